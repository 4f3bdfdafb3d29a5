"""Weights of one image size / window size in a model built for another (Swin's bicubic bias-table resize), the
``window_size`` keyword of the entry points, ``configs/finetune_384*.yaml``, ``--resume`` at another size (weights
only: resized; training state: refused), ``TEST.CROP_PCT`` and the class-count hint."""

from __future__ import annotations

import logging
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F

import main
import models  # noqa: F401  (registers the timm entry points)
from config import CONFIGS_DIR, flat_items, load_config
from data import build_transform, build_uint8_transform, describe_eval_transform
from errors import CheckpointError, ConfigError
from models import build_model, load_model_weights, load_pretrained
from models.weights import resize_bias_table
from tests.helpers import (
    build,
    load_fixture_weights,
    log_of,
    main_args,
    summaries,
    upstream_checkpoint,
    write_image_folder,
)


def bias_table_by_hand(table: torch.Tensor, rows: int) -> torch.Tensor:
    """The reference resize, one head at a time: ``(2w-1)² × H`` -> ``rows × H`` with plain bicubic F.interpolate."""
    side, new = int(math.sqrt(table.shape[0])), int(math.sqrt(rows))
    heads = [
        F.interpolate(table[:, h].reshape(1, 1, side, side), size=(new, new), mode="bicubic").reshape(-1)
        for h in range(table.shape[1])
    ]
    return torch.stack(heads, dim=1)


def reference_model(source: dict[str, torch.Tensor], *opts: str) -> torch.nn.Module:
    """The straightforward path built with ``opts``, its tables resized by hand from ``source``; its own buffers."""
    model = build("tiny", "MODEL.DFVT.FAST_PATH", "False", *opts).double()
    state = model.state_dict()
    for key, value in source.items():
        if key.endswith(("relative_position_index", "attn_mask")) or key not in state:
            continue
        state[key] = bias_table_by_hand(value, state[key].shape[0]) if value.shape != state[key].shape else value
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_resized_model_equals_a_hand_resized_reference():
    source = load_fixture_weights(build("tiny")).double().state_dict()  # trained at 224 with 7x7 windows
    opts = ("DATA.IMG_SIZE", "192", "MODEL.DFVT.WINDOW_SIZE", "6")  # grids 24, 12, 6, 6: 6x6 windows, some shifted
    model = build("tiny", *opts).double().eval()
    notes = load_model_weights(model, source, "fixture.pth")
    assert notes == [
        "5 relative position bias tables resized bicubically from 13x13 to 11x11 per head (window 7 -> 6): "
        "layers.0.blocks.0.attn, layers.1.blocks.0.attn, layers.2.blocks.0.attn, layers.2.blocks.1.attn, "
        "layers.3.blocks.0.attn"
    ]
    assert model.layers[1].blocks[0].attn.relative_position_index.shape == (36, 36)  # rebuilt, not the file's
    x = torch.randn(2, 3, 192, 192, dtype=torch.float64)
    with torch.no_grad():
        assert (model(x) - reference_model(source, *opts)(x)).abs().max() < 1e-9


def test_pretrained_and_timm_and_hub_at_384_with_window_12(tmp_path, caplog):
    source = load_fixture_weights(build("tiny"))
    path = tmp_path / "upstream.pth"
    torch.save(upstream_checkpoint(source), path)  # the upstream format, read by the safe loader
    finetune = load_config(str(CONFIGS_DIR / "finetune_384.yaml"))
    assert (finetune.DATA.IMG_SIZE, finetune.MODEL.DFVT.WINDOW_SIZE, finetune.TEST.CROP) == (384, 12, False)
    model = build_model(finetune).eval()
    with caplog.at_level(logging.INFO):
        load_pretrained(model, path, logging.getLogger("t"))
    assert "resized bicubically from 13x13 to 23x23 per head (window 7 -> 12)" in caplog.text
    assert "bias tables resized as logged" in caplog.text
    via_timm = timm.create_model(
        "dfvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=384, window_size=12
    ).eval()
    via_hub = torch.hub.load(str(CONFIGS_DIR.parent), "dfvt_tiny", source="local", weights=path, img_size=384,
                             window_size=12).eval()  # fmt: skip
    assert via_timm.pretrained_cfg["input_size"] == (3, 384, 384)
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        expected = reference_model(
            source.double().state_dict(), *("DATA.IMG_SIZE", "384", "MODEL.DFVT.WINDOW_SIZE", "12")
        )
        ref = expected(x.double()).float()
        for m in (model, via_timm, via_hub):
            assert (m(x) - ref).abs().max() < 1e-3 * ref.abs().max()


