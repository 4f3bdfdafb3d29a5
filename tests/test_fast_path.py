"""The fast path against the straightforward one (a second implementation of the same function) and the
golden fixtures, on CPU and, where a GPU is present, on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.dfvt import ConvStack, DFvT, WindowAttention, space_to_depth
from models.fast_ops import conv_stack
from tests.helpers import build, fixture_input, golden_logits, load_fixture_weights, relative_error

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SLOW = pytest.mark.slow


def fixture_model(variant: str, fast: bool = True, opts: list[str] | None = None) -> DFvT:
    """``variant`` with the fixture weights (non-trivial BatchNorm statistics, biases and bias tables), float64."""
    opts = list(opts or []) + ["MODEL.DFVT.FAST_PATH", str(fast)]
    return load_fixture_weights(build(variant, *opts)).double()


def fast_and_straightforward(variant: str, opts: list[str] | None = None, train: bool = False) -> tuple[DFvT, DFvT]:
    """``variant`` built on the fast and on the straightforward path, with the same fixture weights."""
    models = fixture_model(variant, True, opts), fixture_model(variant, False, opts)
    return tuple(m.train(train) for m in models)


def switches(model: DFvT) -> list[bool]:
    """The ``fast_path`` flags of the layers that have a fast computation."""
    return [m.fast_path for m in model.modules() if isinstance(m, (ConvStack, WindowAttention))]


def test_build_model_defaults_to_the_fast_path():
    fast = build("tiny")
    straight = build("tiny", "MODEL.DFVT.FAST_PATH", "False")
    assert len(switches(fast)) == 1 + 4 * 3 + 3 + 5  # stem, 3 stacks per branch, 3 projections, 5 attentions
    assert all(switches(fast)) and not any(switches(straight))
    assert fast.state_dict().keys() == straight.state_dict().keys()


@pytest.mark.parametrize("channels_last", [False, True])
def test_space_to_depth_is_the_paper_order(channels_last):
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    by_definition = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], 1)
    out = space_to_depth(x)
    assert out.shape == (2, 20, 3, 4) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, by_definition)


def test_conv_stack_never_changes_the_callers_tensor():
    # SiLU runs in place only on the stack's own intermediates; Identity returns its input unchanged.
    x = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.no_grad():
        out = conv_stack(x, [nn.Identity(), nn.SiLU()])
    assert torch.equal(x, before) and torch.equal(out, F.silu(before))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_golden_logits_float64_on_both_paths(fast):
    model = fixture_model("tiny", fast).eval()
    with torch.no_grad():
        out = model(fixture_input())
    assert relative_error(out, golden_logits("tiny")) < 1e-9


def test_golden_logits_float32_fast_path():
    model = fixture_model("small").float().eval()
    with torch.no_grad():
        out = model(fixture_input().float())
    assert out.dtype == torch.float32
    assert relative_error(out, golden_logits("small")) < 1e-4


@pytest.mark.parametrize("variant", ["tiny", pytest.param("base", marks=SLOW)])  # base has shifted windows
def test_eval_paths_agree_on_random_input(variant):
    fast, straight = fast_and_straightforward(variant)
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


@pytest.mark.parametrize("variant", ["tiny", pytest.param("base", marks=SLOW)])
def test_train_paths_agree_with_drop_path(variant):
    models = fast_and_straightforward(variant, ["MODEL.DROP_PATH_RATE", "0.3"], train=True)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert_same_training_step(*models, x)


def test_eval_mode_gradients_agree():
    # Fine-tuning with frozen BatchNorm statistics differentiates through the folded convolutions.
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_same_training_step(*fast_and_straightforward("tiny"), x)


@SLOW
def test_fast_path_follows_in_place_parameter_updates():
    # Nothing derived from parameters may be cached: an optimizer step or load_state_dict changes them in place.
    fast, straight = fast_and_straightforward("base")
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
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    fast, straight = fast_and_straightforward("tiny", opts, train=True)
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
    assert relative_error(out, golden_logits(variant)) < bound


@CUDA
def test_train_paths_agree_on_cuda(no_tf32):
    models = fast_and_straightforward("base", ["MODEL.DROP_PATH_RATE", "0.3"], train=True)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64, device="cuda")
    assert_same_training_step(*(m.cuda() for m in models), x)


@CUDA
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "straightforward"])
def test_fp16_amp_training_steps_on_cuda(fast):
    torch.manual_seed(0)
    model = build("tiny", "MODEL.DFVT.FAST_PATH", str(fast)).cuda().train()
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
