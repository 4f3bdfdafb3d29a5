"""Signals and preemption: SIGINT/SIGTERM/SIGUSR1 stop training after a step with a mid-epoch checkpoint, the rerun
continues bit-identically; SAVE_STEPS recovery checkpoints survive kill -9; the input pipeline's draws depend on
where they happen only (workers, prefetching and interruptions change nothing); explicit --resume conflicts."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset

import engine
from checkpoint import RECOVERY_FILE, find_resumable, load_file, resume_position
from config import load_config
from data import DeviceLoader, ResumableSampler, SeededSamples, isolated_rng
from errors import ConfigError
from lr_scheduler import build_scheduler
from models import build_model
from optimizer import build_optimizer
from tests.helpers import (
    FINGERPRINT,
    ROOT,
    check,
    clean_env,
    config_path,
    free_port,
    launcher,
    log_of,
    main_args,
    run,
    write_image_folder,
)
from utils import DistEnv, StopRequest

CPU = DistEnv(0, 1, 0, torch.device("cpu"))
LOG = logging.getLogger("test_signals")

# ----------------------------------------------------------------------------------------------- the pieces


def test_stop_request_records_the_first_signal_and_a_second_ctrl_c_interrupts():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopRequest(CPU).install()
    try:
        assert stop.agreed() == 0
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first one is what the run reports
        assert stop.agreed() == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user insists: no waiting for the step
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before


def test_resumable_sampler_skips_the_first_indices_of_the_epoch():
    inner = torch.utils.data.RandomSampler(range(10), generator=torch.Generator().manual_seed(3))
    sampler = ResumableSampler(inner)
    sampler.set_epoch(0)
    whole = list(sampler)
    assert sorted(whole) == list(range(10)) and len(sampler) == 10
    inner.generator.manual_seed(3)  # RandomSampler has no set_epoch: the same order again
    sampler.set_epoch(0, skip=4)
    assert list(sampler) == whole[4:] and len(sampler) == 6
    with pytest.raises(ValueError):
        sampler.set_epoch(0, skip=11)


class Draws(Dataset):
    """Each item is what the global generators give: Python's, NumPy's and torch's."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[float, float, float]:
        import random

        return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_seeded_samples_depend_on_epoch_and_index_only_and_leave_the_caller_alone():
    ds = SeededSamples(Draws(), seed=7)
    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    forward = [ds[i] for i in range(6)]
    assert torch.equal(torch.rand(3), expected_next)  # the caller's torch stream did not move
    backward = [ds[i] for i in reversed(range(6))][::-1]
    assert forward == backward  # order and what ran before do not matter
    assert len(set(forward)) == 6 and all(len(set(item)) == 3 for item in forward)
    ds.set_epoch(1)
    assert all(a != b for a, b in zip(forward, [ds[i] for i in range(6)], strict=True))  # a new epoch, new draws
    # Through loader workers too: 0 and 2 workers give the same items.
    ds.set_epoch(0)
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=2, num_workers=workers)
        got = [tuple(float(x) for x in col) for batch in loader for col in zip(*batch, strict=True)]
        assert got == forward


def test_isolated_rng_restores_every_generator():
    import random

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    reference = random.random(), float(np.random.rand()), float(torch.rand(()))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with isolated_rng(123):
        inside = random.random(), float(np.random.rand()), float(torch.rand(()))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == reference
    with isolated_rng(123):
        assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == inside


class Images(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3, 8, 8), i * 10, dtype=torch.uint8), i


def _erasing_loader() -> DeviceLoader:
    sampler = ResumableSampler(torch.utils.data.SequentialSampler(range(16)))
    loader = DataLoader(Images(), batch_size=4, sampler=sampler, drop_last=True)
    erasing = RandomErasing(1.0, mode="pixel", device="cpu")
    return DeviceLoader(loader, "cpu", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), erasing, seed=5, rank=0)


def test_device_erasing_continues_identically_from_any_batch():
    loader = _erasing_loader()
    loader.set_epoch(2)
    whole = [x for x, _ in loader]
    loader.set_epoch(2, first_batch=2)
    torch.manual_seed(99)  # whatever the caller's generators hold
    rest = [x for x, _ in loader]
    assert len(whole) == 4 and len(rest) == 2
    assert all(torch.equal(a, b) for a, b in zip(whole[2:], rest, strict=True))
    assert not torch.equal(whole[0][0], whole[0][1])  # it did erase (pixel noise differs per image)


# ----------------------------------------------------------------------------------------------- resume choices


def _tiny_run() -> engine.RunState:
    config = load_config(config_path("tiny"), ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "3"])
    model = build_model(config)
    optimizer = build_optimizer(config, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return engine.RunState(model, optimizer, build_scheduler(config, optimizer, 10), scaler)


def _folder_config(folder: Path, resume: str = ""):
    return load_config(
        config_path("tiny"),
        ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "3", "OUTPUT", str(folder), "MODEL.RESUME", resume],
    )


