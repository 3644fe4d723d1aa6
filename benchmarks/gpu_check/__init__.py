"""GPU readiness in one prepared run: correctness on CUDA, throughput against the device's limit,
the initializer at size, the loaders. Writes benchmarks/results/gpu.json and the gpu-check section
of benchmarks/RESULTS.md.

    make gpu-check                                    # on a GPU machine, at most 9 minutes (--budget-s 540)
    python benchmarks/gpu_check.py [--budget-s 540]   # the same
    python benchmarks/gpu_check.py --only step,engines  # some sections; gpu.json keeps the others' figures
    python benchmarks/gpu_check.py --smoke [--out DIR]  # the same code paths on CPU, tiny sizes (~6 min here):
                                                      # DIR/gpu.json, DIR/RESULTS.md (default: a new tmp dir)

Without a GPU and without --smoke: one line saying so, exit 2.

The code: one module per section (gpu_check/<section>.py, each a `run(rec, ctx)`), one runner
(gpu_check/runner.py), shared helpers (common.py, measure.py), the report (report.py);
benchmarks/gpu_check.py is the entry. Sections, each in its own process (killed at its time cap, so one
hang cannot eat the budget; a failure is recorded with its one-line message and where it happened, and the next
section runs). gpu.json and RESULTS.md are rewritten after every section, so a run killed from
outside still leaves what it measured. They run in common.SECTIONS' order: issue 24's targets first
(env, step, engines, fewshot, packed, init_size, dali, data), then the 2026-11 checks (train, init, throughput).

  env         device, driver, torch / CUDA / cuDNN / NCCL, DeepSpeed, DALI, timm versions.
  step        issue 24's step at ViT-H/14, P=10 deep, batch 64 (ddp): the bare timm loop, fp32 weights under
              bf16 autocast, the backbone stored in bf16 (model.dtype=bf16), each with train.compile on/off.
  engines     the same step under fsdp2 (bf16 MixedPrecisionPolicy) and the tuned ZeRO-3, at world 1 in a
              1-rank group, against ddp, model.dtype fp32 and bf16.
  fewshot     the few-shot step (the demo backbone's shape, 112 px, batch 10): steps/s as the loop runs it
              today (fp32, a host sync per step) and with bf16 storage, compile, no sync.
  packed      issues 22 and 33: the accuracy benchmark's 4-shot workload (demo shape, random weights, 112 px,
              batch 10, 80 steps, val + test) as runs/hour of 14 processes of one run each against packs of
              K = 1..64 in one process; per layout the real loop's step time (loader -> device -> step) and
              images/s, peak GPU memory per run; accuracies equal to the solo runs'. Then pack_size=auto's K
              for the workload (pack_memory.auto_pack_size) and the measured peak of a pack of that K.
  init_size   (also) the per-layer math on the GPU in float64 against the CPU's, within 1e-10, and its time.
  train       `vipamin-scale train` (the CLI, tiny model, a few steps) under engine=ddp, zero2 and
              zero3 with activation checkpointing, each in fp32 and bf16, all at once; every loss
              finite, fp32 loss curves equal to the CPU DDP fp32 run's, bf16 close to fp32's.
  init        the sharded initializer (VIPAMIN-Deep, tiny model): run_init without a process group
              (the CPU reference); run_init in a 1-rank NCCL group (CPU statistics all-reduced
              through the GPU); `vipamin-scale init` under torchrun at 2 processes on the one GPU
              (NCCL, and gloo when NCCL refuses 2 ranks on one device: recorded); the capture
              pass on the GPU. Prompts equal to the reference.
  dali        the DALI loader (`mixed` decode on the GPU; CPU decode in --smoke) against the
              webdataset loader on the same shards: eval keys equal in order, train keys equal
              as sets; the largest pixel difference is recorded.
  throughput  ViT-H/14 at 224 px, VPT-Deep P=10, frozen backbone, bf16: our step (PromptedViT
              through our Engine: DDP, DeepSpeed ZeRO-3 at world 1) and a bare timm + torch loop
              doing the same math, in one process, with and without activation checkpointing:
              images/s at one batch, MFU, peak CUDA memory, and the largest batch that fits.
              MFU = model FLOPs (forward + backward to the prompts' inputs, counted with
              torch.utils.flop_counter on the bare step; recomputation not counted) x images/s /
              the device's peak dense bf16 FLOP/s (PEAK_BF16; an unknown device gets MFU null).
  init_size   ViT-H/14 VIPAMIN-Deep with B=256 calibration images (synthetic JPEG shards): the
              capture pass on the GPU against the same images' plain forward, the math, peak memory.
  data        images/s at 224 px: DALI `mixed`, DALI CPU, webdataset + PIL (benchmarks/bench_data.py), the
              same CPU threads; dali_mixed / wds_pil (target >= 2). DALI parts are skipped where DALI is not
              installed (benchmarks/dali_to_device.sh brings its wheel to a GPU machine without a registry).
"""
