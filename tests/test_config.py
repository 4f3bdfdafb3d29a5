"""config.py: defaults, YAML merging with BASE, --opts, and readable errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from config import get_default_config, load_config, set_key, update_config
from errors import ConfigError

ROOT = Path(__file__).parent.parent


def test_defaults_are_the_upstream_recipe():
    c = load_config()
    assert c.is_frozen()
    assert (c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR) == (5e-4, 5e-7, 5e-6)
    assert (c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS, c.TRAIN.WEIGHT_DECAY, c.TRAIN.CLIP_GRAD) == (300, 20, 0.05, 5.0)
    assert (c.DATA.BATCH_SIZE, c.MODEL.LABEL_SMOOTHING, c.TRAIN.CONV_LR_SCALE) == (128, 0.1, 2.0)
    assert (c.AUG.MIXUP, c.AUG.CUTMIX, c.AUG.REPROB, c.AUG.AUTO_AUGMENT) == (0.8, 1.0, 0.25, "rand-m9-mstd0.5-inc1")
    assert c.TRAIN.OPTIMIZER.EPS == 1e-8 and tuple(c.TRAIN.OPTIMIZER.BETAS) == (0.9, 0.999)


def test_yaml_overrides_and_opts(tmp_path):
    c = load_config(str(ROOT / "configs" / "small.yaml"), ["TRAIN.EPOCHS", "3", "MODEL.DFVT.QK_SCALE", "0.5"])
    assert (c.MODEL.NAME, c.MODEL.DFVT.EMBED_DIM, c.MODEL.DFVT.MLP_RATIO) == ("dfvt_small", 96, 2.0)
    assert c.TRAIN.EPOCHS == 3 and c.MODEL.DFVT.QK_SCALE == 0.5


def test_base_files_merge_recursively(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("TRAIN:\n  EPOCHS: 7\n  BASE_LR: 0.1\n")
    (tmp_path / "sub" / "mid.yaml").write_text("BASE: ['../root.yaml']\nTRAIN:\n  BASE_LR: 0.2\n")
    (tmp_path / "leaf.yaml").write_text("BASE: ['sub/mid.yaml']\nDATA:\n  BATCH_SIZE: 4\n")
    c = load_config(str(tmp_path / "leaf.yaml"))
    assert (c.TRAIN.EPOCHS, c.TRAIN.BASE_LR, c.DATA.BATCH_SIZE) == (7, 0.2, 4)


def test_unknown_key_in_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("TRAIN:\n  EPOCHZ: 3\n")
    with pytest.raises(ConfigError, match="EPOCHZ") as err:
        load_config(str(bad))
    assert str(bad) in str(err.value)


def test_unknown_key_in_opts_is_named():
    with pytest.raises(ConfigError, match="TRAIN.NOPE"):
        load_config(None, ["TRAIN.NOPE", "1"])


def test_odd_opts_and_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="KEY VALUE"):
        load_config(None, ["TRAIN.EPOCHS"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("TRAIN: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(broken))


def test_wrong_value_type_is_named():
    with pytest.raises(ConfigError, match="TRAIN.EPOCHS"):
        load_config(None, ["TRAIN.EPOCHS", "'many'"])


def test_command_line_shortcuts():
    c = get_default_config()
    args = argparse.Namespace(
        cfg=str(ROOT / "configs" / "tiny.yaml"),
        opts=["TRAIN.EPOCHS", "2"],
        batch_size=16,
        data_path="/data",
        zip=True,
        cache_mode="no",
        pretrained=None,
        resume="ckpt.pth",
        accumulation_steps=2,
        use_checkpoint=True,
        amp_opt_level="O0",
        output="out",
        tag="t1",
        eval=True,
        throughput=False,
        local_rank=1,
    )
    update_config(c, args)
    assert c.is_frozen()
    assert (c.DATA.BATCH_SIZE, c.DATA.DATA_PATH, c.DATA.ZIP_MODE, c.DATA.CACHE_MODE) == (16, "/data", True, "no")
    assert (c.MODEL.RESUME, c.TRAIN.ACCUMULATION_STEPS, c.TRAIN.USE_CHECKPOINT) == ("ckpt.pth", 2, True)
    assert (c.AMP_ENABLE, c.EVAL_MODE, c.THROUGHPUT_MODE, c.TRAIN.EPOCHS) == (False, True, False, 2)
    assert "LOCAL_RANK" not in c  # the launcher's business: utils.init_distributed reads it, the config does not
    assert c.OUTPUT == str(Path("out") / "dfvt_tiny" / "t1")


def test_set_key_and_a_clean_dump():
    c = get_default_config()
    set_key(c, "MODEL.DFVT.WINDOW_SIZE", 12)
    set_key(c, "TAG", "x")
    assert (c.MODEL.DFVT.WINDOW_SIZE, c.TAG) == (12, "x")
    with pytest.raises(KeyError):
        set_key(c, "MODEL.NOPE.X", 1)
    assert "- ''" not in load_config().dump()  # no empty BASE entry in the saved config
