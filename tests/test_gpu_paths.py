"""The GPU step's paths, tested on the CPU: the frozen backbone's storage dtype (model.dtype), compiled
blocks (train.compile), their rules, and the initializer's math on the run's device."""
from __future__ import annotations

import time

import pytest
import torch

from vipamin_scale.config import ConfigError, default_config, validate


def _model(**overrides):
    from vipamin_scale.models import build_model

    cfg = default_config(model__name="vit_test_d64", model__img_size=32, model__checkpoint=None, prompt__length=4,
                         **overrides)
    torch.manual_seed(0)
    return build_model(cfg, num_classes=10)


def _engine(model, **overrides):
    from vipamin_scale.engine.ddp import DDPEngine

    cfg = default_config(train__weight_decay=0.0, **overrides)
    validate(cfg)
    return DDPEngine(model, cfg, lr=0.01, total_steps=10, warmup_steps=0, device=torch.device("cpu"))


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def _train(engine, steps: int) -> list[float]:
    from vipamin_scale.models.prompted import cross_entropy

    engine.model.train()
    losses = []
    for step in range(steps):
        images, labels = _batch(step)
        loss = cross_entropy(engine.forward(images), labels)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_bf16_backbone_halves_its_bytes_keeps_trainables_fp32_and_follows_fp32(pool):
    """model.dtype=bf16: the engine stores the frozen backbone in bf16 (half its bytes), prompts, head,
    fc_norm, their gradients and AdamW's moments stay fp32; a few steps follow the fp32-stored run under
    bf16 autocast within bf16's tolerance, and the logits reach the loss in fp32."""
    ref_model, model = _model(model__pool=pool), _model(model__pool=pool)
    fp32_bytes = _nbytes(model.backbone)
    ref = _engine(ref_model, train__precision="bf16")
    eng = _engine(model, train__precision="bf16", model__dtype="bf16")
    assert _nbytes(model.backbone) * 2 == fp32_bytes
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    with eng.autocast():
        assert not torch.is_autocast_enabled("cpu")  # the bf16 backbone runs as stored
    with ref.autocast():
        assert torch.is_autocast_enabled("cpu")
    with torch.no_grad():
        assert eng.forward(_batch()[0]).dtype == torch.float32
        # the training loop calls the model as a pack (of one): the same logits, in fp32 (cls pooling
        # once reached the fp32 head in bf16 there)
        from vipamin_scale.models.packed import PromptedPack

        assert torch.equal(PromptedPack([model])(_batch()[0]), model(_batch()[0]))
    losses, ref_losses = _train(eng, 4), _train(ref, 4)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
            state = eng.optimizer.state[p]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32, n
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in ref_model.named_parameters() if p.requires_grad}
    assert ("fc_norm.weight" in trainable) == (pool == "mean")
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 2e-2 * abs(b), (losses, ref_losses)
    assert losses != ref_losses  # really a different path (bf16 residual stream, no autocast)


def test_bf16_storage_needs_bf16_precision():
    for precision in ("fp32", "fp16"):
        with pytest.raises(ConfigError, match=r"^model.dtype: a bf16-stored backbone computes in bf16; "
                                              rf"set train.precision=bf16 \(got train.precision={precision}\)"):
            validate(default_config(model__dtype="bf16", train__precision=precision))
    validate(default_config(model__dtype="bf16", train__precision="bf16"))


def test_compile_only_for_ddp_and_fsdp2():
    for name in ("deepspeed", "fairscale"):
        with pytest.raises(ConfigError, match=rf"^train.compile: compiled blocks are built for engine.name=ddp "
                                              rf"or fsdp2 \(got {name},"):
            validate(default_config(train__compile=True, engine__name=name))


@pytest.mark.slow
def test_training_prompts_do_not_depend_on_the_backbone_dtype(tmp_path, digits_root):
    """The initializer runs on the fp32 backbone before the engine casts it: the VIPAMIN prompts a bf16
    run writes equal the fp32 run's bit for bit (its figures do not change)."""
    from safetensors.torch import load_file

    import vipamin_scale

    from conftest import TINY

    prompts = {}
    for dtype in ("fp32", "bf16"):
        cfg = vipamin_scale.compose([*TINY, "init=vipamin", "init.num_images=32", "train.epochs=1",
                                     "data.max_train_samples=32", "train.test_at_end=false",
                                     "train.precision=bf16", f"model.dtype={dtype}",
                                     f"hydra.run.dir={tmp_path / dtype}"])
        vipamin_scale.train(cfg)
        prompts[dtype] = load_file(tmp_path / dtype / "prompts.safetensors")
    assert prompts["fp32"].keys() == prompts["bf16"].keys()
    for key in prompts["fp32"]:
        assert torch.equal(prompts["fp32"][key], prompts["bf16"][key]), key


