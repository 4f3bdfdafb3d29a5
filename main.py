"""Train, evaluate or measure the throughput of DFvT: ``python main.py --cfg configs/tiny.yaml ...``.

Runs as a single process, or as one process per device under ``torchrun`` or ``python -m torch.distributed.launch``
(NCCL on CUDA, gloo on CPU). This file parses the command line, builds the config, data, model, optimizer and
schedule, and hands them to :mod:`engine`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

import engine
from config import get_default_config, update_config
from data import Data, build_loader, describe_eval_transform
from distillation import build_teacher
from errors import ConfigError, DFvTError, RunFolderBusyError, RunStopped
from logger import create_logger
from lr_scheduler import LearningRates, build_scheduler, linear_scaled_lrs, optimizer_steps_per_epoch
from models import build_model
from models.complexity import complexity_summary
from optimizer import build_optimizer
from utils import (
    DistEnv,
    StopRequest,
    check_writable_folder,
    destroy_distributed,
    init_distributed,
    lock_run_folder,
    set_seed,
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
    parser.add_argument("--check-data", action="store_true", help="read every image of both splits, then stop")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    # torch.distributed.launch passes --local-rank=K (torch >= 2.0) or --local_rank K (older).
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None)
    return parser.parse_args(argv)


def mode_prefix(config, checking: bool = False) -> str:
    """The file-name prefix of this mode's log and config: training's files are never touched by ``--eval``,
    ``--throughput`` or ``--check-data`` runs pointed at the same folder."""
    if checking:
        return "check_"
    return "throughput_" if config.THROUGHPUT_MODE else "eval_" if config.EVAL_MODE else ""


def run_summary(
    config, env: DistEnv, data: Data | None, complexity: str, precision: engine.Precision, lrs: LearningRates | None
) -> str:
    """The run in a few lines: what, on what data and hardware, at which precision, batch and LR, and where to."""
    mode = "throughput" if config.THROUGHPUT_MODE else "eval" if config.EVAL_MODE else "train"
    backend = "nccl" if env.device.type == "cuda" else "gloo"
    batch, accum = config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS
    lines = [
        f"Run: {mode} | {env.world_size} process(es) ({env.device.type}{', ' + backend if env.distributed else ''})",
        f"Model: {config.MODEL.NAME} | {complexity}",
    ]
    if data is not None:
        i = data.info
        split = f"{i.num_train} train, {i.num_val} val images" if i.num_train is not None else f"{i.num_val} val images"
        zipped = " (zip)" if config.DATA.ZIP_MODE else ""
        classes = f"{i.num_classes} classes"
        if i.class_indices is not None:
            classes = f"{len(i.class_indices)} of the model's {i.num_classes} classes"
        lines.append(f"Data: {config.DATA.DATASET} {i.root}{zipped} | {classes} | {split}")
        lines.append(f"Loader: {data.loader}")
        lines.append(f"Eval transform: {describe_eval_transform(config)}")
    lines.append(
        f"Precision: {precision.describe()} | batch {batch} per process x {env.world_size} process(es) x {accum} "
        f"accumulation step(s) = {batch * env.world_size * accum}"
    )
    if lrs is not None:
        t = config.TRAIN
        lines += [
            f"LR: peak {lrs.base:.3e}, warm-up start {lrs.warmup:.3e}, final {lrs.min:.3e} (configured "
            f"{t.BASE_LR:g}, {t.WARMUP_LR:g}, {t.MIN_LR:g} x total batch / 512) | {t.LR_SCHEDULER.NAME} schedule, "
            f"{t.WARMUP_EPOCHS} warm-up epochs | {t.OPTIMIZER.NAME}, weight decay {t.WEIGHT_DECAY:g}",
            f"Epochs: {t.START_EPOCH} to {t.EPOCHS - 1} | checkpoint every {config.SAVE_FREQ} epoch(s), at the last "
            f"and on a new best",
        ]
    prefix = mode_prefix(config)
    lines.append(f"Output: {config.OUTPUT} ({prefix}log_rank<R>.txt; the full config in {prefix}config.json)")
    return "\n".join(lines)


def run(config, env: DistEnv, logger: logging.Logger, stop: StopRequest | None = None, checking: bool = False) -> None:
    """Build what the mode needs and hand it to the engine: a data check, throughput, evaluation, or training (which
    ``stop`` ends early, after a step, with a checkpoint to continue from)."""
    if env.is_main:
        with open(os.path.join(config.OUTPUT, f"{mode_prefix(config, checking)}config.json"), "w") as f:
            json.dump(config, f, indent=2)
    data = build_loader(config, env.device) if not config.THROUGHPUT_MODE or config.DATA.DATA_PATH else None
    if checking:
        engine.check_data(data, env, logger, full=True)
        logger.info("every image of both splits is readable")
        return
    num_classes = data.info.num_classes if data is not None else config.MODEL.NUM_CLASSES
    bare = build_model(config, num_classes)
    complexity = complexity_summary(bare, config.DATA.IMG_SIZE, config.MODEL.DFVT.IN_CHANS)
    bare.to(env.device)
    precision = engine.choose_precision(config, env.device)
    model = engine.maybe_compile(bare, config, env.device, logger)
    if env.distributed:
        device_ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    if config.THROUGHPUT_MODE or config.EVAL_MODE:
        logger.info(run_summary(config, env, data, complexity, precision, None))
        if config.THROUGHPUT_MODE:
            engine.throughput(config, data.val if data is not None else None, model, precision, env, logger)
        else:
            engine.evaluate(config, model, bare, data, precision, env, logger)
        return

    engine.check_data(data, env, logger, full=False)  # a bad validation file is found now, not after an epoch
    teacher = build_teacher(config, env.device, num_classes, data.info.class_names, logger)
    steps_per_epoch = optimizer_steps_per_epoch(len(data.train), config.TRAIN.ACCUMULATION_STEPS)
    lrs = linear_scaled_lrs(config, env.world_size)
    optimizer = build_optimizer(config, bare, lrs.base)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch, lrs)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision.use_scaler)
    ema = engine.build_ema(config, bare)
    state = engine.RunState(bare, optimizer, scheduler, scaler, next_epoch=config.TRAIN.START_EPOCH, ema=ema)
    logger.info(run_summary(config, env, data, complexity, precision, lrs))
    resumed = engine.resume(config, state, env, logger)
    engine.train(config, state, model, data, precision, env, logger, last_saved=resumed, teacher=teacher, stop=stop)


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process of the run ended (its own error, a signal)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator", "Broken pipe")
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_option(argv)
    config = get_default_config()
    try:
        update_config(config, args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        env = init_distributed(args.local_rank)
    except ConfigError as e:  # a malformed launcher or SLURM variable
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if env.is_main:
            check_writable_folder(config.OUTPUT)
        # Training writes checkpoints: one run per folder (before the log is opened, so a refused run writes nothing).
        reading = config.EVAL_MODE or config.THROUGHPUT_MODE or args.check_data
        lock = None if reading else lock_run_folder(config.OUTPUT, env)
    except (ConfigError, RunFolderBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        destroy_distributed()
        return 2
    logger = create_logger(config.OUTPUT, env.rank, name=config.MODEL.NAME, prefix=mode_prefix(config, args.check_data))
    # Training: SIGINT, SIGTERM and SIGUSR1 stop it after the current step, with a checkpoint (from here on, so a
    # Ctrl-C while the data and the loader workers start is not lost).
    stop = None if reading else StopRequest(env).install()
    try:
        set_seed(config.SEED + env.rank)
        if env.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        logger.info(f"rank {env.rank}/{env.world_size}, device {env.device}")
        run(config, env, logger, stop, args.check_data)
    except RunStopped as e:
        logger.warning(str(e))
        return 128 + e.signum
    except DFvTError as e:
        logger.error(f"{type(e).__name__}: {e}")
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted (Ctrl-C, twice while training); the checkpoints written so far are intact")
        return 128 + signal.SIGINT
    except Exception as e:
        if env.distributed and peer_failure(e):
            logger.error(
                f"another process of this run stopped ({str(e).splitlines()[0][:160]}); its log says why: "
                f"{os.path.join(config.OUTPUT, mode_prefix(config, args.check_data) + 'log_rank<R>.txt')}"
            )
            return 2
        if stop is not None and stop.signum:  # e.g. a SIGTERM sent to every process also ended the loader workers
            name = signal.Signals(stop.signum).name
            logger.warning(
                f"stopped by {name} before the step could finish ({type(e).__name__}: {str(e).splitlines()[0]}); the "
                f"last checkpoint is intact: rerun the same command to continue from it (under SLURM, ask for an "
                f"early SIGUSR1, e.g. --signal=USR1@120, which only the main processes act on)"
            )
            return 128 + stop.signum
        logger.exception("the run failed with an unexpected error (a bug: please report it with this log)")
        return 1
    finally:
        if stop is not None:
            stop.uninstall()
        destroy_distributed()
        if lock is not None:
            lock.close()  # releases the run lock (the OS does it too if the process dies first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
