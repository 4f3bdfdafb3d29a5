"""The output folder: one training run per folder (a second run is refused in one line naming the folder and the PID
holding it and writes nothing there; a holder killed with ``kill -9`` leaves no stale lock), an unwritable folder is
one line, and a save that hits a real file-size limit ends the run in one line with every earlier checkpoint
intact."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine
import main
from checkpoint import find_resumable, load_file, resume_position
from tests.helpers import ROOT, clean_env, log_of, main_args, write_image_folder
from utils import DistEnv, lock_run_folder

HOLD = """
import os, sys, time, torch
from utils import DistEnv, lock_run_folder
handle = lock_run_folder(sys.argv[1], DistEnv(0, 1, 0, torch.device("cpu")))
if sys.argv[2] == "fork" and os.fork() == 0:  # a child that outlives its parent, as a loader worker can
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(120)
"""


LOG = logging.getLogger("test_output_folder")


def hold_lock(folder, fork: bool = False) -> subprocess.Popen:
    """Another process holding the run lock of ``folder`` (it prints ``locked`` once it has it); ``fork``: with a
    forked child that keeps running when the holder is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), "fork" if fork else "-"],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    folder = out / "dfvt_tiny" / "t"
    args = [str(a) for a in main_args(data, out)[1:]]
    holder = hold_lock(folder)
    try:
        assert main.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: the output folder {folder} is in use by another run (PID {holder.pid}); wait for it to finish "
            f"or stop it, or pass another --output or --tag."
        ]
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no log, config or checkpoint written
        # Evaluation and throughput write no checkpoints and do not take the lock.
        assert main.main([str(a) for a in main_args(None, out, "--throughput")[1:]]) == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main.main(args) == 0  # the OS released the killed holder's lock
    assert (folder / "ckpt_epoch_0.pth").is_file()


def test_an_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    args = [str(a) for a in main_args(None, blocker / "out", "--throughput")[1:]]
    assert main.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the output folder {blocker / 'out' / 'dfvt_tiny' / 't'} ")
    assert "is not writable (Not a directory); pass --output (OUTPUT) a folder you can write to" in err[0]


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past the limit fail with EFBIG instead of a SIGXFSZ kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_save_past_a_real_size_limit_loses_nothing(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    folder = out / "dfvt_tiny" / "t"
    cmd = [sys.executable, *[str(a) for a in main_args(data, out)]]
    first = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    good = folder / "ckpt_epoch_0.pth"
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    limit = 4 * 2**20  # far below a checkpoint (tens of MiB), far above the log
    again = cmd + ["TRAIN.EPOCHS", "2"]  # a second epoch, resumed from the first; its save hits the limit
    limited = _file_size_limit(limit)
    proc = subprocess.run(
        again, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300, preexec_fn=limited
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = log_of(out).strip().splitlines()[-1]
    assert f"CheckpointError: cannot write {folder / 'ckpt_epoch_1.pth'} (File too large; " in last
    assert re.search(r"\(File too large; \d+ MiB free there\); earlier checkpoints in ", last), last
    assert "Traceback" not in proc.stdout + proc.stderr
    _intact(folder, good, digest)


def _intact(folder: Path, good: Path, digest: str) -> None:
    """``good`` (ckpt_epoch_0.pth) is untouched, loads, and is what a rerun continues from; nothing half-written."""
    assert hashlib.sha256(good.read_bytes()).hexdigest() == digest
    saved = load_file(str(good))
    assert saved["epoch"] == 0 and saved["model"] and all(torch.isfinite(v).all() for v in saved["model"].values())
    path, ckpt = find_resumable(str(folder), LOG)
    assert path == str(good) and resume_position(ckpt) == (1, 0)
    assert not list(folder.glob(".tmp-*")) and not (folder / "ckpt_epoch_1.pth").exists()


def _read_only(folder: Path) -> None:
    """Make ``folder`` read-only (0o555); skip the test where that does not stop writes (root, or a filesystem that
    ignores modes)."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip(f"a read-only folder is still writable here (uid {os.getuid()}): permissions cannot be tested")


def test_a_read_only_output_folder_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    _read_only(out)
    try:
        assert main.main([str(a) for a in main_args(None, out)[1:]]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the output folder {out / 'dfvt_tiny' / 't'} is not writable ")
    assert "(Permission denied); pass --output (OUTPUT) a folder you can write to" in err[0]
    assert not list(out.iterdir())


def test_an_output_folder_made_read_only_during_a_run_loses_nothing(tmp_path, monkeypatch):
    (tmp_path / "probe").mkdir()
    _read_only(tmp_path / "probe")  # skips now, not after an epoch, where modes do not stop writes
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    folder = out / "dfvt_tiny" / "t"
    args = [str(a) for a in main_args(data, out, opts=("TRAIN.EPOCHS", "2"))[1:]]
    validate = engine.validate
    made_read_only = []

    def validate_then_lock(*a, **kw):  # after epoch 0's checkpoint, the folder turns read-only (epoch 1 validating)
        figures = validate(*a, **kw)
        if (folder / "ckpt_epoch_0.pth").exists() and not made_read_only:
            made_read_only.append(hashlib.sha256((folder / "ckpt_epoch_0.pth").read_bytes()).hexdigest())
            folder.chmod(0o555)
        return figures

    monkeypatch.setattr(engine, "validate", validate_then_lock)
    try:
        code = main.main(args)
    finally:
        folder.chmod(0o755)
    assert code == 2 and made_read_only
    last = log_of(out).strip().splitlines()[-1]
    # Epoch 1's first write (its summary.csv row, then its checkpoint) fails: one line, naming the file, the error
    # and the free space.
    assert re.search(
        rf"CheckpointError: cannot write {re.escape(str(folder))}/\S+ \(Permission denied; \d+ MiB free ", last
    )
    assert f"earlier checkpoints in {folder} are intact" in last
    _intact(folder, folder / "ckpt_epoch_0.pth", made_read_only[0])


def test_a_forked_child_of_a_killed_holder_does_not_keep_the_lock(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder, fork=True)
    holder.send_signal(signal.SIGKILL)  # the child (a loader worker, say) lives on for a while
    holder.wait()
    try:
        handle = lock_run_folder(str(folder), DistEnv(0, 1, 0, torch.device("cpu")))  # at once: not "in use"
        handle.close()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