def _save(run: engine.RunState, path: Path, epoch: int, position: dict | None = None, origin: str = "") -> None:
    run.next_epoch, run.position, run.origin = epoch + 1, position, origin
    torch.save(run.state_dict(), path)


def test_the_recovery_checkpoint_is_chosen_when_it_is_further(tmp_path):
    run = _tiny_run()
    _save(run, tmp_path / "ckpt_epoch_1.pth", 1)
    _save(run, tmp_path / RECOVERY_FILE, 2, {"epoch": 3, "step": 4})
    path, ckpt = find_resumable(str(tmp_path), LOG)
    assert path.endswith(RECOVERY_FILE) and resume_position(ckpt) == (3, 4)
    _save(run, tmp_path / "ckpt_epoch_3.pth", 3)  # a later epoch checkpoint beats it
    path, ckpt = find_resumable(str(tmp_path), LOG)
    assert path.endswith("ckpt_epoch_3.pth") and resume_position(ckpt) == (4, 0)


def test_an_explicit_resume_that_conflicts_with_the_folder_is_an_error(tmp_path):
    run = _tiny_run()
    other = tmp_path / "elsewhere.pth"
    _save(run, other, 5)
    folder = tmp_path / "run"
    folder.mkdir()
    _save(run, folder / "ckpt_epoch_0.pth", 0, origin="")  # a run that did not start from `other`
    with pytest.raises(ConfigError, match=r"--resume .*elsewhere.pth is not where the run in .* started") as e:
        engine.resume(_folder_config(folder, str(other)), _tiny_run(), CPU, LOG)
    assert "drop --resume" in str(e.value) and "\n" not in str(e.value)
    # The folder's run started from it (a rerun of the same command after preemption): the folder's run continues.
    _save(run, folder / "ckpt_epoch_0.pth", 0, origin=str(other))
    state = _tiny_run()
    assert engine.resume(_folder_config(folder, str(other)), state, CPU, LOG).endswith("ckpt_epoch_0.pth")
    assert state.next_epoch == 1 and state.origin == str(other)
    # An empty folder: --resume is where the run starts, and its checkpoints will say so.
    state = _tiny_run()
    engine.resume(_folder_config(tmp_path / "new", str(other)), state, CPU, LOG)
    assert state.next_epoch == 6 and state.origin == str(other)


# ----------------------------------------------------------------------------------------------- through main.py

# Three epochs of six steps with the full augmentation recipe, stochastic depth and a loader worker.
EXACT = ("TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1", "DATA.NUM_WORKERS", "1", "MODEL.DROP_PATH_RATE", "0.1")
STEP_LINE = re.compile(r"Train: \[1/3\]\[2/6\]")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("signals") / "data", n_train=8, n_val=3)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run's output folder."""
    out = tmp_path_factory.mktemp("uninterrupted")
    check(run([sys.executable, *main_args(data, out, opts=EXACT)]))
    return out


def _epoch_rows(out: Path) -> list[list[str]]:
    """summary.csv without the epoch times."""
    lines = (out / "dfvt_tiny" / "t" / "summary.csv").read_text().splitlines()
    return [line.split(",")[:-1] for line in lines]