FINETUNE_384 = {"tiny": "finetune_384.yaml", "small": "finetune_384_small.yaml", "base": "finetune_384_base.yaml"}


@pytest.mark.parametrize("variant", list(FINETUNE_384))
def test_finetune_384_config_of_each_variant_loads_its_224_release(variant, tmp_path, caplog):
    """configs/finetune_384*.yaml: the variant at 384 with 12x12 windows; the 224 release layout (a freshly built 224
    model's weights) loads into it with every bias table resized from 13x13 to 23x23, through --pretrained."""
    config = load_config(str(CONFIGS_DIR / FINETUNE_384[variant]))
    assert (config.DATA.IMG_SIZE, config.MODEL.DFVT.WINDOW_SIZE, config.TEST.CROP) == (384, 12, False)
    assert config.MODEL.NAME == f"dfvt_{variant}_384"
    release = build(variant)  # 224, window 7: the released checkpoints' layout
    path = tmp_path / f"dfvt_{variant}.pth"
    torch.save({"model": release.state_dict(), "epoch": 299}, path)
    model = build_model(config)
    assert model.patch_embed.img_size == 384
    assert {block.window_size for stage in model.layers for block in stage.blocks} == {12}  # grids 48, 24, 12, 12
    with caplog.at_level(logging.INFO):
        load_pretrained(model, path, logging.getLogger("t"))
    blocks = sum(config.MODEL.DFVT.DEPTHS)
    assert f"{blocks} relative position bias tables resized bicubically from 13x13 to 23x23 per head" in caplog.text
    assert "(window 7 -> 12)" in caplog.text and "bias tables resized as logged" in caplog.text
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(model.state_dict()[key], resize_bias_table(release.state_dict()[key], 23 * 23))


def test_the_finetune_384_configs_differ_only_in_the_model_variant():
    """Each variant's 384 config is finetune_384.yaml (the DFvT-T one) with its variant's architecture: a key differs
    from DFvT-T's only where the variant's own config (small.yaml, base.yaml) differs from tiny.yaml, and to that
    value; MODEL.NAME names the variant."""

    def keys(name: str) -> dict:
        return dict(flat_items(load_config(str(CONFIGS_DIR / name))))

    tiny_224, tiny_384 = keys("tiny.yaml"), keys(FINETUNE_384["tiny"])
    for variant in ("small", "base"):
        variant_224, variant_384 = keys(f"{variant}.yaml"), keys(FINETUNE_384[variant])
        for key, value in variant_384.items():
            if key in ("BASE", "MODEL.NAME"):
                continue
            expected = variant_224[key] if variant_224[key] != tiny_224[key] else tiny_384[key]
            assert value == expected, (variant, key)
        assert variant_384["MODEL.NAME"] == f"dfvt_{variant}_384"
        assert {k for k in variant_384 if variant_384[k] != tiny_384[k]} - {"BASE", "MODEL.NAME"}  # not T again


def test_a_layout_the_windows_cannot_tile_names_the_key():
    with pytest.raises(ConfigError, match=r"DATA.IMG_SIZE 384 gives a 48x48 token grid .* MODEL.DFVT.WINDOW_SIZE 7"):
        build("tiny", "DATA.IMG_SIZE", "384")
    with pytest.raises(TypeError, match="window_size"):  # a typo'd keyword is still refused
        timm.create_model("dfvt_tiny", window=12)


