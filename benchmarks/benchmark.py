"""Side-by-side speed and memory of the straightforward and the fast DFvT paths (and, on request, compiled).

For each variant both paths are built in one process with the same weights and fed the same input; their
timed repetitions alternate (the machines are shared and noisy). The table reports the median images/s of
each path and its speed-up: the median over repetitions of the straightforward path's time divided by this
path's time in the same repetition (adjacent in time, so a slow spell of the machine hits both). The train
step is forward, cross-entropy, backward and an AdamW step (with a GradScaler under CUDA fp16 autocast).

Peak memory of a train step: on CUDA, ``torch.cuda.max_memory_allocated`` over one step above what was
allocated before it. On CPU, the growth of the process's peak resident set (``VmHWM``) over one step after a
warm-up step, measured for each path in a fresh process with freed heap returned to the system first (glibc
``malloc_trim``), so it counts the step's activations, gradients and workspaces as the OS sees them.

    python benchmarks/benchmark.py --variants tiny small
    python benchmarks/benchmark.py --device cuda --amp --compile
    python benchmarks/benchmark.py --device cuda --amp --fast-dtype auto   # upstream-like fp16 vs ours (bf16)

With ``--amp`` the straightforward path runs as upstream did (fp16 autocast + GradScaler on CUDA, bf16 on the
CPU); ``--fast-dtype`` picks the fast path's autocast dtype (``same``: the straightforward path's; ``auto``: what a
run of this repo picks, ``AMP_DTYPE auto``), with a GradScaler whenever it is fp16.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from config import CONFIGS_DIR, load_config  # noqa: E402
from engine import choose_precision  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from utils import unwrap_model  # noqa: E402

PATHS = ("straightforward", "fast")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["tiny", "small", "base"], choices=["tiny", "small", "base"])
    parser.add_argument("--batch-size", type=int, default=32, help="images per eval forward")
    parser.add_argument("--train-batch-size", type=int, default=16, help="images per train step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="autocast: fp16 (+GradScaler) on CUDA, bf16 on CPU")
    dtypes = ["same", "auto", "bfloat16", "float16"]
    parser.add_argument("--fast-dtype", default="same", choices=dtypes, help="with --amp: the fast path's autocast")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the fast path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions per path (after compiling)")
    parser.add_argument("--reps", type=int, default=11, help="timed repetitions per path (median reported)")
    parser.add_argument("--iters", type=int, default=None, help="forwards/steps per repetition (CPU 1, CUDA 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-eval", action="store_true", help="skip the eval measurement")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--memory-probe", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def machine_description(device: torch.device) -> str:
    """CPU model and cores, torch version and threads, and the accelerator's name."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"CPU: {cpu}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}, load average {load}",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.release()}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"device: {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    else:
        lines.append("device: CPU")
    return "\n".join(lines)


def build(variant: str, path: str, device: torch.device) -> nn.Module:
    """The variant as ``build_model`` returns it, on the requested path."""
    opts = ["MODEL.DFVT.FAST_PATH", str(path != "straightforward")]
    return build_model(load_config(str(CONFIGS_DIR / f"{variant}.yaml"), opts)).to(device)


