"""Train, evaluate or measure the throughput of DFvT: ``python main.py --cfg configs/tiny.yaml ...``.

Runs as a single process, or as one process per device under ``torchrun`` or
``python -m torch.distributed.launch`` (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import distribute_bn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from checkpoint import (
    CheckpointError,
    NonFiniteLossError,
    atomic_save,
    capture_rng_state,
    find_resumable,
    load_file,
    load_model_weights,
    load_pretrained,
    model_state_of,
    restore_rng_state,
)
from config import ConfigError, get_default_config, update_config
from data import DataError, build_loader
from logger import create_logger, create_tensorboard_writer
from lr_scheduler import apply_lr_scaling, build_scheduler, optimizer_steps_per_epoch
from models import build_model
from models.complexity import complexity_summary
from optimizer import build_optimizer
from utils import (
    DistEnv,
    SmoothedValue,
    all_reduce_sum,
    destroy_distributed,
    init_distributed,
    set_seed,
    state_fingerprint,
    unwrap_model,
)


def parse_option(argv: list[str] | None = None) -> argparse.Namespace:
    """The upstream command line (flags are shortcuts for config keys)."""
    parser = argparse.ArgumentParser("DFvT training, evaluation and throughput", add_help=True)
    parser.add_argument("--cfg", metavar="FILE", help="config file (configs/tiny.yaml, small.yaml, base.yaml, ...)")
    parser.add_argument("--opts", nargs="+", default=None, help="KEY VALUE pairs overriding the config")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, help="batch size per process")
    parser.add_argument("--data-path", "--data_path", dest="data_path", help="dataset root")
    parser.add_argument("--zip", action="store_true", help="read train.zip/val.zip instead of folders")
    parser.add_argument("--cache-mode", "--cache_mode", dest="cache_mode", choices=["no", "part", "full"])
    parser.add_argument("--pretrained", help="weights to fine-tune from (model only)")
    parser.add_argument("--resume", help="checkpoint to resume training from, or to evaluate")
    parser.add_argument("--accumulation-steps", "--accumulation_steps", dest="accumulation_steps", type=int)
    parser.add_argument("--use-checkpoint", "--use_checkpoint", dest="use_checkpoint", action="store_true")
    parser.add_argument("--amp-opt-level", "--amp_opt_level", dest="amp_opt_level", choices=["O0", "O1", "O2"])
    parser.add_argument("--output", metavar="DIR", help="output root (runs go to DIR/<model name>/<tag>)")
    parser.add_argument("--tag", help="run tag")
    parser.add_argument("--eval", action="store_true", help="evaluate --resume only")
    parser.add_argument("--throughput", action="store_true", help="measure throughput only")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    # torch.distributed.launch passes --local-rank=K (torch >= 2.0) or --local_rank K (older).
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (None for fp32) and whether a GradScaler is needed."""

    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def choose_precision(config, device: torch.device) -> Precision:
    """fp32 for O0 / AMP off; otherwise fp16 autocast + GradScaler on CUDA, bf16 autocast elsewhere."""
    if not config.AMP_ENABLE or config.AMP_OPT_LEVEL == "O0":
        return Precision(None, False)
    if device.type == "cuda":
        return Precision(torch.float16, True)
    return Precision(torch.bfloat16, False)


def build_criterion(config, mixup_active: bool) -> nn.Module:
    """Soft-target loss under Mixup/CutMix (which smooths labels itself), else label smoothing, else plain CE."""
    if mixup_active:
        return SoftTargetCrossEntropy()
    if config.MODEL.LABEL_SMOOTHING > 0.0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


