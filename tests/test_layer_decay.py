"""optimizer.py: layer-wise LR decay (``TRAIN.LAYER_DECAY``, Swin's fine-tuning groups) on top of the upstream groups.

The expected multipliers are derived here from the parameter names and the configured depths, with Swin's formula
written out: the stem is layer 0, the transformer blocks are numbered 1..n in order across stages, a stage's
down-sampling layer shares its last block's id, the convolutional branch of stage i shares the id of stage i's first
block, and the final norm and head are layer n + 1; the multiplier is ``decay ** (n + 1 - id)``, times the conv
branch's 2x, and the weight decay is the upstream rule (none for 1-D parameters and biases).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from config import load_config
from errors import ConfigError
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer, parameter_groups
from tests.helpers import config_path, group_of

WD, CONV = 0.05, 2.0


def make_config(variant: str = "tiny", *opts: str):
    return load_config(config_path(variant), ["TRAIN.WEIGHT_DECAY", str(WD), "TRAIN.CONV_LR_SCALE", str(CONV), *opts])


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return build_model(make_config("tiny"))


def expected_layer_id(name: str, depths: list[int]) -> int:
    """Swin's layer id of a DFvT parameter, from its name (written independently of optimizer.py)."""
    parts = name.split(".")
    n = sum(depths)
    if parts[0] in ("patch_embed", "absolute_pos_embed"):
        return 0
    if parts[0] in ("norm", "head"):
        return n + 1
    stage = int(parts[1])
    blocks_before = sum(depths[:stage])
    if parts[0] == "layers" and parts[2] == "blocks":
        return blocks_before + int(parts[3]) + 1
    if parts[0] == "layers" and parts[2] == "downsample":
        return blocks_before + depths[stage]  # the stage's last block
    if parts[0] in ("convlayers", "multiresolution_conv"):
        return blocks_before + 1  # the stage's first block
    raise AssertionError(f"the test does not know {name}")


def expected_group(name: str, param: torch.Tensor, depths: list[int], decay: float) -> tuple[float, float]:
    """(LR multiplier, weight decay) of a parameter: conv 2x × decay ** (n + 1 - id); no decay for 1-D and biases."""
    conv = CONV if name.split(".")[0] in ("convlayers", "multiresolution_conv") else 1.0
    scale = conv * decay ** (sum(depths) + 1 - expected_layer_id(name, depths))
    wd = 0.0 if param.dim() <= 1 or name.split(".")[-1] == "bias" else WD
    return scale, wd


@pytest.mark.parametrize("decay", [0.9, 0.75])
@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_layer_decay_groups_match_swins_formula(variant, decay):
    config = make_config(variant, "TRAIN.LAYER_DECAY", str(decay), "TRAIN.BASE_LR", "1e-3")
    depths = list(config.MODEL.DFVT.DEPTHS)
    model = build_model(config)
    opt = build_optimizer(config, model)
    groups = opt.param_groups
    owner = group_of(groups)
    named = dict(model.named_parameters())
    assert len(owner) == len(named)  # every parameter in exactly one group
    for name, p in named.items():
        scale, wd = expected_group(name, p, depths, decay)
        g = owner[id(p)]
        assert g["lr_scale"] == pytest.approx(scale, rel=1e-12), name
        assert g["weight_decay"] == wd, name
        assert g["initial_lr"] == 1e-3 and g["lr"] == pytest.approx(1e-3 * scale, rel=1e-12), name
    # one group per (multiplier, weight decay), none empty, in ascending multiplier order (decayed first)
    keys = [(g["lr_scale"], g["weight_decay"]) for g in groups]
    assert len(set(keys)) == len(keys) and all(g["params"] for g in groups)
    assert keys == sorted(keys, key=lambda k: (k[0], -k[1]))
    expected_keys = {(round(s, 12), w) for s, w in (expected_group(n, p, depths, decay) for n, p in named.items())}
    assert {(round(s, 12), w) for s, w in keys} == expected_keys
    # the ends of the ladder: head at the full LR, the stem the lowest; the last conv branch at its stage's first block
    assert owner[id(model.head.weight)]["lr_scale"] == 1.0
    stem = owner[id(model.patch_embed.proj1.weight)]["lr_scale"]
    assert stem == pytest.approx(decay ** (sum(depths) + 1)) and stem == min(k[0] for k in keys)
    last_conv = owner[id(model.convlayers[-1].conv1[0].weight)]["lr_scale"]
    assert last_conv == pytest.approx(CONV * decay ** depths[-1])


def test_dfvt_tiny_layer_table(tiny):
    """The ids for DFvT-T (depths 1, 1, 2, 1), spelled out per module."""
    table = {
        "patch_embed": 0,
        "layers.0.blocks.0": 1, "convlayers.0": 1, "multiresolution_conv.0": 1, "layers.0.downsample": 1,
        "layers.1.blocks.0": 2, "convlayers.1": 2, "multiresolution_conv.1": 2, "layers.1.downsample": 2,
        "layers.2.blocks.0": 3, "convlayers.2": 3, "multiresolution_conv.2": 3,
        "layers.2.blocks.1": 4, "layers.2.downsample": 4,
        "layers.3.blocks.0": 5, "convlayers.3": 5,
        "norm": 6, "head": 6,
    }  # fmt: skip
    owner = group_of(parameter_groups(tiny, WD, CONV, 0.9))
    covered = set()
    for name, p in tiny.named_parameters():
        module = max((m for m in table if name.startswith(m + ".")), key=len)
        covered.add(module)
        conv = CONV if name.startswith(("convlayers.", "multiresolution_conv.")) else 1.0
        assert owner[id(p)]["lr_scale"] == pytest.approx(conv * 0.9 ** (6 - table[module])), name
    assert covered == set(table)
    # the DANE gate goes with its block
    assert owner[id(tiny.layers[2].blocks[1].select.fc_spatial[1].weight)]["lr_scale"] == pytest.approx(0.81)


