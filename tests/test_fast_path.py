"""The fast path against the straightforward one (a second implementation of the same function) and the
golden fixtures, on CPU and, where a GPU is present, on CUDA."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from config import load_config
from models import build_model
from models.dfvt import DFvT, batch_norm
from tests.golden import fixture_input, load_fixture_weights, relative_error

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def config_path(variant: str) -> str:
    return str(ROOT / "configs" / f"{variant}.yaml")


def fixture_model(variant: str, fast: bool = True, opts: list[str] | None = None) -> DFvT:
    """``variant`` with the fixture weights (non-trivial BatchNorm statistics, biases and bias tables), float64."""
    opts = list(opts or []) + ["MODEL.DFVT.FAST_PATH", str(fast)]
    return load_fixture_weights(build_model(load_config(config_path(variant), opts))).double()


def fast_and_straightforward(model: DFvT) -> tuple[DFvT, DFvT]:
    """Two copies of ``model`` with the same weights, on the fast and the straightforward path."""
    fast, straight = copy.deepcopy(model), copy.deepcopy(model)
    fast.set_fast_path(True)
    straight.set_fast_path(False)
    return fast, straight


def golden(variant: str) -> torch.Tensor:
    return torch.from_numpy(np.load(FIXTURES / f"dfvt_{variant}_golden_logits.npy"))


def test_build_model_defaults_to_the_fast_path():
    fast = build_model(load_config(config_path("tiny")))
    straight = build_model(load_config(config_path("tiny"), ["MODEL.DFVT.FAST_PATH", "False"]))
    flags = [m.fast_path for m in fast.modules() if hasattr(m, "fast_path")]
    assert len(flags) > 5 and all(flags)
    assert not any(m.fast_path for m in straight.modules() if hasattr(m, "fast_path"))
    assert fast.state_dict().keys() == straight.state_dict().keys()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_golden_logits_float64_on_both_paths(fast):
    model = fixture_model("tiny", fast).eval()
    with torch.no_grad():
        out = model(fixture_input())
    assert relative_error(out, golden("tiny")) < 1e-9


def test_golden_logits_float32_fast_path():
    model = fixture_model("small").float().eval()
    with torch.no_grad():
        out = model(fixture_input().float())
    assert out.dtype == torch.float32
    assert relative_error(out, golden("small")) < 1e-4


@pytest.mark.parametrize("variant", ["tiny", "base"])  # base has shifted windows
def test_eval_paths_agree_on_random_input(variant):
    fast, straight = fast_and_straightforward(fixture_model(variant).eval())
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_fast, out_straight = fast(x), straight(x)
    assert relative_error(out_fast, out_straight) < 1e-10


def assert_same_training_step(fast: DFvT, straight: DFvT, x: torch.Tensor, seed: int = 123) -> None:
    """Loss, every parameter gradient and the BatchNorm statistics agree after one forward/backward."""
    target = torch.tensor([3, 7], device=x.device)
    losses = []
    for model in (fast, straight):
        torch.manual_seed(seed)  # same drop-path draws on both paths
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    grads = dict(straight.named_parameters())
    scale = max(p.grad.abs().max().item() for p in grads.values())
    for name, p in fast.named_parameters():
        # Biases in front of a training-mode BatchNorm have zero true gradient: compare on the global scale.
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-9, atol=1e-12 * scale, msg=name)
    buffers = dict(straight.named_buffers())
    for name, b in fast.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-10, atol=1e-14, msg=name)


@pytest.mark.parametrize("variant", ["tiny", "base"])
def test_train_paths_agree_with_drop_path(variant):
    model = fixture_model(variant, opts=["MODEL.DROP_PATH_RATE", "0.3"]).train()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_same_training_step(*fast_and_straightforward(model), x)


def test_eval_mode_gradients_agree():
    # Fine-tuning with frozen BatchNorm statistics differentiates through the folded convolutions.
    model = fixture_model("tiny").eval()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_same_training_step(*fast_and_straightforward(model), x)


def test_fast_path_follows_in_place_parameter_updates():
    # Nothing derived from parameters may be cached: an optimizer step or load_state_dict changes them in place.
    fast, straight = fast_and_straightforward(fixture_model("base").eval())
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        before = fast(x)
        for model in (fast, straight):
            model.layers[0].blocks[1].attn.relative_position_bias_table.mul_(-2.0)
            model.patch_embed.norm.running_var.mul_(3.0)
            model.convlayers[1].conv1x1_1[4].weight.add_(0.5)
        after_fast, after_straight = fast(x), straight(x)
    assert relative_error(after_fast, before) > 1e-3
    assert relative_error(after_fast, after_straight) < 1e-10


def test_fast_path_under_bf16_autocast_is_close_to_float32():
    model = fixture_model("tiny").float().eval()
    x = fixture_input().float()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
    assert relative_error(out.float(), ref) < 5e-2
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fast_path_with_gradient_checkpointing_and_no_head():
    opts = ["MODEL.NUM_CLASSES", "0", "TRAIN.USE_CHECKPOINT", "True", "MODEL.DROP_PATH_RATE", "0.2"]
    model = fixture_model("tiny", opts=opts).train()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    fast, straight = fast_and_straightforward(model)
    outs = []
    for m in (fast, straight):
        torch.manual_seed(5)
        out = m(x)
        out.square().mean().backward()
        outs.append(out)
    assert outs[0].shape == (2, 384)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    grad = dict(straight.named_parameters())["multiresolution_conv.0.3.weight"].grad
    torch.testing.assert_close(dict(fast.named_parameters())["multiresolution_conv.0.3.weight"].grad, grad)


@pytest.mark.parametrize("shape", [(4, 24, 10, 10), (3, 24, 5, 7), (2, 8, 6, 6)], ids=["wide-rows", "odd", "c8"])
def test_channels_last_batch_norm_matches_pytorch(shape):
    # The fast path's own backward for small channel counts (DFvT-T's stem): values, gradients, running statistics.
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, dtype=torch.float64, generator=gen) * 3 + 2).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(shape, dtype=torch.float64, generator=gen)
    ours, reference = torch.nn.BatchNorm2d(shape[1]).double(), torch.nn.BatchNorm2d(shape[1]).double()
    with torch.no_grad():
        for bn in (ours, reference):
            bn.weight.copy_(torch.linspace(0.5, 2.0, shape[1]))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, shape[1]))
    results = []
    for bn, run in ((ours, batch_norm), (reference, lambda t, m: m(t))):
        inp = x.clone().requires_grad_(True)
        out = run(inp, bn)
        results.append((out, *torch.autograd.grad(out, (inp, bn.weight, bn.bias), grad_out)))
    assert type(results[0][0].grad_fn).__name__ == "ChannelsLastBatchNormBackward"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], buffer, rtol=1e-12, atol=0, msg=name)


def test_batch_norm_keeps_pytorch_kernel_elsewhere():
    x = torch.randn(2, 48, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert type(batch_norm(x, torch.nn.BatchNorm2d(48)).grad_fn).__name__.startswith("NativeBatchNorm")
    small = torch.randn(2, 24, 4, 4, requires_grad=True)  # NCHW
    assert type(batch_norm(small, torch.nn.BatchNorm2d(24)).grad_fn).__name__.startswith("NativeBatchNorm")


@pytest.fixture
def no_tf32():
    """Plain fp32 on CUDA: TF32 convolutions/matmuls round to 10 mantissa bits, far above the 1e-4 bound."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@CUDA
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
@pytest.mark.parametrize("variant", ["tiny", "small"])
@pytest.mark.parametrize("dtype,bound", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
def test_golden_logits_on_cuda(variant, fast, dtype, bound, no_tf32):
    model = fixture_model(variant, fast).to("cuda", dtype).eval()
    with torch.no_grad():
        out = model(fixture_input().to("cuda", dtype))
    assert out.dtype == dtype
    assert relative_error(out, golden(variant)) < bound


@CUDA
def test_train_paths_agree_on_cuda(no_tf32):
    model = fixture_model("base", opts=["MODEL.DROP_PATH_RATE", "0.3"]).cuda().train()
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, device="cuda")
    assert_same_training_step(*fast_and_straightforward(model), x)


@CUDA
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_fp16_amp_training_steps_on_cuda(fast):
    torch.manual_seed(0)
    model = build_model(load_config(config_path("tiny"), ["MODEL.DFVT.FAST_PATH", str(fast)])).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(8, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (8,), device="cuda")
    losses, finite_steps = [], 0
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        # GradScaler skips a step whose gradients overflowed; most steps must be finite.
        finite_steps += all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and finite_steps >= 6
    assert losses[-1] < losses[0]