def test_eval_and_pretrained_runs_at_another_size(tmp_path):
    """main.py: a checkpoint trained at 32 pixels evaluated at 64 with 8x8 windows (tables resized, logged), and
    fine-tuned from at 64."""
    from tests.helpers import write_image_folder

    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert main.main([str(a) for a in main_args(data, out)[1:]]) == 0
    ckpt = out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    bigger = ("DATA.IMG_SIZE", "64", "MODEL.DFVT.WINDOW_SIZE", "8")
    args = main_args(data, tmp_path / "eval", "--eval", "--resume", ckpt, opts=bigger)
    assert main.main([str(a) for a in args[1:]]) == 0
    log = log_of(tmp_path / "eval", mode="eval")
    assert re.search(
        r"1 relative position bias table resized bicubically from 7x7 to 15x15 per head \(window 4 -> 8\)", log
    )
    assert "Eval transform: resize the short side to 73 (bicubic), centre crop 64x64 (TEST.CROP_PCT 0.875)" in log
    assert len(summaries(log)) == 1
    args = main_args(data, tmp_path / "ft", "--pretrained", ckpt, opts=bigger)
    assert main.main([str(a) for a in args[1:]]) == 0
    assert "resized bicubically" in log_of(tmp_path / "ft") and len(summaries(log_of(tmp_path / "ft"))) == 1


WINDOW_2 = ("MODEL.DFVT.WINDOW_SIZE", "2")  # at 32 pixels stage 0's 4x4 grid: window 4 (7x7 table) -> 2 (3x3)


@pytest.fixture(scope="module")
def run_at_window_7(tmp_path_factory):
    """A finished one-epoch tiny run at 32 pixels, window 7: its data and ckpt_epoch_0.pth (model, optimizer with
    AdamW moments, schedule, scaler)."""
    root = tmp_path_factory.mktemp("window_7")
    data = write_image_folder(root / "data")
    assert main.main([str(a) for a in main_args(data, root / "out")[1:]]) == 0
    return data, root / "out" / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"


def test_resume_of_training_state_at_another_window_is_one_clear_error(run_at_window_7, tmp_path):
    """torch's Optimizer.load_state_dict does not check shapes: the moments of the resized bias tables would not fit
    their weights (a size-mismatch RuntimeError at the first step, or silently wrong steps). The resume is refused
    with one line, exit status 2, suggesting --pretrained."""
    data, ckpt = run_at_window_7
    out = tmp_path / "res"
    args = main_args(data, out, "--resume", ckpt, opts=(*WINDOW_2, "TRAIN.EPOCHS", "2"))
    assert main.main([str(a) for a in args[1:]]) == 2
    log = log_of(out)
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "Traceback" not in log, log[-2000:]
    line = errors[0]
    assert f"CheckpointError: {ckpt} holds a run's training state (optimizer, LR schedule) at another" in line
    assert "resized bicubically from 7x7 to 3x3 per head (window 4 -> 2)" in line and f"--pretrained {ckpt}" in line
    assert not list((out / "dfvt_tiny" / "t").glob("ckpt_*.pth"))  # nothing trained, nothing saved


