"""The training engine: precision, the loss, one epoch of training, validation, throughput, the run's state with
one ``state_dict()``, resuming and saving it, and the epoch loop. ``main.py`` builds the pieces and hands them over.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import logging
import math
import os
import platform
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, distribute_bn
from torch import nn
from yacs.config import CfgNode

from checkpoint import (
    RECOVERY_FILE,
    atomic_copy,
    atomic_save,
    atomic_write,
    capture_rng_state,
    find_resumable,
    load_file,
    model_state_of,
    prune_checkpoints,
    restore_rng_state,
)
from data import Data, RealLabels
from data.check import base_dataset, check_images, problems_line
from data.unreadable import SkipUnreadable, check_unreadable
from distillation import DistillationLoss, with_distillation
from errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, RunStopped
from logger import create_tensorboard_writer
from lr_scheduler import optimizer_steps_per_epoch
from models import load_model_weights, load_pretrained
from models.weights import loaded_message
from utils import DistEnv, SmoothedValue, StopRequest, all_reduce_sum, state_fingerprint

# ----------------------------------------------------------------------------------------------- precision and loss


AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None for fp32), whether a GradScaler is needed, and why."""

    dtype: torch.dtype | None
    use_scaler: bool
    reason: str = ""

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        """For the run summary, e.g. ``bfloat16 autocast (AMP_DTYPE auto: the GPU supports bfloat16)``."""
        what = "fp32" if self.dtype is None else f"{self.name} autocast"
        what += " with GradScaler" if self.use_scaler else ""
        return f"{what} ({self.reason})" if self.reason else what

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def choose_precision(config: CfgNode, device: torch.device, cuda_bf16: bool | None = None) -> Precision:
    """fp32 for ``AMP_OPT_LEVEL O0`` / ``AMP_ENABLE False``; else autocast in ``AMP_DTYPE``.

    ``auto`` is bfloat16 without a GradScaler (bf16 has fp32's range, so gradients do not underflow) on the CPU and
    on GPUs with native bf16 (Ampere and newer), float16 with a GradScaler on older GPUs. ``float16`` always comes
    with a GradScaler. ``cuda_bf16`` overrides the GPU's answer (for tests).
    """
    if not config.AMP_ENABLE or config.AMP_OPT_LEVEL == "O0":
        return Precision(None, False, "AMP_OPT_LEVEL O0" if config.AMP_OPT_LEVEL == "O0" else "AMP_ENABLE False")
    choice = str(config.AMP_DTYPE).lower()
    if choice != "auto":
        dtype = AMP_DTYPES[choice]
        return Precision(dtype, dtype == torch.float16, f"AMP_DTYPE {choice}")
    if device.type != "cuda":
        return Precision(torch.bfloat16, False, f"AMP_DTYPE auto on {device.type}")
    if cuda_bf16 is None:
        cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if cuda_bf16:
        return Precision(torch.bfloat16, False, "AMP_DTYPE auto: the GPU supports bfloat16")
    return Precision(torch.float16, True, "AMP_DTYPE auto: no native bfloat16 on this GPU")


