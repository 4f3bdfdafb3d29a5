"""Distributed-run helpers and metric meters shared by the training, evaluation and throughput modes."""

from __future__ import annotations

import datetime
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
import torch.distributed as dist

from errors import ConfigError, RunFolderBusyError

try:
    import fcntl  # POSIX advisory locks; the run lock is skipped where there is none (Windows)
except ImportError:
    fcntl = None

LOCK_FILE = ".lock"


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its global rank, the number of processes, its node-local rank and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# One host of a SLURM host list: name parts and bracketed numeric ranges, e.g. ``node[01-04,07]-ib``.
_SLURM_HOST = re.compile(r"(?:[^\[\],\s]+|\[\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*\])+")


def first_slurm_host(nodelist: str, variable: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a host list in SLURM's compressed syntax, zero padding kept: ``node[01-04,07],gpu5`` →
    ``node01``, ``a-b[3-5]`` → ``a-b3``, ``host1,host2`` → ``host1``; ``variable`` names the list in the error."""
    text = nodelist.strip()
    match = _SLURM_HOST.match(text)
    if match is None or text[match.end() : match.end() + 1] not in ("", ","):
        raise ConfigError(
            f"{variable} {nodelist!r} is not a SLURM host list (like node[01-04],gpu5); "
            "set MASTER_ADDR to the host of rank 0 instead."
        )
    return re.sub(r"\[(\d+)[^\]]*\]", r"\1", match.group(0))


def _scontrol_first_host(nodelist: str, path: str | None) -> str | None:
    """The first host ``scontrol show hostnames`` prints for ``nodelist``, ``scontrol`` looked up on ``path`` (a
    ``PATH``; None: this process's); None without scontrol or if it fails."""
    scontrol = shutil.which("scontrol", path=path)
    if scontrol is None:
        return None
    try:
        out = subprocess.run(
            [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = out.split()
    return hosts[0] if hosts else None


def _int_variable(environ: Mapping[str, str], name: str, default: str) -> int:
    """Environment variable ``name`` (``default`` when unset) as an integer, or a ConfigError naming it."""
    value = environ.get(name, default)
    if re.fullmatch(r"\s*-?[0-9]+\s*", value) is None:  # int() would also take "1_000" and non-ASCII digits
        raise ConfigError(f"{name} {value!r} is not an integer; fix or unset it in the launch script.")
    return int(value)


def _slurm_master_addr(environ: Mapping[str, str]) -> str:
    """The first host of ``SLURM_JOB_NODELIST`` (or ``SLURM_NODELIST``): per ``scontrol`` where there is one."""
    variable = "SLURM_JOB_NODELIST" if "SLURM_JOB_NODELIST" in environ else "SLURM_NODELIST"
    if variable not in environ:
        raise ConfigError("SLURM_JOB_NODELIST is not set; set MASTER_ADDR to the host of rank 0.")
    return _scontrol_first_host(environ[variable], environ.get("PATH")) or first_slurm_host(environ[variable], variable)


def _slurm_master_port(environ: Mapping[str, str]) -> int:
    """10000 + ``SLURM_JOB_ID`` % 20000 (the same on every node of a job, below Linux's ephemeral ports, and
    different for most jobs that share a node); 29500 without a job id."""
    if "SLURM_JOB_ID" not in environ:
        return 29500
    return 10000 + _int_variable(environ, "SLURM_JOB_ID", "") % 20000


def slurm_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``) for a
    process that ``srun`` started without torchrun, from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``,
    the node list and the job id; a ``MASTER_ADDR``/``MASTER_PORT`` already set is kept. Empty when torchrun's
    ``RANK``/``WORLD_SIZE`` are set (they win), outside a SLURM task, or for a single task."""
    if "RANK" in environ or "WORLD_SIZE" in environ or not {"SLURM_PROCID", "SLURM_NTASKS"} <= environ.keys():
        return {}
    world_size = _int_variable(environ, "SLURM_NTASKS", "1")
    if world_size <= 1:
        return {}
    rank = _int_variable(environ, "SLURM_PROCID", "0")
    if not 0 <= rank < world_size:
        raise ConfigError(f"SLURM_PROCID {rank} is not a task of SLURM_NTASKS {world_size} (0 to {world_size - 1}).")
    out = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(_int_variable(environ, "SLURM_LOCALID", "0")),
    }
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "")  # "8"; heterogeneous jobs give "8(x2),4", left alone
    if "LOCAL_WORLD_SIZE" not in environ and per_node.isdigit():
        out["LOCAL_WORLD_SIZE"] = per_node  # what DATA.NUM_WORKERS auto shares the node's cores among
    if "MASTER_ADDR" not in environ:
        out["MASTER_ADDR"] = _slurm_master_addr(environ)
    if "MASTER_PORT" not in environ:
        out["MASTER_PORT"] = str(_slurm_master_port(environ))
    return out


def init_distributed(local_rank_arg: int | None = None) -> DistEnv:
    """Join the process group when a launcher started several processes; otherwise run alone.

    ``torchrun`` and ``torch.distributed.launch`` set ``RANK``/``WORLD_SIZE`` (and ``LOCAL_RANK``);
    the older launcher may instead pass ``--local-rank``/``--local_rank``, given here as
    ``local_rank_arg``. Under ``srun`` without torchrun, the SLURM variables are mapped onto those first
    (see ``slurm_environment``). The backend is NCCL with CUDA, gloo on CPU.
    """
    os.environ.update(slurm_environment(os.environ))
    world_size = _int_variable(os.environ, "WORLD_SIZE", "1")
    rank = _int_variable(os.environ, "RANK", "0")
    if local_rank_arg is not None:
        local_rank = local_rank_arg
    else:
        local_rank = _int_variable(os.environ, "LOCAL_RANK", "0")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(minutes=30),
            device_id=device if use_cuda else None,
        )
    return DistEnv(rank, world_size, local_rank, device)


def destroy_distributed() -> None:
    """Leave the process group, if joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum each value over all processes (float64, so counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class SmoothedValue:
    """Tracks a series: its latest value, the mean of a recent window, and the global average.

    Args:
        window: how many recent values the smoothed figures use.
    """

    def __init__(self, window: int = 20) -> None:
        self.recent: deque[float] = deque(maxlen=window)
        self.total = 0.0
        self.count = 0

    def update(self, value: float, n: int = 1) -> None:
        self.recent.append(value)
        self.total += value * n
        self.count += n

    @property
    def value(self) -> float:
        return self.recent[-1] if self.recent else float("nan")

    @property
    def avg(self) -> float:
        return float(np.mean(self.recent)) if self.recent else float("nan")

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float("nan")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # added to parameter names by DDP / DataParallel and torch.compile


def strip_wrapper_prefixes(name: str) -> str:
    """``name`` without the leading ``module.`` / ``_orig_mod.`` prefixes of DDP and torch.compile wrappers."""
    while name.startswith(WRAPPER_PREFIXES):
        name = name.removeprefix("module.").removeprefix("_orig_mod.")
    return name


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def state_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every tensor of the model's state_dict (names, dtypes, shapes, bytes): equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in unwrap_model(model).state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _close_in_forked_children(handle: IO[str]) -> None:
    """Close ``handle`` in every process forked from this one (loader workers): a flock belongs to the open file, so
    a worker that outlived a ``kill -9`` of its parent would otherwise hold the run lock until it noticed."""
    ref = weakref.ref(handle)

    def close() -> None:
        f = ref()
        if f is not None:
            f.close()

    os.register_at_fork(after_in_child=close)


def lock_run_folder(folder: str, env: DistEnv) -> IO[str] | None:
    """Hold an exclusive lock on ``folder`` for this run's life, so that two runs never write the same checkpoints.

    Rank 0 takes a non-blocking ``flock`` on ``<folder>/.lock`` and writes its PID there; the ranks of one run share
    rank 0's answer. The operating system drops the lock when the process ends, however it ends (``kill -9``
    included), so a lock is never stale. Raises :class:`RunFolderBusyError` naming the folder and the PID holding
    it on every rank; returns the open lock file (keep it referenced), or None on ranks > 0 and without ``fcntl``.
    """
    busy, handle = "", None
    if env.is_main and fcntl is not None:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, LOCK_FILE), "a+")  # noqa: SIM115 (held open for the run's life)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            handle = None
            busy = (
                f"the output folder {folder} is in use by another run (PID {holder}); wait for it to finish or stop "
                f"it, or pass another --output or --tag."
            )
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _close_in_forked_children(handle)
    if env.distributed:
        answer = [busy]
        dist.broadcast_object_list(answer, src=0)
        busy = answer[0]
    if busy:
        raise RunFolderBusyError(busy)
    return handle


def check_writable_folder(folder: str) -> None:
    """Create ``folder`` if needed and check a file can be written there; else :class:`ConfigError` naming it."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"the output folder {folder} is not writable ({e.strerror or e}); pass --output (OUTPUT) a folder you can "
            f"write to, or fix its permissions."
        ) from e


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


class StopRequest:
    """SIGINT (Ctrl-C), SIGTERM (a launcher or scheduler stopping the job) and SIGUSR1 (SLURM's warning before it
    preempts, with ``--signal``) become a request that training honours after its current optimizer step.

    The handlers only record the signal; :meth:`agreed` (called by every rank after every step) tells all ranks
    the same answer, so they stop after the same step. A second Ctrl-C raises ``KeyboardInterrupt`` at once.
    Across processes the answer goes through a gloo group of its own (a tiny CPU all-reduce, no GPU sync).
    """

    def __init__(self, env: DistEnv) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._group = dist.new_group(backend="gloo") if env.distributed else None

    def install(self) -> StopRequest:
        """Take over the stop signals (main thread only); :meth:`uninstall` gives them back."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        self.signum = self.signum or signum

    def agreed(self) -> int:
        """The signal every process stops for now (the largest received on any rank), or 0 to go on. A
        collective: every rank calls it at the same points."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item())
