"""Recipe options: the weight EMA (against an independent running average), bounded checkpoints with ckpt_best.pth,
a failed save that loses nothing, summary.csv across a resume, TEST.USE_EMA, and the EMA under two processes."""

from __future__ import annotations

import copy
import csv
import logging

import pytest
import torch
from torch import nn

import engine
import main
from checkpoint import load_file
from config import load_config
from engine import RunState, build_ema, train_one_epoch
from errors import CheckpointError, ConfigError
from tests.helpers import (
    FINGERPRINT,
    check,
    launcher,
    log_of,
    main_args,
    run,
    summaries,
    write_image_folder,
)
from utils import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
EMA = ("TRAIN.EMA.ENABLE", "True", "TRAIN.EMA.DECAY", "0.5")


def test_ema_equals_a_running_average_computed_independently():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    config = load_config(None, ["TRAIN.EMA.ENABLE", "True", "TRAIN.EMA.DECAY", "0.9", "PRINT_FREQ", "1"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    run_state = RunState(
        model, optimizer, NoSchedule(), torch.amp.GradScaler("cpu", enabled=False), ema=build_ema(config, model)
    )
    expected = {k: v.clone().double() for k, v in model.state_dict().items()}  # the average starts at the weights
    after_steps = []
    optimizer.register_step_post_hook(lambda *_: after_steps.append(copy.deepcopy(model.state_dict())))
    batches = [(torch.randn(5, 6), torch.randint(0, 4, (5,))) for _ in range(4)]
    fp32 = engine.Precision(None, False)
    train_one_epoch(
        config, run_state, model, nn.CrossEntropyLoss(), batches, None, 0, fp32, CPU, logging.getLogger("t")
    )
    assert len(after_steps) == 4
    for weights in after_steps:  # ema <- 0.9 ema + 0.1 weights, buffers included; integer buffers copied
        for key, value in weights.items():
            expected[key] = 0.9 * expected[key] + 0.1 * value.double() if value.is_floating_point() else value
    got = run_state.ema.module.state_dict()
    for key, value in expected.items():
        assert torch.allclose(got[key].double(), value.double(), atol=1e-6), key
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy
    with pytest.raises(ConfigError, match=r"TRAIN.EMA.DECAY 1.5 must be in \(0, 1\)"):
        build_ema(load_config(None, ["TRAIN.EMA.ENABLE", "True", "TRAIN.EMA.DECAY", "1.5"]), model)
    assert build_ema(load_config(), model) is None  # off by default


class NoSchedule:
    def step_update(self, num_updates: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}


def rows(out) -> list[dict[str, str]]:
    with open(out / "dfvt_tiny" / "t" / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def train(data, out, *opts) -> int:
    return main.main([str(a) for a in main_args(data, out, opts=opts)[1:]])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("recipe") / "data")


def test_checkpoints_are_bounded_and_the_best_is_kept(data, tmp_path):
    assert train(data, tmp_path, "TRAIN.EPOCHS", "5", "SAVE_KEEP", "2", *EMA) == 0
    folder = tmp_path / "dfvt_tiny" / "t"
    assert sorted(p.name for p in folder.glob("ckpt_*.pth")) == [
        "ckpt_best.pth",
        "ckpt_epoch_3.pth",
        "ckpt_epoch_4.pth",
    ]
    table = rows(tmp_path)
    assert [int(r["epoch"]) for r in table] == [0, 1, 2, 3, 4] and all(r["ema_top1"] for r in table)
    tops = [float(r["val_top1"]) for r in table]
    best = load_file(str(folder / "ckpt_best.pth"))
    assert best["epoch"] == tops.index(max(tops)) and best["max_accuracy"] == pytest.approx(max(tops), abs=1e-3)
    assert "model_ema" in best and set(best["model_ema"]) == set(best["model"])
    log = log_of(tmp_path)
    assert log.count(" * EMA Acc@1 ") == 5 and len(summaries(log)) == 5  # the EMA line is a second, separate line
    assert "removed (SAVE_KEEP 2)" in log
    # --eval with TEST.USE_EMA evaluates the average: the last epoch's EMA line, again.
    args = main_args(
        data, tmp_path / "eval", "--eval", "--resume", folder / "ckpt_epoch_4.pth", opts=("TEST.USE_EMA", "True")
    )
    assert main.main([str(a) for a in args[1:]]) == 0
    ema_line = [line for line in log.splitlines() if " * EMA Acc@1 " in line][-1].split(" * EMA ")[1]
    eval_log = log_of(tmp_path / "eval", mode="eval")
    assert f" * {ema_line}" in eval_log and "the weight average (TEST.USE_EMA)" in eval_log


def test_a_save_that_fails_loses_no_checkpoint(data, tmp_path, monkeypatch):
    calls = []
    real = engine.atomic_save

    def failing(obj, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(obj, path)

    monkeypatch.setattr(engine, "atomic_save", failing)
    assert train(data, tmp_path, "TRAIN.EPOCHS", "4", "SAVE_KEEP", "1") == 2
    folder = tmp_path / "dfvt_tiny" / "t"
    last = log_of(tmp_path).strip().splitlines()[-1]
    assert f"CheckpointError: cannot write {folder / 'ckpt_epoch_2.pth'} (No space left on device; " in last
    assert "MiB free there); earlier checkpoints in" in last and "rerun the same command" in last
    assert sorted(p.name for p in folder.glob("ckpt_epoch_*.pth")) == ["ckpt_epoch_1.pth"]  # pruned only after a save
    assert load_file(str(folder / "ckpt_epoch_1.pth"))["epoch"] == 1
    assert not list(folder.glob(".tmp-*"))


def test_summary_has_one_row_per_epoch_after_a_resume(data, tmp_path):
    assert train(data, tmp_path / "a", "TRAIN.EPOCHS", "3") == 0
    reference = rows(tmp_path / "a")
    # The crash this mimics: the rows of epochs 1 and 2 were written, their checkpoints were lost.
    assert train(data, tmp_path / "b", "TRAIN.EPOCHS", "3") == 0
    for epoch in (1, 2):
        (tmp_path / "b" / "dfvt_tiny" / "t" / f"ckpt_epoch_{epoch}.pth").unlink()
    assert train(data, tmp_path / "b", "TRAIN.EPOCHS", "3") == 0
    assert "continuing at epoch 1" in log_of(tmp_path / "b")
    resumed = rows(tmp_path / "b")
    assert [r["epoch"] for r in resumed] == ["0", "1", "2"]
    for got, want in zip(resumed, reference, strict=True):  # the same figures as the uninterrupted run
        assert {k: v for k, v in got.items() if k != "epoch_time_s"} == {
            k: v for k, v in want.items() if k != "epoch_time_s"
        }


def test_use_ema_without_an_average_is_one_line(data, tmp_path):
    assert train(data, tmp_path, "TRAIN.EPOCHS", "1") == 0
    ckpt = tmp_path / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    config = load_config(None, ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "3", "TEST.USE_EMA", "True"])
    from models import load_checkpoint_model

    with pytest.raises(CheckpointError, match="has no 'model_ema' weights .*drop TEST.USE_EMA"):
        load_checkpoint_model(config, ckpt)


@pytest.mark.slow
def test_every_rank_holds_the_same_ema(data, tmp_path):
    check(run(launcher("torch.distributed.run") + [str(a) for a in main_args(data, tmp_path, batch=2, opts=EMA)]))
    ema = [line for rank in (0, 1) for line in log_of(tmp_path, rank).splitlines() if "Final EMA fingerprint" in line]
    assert len(ema) == 2 and ema[0].split(": ")[-1] == ema[1].split(": ")[-1]
    assert FINGERPRINT.search(log_of(tmp_path, 0)).group(1) == FINGERPRINT.search(log_of(tmp_path, 1)).group(1)


def test_the_ema_leaves_the_model_s_own_training_unchanged(data, tmp_path):
    assert train(data, tmp_path / "off", "TRAIN.EPOCHS", "2") == 0
    assert train(data, tmp_path / "on", "TRAIN.EPOCHS", "2", *EMA) == 0
    off, on = log_of(tmp_path / "off"), log_of(tmp_path / "on")
    assert FINGERPRINT.search(on).group(1) == FINGERPRINT.search(off).group(1)
    assert summaries(on) == summaries(off) and " * EMA Acc@1 " in on


def test_negative_save_keep_is_a_config_error(data, tmp_path, capsys):
    assert train(data, tmp_path, "SAVE_KEEP", "-1") == 2
    assert "SAVE_KEEP -1 must be an integer >= 0" in capsys.readouterr().err
