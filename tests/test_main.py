"""main.py in this process (the quick lane's run of the entry point): train one epoch, evaluate the checkpoint and
measure throughput on a tiny image folder; the run summary, a config that nothing rewrites, the checkpoint's
contents, and TensorBoard being optional. ``test_main_e2e.py`` runs the same as a user would, in subprocesses."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import torch
import yaml

import main
from config import get_default_config, update_config
from logger import create_tensorboard_writer
from tests.helpers import FINGERPRINT, config_path, log_of, main_args, summaries


def run_main(*args) -> int:
    return main.main([str(a) for a in args[1:]])  # main_args starts with the script name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of training on 3 classes x 4 JPEGs at batch 4 (3 optimizer steps), then its log and checkpoint."""
    from tests.helpers import write_image_folder

    base = tmp_path_factory.mktemp("main")
    data = write_image_folder(base / "data", n_train=4, n_val=3)
    out = base / "out"
    assert run_main(*main_args(data, out)) == 0
    return data, out


def test_training_run_summary_and_log(trained):
    _, out = trained
    log = log_of(out)
    assert "rank 0/1, device cpu" in log
    assert re.search(r"Run: train \| 1 process\(es\) \(cpu\)", log)
    assert re.search(r"Model: dfvt_tiny \| params 3,\d{3},\d{3} \| analytic GFLOPs .* measured GFLOPs", log)
    assert re.search(r"Data: folder \S+ \| 3 classes \| 12 train, 9 val images", log)
    assert "Loader: fast pipeline | 0 worker(s) per process" in log
    precision = "Precision: fp32 (AMP_OPT_LEVEL O0) | batch 4 per process x 1 process(es) x 1 accumulation step(s) = 4"
    assert precision in log
    # The LRs of the recipe scaled by 4 / 512, as values in the log (the config keeps the configured ones).
    assert "LR: peak 3.906e-06, warm-up start 3.906e-09, final 3.906e-08 (configured 0.0005, 5e-07, 5e-06" in log
    assert "Full config" not in log and "BASE:" not in log  # the full config is in config.json, not the log
    assert re.search(r"Train: \[0/1\]\[3/3\]\teta 0:00:00 \(run 0:00:00\) lr", log)
    assert re.search(r"rss \d+MB", log) and "mem 0MB" not in log  # the host's peak memory on a CPU run
    assert len(summaries(log)) == 1 and FINGERPRINT.search(log)


def test_config_is_the_parsed_one_everywhere(trained):
    data, out = trained
    parsed = get_default_config()
    update_config(parsed, main.parse_option([str(a) for a in main_args(data, out)[1:]]))
    saved = json.loads((out / "dfvt_tiny" / "t" / "config.json").read_text())
    ckpt = torch.load(out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth", weights_only=True)
    assert saved == yaml.safe_load(parsed.dump()) == yaml.safe_load(ckpt["config"])
    assert saved["MODEL"]["NUM_CLASSES"] == 1000 and saved["TRAIN"]["BASE_LR"] == 5e-4  # not rewritten by the run


def test_checkpoint_holds_what_the_data_and_the_scaling_decided(trained):
    _, out = trained
    ckpt = torch.load(out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth", weights_only=True)
    assert ckpt["model"]["head.weight"].shape == (3, 384) and ckpt["class_names"] == ["a", "b", "c"]
    assert ckpt["epoch"] == 0 and len(ckpt["rng"]) == 1
    assert {g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]} == {5e-4 * 4 / 512}
    assert ckpt["max_accuracy"] == pytest.approx(float(summaries(log_of(out))[0][0]), abs=5e-4)


def test_eval_of_the_checkpoint_in_process(trained, tmp_path):
    data, out = trained
    ckpt = out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    folder = out / "dfvt_tiny" / "t"
    training_files = {name: (folder / name).read_bytes() for name in ("log_rank0.txt", "config.json")}
    # Evaluated in the training run's own folder: it writes its own files and leaves the training's alone.
    assert run_main(*main_args(data, out, "--eval", "--resume", ckpt)) == 0
    log = log_of(out, mode="eval")
    assert "Run: eval" in log and "(strict: every key and shape matched)" in log
    assert summaries(log) == summaries(log_of(out))
    assert {name: (folder / name).read_bytes() for name in training_files} == training_files
    assert json.loads((folder / "eval_config.json").read_text())["EVAL_MODE"] is True


def test_throughput_reports_its_warm_up(tmp_path):
    assert run_main(*main_args(None, tmp_path, "--throughput")) == 0
    log = log_of(tmp_path, mode="throughput")
    assert "throughput: 2 warm-up iterations on a synthetic batch of 4, then 3 timed" in log
    assert re.search(r"throughput: warm-up took [\d.]+ s; timing 3 iterations", log)
    assert re.search(r"throughput [\d.]+ images/s \| batch 4 \| device cpu", log)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert run_main(*main_args(None, tmp_path)) == 2  # training without data
    errors = [line for line in log_of(tmp_path).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "DataError: DATA.DATA_PATH is empty; pass --data-path" in errors[0]
    assert main.main(["--cfg", config_path("tiny"), "--opts", "TRAIN.NOPE", "1"]) == 2
    assert "error: --opts TRAIN.NOPE 1" in capsys.readouterr().err


def test_runs_without_tensorboard(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with caplog.at_level(logging.INFO):
        assert create_tensorboard_writer(str(tmp_path), 0, logging.getLogger("tb")) is None
    assert "pip install tensorboard" in caplog.text
    assert create_tensorboard_writer(str(tmp_path), 1, logging.getLogger("tb")) is None


def test_an_unexpected_error_is_written_to_the_log_with_its_traceback(tmp_path, monkeypatch, trained):
    data, _ = trained

    def broken(*args, **kwargs):
        raise RuntimeError("boom from a bug")

    monkeypatch.setattr(main.engine, "train", broken)
    assert run_main(*main_args(data, tmp_path)) == 1
    log = log_of(tmp_path)
    assert "ERROR the run failed with an unexpected error (a bug: please report it with this log)" in log
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom from a bug" in log