def test_absolute_position_embedding_is_stem():
    model = build_model(make_config("tiny", "MODEL.DFVT.APE", "True"))
    owner = group_of(parameter_groups(model, WD, CONV, 0.5))
    assert owner[id(model.absolute_pos_embed)]["lr_scale"] == pytest.approx(0.5**6)
    assert owner[id(model.absolute_pos_embed)]["weight_decay"] == WD  # 3-D: decayed by the upstream rule


def test_layer_decay_one_gives_the_upstream_groups(tiny):
    def summary(groups):
        return [(len(g["params"]), g["weight_decay"], g.get("lr_scale")) for g in groups]

    upstream = parameter_groups(tiny, WD, CONV)
    assert summary(parameter_groups(tiny, WD, CONV, 1.0)) == summary(upstream)
    assert [g.get("lr_scale") for g in upstream] == [None, None, CONV, CONV]
    opt = build_optimizer(make_config("tiny", "TRAIN.LAYER_DECAY", "1.0"), tiny)
    assert summary(opt.param_groups) == summary(upstream)
    # a model of another layout is fine while layer decay is off
    other = nn.Sequential(nn.Linear(2, 2))
    assert summary(parameter_groups(other, WD, CONV, 1.0)) == [(1, WD, None), (1, 0.0, None)]


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan")])
def test_out_of_range_decay_is_a_config_error(tiny, bad):
    config = make_config("tiny")
    config.defrost()
    config.TRAIN.LAYER_DECAY = bad
    config.freeze()
    with pytest.raises(ConfigError, match=r"TRAIN\.LAYER_DECAY"):
        build_optimizer(config, tiny)


def test_unknown_parameter_raises_naming_it():
    model = build_model(make_config("tiny"))
    model.extra = nn.Linear(2, 2)
    with pytest.raises(ConfigError, match=r"TRAIN\.LAYER_DECAY.*'extra\.weight'"):
        parameter_groups(model, WD, CONV, 0.9)


class Wrapper(nn.Module):
    """Stands in for DDP: holds the model as ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_frozen_skipped_and_wrapper_prefixes_ignored():
    model = build_model(make_config("tiny"))
    for p in model.layers[0].blocks[0].parameters():
        p.requires_grad_(False)
    plain = parameter_groups(model, WD, CONV, 0.9)
    wrapped = parameter_groups(Wrapper(model), WD, CONV, 0.9)
    assert [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in wrapped] == [
        (g["lr_scale"], g["weight_decay"], len(g["params"])) for g in plain
    ]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in plain) == len(trainable)
    # the frozen block still counts: the next stage keeps its id (2), so its multiplier is 0.9 ** 4
    owner = group_of(plain)
    assert owner[id(model.layers[1].blocks[0].attn.qkv.weight)]["lr_scale"] == pytest.approx(0.9**4)


def unscaled_lr(name: str, t: int, base: float, warm: float, low: float, warm_t: int, total_t: int) -> float:
    """The schedule's value for a group of multiplier 1 after ``t`` optimizer steps (formulas written out)."""
    if t < warm_t:
        return warm + t * (base - warm) / warm_t
    frac = (t - warm_t) / (total_t - warm_t)
    if name == "cosine":
        return low + 0.5 * (base - low) * (1 + math.cos(math.pi * min(frac, 1.0)))
    return base + (low - base) * min(frac, 1.0)


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_scheduler_honours_each_groups_multiplier(tiny, name):
    base, warm, low, epochs, warmup, spe = 1e-3, 1e-6, 1e-5, 10, 2, 5
    config = make_config(
        "tiny",
        "TRAIN.LAYER_DECAY", "0.8", "TRAIN.BASE_LR", str(base), "TRAIN.WARMUP_LR", str(warm),
        "TRAIN.MIN_LR", str(low), "TRAIN.EPOCHS", str(epochs), "TRAIN.WARMUP_EPOCHS", str(warmup),
        "TRAIN.LR_SCHEDULER.NAME", name,
    )  # fmt: skip
    opt = build_optimizer(config, tiny)
    sched = build_scheduler(config, opt, spe)
    scales = [g["lr_scale"] for g in opt.param_groups]
    assert len(set(scales)) > 8  # many distinct multipliers
    for t in [0, 1, 4, 10, 11, 27, 49, 50, 53]:
        if t:
            sched.step_update(t)
        value = unscaled_lr(name, t, base, warm, low, warmup * spe, epochs * spe)
        for g, scale in zip(opt.param_groups, scales, strict=True):
            assert g["lr_scale"] == scale  # the scheduler leaves the multiplier alone
            assert g["lr"] == pytest.approx(value * scale, rel=1e-9), (t, scale)


def test_step_scheduler_honours_each_groups_multiplier(tiny):
    config = make_config(
        "tiny",
        "TRAIN.LAYER_DECAY", "0.7", "TRAIN.BASE_LR", "1e-3", "TRAIN.WARMUP_EPOCHS", "1",
        "TRAIN.LR_SCHEDULER.NAME", "step", "TRAIN.LR_SCHEDULER.DECAY_EPOCHS", "2",
        "TRAIN.LR_SCHEDULER.DECAY_RATE", "0.5",
    )  # fmt: skip
    opt = build_optimizer(config, tiny)
    sched = build_scheduler(config, opt, 4)
    for t in [4, 7, 12, 21]:
        sched.step_update(t)
        value = 1e-3 * 0.5 ** ((t - 4) // 8)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(value * g["lr_scale"], rel=1e-9), t