def train_one_epoch(
    config,
    model: nn.Module,
    criterion: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    mixup_fn,
    lr_scheduler,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    env: DistEnv,
    logger: logging.Logger,
    writer=None,
) -> dict[str, float]:
    """One epoch of optimizer steps; each step accumulates ``TRAIN.ACCUMULATION_STEPS`` micro-batches.

    Micro-batches left over after the last full step of the epoch are skipped, so every step
    applies the mean gradient of exactly ``ACCUMULATION_STEPS`` micro-batches.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    accum = config.TRAIN.ACCUMULATION_STEPS
    steps = optimizer_steps_per_epoch(len(loader), accum)
    loss_meter, norm_meter, time_meter = SmoothedValue(), SmoothedValue(), SmoothedValue()
    skipped = 0
    start = end = time.time()
    for idx, (samples, targets) in enumerate(loader):
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
            loss = criterion(outputs.float(), targets)
            scaler.scale(loss / accum).backward()
        loss_value = loss.item()
        step = idx // accum + 1
        if not math.isfinite(loss_value) and not scaler.is_enabled():
            raise NonFiniteLossError(f"the training loss is {loss_value} at epoch {epoch}, step {step}/{steps}")
        if not last_micro:
            continue
        scaler.unscale_(optimizer)
        clip = config.TRAIN.CLIP_GRAD if config.TRAIN.CLIP_GRAD else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(optimizer)
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale_before:
            skipped += 1  # the scaler found inf/NaN gradients and skipped this step
        optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step_update(epoch * steps + step)
        if not math.isfinite(loss_value):
            continue

        loss_meter.update(loss_value, targets.size(0))
        norm_meter.update(grad_norm.item())
        time_meter.update(time.time() - end)
        end = time.time()
        lr = optimizer.param_groups[0]["lr"]
        if writer is not None:
            global_step = epoch * steps + step
            writer.add_scalar("train/loss", loss_value, global_step)
            writer.add_scalar("train/lr", lr, global_step)
            writer.add_scalar("train/grad_norm", grad_norm.item(), global_step)
        if step % config.PRINT_FREQ == 0 or step == steps:
            eta = time_meter.avg * (steps - step)
            memory = torch.cuda.max_memory_allocated() / 2**20 if env.device.type == "cuda" else 0.0
            logger.info(
                f"Train: [{epoch}/{config.TRAIN.EPOCHS}][{step}/{steps}]\t"
                f"eta {datetime.timedelta(seconds=int(eta))} lr {lr:.3e}\t"
                f"time {time_meter.value:.4f} ({time_meter.global_avg:.4f})\t"
                f"loss {loss_meter.value:.4f} ({loss_meter.global_avg:.4f})\t"
                f"grad_norm {norm_meter.value:.4f} ({norm_meter.global_avg:.4f})\t"
                f"mem {memory:.0f}MB" + (f"\tskipped steps {skipped}" if scaler.is_enabled() else "")
            )
    logger.info(f"EPOCH {epoch} training takes {datetime.timedelta(seconds=int(time.time() - start))}")
    if skipped:
        logger.warning(f"EPOCH {epoch}: the grad scaler skipped {skipped} of {steps} steps (inf/NaN gradients)")
    return {
        "loss": loss_meter.global_avg,
        "grad_norm": norm_meter.global_avg,
        "epoch_time": time.time() - start,
        "skipped_steps": skipped,
    }


@torch.no_grad()
def validate(config, loader, model: nn.Module, precision: Precision, env: DistEnv, logger: logging.Logger):
    """Top-1, top-5 (%) and mean cross-entropy over the whole validation set, summed over all processes."""
    model.eval()
    num_classes = unwrap_model(model).num_classes
    k = min(5, num_classes)
    correct1 = correct5 = loss_sum = count = 0.0
    for idx, (images, targets) in enumerate(loader):
        images = images.to(env.device, non_blocking=True)
        targets = targets.to(env.device, non_blocking=True)
        with precision.autocast(env.device):
            outputs = model(images)
        outputs = outputs.float()
        loss_sum += F.cross_entropy(outputs, targets, reduction="sum").item()
        top = outputs.topk(k, dim=1).indices
        hits = top.eq(targets[:, None])
        correct1 += hits[:, :1].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += targets.size(0)
        if (idx + 1) % config.PRINT_FREQ == 0:
            logger.info(f"Test: [{idx + 1}/{len(loader)}]")
    correct1, correct5, loss_sum, count = all_reduce_sum([correct1, correct5, loss_sum, count], env.device)
    if count == 0:
        raise DataError("The validation set is empty; put images under <data-path>/val/<class>/.")
    acc1, acc5, loss = 100.0 * correct1 / count, 100.0 * correct5 / count, loss_sum / count
    logger.info(f" * Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} Loss {loss:.4f}")
    return acc1, acc5, loss


@torch.no_grad()
def throughput(config, loader, model: nn.Module, precision: Precision, env: DistEnv, logger: logging.Logger) -> float:
    """Images per second of the eval forward pass on one batch (real when a loader is given, else synthetic)."""
    model.eval()
    batch = config.DATA.BATCH_SIZE
    if loader is not None:
        images = next(iter(loader))[0].to(env.device)
    else:
        size = config.DATA.IMG_SIZE
        images = torch.randn(batch, config.MODEL.DFVT.IN_CHANS, size, size, device=env.device)
    batch = images.shape[0]

    def sync() -> None:
        if env.device.type == "cuda":
            torch.cuda.synchronize()

    with precision.autocast(env.device):
        for _ in range(config.THROUGHPUT.WARMUP_ITERS):
            model(images)
        sync()
        start = time.perf_counter()
        for _ in range(config.THROUGHPUT.ITERS):
            model(images)
        sync()
        elapsed = time.perf_counter() - start
    rate = config.THROUGHPUT.ITERS * batch / elapsed
    device_name = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
    logger.info(
        f"throughput {rate:.1f} images/s | batch {batch} | device {env.device} ({device_name}) | dtype {precision.name}"
        f" | {config.THROUGHPUT.ITERS} timed iterations after {config.THROUGHPUT.WARMUP_ITERS} warm-up"
    )
    return rate


def gather_rng_states(env: DistEnv) -> list[dict]:
    """Every process's generator states, indexed by rank (all processes must call this together)."""
    state = capture_rng_state()
    if not env.distributed:
        return [state]
    states: list = [None] * env.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def checkpoint_state(
    config, model, optimizer, lr_scheduler, scaler, epoch: int, max_accuracy: float, rng, class_names
) -> dict:
    """Everything a run needs to continue, as tensors and plain containers (loadable with ``weights_only``).

    ``class_names`` (the dataset's, when it has them) let ``predict.py`` print names.
    """
    return {
        "class_names": class_names,
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "max_accuracy": max_accuracy,
        "config": config.dump(),
        "rng": rng,
    }


