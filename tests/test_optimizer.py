"""optimizer.py: the upstream parameter groups (2x conv branch, no decay on 1-D/bias) and the optimizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from config import get_default_config, load_config
from errors import ConfigError
from models import build_model
from optimizer import build_optimizer, parameter_groups
from tests.helpers import group_of
from utils import strip_wrapper_prefixes

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return build_model(load_config(str(ROOT / "configs" / "tiny.yaml")))


class Wrapper(nn.Module):
    """Stands in for DDP: holds the model as ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def expected_classes(model: nn.Module) -> dict[str, tuple[bool, bool]]:
    """Independent classification: name -> (conv branch, decayed), by module name and tensor shape."""
    out = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        conv = top in {"convlayers", "multiresolution_conv"}
        leaf = name.rsplit(".", 1)[-1]
        decayed = len(p.shape) >= 2 and leaf != "bias"
        out[name] = (conv, decayed)
    return out


def config_with(**train) -> object:
    c = get_default_config()
    for k, v in train.items():
        node = c.TRAIN
        *path, leaf = k.split("__")
        for part in path:
            node = node[part]
        node[leaf] = v
    c.freeze()
    return c


def test_every_trainable_parameter_once_with_the_upstream_rules(model):
    groups = parameter_groups(model, weight_decay=0.05, conv_lr_scale=2.0)
    ids = group_of(groups)
    named = dict(model.named_parameters())
    assert len(ids) == len(named)
    expected = expected_classes(model)
    for name, p in named.items():
        g = ids[id(p)]
        conv, decayed = expected[name]
        assert g.get("lr_scale", 1.0) == (2.0 if conv else 1.0), name
        assert g["weight_decay"] == (0.05 if decayed else 0.0), name
    # the counts per group match the independent classification
    counts = {(g.get("lr_scale", 1.0) == 2.0, g["weight_decay"] > 0): len(g["params"]) for g in groups}
    for key in counts:
        assert counts[key] == sum(1 for v in expected.values() if v == key)
    assert len(groups) == 4 and all(counts.values())
    # the deliberate upstream detail: the 2-D relative position bias tables are decayed
    tables = [p for n, p in named.items() if n.endswith("relative_position_bias_table")]
    assert tables and all(ids[id(p)]["weight_decay"] == 0.05 for p in tables)
    # sanity of the independent classification itself
    assert any(n.startswith("multiresolution_conv.") for n in named) and any(n.startswith("convlayers.") for n in named)
    assert ids[id(model.head.weight)]["weight_decay"] == 0.05 and ids[id(model.head.bias)]["weight_decay"] == 0.0
    assert "lr_scale" not in ids[id(model.layers[0].blocks[0].attn.qkv.weight)]


def test_frozen_parameters_are_skipped_and_empty_groups_dropped():
    m = nn.Module()
    m.head = nn.Linear(4, 2)
    m.convlayers = nn.ModuleList([nn.Conv2d(2, 2, 1, bias=False)])
    m.head.bias.requires_grad_(False)
    groups = parameter_groups(m, 0.1, 2.0)
    assert [(len(g["params"]), g["weight_decay"], g.get("lr_scale")) for g in groups] == [
        (1, 0.1, None),
        (1, 0.1, 2.0),
    ]


@pytest.mark.parametrize("prefixes", [["module"], ["_orig_mod"], ["module", "_orig_mod"], ["_orig_mod", "module"]])
def test_wrapper_prefixes_are_ignored(model, prefixes):
    wrapped: nn.Module = model
    for attr in reversed(prefixes):
        outer = Wrapper(wrapped)
        if attr != "module":
            outer._modules[attr] = outer._modules.pop("module")
        wrapped = outer
    names = [n for n, _ in wrapped.named_parameters()]
    assert names[0].startswith(".".join(prefixes) + ".")
    plain = [(len(g["params"]), g["weight_decay"], g.get("lr_scale")) for g in parameter_groups(model, 0.05, 2.0)]
    wrapped_groups = parameter_groups(wrapped, 0.05, 2.0)
    assert [(len(g["params"]), g["weight_decay"], g.get("lr_scale")) for g in wrapped_groups] == plain


def test_bias_by_name_and_low_dimensional_by_shape():
    m = nn.Module()
    m.extra = nn.Module()
    m.extra.bias = nn.Parameter(torch.zeros(3, 3))  # 2-D but named .bias: no decay
    m.extra.gain = nn.Parameter(torch.zeros(()))  # 0-D: no decay
    m.extra.table = nn.Parameter(torch.zeros(3, 3))  # 2-D: decayed
    groups = parameter_groups(m, 0.1, 2.0)
    ids = group_of(groups)
    assert ids[id(m.extra.bias)]["weight_decay"] == 0.0 and ids[id(m.extra.gain)]["weight_decay"] == 0.0
    assert ids[id(m.extra.table)]["weight_decay"] == 0.1
    assert all("lr_scale" not in g for g in groups)


def test_strip_wrapper_prefixes():
    assert strip_wrapper_prefixes("module._orig_mod.convlayers.0.x") == "convlayers.0.x"
    assert strip_wrapper_prefixes("layers.0.module.weight") == "layers.0.module.weight"


def test_adamw_hyper_parameters_and_lrs(model):
    c = config_with(
        BASE_LR=1e-3, WEIGHT_DECAY=0.05, CONV_LR_SCALE=2.0, OPTIMIZER__EPS=1e-7, OPTIMIZER__BETAS=(0.8, 0.9)
    )
    opt = build_optimizer(c, model)
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert g["eps"] == 1e-7 and tuple(g["betas"]) == (0.8, 0.9)
        assert g["initial_lr"] == 1e-3
        assert g["lr"] == pytest.approx(1e-3 * g.get("lr_scale", 1.0))
        assert g["fused"]  # the fused kernel also runs on CPU
    assert sorted(g.get("lr_scale", 1.0) for g in opt.param_groups) == [1.0, 1.0, 2.0, 2.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_sgd_hyper_parameters(model):
    c = config_with(BASE_LR=0.1, OPTIMIZER__NAME="sgd", OPTIMIZER__MOMENTUM=0.8, WEIGHT_DECAY=1e-4)
    opt = build_optimizer(c, model)
    assert isinstance(opt, torch.optim.SGD)
    for g in opt.param_groups:
        assert g["momentum"] == 0.8 and g["nesterov"] is True
        assert g["weight_decay"] in (1e-4, 0.0)
        assert g["lr"] == pytest.approx(0.1 * g.get("lr_scale", 1.0))


def test_optimizer_steps():
    """A real step runs with the groups (AdamW, CPU)."""
    small = nn.Module()
    small.convlayers = nn.ModuleList([nn.Linear(3, 3)])
    small.head = nn.Linear(3, 1)
    opt = build_optimizer(config_with(), small)
    loss = small.head(small.convlayers[0](torch.ones(2, 3))).sum()
    loss.backward()
    before = small.head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, small.head.weight)


def test_unknown_optimizer_is_named(model):
    with pytest.raises(ConfigError, match=r"TRAIN\.OPTIMIZER\.NAME 'lamb' must be one of adamw, sgd"):
        build_optimizer(load_config(None, ["TRAIN.OPTIMIZER.NAME", "lamb"]), model)
    assert issubclass(ConfigError, ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_adamw_on_cuda():
    m = nn.Linear(4, 4).cuda()
    opt = build_optimizer(config_with(), m)
    assert all(g["fused"] for g in opt.param_groups)
    m(torch.ones(2, 4, device="cuda")).sum().backward()
    opt.step()
