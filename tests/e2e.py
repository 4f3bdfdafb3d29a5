"""Helpers for end-to-end tests: run main.py (alone or under a launcher) as a user would, and read its logs."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
SMALL_RUN = [
    "DATA.DATASET", "folder", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
    "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1",
    "THROUGHPUT.WARMUP_ITERS", "2", "THROUGHPUT.ITERS", "3",
]  # fmt: skip
SUMMARY = re.compile(r"\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) Loss (\d+\.\d{4})")
FINGERPRINT = re.compile(r"Final weights fingerprint \(sha256 of the state_dict\): ([0-9a-f]{64})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(module: str, nproc: int = 2) -> list[str]:
    """``python -m <module> --nproc_per_node N --master_port P`` for torch.distributed.run or .launch."""
    return [sys.executable, "-m", module, "--nproc_per_node", str(nproc), "--master_port", str(free_port())]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without launcher variables (unless given in ``extra``), one thread per process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def run(cmd: list[str], env_extra: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo root, capturing its output."""
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(env_extra), capture_output=True, text=True, timeout=timeout)


def main_args(data: Path | None, out: Path, *extra: str, batch: int = 4, opts: tuple[str, ...] = ()) -> list[str]:
    args = ["main.py", "--cfg", "configs/tiny.yaml", "--batch-size", str(batch), "--amp-opt-level", "O0"]
    args += ["--output", str(out), "--tag", "t"] + list(extra)
    if data is not None:
        args += ["--data-path", str(data)]
    return args + ["--opts", *SMALL_RUN, *opts]


def log_of(out: Path, rank: int = 0) -> str:
    return (out / "dfvt_tiny" / "t" / f"log_rank{rank}.txt").read_text()


def summaries(text: str) -> list[tuple[str, str, str]]:
    return SUMMARY.findall(text)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc
