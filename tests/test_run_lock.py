"""One training run per output folder: a second run is refused in one line naming the folder and the PID holding
it, writes nothing there, and a holder killed with ``kill -9`` leaves no stale lock."""

from __future__ import annotations

import signal
import subprocess
import sys

import main
from tests.helpers import ROOT, clean_env, main_args, write_image_folder

HOLD = """
import sys, time, torch
from utils import DistEnv, lock_run_folder
handle = lock_run_folder(sys.argv[1], DistEnv(0, 1, 0, torch.device("cpu")))
print("locked", flush=True)
time.sleep(120)
"""


def hold_lock(folder) -> subprocess.Popen:
    """Another process holding the run lock of ``folder`` (it prints ``locked`` once it has it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True
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