def _load_optional(what: str, target, state, path: str, logger: logging.Logger) -> None:
    """Load a piece of training state, skipping (with a warning) one written by another setup."""
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        logger.warning(f"{path}: its {what} state does not fit this run and was skipped ({e})")


def restore_training_state(config, ckpt, path: str, optimizer, lr_scheduler, scaler, env: DistEnv, logger) -> float:
    """Continue a run from ``ckpt``: optimizer, schedule, scaler, next epoch and generators; returns max accuracy."""
    if "optimizer" in ckpt:
        _load_optional("optimizer", optimizer, ckpt["optimizer"], path, logger)
    if "lr_scheduler" in ckpt:
        _load_optional("LR scheduler", lr_scheduler, ckpt["lr_scheduler"], path, logger)
    if "scaler" in ckpt:
        _load_optional("grad scaler", scaler, ckpt["scaler"], path, logger)
    elif "amp" in ckpt:
        logger.warning(f"{path}: apex loss-scaler state ignored; torch.amp's GradScaler starts afresh")
    config.defrost()
    config.TRAIN.START_EPOCH = int(ckpt["epoch"]) + 1
    config.freeze()
    rng = ckpt.get("rng")
    if isinstance(rng, list) and len(rng) == env.world_size:
        restore_rng_state(rng[env.rank])
    else:
        logger.warning(f"{path}: no generator state for {env.world_size} process(es); randomness restarts from SEED")
    logger.info(f"Resumed optimizer, schedule and scaler; continuing at epoch {config.TRAIN.START_EPOCH}")
    return float(ckpt.get("max_accuracy", 0.0))


