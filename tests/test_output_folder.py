"""The output folder: one training run per folder (a second run is refused in one line naming the folder and the PID
holding it and writes nothing there; a holder killed with ``kill -9`` leaves no stale lock), an unwritable folder is
one line, and a save that hits a real file-size limit ends the run in one line with every earlier checkpoint
intact."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

import main
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
    assert "earlier checkpoints in" in last and "Traceback" not in proc.stdout + proc.stderr
    assert hashlib.sha256(good.read_bytes()).hexdigest() == digest  # the last good checkpoint, untouched
    assert not list(folder.glob(".tmp-*")) and not (folder / "ckpt_epoch_1.pth").exists()


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
