"""config.py: defaults, YAML merging with BASE, --opts, and readable errors."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from config import RULES, flat_items, get_default_config, load_config, set_key, update_config
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


# A value each key must refuse, given as on the command line (--opts KEY VALUE). Every key of the defaults is here,
# so a new key fails this file until it has a bad value, and fails the walk until config.RULES checks it.
BAD_VALUES = {
    "BASE": "5",
    "DATA.BATCH_SIZE": "0",
    "DATA.DATA_PATH": "5",
    "DATA.DATASET": "cifar",
    "DATA.IMG_SIZE": "0",
    "DATA.INTERPOLATION": "nearest",
    "DATA.ZIP_MODE": "maybe",
    "DATA.CACHE_MODE": "some",
    "DATA.PIN_MEMORY": "2",
    "DATA.NUM_WORKERS": "-1",
    "DATA.PIPELINE": "turbo",
    "DATA.LOADER": "ffcv",
    "DATA.CLASS_MAP": "",
    "DATA.SKIP_UNREADABLE": "sometimes",
    "MODEL.TYPE": "swin",
    "MODEL.NAME": "a/b",
    "MODEL.PRETRAINED": "5",
    "MODEL.RESUME": "5",
    "MODEL.NUM_CLASSES": "-1",
    "MODEL.DROP_RATE": "1.0",
    "MODEL.DROP_PATH_RATE": "-0.1",
    "MODEL.LABEL_SMOOTHING": "1.5",
    "MODEL.DFVT.PATCH_SIZE": "2",
    "MODEL.DFVT.IN_CHANS": "0",
    "MODEL.DFVT.EMBED_DIM": "15",
    "MODEL.DFVT.DEPTHS": "[1]",
    "MODEL.DFVT.NUM_HEADS": "[3, 0, 12, 24]",
    "MODEL.DFVT.WINDOW_SIZE": "0",
    "MODEL.DFVT.MLP_RATIO": "0.0",
    "MODEL.DFVT.QKV_BIAS": "1",
    "MODEL.DFVT.QK_SCALE": "-1.0",
    "MODEL.DFVT.APE": "yes",
    "MODEL.DFVT.PATCH_NORM": "yes",
    "MODEL.DFVT.FAST_PATH": "yes",
    "TRAIN.START_EPOCH": "-1",
    "TRAIN.EPOCHS": "0",
    "TRAIN.WARMUP_EPOCHS": "-1",
    "TRAIN.WEIGHT_DECAY": "-0.1",
    "TRAIN.BASE_LR": "0.0",
    "TRAIN.WARMUP_LR": "-1e-6",
    "TRAIN.MIN_LR": "-1e-6",
    "TRAIN.CONV_LR_SCALE": "0",
    "TRAIN.CLIP_GRAD": "-1.0",
    "TRAIN.AUTO_RESUME": "no",
    "TRAIN.ACCUMULATION_STEPS": "0",
    "TRAIN.USE_CHECKPOINT": "sometimes",
    "TRAIN.COMPILE": "sometimes",
    "TRAIN.LAYER_DECAY": "1.5",
    "TRAIN.EMA.ENABLE": "on",
    "TRAIN.EMA.DECAY": "1.0",
    "TRAIN.DISTILL.TEACHER": "5",
    "TRAIN.DISTILL.CHECKPOINT": "5",
    "TRAIN.DISTILL.TYPE": "medium",
    "TRAIN.DISTILL.ALPHA": "1.5",
    "TRAIN.DISTILL.TAU": "0",
    "TRAIN.LR_SCHEDULER.NAME": "poly",
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": "0",
    "TRAIN.LR_SCHEDULER.DECAY_RATE": "0",
    "TRAIN.OPTIMIZER.NAME": "lamb",
    "TRAIN.OPTIMIZER.EPS": "0",
    "TRAIN.OPTIMIZER.BETAS": "(0.9, 1.0)",
    "TRAIN.OPTIMIZER.MOMENTUM": "1.0",
    "AUG.COLOR_JITTER": "-0.4",
    "AUG.AUTO_AUGMENT": "randaug-m9",
    "AUG.REPROB": "1.5",
    "AUG.REMODE": "zero",
    "AUG.RECOUNT": "0",
    "AUG.MIXUP": "-1",
    "AUG.CUTMIX": "-1",
    "AUG.CUTMIX_MINMAX": "(0.5, 0.2)",
    "AUG.MIXUP_PROB": "2",
    "AUG.MIXUP_SWITCH_PROB": "-0.5",
    "AUG.MIXUP_MODE": "row",
    "AUG.HFLIP": "1.5",
    "AUG.SCALE": "(0.5, 0.1)",
    "TEST.CROP": "sometimes",
    "TEST.CROP_PCT": "0",
    "TEST.USE_EMA": "sometimes",
    "TEST.REAL_LABELS": "5",
    "THROUGHPUT.WARMUP_ITERS": "-1",
    "THROUGHPUT.ITERS": "0",
    "AMP_ENABLE": "sometimes",
    "AMP_OPT_LEVEL": "O3",
    "AMP_DTYPE": "half",
    "OUTPUT": "",
    "TAG": "../elsewhere",
    "SAVE_FREQ": "0",
    "SAVE_KEEP": "-1",
    "SAVE_STEPS": "-5",
    "PRINT_FREQ": "0",
    "SEED": "-1",
    "EVAL_MODE": "sometimes",
    "THROUGHPUT_MODE": "sometimes",
}


def test_every_key_has_a_rule_and_a_bad_value():
    keys = [key for key, _ in flat_items(load_config())]
    assert set(BAD_VALUES) == set(keys), "a key was added or removed: give it a rule in config.RULES and a bad value"
    assert set(RULES) == set(keys)


@pytest.mark.parametrize("key", list(BAD_VALUES))
def test_a_bad_value_of_each_key_is_one_line_naming_it(key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [key, BAD_VALUES[key]])
    message = str(err.value)
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize(
    "opts, named",
    [
        (["DATA.IMG_SIZE", "100"], "DATA.IMG_SIZE 100 cannot be tiled"),  # not a multiple of 32
        (["DATA.IMG_SIZE", "256"], "MODEL.DFVT.WINDOW_SIZE 7 windows cannot tile"),  # 32x32 grids, 7x7 windows
        (["MODEL.DFVT.NUM_HEADS", "[3, 6, 12]"], "one entry per stage"),
        (["MODEL.DFVT.NUM_HEADS", "[5, 6, 12, 24]"], "NUM_HEADS[0] = 5 does not divide the 48 channels"),
        (["DATA.ZIP_MODE", "True", "DATA.DATASET", "digits"], "DATA.ZIP_MODE off"),
        (["DATA.ZIP_MODE", "True", "DATA.CLASS_MAP", "sorted"], "DATA.CLASS_MAP 'sorted' maps class folders"),
        (["TRAIN.LAYER_DECAY", "nan"], "TRAIN.LAYER_DECAY"),  # not a number: yacs' type check names the key
        (["TRAIN.CLIP_GRAD", "1e999"], "TRAIN.CLIP_GRAD inf"),  # numbers must be finite
    ],
)
def test_relations_between_keys_are_checked(opts, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(None, opts)


def test_training_relations_are_checked_when_training_only():
    args = argparse.Namespace(opts=["TRAIN.EPOCHS", "10"], eval=False)
    with pytest.raises(ConfigError, match=r"TRAIN.EPOCHS 10 must exceed TRAIN.WARMUP_EPOCHS 20"):
        update_config(get_default_config(), args)
    with pytest.raises(ConfigError, match=r"TRAIN.START_EPOCH 5 must be below TRAIN.EPOCHS 5"):
        update_config(
            get_default_config(),
            argparse.Namespace(opts=["TRAIN.START_EPOCH", "5", "TRAIN.EPOCHS", "5", "TRAIN.WARMUP_EPOCHS", "0"]),
        )
    with pytest.raises(ConfigError, match=r"DATA.BATCH_SIZE \(5\) must be even"):
        update_config(get_default_config(), argparse.Namespace(opts=None, batch_size=5))
    # Evaluating, predicting or exporting with a training YAML whose schedule is short is fine.
    update_config(get_default_config(), argparse.Namespace(opts=["TRAIN.EPOCHS", "10"], eval=True))
    assert load_config(None, ["TRAIN.EPOCHS", "10", "DATA.BATCH_SIZE", "5"]).TRAIN.EPOCHS == 10


def test_integers_are_accepted_for_float_keys(tmp_path):
    # yacs alone refuses `--opts AUG.MIXUP 0` (an int for a float key); both routes give the float.
    c = load_config(None, ["AUG.MIXUP", "0", "TRAIN.BASE_LR", "1", "TRAIN.OPTIMIZER.BETAS", "(0, 0.5)"])
    assert c.AUG.MIXUP == 0.0 and isinstance(c.AUG.MIXUP, float) and isinstance(c.TRAIN.BASE_LR, float)
    yaml_file = tmp_path / "ints.yaml"
    yaml_file.write_text("AUG:\n  MIXUP: 0\n  CUTMIX: 1\nTRAIN:\n  WARMUP_EPOCHS: 5\n")
    c = load_config(str(yaml_file))
    assert (c.AUG.MIXUP, c.AUG.CUTMIX, c.TRAIN.WARMUP_EPOCHS) == (0.0, 1.0, 5)
    assert isinstance(c.AUG.CUTMIX, float)
    with pytest.raises(ConfigError, match="TRAIN.EPOCHS"):  # but not a float for an int key
        load_config(None, ["TRAIN.EPOCHS", "2.5"])


def test_the_shipped_configs_pass_their_checks():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        args = argparse.Namespace(cfg=str(path), opts=None)
        update_config(get_default_config(), args)  # the training relations included


@pytest.mark.parametrize(
    "opts, message",
    [
        (["PRINT_FREQ", "0"], "PRINT_FREQ 0 must be an integer >= 1."),
        (["SAVE_FREQ", "0"], "SAVE_FREQ 0 must be an integer >= 1."),
        (["DATA.NUM_WORKERS", "-1"], "DATA.NUM_WORKERS '-1' must be 'auto' or a number of worker processes"),
        (["AUG.MIXUP", "-0.5"], "AUG.MIXUP -0.5 must be a number >= 0."),
    ],
)
def test_main_refuses_a_bad_value_before_anything_runs(tmp_path, capsys, opts, message):
    import main

    assert main.main(["--output", str(tmp_path / "out"), "--opts", *opts]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing was created


def test_a_wrong_type_is_one_line_with_what_the_key_takes(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["TRAIN.BASE_LR", "abc"])
    assert str(e.value) == "TRAIN.BASE_LR 'abc' must be a number > 0."
    bad = tmp_path / "bad.yaml"
    bad.write_text("DATA:\n  SKIP_UNREADABLE: maybe\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(bad))
    assert str(e.value) == f"Config file {bad}: DATA.SKIP_UNREADABLE 'maybe' must be True or False."