def run(config, env: DistEnv, logger: logging.Logger) -> None:
    """The three modes: throughput, evaluation, or training with validation every epoch."""
    data_needed = not config.THROUGHPUT_MODE or config.DATA.DATA_PATH
    if data_needed:
        _, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config)
    else:
        dataset_val = loader_train = loader_val = mixup_fn = None
    # Logged and saved once the data has set what it decides (MODEL.NUM_CLASSES, the digits' DATA_PATH).
    logger.info(f"Full config:\n{config.dump()}")
    if env.is_main:
        with open(os.path.join(config.OUTPUT, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=list)

    model = build_model(config)
    logger.info(complexity_summary(model, config.DATA.IMG_SIZE, config.MODEL.DFVT.IN_CHANS))
    model.to(env.device)
    precision = choose_precision(config, env.device)
    logger.info(f"Precision: {precision.name}" + (" with GradScaler" if precision.use_scaler else ""))
    model_without_ddp = model
    if config.TRAIN.COMPILE:
        model = torch.compile(model)
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    if config.THROUGHPUT_MODE:
        throughput(config, loader_val, model, precision, env, logger)
        return

    if config.EVAL_MODE:
        if not config.MODEL.RESUME:
            raise CheckpointError("--eval needs the checkpoint to evaluate: add --resume CKPT.")
        path = config.MODEL.RESUME
        load_model_weights(model_without_ddp, model_state_of(load_file(path), path), path)
        logger.info(f"Loaded model weights from {path} (strict: every key and shape matched)")
        acc1, _, _ = validate(config, loader_val, model, precision, env, logger)
        logger.info(f"Accuracy of the network on the {len(loader_val.dataset)} test images: {acc1:.1f}%")
        return

    steps_per_epoch = optimizer_steps_per_epoch(len(loader_train), config.TRAIN.ACCUMULATION_STEPS)
    optimizer = build_optimizer(config, model_without_ddp)
    lr_scheduler = build_scheduler(config, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision.use_scaler)

    max_accuracy = 0.0
    resume_path, ckpt = config.MODEL.RESUME, None
    if config.TRAIN.AUTO_RESUME:
        found = find_resumable(config.OUTPUT, logger)
        if found:
            if resume_path and resume_path != found[0]:
                logger.warning(f"auto-resume: {found[0]} is newer than --resume {resume_path}; resuming from it")
            resume_path, ckpt = found
    if resume_path:
        logger.info(f"==============> Resuming from {resume_path}....................")
        ckpt = ckpt if ckpt is not None else load_file(resume_path)
        load_model_weights(model_without_ddp, model_state_of(ckpt, resume_path), resume_path)
        if isinstance(ckpt, dict) and "epoch" in ckpt:
            max_accuracy = restore_training_state(
                config, ckpt, resume_path, optimizer, lr_scheduler, scaler, env, logger
            )
    elif config.MODEL.PRETRAINED:
        load_pretrained(model_without_ddp, config.MODEL.PRETRAINED, logger)
    last_saved = resume_path or None

    criterion = build_criterion(config, mixup_fn is not None)
    class_names = list(getattr(dataset_val, "classes", None) or []) or None
    writer = create_tensorboard_writer(config.OUTPUT, env.rank, logger)
    logger.info("Start training")
    start = time.time()
    for epoch in range(config.TRAIN.START_EPOCH, config.TRAIN.EPOCHS):
        if hasattr(loader_train.sampler, "set_epoch"):
            loader_train.sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(
                config,
                model,
                criterion,
                loader_train,
                optimizer,
                epoch,
                mixup_fn,
                lr_scheduler,
                scaler,
                precision,
                env,
                logger,
                writer,
            )
        except NonFiniteLossError as e:
            raise NonFiniteLossError(
                f"{e}; stopped without saving. Last good checkpoint: {last_saved or 'none yet'}. "
                f"Lower TRAIN.BASE_LR or check the data, then resume from it."
            ) from e
        if env.distributed:
            # BatchNorm statistics are per process; average them so every rank validates and saves the same model.
            distribute_bn(model, env.world_size, reduce=True)
        acc1, acc5, val_loss = validate(config, loader_val, model, precision, env, logger)
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
        is_best = acc1 > max_accuracy
        max_accuracy = max(max_accuracy, acc1)
        last = epoch == config.TRAIN.EPOCHS - 1
        if (epoch + 1) % config.SAVE_FREQ == 0 or last or is_best:
            rng = gather_rng_states(env)
            if env.is_main:
                path = os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth")
                atomic_save(
                    checkpoint_state(
                        config, model, optimizer, lr_scheduler, scaler, epoch, max_accuracy, rng, class_names
                    ),
                    path,
                )
                logger.info(f"{path} saved")
            last_saved = os.path.join(config.OUTPUT, f"ckpt_epoch_{epoch}.pth")
        logger.info(f"Accuracy of the network on the {len(loader_val.dataset)} test images: {acc1:.1f}%")
        logger.info(f"Max accuracy: {max_accuracy:.2f}%")
    logger.info(f"Training time {datetime.timedelta(seconds=int(time.time() - start))}")
    logger.info(f"Final weights fingerprint (sha256 of the state_dict): {state_fingerprint(model)}")
    if writer is not None:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_option(argv)
    config = get_default_config()
    try:
        update_config(config, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = init_distributed(args.local_rank)
    logger = create_logger(config.OUTPUT, env.rank, name=config.MODEL.NAME)
    try:
        config.defrost()
        config.LOCAL_RANK = env.local_rank
        config.freeze()
        apply_lr_scaling(config, env.world_size)
        set_seed(config.SEED + env.rank)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        logger.info(f"rank {env.rank}/{env.world_size}, device {env.device}")
        run(config, env, logger)
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as e:
        logger.error(f"{type(e).__name__}: {e}")
        return 2
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
