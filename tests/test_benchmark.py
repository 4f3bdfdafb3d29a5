"""benchmarks/benchmark.py on the CPU, with every option benchmarks/gpu_check.sh uses on a GPU (so a GPU session does
not meet a typo first): both paths side by side, autocast, the compiled column and the memory probe."""

from __future__ import annotations

import re
import sys

import pytest

from tests.helpers import check, run

pytestmark = pytest.mark.slow
TINY = ["--variants", "tiny", "--batch-size", "2", "--train-batch-size", "2", "--reps", "1", "--warmup", "1"]


def rows(stdout: str) -> dict[str, list[str]]:
    """``{path: [eval img/s, eval speed-up, train img/s, train speed-up, peak MiB, peak ratio, max rel diff]}``."""
    table = {}
    for line in stdout.splitlines():
        cells = [c.strip().removesuffix("×") for c in line.strip("| ").split("|")]
        if cells[0] == "tiny":
            table[cells[1]] = cells[2:]
    return table


def test_both_paths_under_autocast_with_memory():
    # --fast-dtype auto: the fast path in the dtype a run picks (bf16 on the CPU), as gpu_check.sh asks on a GPU.
    cmd = [sys.executable, "benchmarks/benchmark.py", *TINY, "--amp", "--fast-dtype", "auto"]
    proc = check(run(cmd, timeout=600))
    header = "straightforward bfloat16 autocast, fast bfloat16 autocast (GradScaler with float16); eval batch 2"
    assert header in proc.stdout
    table = rows(proc.stdout)
    assert set(table) == {"straightforward", "fast"}
    assert table["straightforward"][1] == "1.00" and float(table["fast"][0]) > 0
    assert float(table["straightforward"][4]) > 0 and float(table["fast"][4]) > 0  # peak MiB of each path
    assert float(table["fast"][6]) < 5e-2  # logits of the two paths under bf16


def test_compiled_column_and_options():
    # torch.compile itself is disabled here (TORCH_COMPILE_DISABLE): this checks the benchmark's own handling of it.
    cmd = [sys.executable, "benchmarks/benchmark.py", *TINY, "--compile", "--no-memory"]
    proc = check(run(cmd, env_extra={"TORCH_COMPILE_DISABLE": "1"}, timeout=600))
    table = rows(proc.stdout)
    assert set(table) == {"straightforward", "fast", "fast+compile"}
    assert table["fast+compile"][5] == "-"  # no memory column with --no-memory
    assert re.search(r"tiny fast\+compile: first eval call \(compiles\) took \d+ s", proc.stdout)
