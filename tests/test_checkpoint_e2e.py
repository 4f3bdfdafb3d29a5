"""Checkpoints through main.py: exact resume after kill -9, upstream files, hostile and broken files,
fine-tuning, and a diverging run that must not overwrite good checkpoints."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from checkpoint import load_file
from config import load_config
from models import build_model
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    Hostile,
    check,
    clean_env,
    log_of,
    main_args,
    run,
    summaries,
    upstream_checkpoint,
    write_image_folder,
)

pytestmark = pytest.mark.slow

# Three epochs with the full augmentation recipe (RandAugment, random erasing, Mixup/CutMix), stochastic
# depth and a loader worker, so every source of randomness has to continue exactly after a resume.
EXACT = ("TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "DATA.NUM_WORKERS", "1", "MODEL.DROP_PATH_RATE", "0.1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("ckpt_data") / "data", n_train=8, n_val=3)


@pytest.mark.parametrize("recipe", ["upstream", "ema+distillation"])
def test_killed_run_resumes_bit_identically(data, tmp_path, recipe):
    opts = EXACT
    if recipe != "upstream":  # the weight average and a soft-distillation teacher (a DFvT-T of its own weights)
        teacher = tmp_path / "teacher.pth"
        torch.manual_seed(1)
        teacher_config = load_config(
            str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "3"]
        )
        torch.save({"model": build_model(teacher_config).state_dict()}, teacher)
        opts += ("TRAIN.EMA.ENABLE", "True", "TRAIN.EMA.DECAY", "0.9")
        opts += ("TRAIN.DISTILL.TEACHER", "configs/tiny.yaml", "TRAIN.DISTILL.CHECKPOINT", str(teacher))
    uninterrupted = tmp_path / "a"
    check(run([sys.executable, *main_args(data, uninterrupted, opts=opts)]))
    reference = FINGERPRINT.search(log_of(uninterrupted)).group(1)

    interrupted = tmp_path / "b"
    cmd = [sys.executable, *main_args(data, interrupted, opts=opts)]
    first_ckpt = interrupted / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not first_ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert "Training time" not in log_of(interrupted)  # it really died mid-run

    check(run(cmd))
    log = log_of(interrupted)
    assert "Resuming from" in log and "continuing at epoch" in log
    assert FINGERPRINT.search(log).group(1) == reference
    # The validation figures of the last epoch agree too, and the weight average and distillation terms with them.
    assert summaries(log)[-1] == summaries(log_of(uninterrupted))[-1]
    if recipe != "upstream":
        ema = re.compile(r"Final EMA fingerprint \(sha256 of the state_dict\): ([0-9a-f]{64})")
        assert ema.search(log).group(1) == ema.search(log_of(uninterrupted)).group(1)
        assert re.search(r"\tbase [\d.]+ \([\d.]+\)\tdistill [\d.]+ \([\d.]+\)\t", log)


def test_upstream_format_checkpoint_evaluates(data, tmp_path):
    model = build_model(
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "3"])
    )
    path = tmp_path / "dfvt_tiny_upstream.pth"
    torch.save(upstream_checkpoint(model), path)
    proc = check(run([sys.executable, *main_args(data, tmp_path / "out", "--eval", "--resume", str(path))]))
    assert "(strict: every key and shape matched)" in proc.stdout
    assert len(summaries(proc.stdout)) == 1


def test_training_resume_from_upstream_file_skips_foreign_state(data, tmp_path):
    model = build_model(
        load_config(str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "3"])
    )
    path = tmp_path / "upstream.pth"
    ckpt = upstream_checkpoint(model)
    ckpt["epoch"] = 0
    torch.save(ckpt, path)
    proc = check(
        run([sys.executable, *main_args(data, tmp_path / "out", "--resume", str(path), opts=("TRAIN.EPOCHS", "2"))])
    )
    assert "optimizer state does not fit this run and was skipped" in proc.stdout
    assert "apex loss-scaler state ignored" in proc.stdout
    assert "continuing at epoch 1" in proc.stdout and len(summaries(proc.stdout)) == 1


def one_line_failure(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert len(errors) == 1
    return errors[0]


def test_hostile_checkpoint_is_refused_by_eval(data, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Hostile(marker)}, path)
    line = one_line_failure(run([sys.executable, *main_args(data, tmp_path / "out", "--eval", "--resume", str(path))]))
    assert not marker.exists()
    assert str(path) in line and "posix.system" in line and "refused" in line


@pytest.mark.parametrize("kind", ["missing", "truncated", "not_a_checkpoint"])
def test_broken_checkpoints_give_one_line(data, tmp_path, kind):
    path = tmp_path / f"{kind}.pth"
    if kind == "truncated":
        model = build_model(load_config(str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32"]))
        torch.save({"model": model.state_dict()}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "not_a_checkpoint":
        path.write_text("epoch,acc\n1,50.0\n")
    line = one_line_failure(run([sys.executable, *main_args(data, tmp_path / "out", "--eval", "--resume", str(path))]))
    assert str(path) in line


def test_wrong_variant_suggests_the_right_config(data, tmp_path):
    small = build_model(
        load_config(str(ROOT / "configs" / "small.yaml"), ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "3"])
    )
    path = tmp_path / "dfvt_small.pth"
    torch.save({"model": small.state_dict()}, path)
    line = one_line_failure(run([sys.executable, *main_args(data, tmp_path / "out", "--eval", "--resume", str(path))]))
    assert "this looks like DFvT-S: use configs/small.yaml" in line and "patch_embed" in line


def test_fine_tune_to_ten_classes(tmp_path):
    pretrained = build_model(load_config(str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32"]))
    path = tmp_path / "imagenet_tiny.pth"
    torch.save({"model": pretrained.state_dict(), "epoch": 299}, path)
    data = write_image_folder(tmp_path / "ten", classes=[f"c{i}" for i in range(10)], n_train=1, n_val=1)
    out = tmp_path / "out"
    proc = check(run([sys.executable, *main_args(data, out, "--pretrained", str(path), opts=("TRAIN.EPOCHS", "1"))]))
    assert "head re-initialised (1000 classes in the file, 10 here)" in proc.stdout
    saved = load_file(str(out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"))
    assert saved["model"]["head.weight"].shape == (10, 384)
    assert saved["epoch"] == 0  # weights only: the file's epoch 299 is not resumed


def test_non_finite_loss_stops_without_touching_good_checkpoints(data, tmp_path):
    out = tmp_path / "out"
    check(run([sys.executable, *main_args(data, out)]))
    good = out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    diverging = ("TRAIN.EPOCHS", "3", "TRAIN.BASE_LR", "1e30", "TRAIN.AUTO_RESUME", "False")
    line = one_line_failure(run([sys.executable, *main_args(data, out, opts=diverging)]))
    assert "NonFiniteLossError" in line and "at epoch 0, step" in line and "Last good checkpoint" in line
    assert hashlib.sha256(good.read_bytes()).hexdigest() == digest
    # Nothing new was written: the epoch-0 checkpoint and ckpt_best.pth (that same epoch) are all there is.
    assert sorted(p.name for p in good.parent.glob("*.pth")) == ["ckpt_best.pth", "ckpt_epoch_0.pth"]
    assert hashlib.sha256((good.parent / "ckpt_best.pth").read_bytes()).hexdigest() == digest
