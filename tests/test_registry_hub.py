"""timm registry (models/registry.py), torch.hub entry points (hubconf.py) and the fine-tuning recipe
(configs/finetune.yaml): creation, pretrained configs, safe strict loading of our and upstream files, and importing
the project without changing timm."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

import pytest
import timm
import torch
import yaml
from torch import nn

import hubconf
from checkpoint import atomic_save, load_file
from config import load_config
from errors import CheckpointError, ConfigError
from models import VARIANTS as RELEASED
from models import DFvT, build_model
from tests.helpers import ROOT, SUMMARY, Hostile, check, run, upstream_checkpoint, write_image_folder

VARIANTS = {"dfvt_tiny": "tiny", "dfvt_small": "small", "dfvt_base": "base"}
HEAD = ("head.weight", "head.bias")


def manifest(variant: str) -> dict:
    return json.loads((ROOT / "tests" / "fixtures" / f"{variant}_manifest.json").read_text())


def seeded_tiny(num_classes: int = 1000) -> DFvT:
    """DFvT-T at 32x32 with non-trivial BatchNorm statistics, from a fixed seed."""
    torch.manual_seed(0)
    model = build_model(
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", str(num_classes)])
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """The seeded model, saved in our format and in the upstream format."""
    folder = tmp_path_factory.mktemp("weights")
    model = seeded_tiny()
    ours, upstream = folder / "ours.pth", folder / "upstream.pth"
    atomic_save({"model": model.state_dict(), "epoch": 299, "config": "MODEL:\n  NAME: dfvt_tiny\n"}, str(ours))
    torch.save(upstream_checkpoint(model), upstream)
    return {"state": model.state_dict(), "ours": ours, "upstream": upstream}


def assert_same_weights(model: nn.Module, expected: dict, skip: tuple[str, ...] = ()) -> None:
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        if key not in skip:
            assert torch.equal(state[key], value), key


def assert_fresh_head(model: DFvT, num_classes: int) -> None:
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.weight.shape == (num_classes, model.num_features)
    assert torch.equal(head.bias, torch.zeros(num_classes))  # the initialiser's zero bias
    assert 0.01 < head.weight.std().item() < 0.03  # truncated normal, std 0.02


@pytest.mark.parametrize("variant", VARIANTS)
def test_create_model_matches_manifest_and_config(variant):
    model = timm.create_model(variant)
    assert isinstance(model, DFvT)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest(variant)["trainable_params"]
    arch = load_config(str(ROOT / "configs" / f"{VARIANTS[variant]}.yaml")).MODEL.DFVT
    assert model.embed_dim == arch.EMBED_DIM and [len(s.blocks) for s in model.layers] == list(arch.DEPTHS)
    cfg = model.pretrained_cfg
    assert cfg is model.default_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"]
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["num_classes"] == 1000 and cfg["file"] == f"{variant}.pth"
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == 3
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    data = timm.data.resolve_model_data_config(model)
    assert data["input_size"] == (3, 224, 224) and data["crop_pct"] == 0.875 and data["interpolation"] == "bicubic"


def test_registered_with_timm():
    assert timm.list_models("dfvt_*") == ["dfvt_base", "dfvt_small", "dfvt_tiny"]
    assert timm.is_model_pretrained("dfvt_tiny")
    for name, released in RELEASED.items():  # the entry points' docs quote the paper's figures table
        for entry in (timm.models.model_entrypoint(name), getattr(hubconf, name)):
            assert entry.__doc__.startswith(f"{released.title}: {released.params / 1e6:.2f} M parameters")
            assert f"{released.top1:.2f} % ImageNet-1K top-1" in entry.__doc__


def test_keyword_overrides():
    model = timm.create_model("dfvt_small", num_classes=10, drop_path_rate=0.3, img_size=32)
    assert model.num_classes == 10 and model.get_classifier().out_features == 10
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ConfigError, match="MODEL.DFVT.WINDOW_SIZE 8 windows cannot tile"):
        timm.create_model("dfvt_tiny", window_size=8)  # accepted keyword, but 8x8 windows do not tile 224
    with pytest.raises(TypeError, match="unsupported keyword argument.* window_size"):
        timm.create_model("dfvt_tiny", window=8)
    with pytest.raises(ValueError, match="not square"):
        timm.create_model("dfvt_tiny", img_size=(32, 64))


def test_checkpoint_path_is_timms_own_loader(saved):
    # Our files load with weights_only, so timm's loader reads them strictly.
    model = timm.create_model("dfvt_tiny", img_size=32, checkpoint_path=str(saved["ours"]))
    assert_same_weights(model, saved["state"])
    # Upstream files pickle a yacs config: timm's weights_only read refuses them (the README points to the overlay).
    with pytest.raises(RuntimeError, match="weights_only"):
        timm.create_model("dfvt_tiny", img_size=32, checkpoint_path=str(saved["upstream"]))
    # A head of another size is timm's strict mismatch, not a re-initialisation.
    with pytest.raises(RuntimeError, match="head.weight"):
        timm.create_model("dfvt_tiny", img_size=32, num_classes=10, checkpoint_path=str(saved["ours"]))


def test_checkpoint_path_of_an_ema_run_loads_the_average(saved, tmp_path):
    # timm's loader prefers a checkpoint's model_ema (its use_ema default), as the README says.
    average = {k: v + 1 if v.is_floating_point() else v for k, v in saved["state"].items()}
    path = tmp_path / "ema.pth"
    atomic_save({"model": saved["state"], "model_ema": average, "epoch": 0}, str(path))
    assert_same_weights(timm.create_model("dfvt_tiny", img_size=32, checkpoint_path=str(path)), average)


@pytest.mark.parametrize("fmt", ["ours", "upstream"])
def test_pretrained_overlay_reinitialises_another_head(saved, fmt):
    overlay = {"file": str(saved[fmt])}
    model = timm.create_model("dfvt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, img_size=32, num_classes=10)
    own = {k: v for k, v in saved["state"].items() if k not in HEAD}
    assert_same_weights(model, {**own, **{k: model.state_dict()[k] for k in HEAD}}, skip=HEAD)
    assert_fresh_head(model, 10)
    features = timm.create_model(
        "dfvt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, img_size=32, num_classes=0
    )
    assert_same_weights(features, own)


@pytest.mark.parametrize("fmt", ["ours", "upstream"])
def test_pretrained_with_file_overlay(saved, fmt):
    overlay = {"file": str(saved[fmt])}
    model = timm.create_model("dfvt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, img_size=32)
    assert_same_weights(model, saved["state"])
    assert model.pretrained_cfg["file"] == str(saved[fmt])
    tuned = timm.create_model("dfvt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, img_size=32, num_classes=3)
    assert_fresh_head(tuned, 3)


def test_pretrained_without_the_release_file_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="dfvt_tiny.pth.*pretrained_cfg_overlay=dict\\(file=PATH\\)"):
        timm.create_model("dfvt_tiny", pretrained=True)


def test_every_loader_refuses_hostile_files(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": seeded_tiny().state_dict(), "payload": Hostile(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        timm.create_model("dfvt_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(evil)}, img_size=32)
    with pytest.raises(RuntimeError, match="weights_only"):
        timm.create_model("dfvt_tiny", img_size=32, checkpoint_path=str(evil))
    assert not marker.exists()


def test_pretrained_overlay_names_the_right_variant(tmp_path):
    small = tmp_path / "small.pth"
    torch.save({"model": timm.create_model("dfvt_small", img_size=32).state_dict()}, small)
    with pytest.raises(CheckpointError, match="this looks like DFvT-S: use configs/small.yaml"):
        timm.create_model("dfvt_tiny", pretrained=True, pretrained_cfg_overlay={"file": str(small)}, img_size=32)


# Every function, class and module-level value of the third-party modules the project touches, by identity.
SNAPSHOT = """
import importlib, sys, types
names = ["timm", "timm.models", "timm.models._factory", "timm.models._helpers", "timm.models._registry",
         "timm.data", "timm.layers", "torch", "torch.nn.functional", "torch.serialization", "torch.hub", "yacs.config",
         "PIL.Image", "PIL.ImageOps", "torchvision.transforms", "numpy", "pickle"]
