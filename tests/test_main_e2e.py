"""main.py end to end, as a user runs it: train → checkpoint → --eval → --throughput, zip mode,
two-process training and evaluation under each launcher convention, and bad data (all ``slow``)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import (
    FINGERPRINT,
    ROOT,
    check,
    clean_env,
    free_port,
    launcher,
    log_of,
    main_args,
    run,
    summaries,
    write_image_folder,
    write_zip_dataset,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of single-process training on 3 classes × 4 JPEGs (9 validation images)."""
    base = tmp_path_factory.mktemp("e2e")
    data = write_image_folder(base / "data", n_train=4, n_val=3)
    out = base / "out"
    proc = check(run([sys.executable, *main_args(data, out)]))
    return data, out, proc


def test_train_writes_checkpoint_and_logs(trained):
    data, out, proc = trained
    ckpt = out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and "model" in state and "optimizer" in state
    assert state["class_names"] == ["a", "b", "c"]  # for predict.py
    assert state["model"]["head.weight"].shape == (3, 384)
    log = log_of(out)
    assert "analytic GFLOPs" in log and "measured GFLOPs" in log and "params 3," in log
    assert "Precision: fp32" in log
    assert re.search(r"Train: \[0/1\]\[3/3\]", log)  # 12 images / batch 4 = 3 steps
    assert len(summaries(log)) == 1 and FINGERPRINT.search(log)
    saved_config = json.loads((out / "dfvt_tiny" / "t" / "config.json").read_text())
    # The run's config as parsed, in both places; what the data decided is in the log and the model, not the config.
    assert yaml.safe_load(state["config"]) == saved_config and saved_config["DATA"]["DATASET"] == "folder"
    assert re.search(r"Data: folder \S+ \| 3 classes \| 12 train, 9 val images", log)


def test_eval_of_the_checkpoint_reproduces_the_training_validation(trained):
    data, out, _ = trained
    ckpt = out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    eval_out = out.parent / "eval1"
    proc = check(run([sys.executable, *main_args(data, eval_out, "--eval", "--resume", str(ckpt))]))
    assert summaries(proc.stdout) == summaries(log_of(out))
    assert "Loaded weights from" in proc.stdout and "(strict: every key and shape matched)" in proc.stdout


def test_throughput_without_and_with_data(trained):
    data, out, _ = trained
    proc = check(run([sys.executable, *main_args(None, out.parent / "tp", "--throughput")]))
    match = re.search(r"throughput ([\d.]+) images/s \| batch 4 \| device cpu .*\| dtype fp32", proc.stdout)
    assert match and float(match.group(1)) > 0
    proc = check(run([sys.executable, *main_args(data, out.parent / "tp2", "--throughput")]))
    assert re.search(r"throughput [\d.]+ images/s \| batch 4 \|", proc.stdout)


def test_zip_mode_training(trained, tmp_path):
    data, _, _ = trained
    zips = write_zip_dataset(data, tmp_path / "zips")
    out = tmp_path / "out"
    check(run([sys.executable, *main_args(zips, out, "--zip", "--cache-mode", "part")]))
    log = log_of(out)
    assert re.search(r"Train: \[0/1\]\[3/3\]", log) and len(summaries(log)) == 1
    assert (out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth").is_file()


def test_torchrun_two_process_training_keeps_ranks_identical(trained, tmp_path):
    data, _, _ = trained
    out = tmp_path / "ddp"
    proc = check(run(launcher("torch.distributed.run") + main_args(data, out, batch=2)))
    logs = [log_of(out, 0), log_of(out, 1)]
    assert "rank 1/2" in logs[1] and "rank 0/2" in logs[0]
    # 12 images over 2 ranks at batch 2: 3 steps per rank.
    assert all(re.search(r"Train: \[0/1\]\[3/3\]", log) for log in logs), proc.stdout[-2000:]
    prints = [FINGERPRINT.search(log).group(1) for log in logs]
    assert prints[0] == prints[1]


def _eval_cmd(trained, out: Path) -> list[str]:
    data, train_out, _ = trained
    ckpt = train_out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    return main_args(data, out, "--eval", "--resume", str(ckpt), batch=2)


def test_eval_figures_identical_under_every_launcher(trained, tmp_path):
    """9 validation images: 1 process and 2 processes (5 + 4 images, no padding) report the same figures."""
    single = summaries(check(run([sys.executable, *_eval_cmd(trained, tmp_path / "single")])).stdout)
    assert len(single) == 1

    out = tmp_path / "torchrun"
    check(run(launcher("torch.distributed.run") + _eval_cmd(trained, out)))
    assert summaries(log_of(out, mode="eval")) == single and "rank 1/2" in log_of(out, 1, mode="eval")

    # The deprecated launcher passes --local-rank=K.
    out = tmp_path / "launch"
    check(run(launcher("torch.distributed.launch") + _eval_cmd(trained, out)))
    assert summaries(log_of(out, mode="eval")) == single and "rank 1/2" in log_of(out, 1, mode="eval")

    # Older launchers pass --local_rank K and no LOCAL_RANK variable.
    out = tmp_path / "local_rank"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, *_eval_cmd(trained, out), "--local_rank", str(r)],
            cwd=ROOT,
            env=clean_env({"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert summaries(log_of(out, mode="eval")) == single and "rank 1/2" in log_of(out, 1, mode="eval")


def test_missing_data_path_is_reported_before_training(tmp_path):
    proc = run([sys.executable, *main_args(None, tmp_path / "out")])
    assert proc.returncode == 2
    assert "--data-path" in proc.stdout + proc.stderr
    assert "Start training" not in proc.stdout


def test_unreadable_image_during_training_names_the_file(tmp_path):
    data = write_image_folder(tmp_path / "data", n_train=4, n_val=3)
    bad = data / "train" / "b" / "2.jpg"
    bad.write_bytes(b"this is not a JPEG")
    proc = run([sys.executable, *main_args(data, tmp_path / "out")])
    assert proc.returncode == 2
    assert str(bad) in proc.stdout and "Traceback" not in proc.stdout + proc.stderr


def test_tensorboard_scalars_match_the_log(trained):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = trained
    events = EventAccumulator(str(out / "dfvt_tiny" / "t" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/epoch_time_s", "val/top1", "val/top5", "val/loss"}
    assert expected <= tags
    assert len(events.Scalars("train/loss")) == 3  # one per optimizer step
    acc1, acc5, loss = summaries(log_of(out))[0]
    assert events.Scalars("val/top1")[0].value == pytest.approx(float(acc1), abs=1e-3)
    assert events.Scalars("val/loss")[0].value == pytest.approx(float(loss), abs=1e-4)