def _start(cmd: list[str]) -> subprocess.Popen:
    # A session of its own, as a terminal's foreground job: Ctrl-C reaches the loader workers too.
    return subprocess.Popen(
        cmd, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _wait_for(path: Path, pattern: re.Pattern, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and pattern.search(path.read_text()):
            return
        time.sleep(0.02)
    raise AssertionError(f"{pattern.pattern} never appeared in {path}")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c to the process group", "SIGUSR1 from the scheduler"])
def test_a_signal_stops_after_the_step_and_the_rerun_is_bit_identical(data, reference, tmp_path, how):
    cmd = [sys.executable, *main_args(data, tmp_path, opts=EXACT)]
    proc = _start(cmd)
    _wait_for(tmp_path / "dfvt_tiny" / "t" / "log_rank0.txt", STEP_LINE, proc)
    sig = signal.SIGINT if how.startswith("ctrl-c") else signal.SIGUSR1
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # what a terminal does: the main process and its loader workers
    else:
        proc.send_signal(sig)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig, output[-3000:]
    assert "Traceback" not in output
    stopped = re.findall(rf"stopped by {sig.name} at epoch 1, step (\d)/6 \(saved in (\S+)\); rerun the same", output)
    assert len(stopped) == 1 and 3 <= int(stopped[0][0]) < 6, output[-3000:]  # mid-epoch, after step 2
    recovery = Path(stopped[0][1])
    assert recovery.name == RECOVERY_FILE and load_file(str(recovery))["position"]["step"] == int(stopped[0][0])

    resumed = check(run(cmd))
    log = log_of(tmp_path)
    assert f"continuing at epoch 1, step {stopped[0][0]}" in log
    assert FINGERPRINT.search(log).group(1) == FINGERPRINT.search(log_of(reference)).group(1)
    assert not recovery.exists()  # superseded by a later epoch checkpoint, then removed
    # summary.csv: one row per epoch, with the same figures as the uninterrupted run (the interrupted epoch's
    # training loss included), epoch times aside.
    assert f"Train: [1/3][{int(stopped[0][0]) + 1}/6]" in resumed.stdout
    assert _epoch_rows(tmp_path) == _epoch_rows(reference) and len(_epoch_rows(tmp_path)) == 4
    # Rerunning a finished run says so and trains nothing.
    again = check(run(cmd))
    assert "This run is finished" in again.stdout and "Train: [" not in again.stdout


@pytest.mark.slow
def test_save_steps_limits_what_kill_9_loses(data, reference, tmp_path):
    cmd = [sys.executable, *main_args(data, tmp_path, opts=(*EXACT, "SAVE_STEPS", "4"))]
    recovery = tmp_path / "dfvt_tiny" / "t" / RECOVERY_FILE
    proc = _start(cmd)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a recovery checkpoint inside epoch 1 (global step 8)
        if recovery.exists() and "(epoch 1, step 2)" in log_of(tmp_path):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "Training time" not in log_of(tmp_path)
    # One recovery checkpoint, the newest: at a multiple of 4 steps, the last one logged or (killed between writing
    # it and logging it) the next. (None if the kill came after epoch 1's checkpoint, which supersedes it.)
    kept = [p.name for p in recovery.parent.glob("*recovery*")]
    assert kept == [RECOVERY_FILE] or (kept == [] and (recovery.parent / "ckpt_epoch_1.pth").exists()), kept
    if kept:
        position = load_file(str(recovery))["position"]
        logged = re.findall(r"saved \(epoch (\d+), step (\d+)\)", log_of(tmp_path))
        last = int(logged[-1][0]) * 6 + int(logged[-1][1])
        assert last % 4 == 0 and position["epoch"] * 6 + position["step"] in (last, last + 4), (position, logged)
    check(run(cmd))
    log = log_of(tmp_path)
    assert re.search(r"continuing at epoch 1, step [2-5]", log) or "continuing at epoch 2" in log
    assert FINGERPRINT.search(log).group(1) == FINGERPRINT.search(log_of(reference)).group(1)


def test_save_steps_keeps_only_the_newest_recovery_checkpoint(tmp_path, monkeypatch):
    import main

    data = write_image_folder(tmp_path / "data", n_train=8, n_val=1)  # 24 images: 6 steps of 4
    out = tmp_path / "out"
    folder = out / "dfvt_tiny" / "t"
    seen = []  # after each save: the recovery files in the folder, with the step each holds

    def recovery_files() -> list[tuple[str, int]]:
        found = sorted(folder.glob("*recovery*"))
        return [(p.name, int(load_file(str(p))["position"]["step"])) for p in found]

    save = engine.save_checkpoint

    def save_and_look(path, *args, **kwargs):
        save(path, *args, **kwargs)
        seen.append((os.path.basename(path), recovery_files()))

    monkeypatch.setattr(engine, "save_checkpoint", save_and_look)
    args = main_args(data, out, opts=("SAVE_STEPS", "2"))[1:]
    assert main.main([str(a) for a in args]) == 0
    # Steps 2 and 4 write the recovery checkpoint, each replacing the last; step 6 ends the epoch, whose own
    # checkpoint follows (and then the recovery checkpoint, older, is removed).
    assert seen == [
        (RECOVERY_FILE, [(RECOVERY_FILE, 2)]),
        (RECOVERY_FILE, [(RECOVERY_FILE, 4)]),
        ("ckpt_epoch_0.pth", [(RECOVERY_FILE, 4)]),
    ]
    assert recovery_files() == [] and not list(folder.glob(".tmp-*"))


@pytest.mark.slow
def test_the_number_of_loader_workers_does_not_change_training(data, tmp_path):
    opts = ("DATA.IMG_SIZE", "32", "MODEL.DROP_PATH_RATE", "0.1")
    prints = []
    for workers in ("0", "2"):
        out = tmp_path / workers
        check(run([sys.executable, *main_args(data, out, opts=(*opts, "DATA.NUM_WORKERS", workers))]))
        prints.append(FINGERPRINT.search(log_of(out)).group(1))
    assert prints[0] == prints[1]


# ``python RECORD_STATUS FOLDER main.py ARGS`` runs ``python main.py ARGS`` and writes the status it exits with to
# FOLDER/status_rank<RANK>: torchrun stopped by a signal stops its processes without reporting their status.
RECORD_STATUS = """
import os, runpy, sys
folder, sys.argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    with open(os.path.join(folder, "status_rank" + os.environ["RANK"]), "w") as f:
        f.write(str(e.code))
    raise
"""


@pytest.mark.slow
def test_every_rank_stops_after_the_same_step_and_continues_exactly(tmp_path_factory, tmp_path):
    data = write_image_folder(tmp_path_factory.mktemp("signals2") / "data", n_train=16, n_val=2)
    opts = ("TRAIN.EPOCHS", "2", "TRAIN.WARMUP_EPOCHS", "1", "MODEL.DROP_PATH_RATE", "0.1")
    reference = tmp_path / "reference"
    check(run([*launcher("torch.distributed.run"), *main_args(data, reference, opts=opts)]))
    out, statuses = tmp_path / "stopped", tmp_path / "statuses"
    statuses.mkdir()
    (tmp_path / "record_status.py").write_text(RECORD_STATUS)
    cmd = [*launcher("torch.distributed.run"), str(tmp_path / "record_status.py"), str(statuses)]
    cmd += main_args(data, out, opts=opts)
    proc = _start(cmd)
    _wait_for(out / "dfvt_tiny" / "t" / "log_rank0.txt", re.compile(r"Train: \[1/2\]\[2/6\]"), proc)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to its processes
    output, _ = proc.communicate(timeout=240)
    # Every process exits 128 + SIGTERM, as one killed by it would. torchrun itself, stopped by the signal, ends with
    # its own error (status 1 in torch 2.x: its SignalException), never as a success.
    exits = {rank: (statuses / f"status_rank{rank}").read_text() for rank in (0, 1)}
    assert exits == {0: str(128 + signal.SIGTERM), 1: str(128 + signal.SIGTERM)}, output[-3000:]
    assert proc.returncode != 0, output[-3000:]
    steps = [re.findall(r"stopped by SIGTERM at epoch 1, step (\d)/6", log_of(out, rank)) for rank in (0, 1)]
    assert steps[0] == steps[1] and len(steps[0]) == 1 and int(steps[0][0]) < 6, output[-3000:]
    assert "Traceback" not in log_of(out, 0) + log_of(out, 1)
    check(run(cmd[:6] + [str(free_port())] + cmd[7:]))  # the same command, on a fresh port
    for rank in (0, 1):
        log = log_of(out, rank)
        assert f"continuing at epoch 1, step {steps[0][0]}" in log
        assert FINGERPRINT.search(log).group(1) == FINGERPRINT.search(log_of(reference, rank)).group(1)


@pytest.mark.slow
def test_ctrl_c_while_the_loader_workers_start_is_not_lost(data, tmp_path):
    cmd = [sys.executable, *main_args(data, tmp_path, opts=EXACT)]
    proc = _start(cmd)
    _wait_for(tmp_path / "dfvt_tiny" / "t" / "log_rank0.txt", re.compile("Start training"), proc)
    os.killpg(proc.pid, signal.SIGINT)  # the workers are being forked now (or about to be)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    assert re.search(r"stopped by SIGINT at epoch 0, step [1-6]/6 \(saved in \S+\); rerun the same command", output)
    assert "Traceback" not in output


def test_a_signal_during_validation_stops_after_the_epoch(tmp_path, monkeypatch):
    import main

    data = write_image_folder(tmp_path / "data")
    opts = ("TRAIN.EPOCHS", "2", "MODEL.DROP_PATH_RATE", "0.1")

    def run_main(out: Path) -> int:
        return main.main([str(a) for a in main_args(data, out, opts=opts)[1:]])

    assert run_main(tmp_path / "whole") == 0
    validate = engine.validate

    def validate_then_signal(*args, **kwargs):
        figures = validate(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)  # the scheduler's warning arrives while the epoch is being validated
        return figures

    monkeypatch.setattr(engine, "validate", validate_then_signal)
    out = tmp_path / "stopped"
    assert run_main(out) == 128 + signal.SIGUSR1
    saved = out / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"  # written after the validation, before the signal is acted on
    assert f"stopped by SIGUSR1 after epoch 0 (saved in {saved}); rerun the same command" in log_of(out)
    assert "Train: [1/2]" not in log_of(out) and resume_position(find_resumable(str(saved.parent), LOG)[1]) == (1, 0)
    monkeypatch.setattr(engine, "validate", validate)
    assert run_main(out) == 0
    assert "continuing at epoch 1" in log_of(out)
    assert FINGERPRINT.search(log_of(out)).group(1) == FINGERPRINT.search(log_of(tmp_path / "whole")).group(1)
