"""The model against the reference fixtures: state_dict layout, parameter counts, analytic FLOPs, golden logits."""

from __future__ import annotations

import json

import pytest
import torch

from config import load_config
from models import VARIANTS as RELEASED
from models import build_model
from models.complexity import count_parameters, measured_flops
from tests.helpers import (
    FIXTURES,
    ROOT,
    build,
    fixture_input,
    golden_logits,
    load_fixture_weights,
    relative_error,
)

VARIANTS = ["tiny", "small", "base"]


def manifest(variant: str) -> dict:
    return json.loads((FIXTURES / f"dfvt_{variant}_manifest.json").read_text())


@pytest.fixture(scope="module", params=VARIANTS)
def variant_model(request):
    return request.param, build_model(load_config(str(ROOT / "configs" / f"{request.param}.yaml")))


def test_config_matches_manifest(variant_model):
    variant, model = variant_model
    ref = manifest(variant)["config"]
    cfg = load_config(str(ROOT / "configs" / f"{variant}.yaml"))
    m = cfg.MODEL.DFVT
    assert (m.EMBED_DIM, list(m.DEPTHS), list(m.NUM_HEADS)) == (ref["embed_dim"], ref["depths"], ref["num_heads"])
    assert (m.MLP_RATIO, m.WINDOW_SIZE, m.PATCH_SIZE) == (ref["mlp_ratio"], ref["window_size"], ref["patch_size"])
    assert (cfg.MODEL.DROP_PATH_RATE, cfg.DATA.IMG_SIZE, cfg.MODEL.NUM_CLASSES) == (
        ref["drop_path_rate"],
        ref["img_size"],
        ref["num_classes"],
    )


def test_state_dict_equals_manifest(variant_model):
    variant, model = variant_model
    expected = [tuple(entry[:1]) + (tuple(entry[1]), entry[2]) for entry in manifest(variant)["state_dict"]]
    actual = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    missing = sorted({e[0] for e in expected} - {a[0] for a in actual})
    unexpected = sorted({a[0] for a in actual} - {e[0] for e in expected})
    assert not missing and not unexpected, f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    assert sorted(actual) == sorted(expected)


def test_manifest_state_dict_loads_strictly(variant_model):
    variant, model = variant_model
    state = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, shape, dtype in manifest(variant)["state_dict"]}
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_trainable_parameter_count(variant_model):
    variant, model = variant_model
    assert count_parameters(model) == manifest(variant)["trainable_params"]


def test_analytic_flops(variant_model):
    variant, model = variant_model
    expected = manifest(variant)["analytic_gflops"] * 1e9
    assert model.flops() == pytest.approx(expected, rel=1e-6)


def test_measured_flops_counts_convolutions_and_matmuls():
    # Closed form: a 1x1 conv 3->8 on 4x4 then a linear 8->5 on the pooled vector, 2 FLOPs per MAC.
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5)
    )
    assert measured_flops(net, img_size=4) == 2 * (3 * 8 * 16 + 8 * 5)


def test_measured_flops_are_the_same_on_both_paths():
    # The fast path's eval attention is one CPU attention kernel; it must count like the straightforward matmuls.
    fast = measured_flops(build("base"), 224)
    assert fast == measured_flops(build("base", "MODEL.DFVT.FAST_PATH", "False"), 224)


def test_measured_flops_of_tiny_is_in_range_of_analytic():
    model = build_model(load_config(str(ROOT / "configs" / "tiny.yaml")))
    measured = measured_flops(model, 224)
    # The hand count undercounts the stem; the profiler counts 2 per MAC: the ratio is about 2.25.
    assert 1.8 < measured / model.flops() < 2.8


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_golden_logits_float64(variant):
    model = load_fixture_weights(build_model(load_config(str(ROOT / "configs" / f"{variant}.yaml"))))
    model = model.double().eval()
    ref = golden_logits(variant)
    with torch.no_grad():
        out = model(fixture_input())
    assert out.dtype == torch.float64 and out.shape == ref.shape
    assert relative_error(out, ref) < 1e-9


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_golden_logits_float32(variant):
    model = load_fixture_weights(build_model(load_config(str(ROOT / "configs" / f"{variant}.yaml")))).eval()
    ref = golden_logits(variant)
    with torch.no_grad():
        out = model(fixture_input().float())
    assert out.dtype == torch.float32
    assert relative_error(out, ref) < 1e-4


def test_golden_logits_detect_a_wrong_weight():
    # The fixture comparison is sensitive: perturbing one gate weight breaks the 1e-9 bound.
    model = load_fixture_weights(build_model(load_config(str(ROOT / "configs" / "tiny.yaml")))).double().eval()
    with torch.no_grad():
        model.layers[2].blocks[1].select.fc_spatial[1].weight.mul_(1.001)
        out = model(fixture_input())
    assert relative_error(out, golden_logits("tiny")) > 1e-9


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_paper_figures_table_matches_the_fixtures_and_configs(variant):
    released = RELEASED[f"dfvt_{variant}"]
    ref = manifest(variant)
    assert released.params == ref["trainable_params"]
    assert released.gflops == pytest.approx(ref["analytic_gflops"], rel=1e-12)
    assert released.config_path == ROOT / "configs" / f"{variant}.yaml"
    # The config files' header comments quote the same figures.
    header = released.config_path.read_text().splitlines()[0]
    expected = f"{released.params / 1e6:.2f} M parameters, {released.gflops:.2f} analytic GFLOPs, {released.top1} top-1"
    assert expected in header


def test_the_readme_table_quotes_the_paper_figures():
    readme = (ROOT / "README.md").read_text()
    for released in RELEASED.values():
        row = (
            f"| {released.title} | {released.params:,} | {released.gflops:.3f} | {released.top1:.2f} | "
            f"`configs/{released.config}` |"
        )
        assert row in readme, row