def snapshot():
    out = {}
    for name in names:
        module = importlib.import_module(name)
        for key, value in vars(module).items():
            if not isinstance(value, types.ModuleType) and not key.startswith("__"):
                out[f"{name}.{key}"] = id(value)
    return out
before = snapshot()
import hubconf, main, predict, engine, models, data  # every entry point, hence every project module
after = snapshot()
changed = sorted(k for k in before if k in after and before[k] != after[k])
print("CHANGED", changed)
"""


def test_importing_the_project_changes_no_third_party_module():
    proc = subprocess.run([sys.executable, "-c", SNAPSHOT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed = proc.stdout.strip().splitlines()[-1]
    # Registering models adds entries to timm's registry tables (their contents, not their identity).
    assert changed == "CHANGED []", changed


def test_other_timm_models_keep_timms_loader(tmp_path):
    reference = timm.create_model("test_vit")
    path = tmp_path / "vit.pth"
    torch.save(reference.state_dict(), path)
    loaded = timm.create_model("test_vit", checkpoint_path=str(path))
    assert_same_weights(loaded, reference.state_dict())


def test_classifier_and_feature_api_through_timm(saved):
    model = timm.create_model("dfvt_tiny", img_size=32, checkpoint_path=str(saved["ours"])).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        logits = model(x)
        torch.testing.assert_close(model.forward_head(tokens), logits)
        torch.testing.assert_close(model.get_classifier()(tokens.mean(dim=1)), logits)
        assert tokens.shape[0] == 3 and tokens.shape[-1] == model.num_features == 384
        assert pooled.shape == (3, 384)
        model.reset_classifier(7)
        assert model.num_classes == 7 and model.get_classifier().out_features == 7
        assert model(x).shape == (3, 7)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity)
        torch.testing.assert_close(model(x), pooled)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_hub_random_init(no_network):
    assert hubconf.dependencies == ["torch", "timm", "yacs"]
    for name, size in VARIANTS.items():
        model = torch.hub.load(str(ROOT), name, source="local", weights=None)
        assert isinstance(model, DFvT) and model.pretrained_cfg["file"] == f"{name}.pth"
        assert sum(p.numel() for p in model.parameters()) == manifest(name)["trainable_params"], size


@pytest.mark.parametrize("fmt", ["ours", "upstream"])
def test_hub_loads_weights(saved, no_network, fmt):
    model = torch.hub.load(str(ROOT), "dfvt_tiny", source="local", weights=str(saved[fmt]), img_size=32)
    assert_same_weights(model, saved["state"])
    tuned = torch.hub.load(str(ROOT), "dfvt_tiny", source="local", weights=saved[fmt], img_size=32, num_classes=5)
    assert_fresh_head(tuned, 5)
    with pytest.raises(CheckpointError, match="does not exist"):
        torch.hub.load(str(ROOT), "dfvt_tiny", source="local", weights=str(saved[fmt]) + ".missing")


@pytest.mark.slow
def test_finetune_recipe_from_an_upstream_checkpoint(tmp_path):
    """configs/finetune.yaml end to end: a 1000-class upstream-format file fine-tuned on a 3-class folder."""
    pretrained = seeded_tiny()
    ckpt = tmp_path / "dfvt_tiny_imagenet.pth"
    torch.save(upstream_checkpoint(pretrained), ckpt)
    data = write_image_folder(tmp_path / "data", classes=("cat", "dog", "fox"), n_train=4, n_val=2)
    out = tmp_path / "out"
    cmd = [sys.executable, "main.py", "--cfg", "configs/finetune.yaml", "--pretrained", str(ckpt)]
    cmd += ["--data-path", str(data), "--batch-size", "4", "--amp-opt-level", "O0", "--output", str(out)]
    cmd += ["--opts", "DATA.IMG_SIZE", "32", "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "DATA.NUM_WORKERS", "0"]
    proc = check(run(cmd))
    assert "head re-initialised (1000 classes in the file, 3 here)" in proc.stdout
    assert len(SUMMARY.findall(proc.stdout)) == 1  # the "* Acc@1 ... Acc@5 ... Loss ..." line

    run_dir = out / "dfvt_tiny_finetune" / "default"
    result = load_file(str(run_dir / "ckpt_epoch_0.pth"))
    used = yaml.safe_load(result["config"])  # the recipe's values, as the run saved them
    assert used["TRAIN"]["WEIGHT_DECAY"] == 1e-8 and used["AUG"]["MIXUP"] == used["AUG"]["CUTMIX"] == 0.0
    assert used["TRAIN"]["BASE_LR"] == 1e-4 and used["MODEL"]["LABEL_SMOOTHING"] == 0.1  # as configured
    # The run trained at the recipe's LR scaled by its total batch (4 / 512), kept as a value, not in the config.
    assert [g["initial_lr"] for g in result["optimizer"]["param_groups"]] == pytest.approx([1e-4 * 4 / 512] * 4)
    tuned = result["model"]
    assert tuned["head.weight"].shape == (3, 384)
    # Fine-tuned, not trained from scratch: three steps at a tiny LR leave the backbone near the file's.
    start = pretrained.state_dict()
    for key in ("patch_embed.proj1.weight", "layers.2.blocks.1.attn.qkv.weight", "convlayers.3.conv1x1_1.0.weight"):
        assert (tuned[key] - start[key]).abs().max() < 1e-3 * start[key].abs().max(), key
    # The result loads back through timm, strictly, with its own 3-class head.
    model = timm.create_model(
        "dfvt_tiny", img_size=32, num_classes=3, checkpoint_path=str(run_dir / "ckpt_epoch_0.pth")
    )
    assert_same_weights(model, tuned)
