# The commands of the README: `make demo`, `make test` and `make test-fast`. Both set up .venv/ when needed.
PY      := .venv/bin/python
STAMP   := .venv/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast sweep-demo bench-init bench-accuracy gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first: deepspeed's source build imports it, so it builds without isolation.
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt --no-build-isolation -e '.[scale,dev,track]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m vipamin_scale.cli demo

test: $(STAMP)
	$(PY) -m pytest -q

# The unit tests only (under 3 min on 2 cores): what is marked `slow` (starts processes, trains end to
# end, or takes over 10 s) is left to `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf .venv

# A small prompt-length study on CPU: the tiny random ViT (model=vit_test_d64, 32 px) on 256
# digits images, shallow and deep prompts of length 1, 4, 8, random vs VIPAMIN init (12 runs,
# a Hydra multirun), then `vipamin-scale report`: $(SWEEP_DIR)/report.md, report.csv, *.png. A re-run
# continues or reuses the runs already in $(SWEEP_DIR) (train.resume=true).
SWEEP_DIR ?= multirun/sweep-demo
sweep-demo: $(STAMP)
	$(PY) -m vipamin_scale.cli train -m model=vit_test_d64 model.pool=mean data.max_train_samples=256 \
	  data.batch_size=32 train.epochs=3 train.lr=0.5 train.warmup_epochs=0.5 train.progress=false \
	  init.num_images=64 init.k=2 prompt=shallow,deep prompt.length=1,4,8 init=random,vipamin train.resume=true \
	  hydra.sweep.dir=$(SWEEP_DIR)
	$(PY) -m vipamin_scale.cli report $(SWEEP_DIR)

# The accuracy study (`vipamin-scale study study=accuracy`): every initializer at its own lr selected on val,
# the demo backbone at 112 px, 1/2/4/8-shot, 5/5/20/20 paired draws, a convergence gate; writes
# benchmarks/results/accuracy.json and plots, demo_preset.json and its RESULTS.md section
# (a GPU machine: benchmarks/device_studies.sh; days on 2 CPU cores).
bench-accuracy: $(STAMP)
	$(PY) benchmarks/accuracy.py

bench-init: $(STAMP)
	$(PY) benchmarks/bench_init.py

# GPU readiness in one run (<= 8 min on one H200): correctness on CUDA (engines x fp32/bf16, NCCL init,
# DALI mixed), ViT-H/14 throughput and MFU vs a bare timm loop, the initializer at B=256, loaders;
# writes benchmarks/results/gpu.json and the gpu-check section of benchmarks/RESULTS.md.
# Without a GPU it says so and exits 2 (`benchmarks/gpu_check.py --smoke` is the CPU smoke run).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py