def compile_blocker(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, in a few words, or None when nothing stops it."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return f"this torch cannot compile on Python {platform.python_version()} ({sys.platform})"
    except Exception as e:  # a torch build without dynamo
        return f"torch.compile is unavailable ({e})"
    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:  # a torch without the helper: let torch.compile decide
            return None
        if not has_triton():
            return "Triton, which torch.compile needs on a GPU, is not installed (pip install triton)"
        return None
    compilers = (os.environ.get("CXX"), "g++", "c++", "clang++")
    if device.type == "cpu" and not any(shutil.which(c) for c in compilers if c):
        return "torch.compile needs a C++ compiler (g++ or clang++) on the CPU and none is on PATH"
    return None


def maybe_compile(model: nn.Module, config: CfgNode, device: torch.device, logger: logging.Logger) -> nn.Module:
    """``torch.compile(model)`` when ``TRAIN.COMPILE`` asks for it and it can run here; otherwise ``model``, with a
    one-line warning saying why (the run goes on without compiling)."""
    if not config.TRAIN.COMPILE:
        return model
    blocker = compile_blocker(device)
    if blocker:
        logger.warning(f"TRAIN.COMPILE: {blocker}; running without torch.compile")
        return model
    logger.info("TRAIN.COMPILE: torch.compile on; the first steps of each shape compile and take longer")
    return torch.compile(model)


def build_criterion(config: CfgNode, mixup_active: bool) -> nn.Module:
    """Soft-target loss under Mixup/CutMix (which smooths labels itself), else label smoothing, else plain CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def memory_note(device: torch.device) -> str:
    """Peak memory so far: CUDA memory allocated on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return f"mem {torch.cuda.max_memory_allocated(device) / 2**20:.0f}MB"
    try:
        import resource  # POSIX only: on Windows the line prints no memory figure rather than failing
    except ImportError:
        return ""
    return f"rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB"  # Linux reports KiB


# ----------------------------------------------------------------------------------------------- the run's state


def build_ema(config: CfgNode, model: nn.Module) -> ModelEmaV3 | None:
    """timm's ``ModelEmaV3`` of ``model`` (weights and floating buffers; integer buffers copied) when
    ``TRAIN.EMA.ENABLE``: after each optimizer step ``ema = DECAY * ema + (1 - DECAY) * model``."""
    if not config.TRAIN.EMA.ENABLE:
        return None
    decay = float(config.TRAIN.EMA.DECAY)
    return ModelEmaV3(model, decay=decay)


class RunState:
    """What a training run carries from epoch to epoch: model, optimizer, LR schedule, grad scaler, the weight
    average, the next epoch and the best validation top-1 so far; ``state_dict()`` is the checkpoint's training part.

    Args:
        model: the bare model (not a DDP or compiled wrapper).
        optimizer, lr_scheduler, scaler: the run's optimizer, timm scheduler and ``torch.amp.GradScaler``.
        next_epoch: the first epoch still to run.
        ema: the weight average (:func:`build_ema`), or None.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        scaler: torch.amp.GradScaler,
        next_epoch: int = 0,
        ema: ModelEmaV3 | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.scaler = scaler
        self.next_epoch = next_epoch
        self.ema = ema
        self.max_accuracy = 0.0
        self.position: dict[str, Any] | None = None  # mid-epoch progress (EpochProgress.state_dict()), if any
        self.origin = ""  # the --resume file this run started from (kept in every checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loadable with ``weights_only``); ``epoch`` is the last finished one."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.next_epoch - 1,
            "max_accuracy": self.max_accuracy,
            "origin": self.origin,
        }
        if self.position is not None:
            state["position"] = self.position
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], source: str, logger: logging.Logger) -> None:
        """Continue from ``state`` (ours or an upstream checkpoint read from ``source``): the model strictly; the
        weight average, optimizer, schedule and scaler where they fit this run (others are skipped with a warning;
        a missing weight average starts from the loaded weights). Training state of another window layout (bias
        tables resized) is refused with :class:`CheckpointError`: the optimizer's moments keep the file's shapes,
        which torch's ``Optimizer.load_state_dict`` does not check."""
        notes = load_model_weights(self.model, model_state_of(state, source), source, logger=logger, purpose="resume")
        if notes:
            resized = "; ".join(note.split(": ")[0] for note in notes)
            raise CheckpointError(
                f"{source} holds a run's training state (optimizer, LR schedule) at another image or window size "
                f"({resized}), which cannot continue at this DATA.IMG_SIZE / MODEL.DFVT.WINDOW_SIZE: to fine-tune its "
                f"weights at this size, start a new run from it with --pretrained {source} (another --tag if this "
                f"folder holds it), or resume it at the size and window it was trained at."
            )
        if self.ema is not None:
            if isinstance(state.get("model_ema"), dict):
                load_model_weights(
                    self.ema.module, model_state_of(state, source, "model_ema"), source, purpose="resume"
                )
            else:
                self.ema.set(self.model)
                logger.warning(f"{source}: no weight average (model_ema) saved; the EMA starts from its weights")
        pieces = (("optimizer", self.optimizer), ("lr_scheduler", self.lr_scheduler), ("scaler", self.scaler))
        for key, target in pieces:
            if key == "scaler" and key in state and not state[key] and self.scaler.is_enabled():
                logger.info(f"{source}: saved without a GradScaler (bfloat16 or fp32); the scaler starts afresh")
                continue
            if key in state:
                try:
                    target.load_state_dict(state[key])
                except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
                    what = {"lr_scheduler": "LR scheduler", "scaler": "grad scaler"}.get(key, key)
                    logger.warning(f"{source}: its {what} state does not fit this run and was skipped ({e})")
        if "scaler" not in state and "amp" in state:
            logger.warning(f"{source}: apex loss-scaler state ignored; torch.amp's GradScaler starts afresh")
        self.next_epoch = int(state["epoch"]) + 1
        self.max_accuracy = float(state.get("max_accuracy", 0.0))
        self.origin = str(state.get("origin", ""))
        position = state.get("position")
        self.position = position if isinstance(position, dict) and position.get("epoch") == self.next_epoch else None


SUMMARY_FILE, BEST_FILE = "summary.csv", "ckpt_best.pth"
SUMMARY_FIELDS = ("epoch", "lr", "train_loss", "val_top1", "val_top5", "val_loss", "ema_top1", "epoch_time_s")


def update_summary(path: str, first_dropped: int, row: dict[str, Any] | None = None) -> None:
    """Rewrite the per-epoch ``summary.csv`` atomically: its rows of epochs before ``first_dropped``, then ``row``.

    Rows are dropped from ``first_dropped`` on because a resumed run repeats those epochs: after any crash and
    resume the file has exactly one row per finished epoch, in order.
    """
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            rows = [
                r for r in csv.DictReader(f) if str(r.get("epoch", "")).isdigit() and int(r["epoch"]) < first_dropped
            ]
    if row is not None:
        rows.append(row)
    if not rows and not os.path.exists(path):
        return

    def write(f) -> None:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        writer = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        text.flush()
        text.detach()

    atomic_write(path, write)


def gather_rng_states(env: DistEnv) -> list[dict]:
    """Every process's generator states, indexed by rank (all processes must call this together)."""
    state = capture_rng_state()
    if not env.distributed:
        return [state]
    states: list = [None] * env.world_size
    torch.distributed.all_gather_object(states, state)
    return states


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn a failed write of ``path`` (disk full, quota, I/O error, read-only folder) into one line naming the file,
    the error and the free space; the atomic writes have already removed their temporary file, and every earlier
    file is untouched."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        # torch.save's zip writer reports a failed write as a RuntimeError raised while it closes, with the OSError
        # as its context: find the OSError in the chain.
        e = error
        while e is not None and not isinstance(e, OSError):
            e = e.__cause__ or e.__context__
        if e is None:
            raise
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        raise CheckpointError(
            f"cannot write {path} ({e.strerror or e}; {free}); earlier checkpoints in {folder} are intact. Free some "
            f"space (or raise the quota), then rerun the same command to continue from the last one."
        ) from error


def batch_norm_statistics(run: RunState) -> dict[str, dict[str, torch.Tensor]]:
    """This process's BatchNorm statistics (running mean and variance, batch count) of the model and the weight
    average: per process during an epoch, averaged over processes only at its end (``distribute_bn``)."""
    out = {}
    for key, module in (("model", run.model), ("model_ema", run.ema.module if run.ema is not None else None)):
        if module is not None:
            out[key] = {
                f"{name}.{buffer}": getattr(m, buffer).detach().cpu().clone()
                for name, m in module.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                for buffer in ("running_mean", "running_var", "num_batches_tracked")
            }
    return out


def restore_batch_norm_statistics(run: RunState, saved: dict[str, dict[str, torch.Tensor]]) -> None:
    """Inverse of :func:`batch_norm_statistics`."""
    for key, module in (("model", run.model), ("model_ema", run.ema.module if run.ema is not None else None)):
        if module is not None and key in saved:
            buffers = dict(module.named_buffers())
            for name, value in saved[key].items():
                buffers[name].copy_(value)


def save_checkpoint(path: str, run: RunState, config: CfgNode, env: DistEnv, class_names: list[str] | None) -> None:
    """Write the run's state, the config (YAML text), every process's generator states and the class names (for
    ``predict.py``) atomically to ``path`` from rank 0 (all processes must call this together). Mid-epoch, every
    process's BatchNorm statistics go in too (``batch_norm``, by rank): they differ until the epoch's end."""
    extra: dict[str, Any] = {"rng": gather_rng_states(env)}
    if run.position is not None and env.distributed:
        statistics: list = [None] * env.world_size
        torch.distributed.all_gather_object(statistics, batch_norm_statistics(run))
        extra["batch_norm"] = statistics
    if env.is_main:
        with writing(path):
            atomic_save({**run.state_dict(), "config": config.dump(), **extra, "class_names": class_names}, path)


def resume(config: CfgNode, run: RunState, env: DistEnv, logger: logging.Logger) -> str | None:
    """Load what the run starts from: the newest checkpoint of its folder (``TRAIN.AUTO_RESUME``), else
    ``MODEL.RESUME``, else ``MODEL.PRETRAINED`` (weights only). Returns the checkpoint resumed from, if any."""
    path, ckpt = config.MODEL.RESUME, None
    explicit = os.path.abspath(path) if path else ""
    if config.TRAIN.AUTO_RESUME:
        found = find_resumable(config.OUTPUT, logger)
        if found:
            origin = str(found[1].get("origin", ""))
            if explicit and explicit not in (os.path.abspath(found[0]), origin):
                raise ConfigError(
                    f"--resume {path} is not where the run in {config.OUTPUT} started, and that folder already holds "
                    f"its checkpoint {found[0]}: drop --resume to continue that run, pass another --tag (or --output) "
                    f"to start a new run from {path}, or set TRAIN.AUTO_RESUME False to restart this folder from it."
                )
            if explicit and explicit == origin:
                logger.info(f"--resume {path}: this folder's run started from it; continuing that run from {found[0]}")
            path, ckpt = found
            explicit = ""  # continuing the folder's own run: its checkpoints carry where it started
    if not path:
        if config.MODEL.PRETRAINED:
            load_pretrained(run.model, config.MODEL.PRETRAINED, logger)
            if run.ema is not None:
                run.ema.set(run.model)  # the average starts from the pretrained weights
        return None
    logger.info(f"Resuming from {path}")
    ckpt = ckpt if ckpt is not None else load_file(path)
    if not (isinstance(ckpt, dict) and "epoch" in ckpt):  # weights only: the run starts at its first epoch
        load_model_weights(run.model, model_state_of(ckpt, path), path, logger=logger, purpose="resume")
        if run.ema is not None:
            run.ema.set(run.model)
        run.origin = explicit
        return path
    run.load_state_dict(ckpt, path, logger)
    run.origin = explicit or run.origin
    statistics = ckpt.get("batch_norm")
    if run.position is not None and isinstance(statistics, list) and len(statistics) == env.world_size:
        restore_batch_norm_statistics(run, statistics[env.rank])  # this process's own, mid-epoch
    rng = ckpt.get("rng")
    if isinstance(rng, list) and len(rng) == env.world_size:
        restore_rng_state(rng[env.rank])
    else:
        logger.warning(f"{path}: no generator state for {env.world_size} process(es); randomness restarts from SEED")
    where = f", step {run.position['step']}" if run.position else ""
    logger.info(f"Resumed optimizer, schedule and scaler; continuing at epoch {run.next_epoch}{where}")
    return path


# ----------------------------------------------------------------------------------------------- loops


@dataclass
class EpochProgress:
    """Where an epoch stands: its optimizer steps done, and the sums (total, count) behind its loss, grad-norm and
    distillation figures and its scaler-skipped steps, so an epoch continued from a mid-epoch checkpoint reports
    what the uninterrupted one would."""

    epoch: int
    step: int = 0
    sums: dict[str, list[float]] = field(default_factory=dict)
    skipped: int = 0
    layout: tuple[int, int, int] = (0, 0, 0)  # processes, batch per process, accumulation steps: what a step means
    # DATA.SKIP_UNREADABLE: the unreadable images each process met so far this epoch, by rank ([index, message] pairs)
    unreadable: list[list[list]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "sums": self.sums,
            "skipped": self.skipped,
            "layout": list(self.layout),
            "unreadable": self.unreadable,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EpochProgress:
        sums = {k: [float(v[0]), float(v[1])] for k, v in dict(state.get("sums", {})).items()}
        layout = tuple(int(x) for x in state.get("layout", (0, 0, 0)))
        unreadable = [[[int(i), str(m)] for i, m in notes] for notes in state.get("unreadable", [])]
        return cls(int(state["epoch"]), int(state["step"]), sums, int(state.get("skipped", 0)), layout, unreadable)


def train_one_epoch(
    config: CfgNode,
    run: RunState,
    model: nn.Module,
    criterion: nn.Module,
    loader,
    mixup_fn,
    epoch: int,
    precision: Precision,
    env: DistEnv,
    logger: logging.Logger,
    writer=None,
    progress: EpochProgress | None = None,
    stop: StopRequest | None = None,
    recovery: Callable[[EpochProgress], None] | None = None,
) -> dict[str, float]:
    """One epoch of optimizer steps; each step accumulates ``TRAIN.ACCUMULATION_STEPS`` micro-batches. ``model`` is
    ``run.model`` as the loop calls it (possibly in a DDP or compiled wrapper).

    Micro-batches left over after the last full step of the epoch are skipped, so every step applies the mean
    gradient of exactly ``ACCUMULATION_STEPS`` micro-batches. With ``progress`` the epoch continues after its
    ``progress.step`` (``loader`` then starts at that step's first micro-batch). After each step, ``recovery`` is
    called every ``SAVE_STEPS`` steps and when ``stop`` says every process is to stop; the epoch then ends early,
    with ``stopped`` (the signal) and ``step`` in the returned figures.
    """
    optimizer, scaler = run.optimizer, run.scaler
    model.train()
    optimizer.zero_grad(set_to_none=True)
    accum = config.TRAIN.ACCUMULATION_STEPS
    first = progress.step if progress is not None else 0
    steps = optimizer_steps_per_epoch(len(loader) + first * accum, accum)
    clip = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD else float("inf")
    loss_meter, norm_meter, time_meter = SmoothedValue(), SmoothedValue(), SmoothedValue()
    distilling = isinstance(criterion, DistillationLoss)
    base_meter, distill_meter = SmoothedValue(), SmoothedValue()  # the distillation loss's two terms, unweighted
    meters = {"loss": loss_meter, "grad_norm": norm_meter, "base": base_meter, "distill": distill_meter}
    skipped = 0
    if progress is not None:
        for name, (total, count) in progress.sums.items():
            meters[name].total, meters[name].count = total, int(count)
        skipped = progress.skipped
    # Per-step figures stay on the device until the next report: one host sync per PRINT_FREQ steps, not per step.
    pending: list[tuple[int, int, float, torch.Tensor]] = []  # (step, batch size, LR, [loss, grad norm])

    def report(step: int) -> None:
        nonlocal skipped
        values = torch.stack([figures for *_, figures in pending]).tolist()
        for (at, n, lr, _), (loss_value, grad_norm, *terms) in zip(pending, values, strict=True):
            if not math.isfinite(loss_value) and not scaler.is_enabled():
                raise NonFiniteLossError(f"the training loss is {loss_value} at epoch {epoch}, step {at}/{steps}")
            if scaler.is_enabled() and not math.isfinite(grad_norm):
                skipped += 1  # the scaler found inf/NaN gradients and skipped this step
            if not math.isfinite(loss_value):
                continue
            loss_meter.update(loss_value, n)
            norm_meter.update(grad_norm)
            if distilling:
                base_meter.update(terms[0], n)
                distill_meter.update(terms[1], n)
            if writer is not None:
                global_step = epoch * steps + at
                writer.add_scalar("train/loss", loss_value, global_step)
                writer.add_scalar("train/lr", lr, global_step)
                writer.add_scalar("train/grad_norm", grad_norm, global_step)
                if distilling:
                    writer.add_scalar("train/loss_base", terms[0], global_step)
                    writer.add_scalar("train/loss_distill", terms[1], global_step)
        pending.clear()
        lr = optimizer.param_groups[0]["lr"]
        eta_epoch = time_meter.avg * (steps - step)
        eta_run = eta_epoch + time_meter.avg * steps * (config.TRAIN.EPOCHS - epoch - 1)
        logger.info(
            f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{step}/{steps}]\t"
            f"eta {datetime.timedelta(seconds=int(eta_epoch))} (run {datetime.timedelta(seconds=int(eta_run))}) "
            f"lr {lr:.3e}\t"
            f"time {time_meter.value:.4f} ({time_meter.global_avg:.4f})\t"
            f"loss {loss_meter.value:.4f} ({loss_meter.global_avg:.4f})\t"
            + (
                f"base {base_meter.value:.4f} ({base_meter.global_avg:.4f})\t"
                f"distill {distill_meter.value:.4f} ({distill_meter.global_avg:.4f})\t"
                if distilling
                else ""
            )
            + f"grad_norm {norm_meter.value:.4f} ({norm_meter.global_avg:.4f})\t"
            f"{memory_note(env.device)}" + (f"\tskipped steps {skipped}" if scaler.is_enabled() else "")
        )

    start = end = time.time()
    stopped, step = 0, first
    epoch_checkpoint = (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1
    for idx, (samples, targets) in enumerate(loader, start=first * accum):
        if idx >= steps * accum:
            break
        samples = samples.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        last_micro = (idx + 1) % accum == 0
        # Under DDP, gradients are all-reduced only on the micro-batch that completes a step.
        sync = contextlib.nullcontext() if last_micro or not env.distributed else model.no_sync()
        with sync:
            with precision.autocast(env.device):
                outputs = model(samples)
                if distilling:  # the teacher sees the same (mixed) samples under the same autocast
                    loss, terms = criterion(samples, outputs, targets)
            if not distilling:
                loss = criterion(outputs.float(), targets)
            scaler.scale(loss / accum).backward()
        if not last_micro:
            continue
        step = idx // accum + 1
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.update(run.model)
        lr = optimizer.param_groups[0]["lr"]  # the LR this step used (the schedule moves it next)
        run.lr_scheduler.step_update(epoch * steps + step)
        figures = [loss.detach().float(), grad_norm.detach().float()]
        if distilling:
            figures += [terms["base"], terms["distill"]]
        pending.append((step, targets.size(0), lr, torch.stack(figures)))
        time_meter.update(time.time() - end)
        end = time.time()
        if step % config.PRINT_FREQ == 0 or step == steps:
            report(step)
        save = recovery is not None and config.SAVE_STEPS and (epoch * steps + step) % config.SAVE_STEPS == 0
        save = save and not (step == steps and epoch_checkpoint)  # the epoch's own checkpoint follows at once
        stopped = stop.agreed() if stop is not None else 0
        if save or (stopped and recovery is not None):
            if pending:
                report(step)  # the figures so far go into the checkpoint (and a non-finite loss is never saved)
            sums = {name: [m.total, m.count] for name, m in meters.items() if m.count}
            recovery(EpochProgress(epoch, step, sums, skipped))
        if stopped:
            break
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}")
    if skipped:
        logger.warning(f"EPOCH {epoch}: the grad scaler skipped {skipped} of {steps} steps (inf/NaN gradients)")
    return {
        "loss": loss_meter.global_avg,
        "grad_norm": norm_meter.global_avg,
        "epoch_time": time.time() - start,
        "skipped_steps": skipped,
        "stopped": stopped,
        "step": step,
        "first_step": first,
        "steps": steps,
        **({"loss_base": base_meter.global_avg, "loss_distill": distill_meter.global_avg} if distilling else {}),
    }


class ValFigures(NamedTuple):
    """What :func:`validate` measured: top-1 and top-5 (%), mean cross-entropy, and ReaL@1 and ReaL@5 (%) when
    ReaL labels were given (else None)."""

    acc1: float
    acc5: float
    loss: float
    real1: float | None = None
    real5: float | None = None


@torch.no_grad()
def validate(
    config: CfgNode,
    loader,
    model: nn.Module,
    num_classes: int,
    precision: Precision,
    env: DistEnv,
    logger,
    classes: Sequence[int] | None = None,
    real: RealLabels | None = None,
    name: str = "",
) -> ValFigures:
    """Top-1, top-5 (%) and mean cross-entropy over the whole validation set, from counts summed over processes.

    ``classes`` (the model outputs the data holds, when it holds only some of the ``num_classes``: ImageNet-A/R)
    restricts the logits to those outputs, as timm's ``--valid-labels``: top-k (k capped at their count) and the loss
    are computed on the restricted logits, the targets renumbered to positions in ``classes``. ``real`` (ReaL labels
    of the dataset's images, as outputs) adds ReaL@1 (the top-1 prediction is one of the image's labels) and ReaL@5
    (one of the top 5 is) over the images with labels; the images of each batch are the next ones of
    ``loader.sampler``, whose order is fixed (``ShardedEvalSampler``).
    """
    model.eval()
    device = env.device
    restrict = positions = None
    if classes is not None:
        restrict = torch.as_tensor(list(classes), dtype=torch.int64, device=device)
        positions = torch.full((num_classes,), -1, dtype=torch.int64, device=device)
        positions[restrict] = torch.arange(len(restrict), device=device)
        logger.info(f"evaluating on {len(restrict)} of {num_classes} classes (logits restricted)")
    k = min(5, len(restrict) if restrict is not None else num_classes)
    if real is not None:
        order = torch.as_tensor(list(loader.sampler), dtype=torch.int64)
        real_rows, real_counted = real.labels.to(device), real.counted.to(device)
    # correct@1, correct@k, the loss sum and the ReaL counts (right@1, right@5, images with labels) stay on the
    # device, read once at the end (no per-batch host sync).
    totals, count = torch.zeros(6, dtype=torch.float64, device=device), 0
    for idx, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast(device):
            outputs = model(images)
        outputs = outputs.float()
        if restrict is not None:
            outputs, targets = outputs.index_select(1, restrict), positions[targets]
        top = outputs.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        loss_sum = F.cross_entropy(outputs, targets, reduction="sum")
        figures = [hits[:, :1].sum(), hits.any(dim=1).sum(), loss_sum]
        if real is not None:
            rows = order[count : count + targets.size(0)].to(device, non_blocking=True)
            predicted = top if restrict is None else restrict[top]  # model outputs, as the ReaL rows hold them
            right = predicted[:, :, None].eq(real_rows[rows][:, None, :]).any(dim=2) & real_counted[rows][:, None]
            figures += [right[:, 0].sum(), right.any(dim=1).sum(), real_counted[rows].sum()]
        totals[: len(figures)] += torch.stack(figures).to(torch.float64)
        count += targets.size(0)
        if (idx + 1) % config.PRINT_FREQ == 0:
            logger.info(f"Test: [{idx + 1}/{len(loader)}]")
    correct1, correct5, loss_sum, real1, real5, real_count, count = all_reduce_sum([*totals.tolist(), count], device)
    if count == 0:
        raise DataError("The validation set is empty; put images under <data-path>/val/<class>/.")
    acc1, acc5, loss = 100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count
    logger.info(f" * {name + ' ' if name else ''}Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} Loss {loss:.4f}")
    if real is None:
        return ValFigures(acc1, acc5, loss)
    real1, real5 = 100.0 * real1 / real_count, 100.0 * real5 / real_count
    logger.info(f" * ReaL@1 {real1:.3f} ReaL@5 {real5:.3f}")
    logger.info(f"ReaL: {int(real_count)} of {int(count)} images have ReaL labels ({real.path})")
    return ValFigures(acc1, acc5, loss, real1, real5)


@torch.no_grad()
def throughput(config: CfgNode, loader, model: nn.Module, precision: Precision, env: DistEnv, logger) -> float:
    """Images per second of the eval forward pass on one batch (real when a loader is given, else synthetic)."""
    model.eval()
    if loader is not None:
        images = next(iter(loader))[0].to(env.device)
    else:
        size = config.DATA.IMG_SIZE
        images = torch.randn(config.DATA.BATCH_SIZE, config.MODEL.DFVT.IN_CHANS, size, size, device=env.device)
    batch = images.shape[0]
    warmup, iters = config.THROUGHPUT.WARMUP_ITERS, config.THROUGHPUT.ITERS

    def sync() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize()

    source = "a batch of the validation data" if loader is not None else "a synthetic batch"
    logger.info(f"throughput: {warmup} warm-up iterations on {source} of {batch}, then {iters} timed ...")
    with precision.autocast(env.device):
        start = time.perf_counter()
        for _ in range(warmup):
            model(images)
        sync()
        logger.info(f"throughput: warm-up took {time.perf_counter() - start:.1f} s; timing {iters} iterations ...")
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
        sync()
        elapsed = time.perf_counter() - start
    rate = iters * batch / elapsed
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    logger.info(
        f"throughput {rate:.1f} images/s | batch {batch} | device {env.device} ({device_name}) | dtype {precision.name}"
        f" | {iters} timed iterations after {warmup} warm-up"
    )
    return rate


def unreadable_so_far(skip: SkipUnreadable, met: dict[int, str], env: DistEnv) -> list[list[list]]:
    """Add what ``skip`` noted since the last drain to ``met`` (index: message, the unreadable images this process met
    so far this epoch) and return every process's, by rank, for a mid-epoch checkpoint (all processes together)."""
    for item in skip.drain():
        met.setdefault(item.index, item.message)
    mine = [[index, message] for index, message in sorted(met.items())]
    if not env.distributed:
        return [mine]
    every: list = [None] * env.world_size
    torch.distributed.all_gather_object(every, mine)
    return every


def report_unreadable(
    skip: SkipUnreadable,
    stats: dict,
    epoch: int,
    config: CfgNode,
    env: DistEnv,
    logger,
    met: dict[int, str] | None = None,
) -> None:
    """Name the training images ``DATA.SKIP_UNREADABLE`` replaced this epoch (on their rank) and stop every rank in
    one line when they were more than 1 % of the images the epoch drew on all ranks.

    ``met`` holds the images met earlier in the epoch (restored from a mid-epoch checkpoint, or drained when one was
    written), so an epoch continued after a resume reports and counts the whole epoch, as the uninterrupted run would;
    it is emptied. An epoch stopped by a signal (``stats["stopped"]``) names what it met so far, and leaves the 1 %
    rule to the end of the epoch, after the rerun."""
    met = {} if met is None else met
    for item in skip.drain():
        met.setdefault(item.index, item.message)
    skipped = sorted(met.items())
    met.clear()
    for _, message in skipped:
        logger.warning(f"EPOCH {epoch}: unreadable training image replaced by the next readable one: {message}")
    drawn = stats["step"] * config.TRAIN.ACCUMULATION_STEPS * config.DATA.BATCH_SIZE  # from the epoch's first step
    count, images = all_reduce_sum([len(skipped), drawn], env.device)
    if count:
        logger.info(f"EPOCH {epoch}: {int(count)} unreadable of {int(images)} training images drawn (all processes)")
    if not stats["stopped"]:
        check_unreadable(int(count), int(images))


def train(
    config: CfgNode,
    run: RunState,
    model: nn.Module,
    data: Data,
    precision: Precision,
    env: DistEnv,
    logger: logging.Logger,
    last_saved: str | None = None,
    teacher: nn.Module | None = None,
    stop: StopRequest | None = None,
) -> None:
    """Epochs ``run.next_epoch`` .. ``TRAIN.EPOCHS - 1``: train, average BatchNorm statistics over processes,
    validate (the weight average too), write ``summary.csv``, and save every ``SAVE_FREQ`` epochs, at the last epoch
    and on a new best top-1 (also as ``ckpt_best.pth``), keeping the newest ``SAVE_KEEP`` epoch checkpoints.

    A run resumed mid-epoch (``run.position``) continues that epoch after its last step. Every ``SAVE_STEPS`` steps,
    and when ``stop`` reports a signal, the run's state is written to the recovery checkpoint; a signal then ends the
    run with :class:`RunStopped` (after the current step, or after the epoch if it came during validation)."""
    criterion = with_distillation(config, build_criterion(config, data.mixup_fn is not None), teacher)
    class_names = list(data.info.class_names) if data.info.class_names else None
    writer = create_tensorboard_writer(config.OUTPUT, env.rank, logger)
    summary = os.path.join(config.OUTPUT, SUMMARY_FILE)
    if env.is_main:
        update_summary(summary, run.next_epoch)  # rows of epochs not covered by the resumed state are run again
    recovery_path = os.path.join(config.OUTPUT, RECOVERY_FILE)

    layout = (env.world_size, config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS)

    met: dict[int, str] = {}  # DATA.SKIP_UNREADABLE: the unreadable images this process met so far this epoch

    def save_recovery(progress: EpochProgress) -> None:
        progress.layout = layout
        if data.unreadable is not None:
            progress.unreadable = unreadable_so_far(data.unreadable, met, env)
        run.position = progress.state_dict()
        try:
            save_checkpoint(recovery_path, run, config, env, class_names)
        finally:
            run.position = None
        logger.info(f"{recovery_path} saved (epoch {progress.epoch}, step {progress.step})")

    if run.next_epoch >= config.TRAIN.EPOCHS:
        logger.info(
            f"This run is finished: {last_saved or 'its checkpoint'} holds all {config.TRAIN.EPOCHS} epochs. Raise "
            f"TRAIN.EPOCHS to train on, or pass another --tag to start a new run."
        )
    logger.info("Start training")
    start = time.time()
    for epoch in range(run.next_epoch, config.TRAIN.EPOCHS):
        progress = None
        if run.position is not None and run.position["epoch"] == epoch:
            progress = EpochProgress.from_state(run.position)
            if progress.step and progress.layout != layout:
                logger.warning(
                    f"the checkpoint stopped at epoch {epoch}, step {progress.step} with (processes, batch, "
                    f"accumulation) {progress.layout}, this run has {layout}: its steps differ, so epoch {epoch} "
                    f"restarts from its first step"
                )
                progress = None
        run.position = None
        met.clear()  # the images met before a mid-epoch checkpoint count in this epoch's report
        if progress is not None and len(progress.unreadable) == env.world_size:
            met.update((index, message) for index, message in progress.unreadable[env.rank])
        first_batch = progress.step * config.TRAIN.ACCUMULATION_STEPS if progress is not None else 0
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch, first_batch)
        elif hasattr(data.train.sampler, "set_epoch"):
            data.train.sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(
                config,
                run,
                model,
                criterion,
                data.train,
                data.mixup_fn,
                epoch,
                precision,
                env,
                logger,
                writer,
                progress=progress,
                stop=stop,
                recovery=save_recovery,
            )
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{e}; stopped without saving. Last good checkpoint: {last_saved or 'none yet'}. "
                f"Lower TRAIN.BASE_LR or check the data, then resume from it."
            ) from e
        if data.unreadable is not None:
            report_unreadable(data.unreadable, stats, epoch, config, env, logger, met)
        if stats["stopped"]:
            raise RunStopped(
                f"stopped by {signal.Signals(stats['stopped']).name} at epoch {epoch}, step {stats['step']}/"
                f"{stats['steps']} (saved in {recovery_path}); rerun the same command to continue from there.",
                stats["stopped"],
            )
        if env.distributed:
            # BatchNorm statistics are per process; average them so every rank validates and saves the same model.
            distribute_bn(model, env.world_size, reduce=True)
            if run.ema is not None:
                distribute_bn(run.ema.module, env.world_size, reduce=True)
        acc1, acc5, val_loss = validate(config, data.val, model, data.info.num_classes, precision, env, logger)[:3]
        ema_acc1 = None
        if run.ema is not None:
            # The extra pass over the validation loader draws a loader seed; keep the training's generator stream as
            # it would be without the EMA, so turning the EMA on leaves the model's own training unchanged.
            with torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
                ema_acc1 = validate(
                    config, data.val, run.ema.module, data.info.num_classes, precision, env, logger, name="EMA"
                ).acc1
        if writer is not None:
            scalars = {
                "train/epoch_time_s": stats["epoch_time"],
                "val/top1": acc1,
                "val/top5": acc5,
                "val/loss": val_loss,
            }
            for name, value in scalars.items():
                writer.add_scalar(name, value, epoch)
            writer.flush()
        is_best = acc1 > run.max_accuracy
        run.max_accuracy = max(run.max_accuracy, acc1)
        run.next_epoch = epoch + 1
        if env.is_main:
            row = {
                "epoch": epoch,
                "lr": f"{run.optimizer.param_groups[0]['lr']:.6e}",
                "train_loss": f"{stats['loss']:.6f}",
                "val_top1": f"{acc1:.3f}",
                "val_top5": f"{acc5:.3f}",
                "val_loss": f"{val_loss:.6f}",
                "ema_top1": "" if ema_acc1 is None else f"{ema_acc1:.3f}",
                "epoch_time_s": f"{stats['epoch_time']:.1f}",
            }
            with writing(summary):
                update_summary(summary, epoch, row)
        if (epoch + 1) % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1 or is_best:
            last_saved = os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth")
            save_checkpoint(last_saved, run, config, env, class_names)
            logger.info(f"{last_saved} saved")
            if env.is_main:
                if is_best:
                    with writing(os.path.join(config.OUTPUT, BEST_FILE)):
                        atomic_copy(last_saved, os.path.join(config.OUTPUT, BEST_FILE))
                    logger.info(f"{BEST_FILE}: epoch {epoch}, top-1 {acc1:.3f}")
                for old in prune_checkpoints(config.OUTPUT, config.SAVE_KEEP):  # only once the new file is whole
                    logger.info(f"{old} removed (SAVE_KEEP {config.SAVE_KEEP})")
                if os.path.exists(recovery_path):  # older than the epoch checkpoint just written
                    os.unlink(recovery_path)
        logger.info(f"Accuracy of the network on the {data.info.num_val} test images: {acc1:.1f}%")
        logger.info(f"Max accuracy: {run.max_accuracy:.2f}%")
        signum = stop.agreed() if stop is not None else 0
        if signum and epoch < config.TRAIN.EPOCHS - 1:  # the signal came during validation or saving
            saved = last_saved if last_saved and last_saved.endswith(f"ckpt_epoch_{epoch}.pth") else recovery_path
            if saved == recovery_path:
                save_recovery(EpochProgress(epoch + 1))
            raise RunStopped(
                f"stopped by {signal.Signals(signum).name} after epoch {epoch} (saved in {saved}); rerun the same "
                f"command to continue from there.",
                signum,
            )
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start))}")
    logger.info(f"Final weights fingerprint (sha256 of the state_dict): {state_fingerprint(run.model)}")
    if run.ema is not None:
        logger.info(f"Final EMA fingerprint (sha256 of the state_dict): {state_fingerprint(run.ema.module)}")
    if writer is not None:
        writer.close()