@pytest.mark.parametrize("layout", ["state_dict", "model_entry"])
def test_resume_of_weights_only_at_another_window_resizes_the_tables(run_at_window_7, tmp_path, layout):
    """--resume of a weights-only file (a raw state_dict, or {'model': ...}) at another window: tables resized and
    logged, the run starts at its first epoch with a fresh optimizer."""
    data, ckpt = run_at_window_7
    weights = torch.load(ckpt, weights_only=True)["model"]
    path = tmp_path / "weights.pth"
    torch.save(weights if layout == "state_dict" else {"model": weights}, path)
    out = tmp_path / "res"
    args = main_args(data, out, "--resume", path, opts=WINDOW_2)
    assert main.main([str(a) for a in args[1:]]) == 0
    log = log_of(out)
    assert re.search(
        r"1 relative position bias table resized bicubically from 7x7 to 3x3 per head \(window 4 -> 2\)", log
    )
    assert "Resumed optimizer" not in log and len(summaries(log)) == 1
    saved = torch.load(out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth", weights_only=True)
    assert saved["model"]["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (9, 3)


def test_crop_pct_sets_the_eval_resize(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (300, 200), (10, 200, 30))
    config = load_config(None, ["TEST.CROP_PCT", "0.95"])
    assert (
        describe_eval_transform(config)
        == "resize the short side to 235 (bicubic), centre crop 224x224 (TEST.CROP_PCT 0.95)"
    )
    resize = build_transform(False, config).transforms[0]
    assert resize.size == 235 and build_transform(False, config)(image).shape == (3, 224, 224)
    assert build_uint8_transform(False, config).resize.transforms[0].size == [235]
    whole = load_config(None, ["TEST.CROP", "False"])
    assert describe_eval_transform(whole) == "resize to 224x224 (bicubic, TEST.CROP False)"
    for bad in ("0.0", "1.5"):
        with pytest.raises(ConfigError, match=rf"TEST.CROP_PCT {bad} must be in \(0, 1\]"):
            build_transform(False, load_config(None, ["TEST.CROP_PCT", bad]))


def test_head_mismatch_is_called_a_class_count_problem():
    """The fix the hint names fits why the weights are loaded: data with the file's classes to evaluate (--eval,
    predict.py, export.py: the default purpose), --pretrained to train on other classes (resuming)."""
    imagenet = build("tiny").state_dict()
    model = build("tiny", "MODEL.NUM_CLASSES", "3")
    problem = "has a 1000-class head and this model 3 classes: a class-count mismatch, not another variant"
    with pytest.raises(CheckpointError) as info:
        load_model_weights(model, imagenet, "dfvt_tiny.pth")
    evaluate = str(info.value)
    assert problem in evaluate and "looks like" not in evaluate
    assert "To evaluate it, give the data its 1000 classes: DATA.DATASET imagenet (MODEL.NUM_CLASSES 1000)" in evaluate
    assert "ImageNet synsets or 0..999" in evaluate and "DATA.CLASS_MAP file" in evaluate
    assert "--pretrained" not in evaluate
    with pytest.raises(CheckpointError) as info:
        load_model_weights(model, imagenet, "dfvt_tiny.pth", purpose="resume")
    resume = str(info.value)
    assert problem in resume and "looks like" not in resume
    assert "to train on these 3 classes, start a new run from it with --pretrained dfvt_tiny.pth" in resume
    assert "DATA.DATASET folder" in resume and "DATA.CLASS_MAP" not in resume
    with pytest.raises(CheckpointError, match=r"its 3 classes: .*class folders named 0\.\.2 \(DATA.CLASS_MAP auto\)"):
        load_model_weights(build("tiny"), model.state_dict(), "three.pth")  # no synsets for a 3-class head
    with pytest.raises(ValueError, match="purpose 'train'"):
        load_model_weights(model, imagenet, "dfvt_tiny.pth", purpose="train")
    other_variant = build("small").state_dict()
    with pytest.raises(CheckpointError, match="this looks like DFvT-S: use configs/small.yaml"):
        load_model_weights(build("tiny"), other_variant, "dfvt_small.pth")


def test_main_names_the_class_count_fix_of_eval_and_of_resume(tmp_path):
    """main.py passes why it loads: --eval of a 1000-class file on 3 class folders points at the data, --resume of it
    into a 3-class training run at --pretrained."""
    data = write_image_folder(tmp_path / "data")  # DATA.DATASET folder (SMALL_RUN): 3 classes
    path = tmp_path / "imagenet.pth"
    torch.save({"model": build("tiny", "DATA.IMG_SIZE", "32").state_dict()}, path)
    for mode, hint in (("eval", "To evaluate it, give the data its 1000 classes"), ("", f"--pretrained {path}")):
        out = tmp_path / (mode or "train")
        args = main_args(data, out, *(["--eval"] if mode else []), "--resume", path)
        assert main.main([str(a) for a in args[1:]]) == 2
        errors = [line for line in log_of(out, mode=mode).splitlines() if "ERROR" in line]
        assert len(errors) == 1 and "a class-count mismatch" in errors[0] and hint in errors[0], errors


def test_predict_at_another_size_says_what_it_resized(tmp_path, capsys):
    import predict

    model = build("tiny", "DATA.IMG_SIZE", "32")
    ckpt = tmp_path / "small.pth"
    torch.save({"model": model.state_dict(), "epoch": 0}, ckpt)
    image = next((write_image_folder(tmp_path / "data") / "val" / "a").iterdir())
    args = ["--cfg", "configs/tiny.yaml", "--resume", str(ckpt), str(image), "--json"]
    code = predict.main([*args, "--opts", "DATA.IMG_SIZE", "64", "MODEL.DFVT.WINDOW_SIZE", "8"])
    out = capsys.readouterr()
    assert code == 0 and "note: 1 relative position bias table resized bicubically from 7x7 to 15x15" in out.err
    assert len(__import__("json").loads(out.out)["images"]) == 1