def amp_dtype(args: argparse.Namespace, path: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``path`` (None: fp32); see the module docstring."""
    if not args.amp:
        return None
    upstream = torch.float16 if device.type == "cuda" else torch.bfloat16
    if path == "straightforward" or args.fast_dtype == "same":
        return upstream
    if args.fast_dtype == "auto":
        return choose_precision(load_config(), device).dtype
    return getattr(torch, args.fast_dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_train_step(
    model: nn.Module, device: torch.device, dtype: torch.dtype | None, repo_optimizer: bool
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimisation step: forward, cross-entropy, backward, AdamW (GradScaler under fp16 autocast).

    ``repo_optimizer``: the AdamW users get from ``optimizer.build_optimizer`` (upstream parameter groups, fused
    kernel); otherwise ``torch.optim.AdamW`` with its defaults over all parameters, as the upstream code builds it.
    """
    if repo_optimizer:
        optimizer = build_optimizer(load_config(None, ["TRAIN.BASE_LR", "1e-4"]), unwrap_model(model))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def interleaved_times(
    runs: dict[str, Callable[[], None]], device: torch.device, warmup: int, reps: int, iters: int
) -> dict[str, list[float]]:
    """Seconds per iteration of each run, repetitions alternating between runs (order reversed every other rep)."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                runs[name]()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / iters)
    return times


def paired_speedup(reference: list[float], times: list[float]) -> float:
    """Median over repetitions of ``reference`` time / ``times`` time, pairing the same repetition."""
    return statistics.median(r / t for r, t in zip(reference, times, strict=True))


def peak_rss_growth_of_step(step: Callable[[], None]) -> float:
    """MiB by which one ``step`` raises this process's peak resident set (Linux ``VmHWM``) above its resident set."""

    def status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the step's allocations show
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = status("VmRSS")
    step()
    return status("VmHWM") - before


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: print the peak RSS growth (MiB) of one train step of one variant on one path, as JSON."""
    variant, path = args.memory_probe
    device = torch.device("cpu")
    model = build(variant, path, device).train()
    dtype = amp_dtype(args, path, device)
    train_step = make_train_step(model, device, dtype, repo_optimizer=path != "straightforward")
    x = torch.randn(args.train_batch_size, 3, 224, 224)
    y = torch.randint(0, 1000, (args.train_batch_size,))
    train_step(x, y)  # warm-up: gradients and optimizer state exist afterwards, as in steady training
    print(json.dumps({"peak_mib": peak_rss_growth_of_step(lambda: train_step(x, y))}))


def cpu_train_peak_mib(args: argparse.Namespace, variant: str, path: str) -> float | None:
    """Run :func:`memory_probe` in a fresh process; None where the OS gives no peak-RSS reset."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    cmd = [sys.executable, __file__, "--memory-probe", variant, path, "--train-batch-size", str(args.train_batch_size)]
    cmd += ["--amp", "--fast-dtype", args.fast_dtype] if args.amp else []
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def cuda_train_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak CUDA memory allocated during one ``step`` above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def benchmark_variant(args: argparse.Namespace, variant: str, device: torch.device) -> list[dict]:
    """Measure every path of one variant; one result row per path."""
    models = {path: build(variant, path, device) for path in PATHS}
    models["straightforward"].load_state_dict(models["fast"].state_dict())
    if args.compile:
        models["fast+compile"] = build(variant, "fast", device)
        models["fast+compile"].load_state_dict(models["fast"].state_dict())
    iters = args.iters or (10 if device.type == "cuda" else 1)
    rows = {name: {"variant": variant, "path": name} for name in models}
    runners = {name: torch.compile(m) if name.endswith("compile") else m for name, m in models.items()}

    if not args.no_eval:
        x = torch.randn(args.batch_size, 3, 224, 224, device=device)
        for m in models.values():
            m.eval()

        def forward(model: nn.Module, dtype: torch.dtype | None) -> Callable[[], None]:
            def run() -> None:
                with torch.no_grad(), autocast(device, dtype):
                    model(x)

            return run

        with torch.no_grad():
            with autocast(device, amp_dtype(args, "straightforward", device)):
                ref = runners["straightforward"](x).float()
            for name, runner in runners.items():
                start = time.perf_counter()
                with autocast(device, amp_dtype(args, name, device)):
                    out = runner(x).float()  # the first call of a compiled model compiles it
                rows[name]["max_rel_diff"] = ((out - ref).abs().max() / ref.abs().max()).item()
                rows[name]["first_call_s"] = time.perf_counter() - start
        forwards = {n: forward(r, amp_dtype(args, n, device)) for n, r in runners.items()}
        times = interleaved_times(forwards, device, args.warmup, args.reps, iters)
        for name, t in times.items():
            rows[name]["eval_ips"] = args.batch_size / statistics.median(t)
            rows[name]["eval_speedup"] = paired_speedup(times["straightforward"], t)

    if not args.no_train:
        x = torch.randn(args.train_batch_size, 3, 224, 224, device=device)
        y = torch.randint(0, 1000, (args.train_batch_size,), device=device)
        steps = {}
        for name, runner in runners.items():
            models[name].train()
            dtype = amp_dtype(args, name, device)
            train_step = make_train_step(runner, device, dtype, repo_optimizer=name != "straightforward")
            steps[name] = lambda s=train_step: s(x, y)
        times = interleaved_times(steps, device, args.warmup, args.reps, iters)
        for name, t in times.items():
            rows[name]["train_ips"] = args.train_batch_size / statistics.median(t)
            rows[name]["train_speedup"] = paired_speedup(times["straightforward"], t)
        if not args.no_memory:
            for name in runners:
                if device.type == "cuda":
                    rows[name]["train_peak_mib"] = cuda_train_peak_mib(steps[name], device)
                elif name in PATHS:
                    rows[name]["train_peak_mib"] = cpu_train_peak_mib(args, variant, name)
    return list(rows.values())


def format_table(rows: list[dict]) -> str:
    """Markdown table with the ratios of each path to the straightforward one of the same variant."""
    base = {r["variant"]: r for r in rows if r["path"] == "straightforward"}

    def fmt(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ratio(row: dict, key: str) -> float | None:
        ref = base[row["variant"]].get(key)
        return row[key] / ref if row.get(key) is not None and ref else None

    header = (
        "| variant | path | eval img/s | eval speed-up | train img/s | train speed-up | train peak MiB "
        "| peak vs straightforward | max rel diff of logits |"
    )
    lines = [header, "|" + " --- |" * 9]
    for r in rows:
        cells = [
            r["variant"],
            r["path"],
            fmt(r.get("eval_ips"), ".1f"),
            fmt(r.get("eval_speedup"), ".2f") + "×",
            fmt(r.get("train_ips"), ".1f"),
            fmt(r.get("train_speedup"), ".2f") + "×",
            fmt(r.get("train_peak_mib"), ".0f"),
            fmt(ratio(r, "train_peak_mib"), ".2f") + "×",
            fmt(r.get("max_rel_diff"), ".1e"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    device = torch.device(args.device)
    print(machine_description(device))
    precision = "fp32"
    if args.amp:
        names = {path: str(amp_dtype(args, path, device)).removeprefix("torch.") for path in PATHS}
        precision = ", ".join(f"{path} {name} autocast" for path, name in names.items())
        precision += " (GradScaler with float16)"
    print(
        f"{precision}; eval batch {args.batch_size}, train batch {args.train_batch_size}; "
        f"median of {args.reps} alternating repetitions after {args.warmup} warm-up"
    )
    rows = []
    for variant in args.variants:
        rows += benchmark_variant(args, variant, device)
        print(f"[{variant} done]", flush=True)
    print(format_table(rows))
    for row in rows:
        if row["path"].endswith("compile") and "first_call_s" in row:
            print(f"{row['variant']} {row['path']}: first eval call (compiles) took {row['first_call_s']:.0f} s")
    if hasattr(os, "getloadavg"):
        print("load average at the end (other processes share the CPUs):", *(f"{v:.2f}" for v in os.getloadavg()))
    if device.type == "cpu" and not (args.no_train or args.no_memory):
        print("train peak MiB: growth of the peak resident set over one train step, fresh process per path (CPU).")
    elif device.type == "cuda":
        print("train peak MiB: torch.cuda.max_memory_allocated over one train step, above the memory held before it.")


if __name__ == "__main__":
    main()