def check_data(data: Data, env: DistEnv, logger: logging.Logger, full: bool) -> None:
    """Read the images before a run needs them, each process its share: the validation split's headers (and a full
    decode of those that look cut short) before training, so a bad file does not cost an epoch; with ``full``
    (``main.py --check-data``) every image of both splits, decoded. Each unreadable image is logged; any raise a
    :class:`DataError` on every process, naming the first few."""
    splits = [("validation", data.val)] + ([("training", data.train)] if full and data.train is not None else [])
    for split, loader in splits:
        dataset = base_dataset(loader.dataset)
        n = len(dataset)
        indices = list(loader.sampler) if loader is data.val else range(env.rank, n, env.world_size)
        start = time.time()
        count, problems = check_images(dataset, indices, full)
        for problem in problems:
            logger.warning(f"{split} split: {problem}")
        total, bad = (int(v) for v in all_reduce_sum([count, len(problems)], env.device))
        how = "decoded" if full else "headers read"
        logger.info(f"{split} split: {total} images checked ({how}, {time.time() - start:.1f} s): {bad} unreadable")
        if bad:
            if problems:
                raise DataError(problems_line(split, data.info.root, total, problems, bad))
            raise DataError(
                f"{bad} {split} images under {data.info.root} are unreadable; another process's log names them"
            )


def evaluate(
    config: CfgNode, model: nn.Module, bare: nn.Module, data: Data, precision: Precision, env: DistEnv, logger
) -> float:
    """``--eval``: load ``MODEL.RESUME`` into ``bare`` strictly and validate ``model`` (its wrapper); top-1 (%)."""
    if not config.MODEL.RESUME:
        raise CheckpointError("--eval needs the checkpoint to evaluate: add --resume CKPT.")
    path = config.MODEL.RESUME
    key = "model_ema" if config.TEST.USE_EMA else "model"
    notes = load_model_weights(bare, model_state_of(load_file(path), path, key), path, logger=logger)
    logger.info(loaded_message(path, notes) + (" - the weight average (TEST.USE_EMA)" if key == "model_ema" else ""))
    info = data.info
    acc1 = validate(
        config, data.val, model, info.num_classes, precision, env, logger, info.class_indices, data.real_labels
    ).acc1
    logger.info(f"Accuracy of the network on the {info.num_val} test images: {acc1:.1f}%")
    return acc1