@pytest.mark.slow
def test_compiled_blocks_equal_eager_within_fp32_round_off(capsys):
    """train.compile=true: the blocks are compiled in place (names unchanged), and two training
    steps give eager's losses and trained prompts within fp32 round-off (inductor fuses and reorders)."""
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    e_eager = _engine(eager)
    t = time.perf_counter()
    e_comp = _engine(compiled, train__compile=True)
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in eager.named_parameters()]
    losses = _train(e_comp, 2)
    compile_s = time.perf_counter() - t
    ref = _train(e_eager, 2)
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (losses, ref)
    torch.testing.assert_close(compiled.prompt.prompts, eager.prompt.prompts, rtol=1e-5, atol=1e-6)
    with capsys.disabled():
        print(f"\n[compile] tiny ViT (d=64, 2 blocks): build + 2 compiled steps {compile_s:.1f} s on this CPU")


def test_vipamin_math_on_the_run_device_equals_the_pure_cpu_math():
    """init/run.vipamin_row moves a layer's inputs to the run's device, runs the float64 math there and
    returns CPU tensors (map_layers gathers on the CPU). On the CPU that path gives the pure function's
    numbers exactly; gpu_check compares CUDA with the CPU within 1e-10."""
    import vipamin_scale.init.vipamin as vip
    from vipamin_scale.init.capture import layer_weights
    from vipamin_scale.init.run import vipamin_row

    model = _model()
    icfg = default_config(init__method="vipamin", init__k=2).init
    L_p, P, d = model.prompt_shape
    N_p, d_h = model.backbone.patch_embed.num_patches, d // model.backbone.blocks[0].attn.num_heads
    g = torch.Generator().manual_seed(3)
    means = {"E": {1: torch.randn(N_p, d, generator=g, dtype=torch.float64)},
             "K": {1: torch.randn(P + N_p, d_h, generator=g, dtype=torch.float64)},
             "S": {1: torch.randn(1 + P + N_p, d, generator=g, dtype=torch.float64)}}
    R = torch.rand(L_p, P, d, generator=g, dtype=torch.float64) - 0.5
    w = layer_weights(model, 1)
    ref = vip.vipamin_layer(E=means["E"][1], K=means["K"][1], R=R[1], W_V=w["W_V"], b_V=w["b_V"], k=2, lam=0.5,
                            S=means["S"][1], Q=None, energy=None, gamma=w["gamma"], beta=w["beta"],
                            official_compat=False, ln_aware=False, orth_scale="match", layer=1, ln_eps=w["ln_eps"])
    for device in (None, torch.device("cpu")):
        out = vipamin_row(icfg, model, means, R, {}, 1, device=device)
        for name in ("prompts", "match", "orth"):
            value = out[name]
            assert value.device.type == "cpu" and value.dtype == torch.float64
            assert torch.equal(value, getattr(ref, name)), name
        assert out["info"] == ref.info


def test_zero3_tuned_for_the_frozen_backbone_and_fsdp2_bf16_policy(tmp_path):
    """ZeRO-3's generated config sizes its knobs in this model's blocks (a user's JSON still wins); fsdp2's
    policy for bf16 gathers and computes in bf16 and reduces in fp32, for fp32 it casts nothing."""
    import json

    from vipamin_scale.engine.deepspeed import deepspeed_config
    from vipamin_scale.engine.fsdp2 import mixed_precision

    model = _model()
    d = model.backbone.embed_dim
    block = sum(p.numel() for p in model.backbone.blocks[0].parameters())
    cfg = default_config(engine__name="deepspeed", engine__zero_stage=3, data__batch_size=32)
    zero = deepspeed_config(cfg, 2, model)["zero_optimization"]
    assert zero == {"stage": 3, "stage3_param_persistence_threshold": d * d, "stage3_prefetch_bucket_size": 2 * block,
                    "stage3_max_live_parameters": 3 * block, "stage3_max_reuse_distance": 2 * block}
    assert deepspeed_config(cfg, 2)["zero_optimization"] == {"stage": 3}  # no model: DeepSpeed's defaults
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cfg.engine.ds_config = str(user)
    assert deepspeed_config(cfg, 2, model)["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    bf16, fp32 = mixed_precision("bf16"), mixed_precision("fp32")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)
