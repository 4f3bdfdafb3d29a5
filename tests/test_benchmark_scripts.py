"""The quick lane's share of benchmarks/: the loader benchmark, the evaluation-pipeline comparison and the recipe
overhead benchmark on tiny inputs, with their arithmetic checked by hand (benchmark.py's runs are in
tests/test_benchmark.py, slow)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import ImageFolder

from benchmarks import eval_pipelines, loader, recipe
from config import load_config
from data import build_transform
from data.dali import import_dali
from errors import ConfigError
from models import build_model
from tests.helpers import ROOT, write_image_folder


def dali_installed() -> bool:
    try:
        import_dali()
    except ConfigError:
        return False
    return True


def test_images_per_second_counts_the_images_of_every_batch(monkeypatch):
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(loader.time, "perf_counter", lambda: next(clock))
    batches = [(torch.zeros(4, 3, 2, 2), None), (torch.zeros(2, 3, 2, 2), None)]
    assert loader._images_per_second(batches) == 3.0  # 6 images in 2 s


def test_loader_benchmark_measures_every_pipeline(tmp_path, capsys):
    figures = loader.main(["--images", "8", "--batch-size", "4", "--repeats", "1", "--json", str(tmp_path / "f.json")])
    columns = ["upstream", "fast (host)", "fast (all on CPU)", *(["dali (CPU)"] if dali_installed() else [])]
    assert list(figures) == ["train", "val"] and all(list(row) == columns for row in figures.values())
    assert all(rate > 0 for row in figures.values() for rate in row.values())
    assert json.loads((tmp_path / "f.json").read_text()) == figures
    out = capsys.readouterr().out
    for split, row in figures.items():  # the table's last column is fast (host) over upstream
        assert f"| {split} | {row['upstream']:.1f} |" in out
        assert f"| {row['fast (host)'] / row['upstream']:.2f}x |" in out


def test_eval_pipelines_figures_equal_a_direct_computation(tmp_path):
    data = write_image_folder(tmp_path / "data", n_val=3, size=(60, 44))
    opts = ["DATA.DATASET", "folder", "DATA.NUM_WORKERS", "0", "DATA.BATCH_SIZE", "4"]
    config = load_config(str(ROOT / "configs/digits.yaml"), [*opts, "DATA.DATA_PATH", str(data)])
    torch.manual_seed(0)
    model = build_model(config, num_classes=3).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    args = ["--cfg", str(ROOT / "configs/digits.yaml"), "--resume", str(tmp_path / "ckpt.pth")]
    figures = eval_pipelines.main([*args, "--data-path", str(data), "--opts", *opts])

    # upstream's pipeline written out: ImageFolder + timm's eval transform, the model in float32
    val = ImageFolder(str(data / "val"), transform=build_transform(False, config))
    images = torch.stack([image for image, _ in val])
    labels = torch.tensor(val.targets)
    with torch.no_grad():
        logits = model(images)
    expected = F.cross_entropy(logits.double(), labels).item()
    assert figures["upstream fp32"]["loss"] == pytest.approx(expected, rel=1e-6)
    assert figures["upstream fp32"]["top1"] == pytest.approx((logits.argmax(1) == labels).double().mean().item() * 100)
    pair = figures["fast fp32 vs upstream fp32"]
    assert pair["loss_diff"] == abs(figures["fast fp32"]["loss"] - figures["upstream fp32"]["loss"])
    assert 0 <= pair["mean_logit_diff"] <= pair["max_logit_diff"] and 0 <= pair["top1_changed"] <= len(val)
    assert figures["upstream bf16 vs upstream fp32"]["max_logit_diff"] > 0  # bf16 does move the logits


def test_recipe_overhead_benchmark_runs_every_option(capsys):
    per_step = recipe.main(["--img-size", "32", "--batch-size", "4", "--steps", "1", "--reps", "1"])
    assert list(per_step) == list(recipe.VARIANTS) and all(t > 0 for t in per_step.values())
    out = capsys.readouterr().out
    assert "| plain |" in out and "| distillation (soft) |" in out and "1.00x" in out
