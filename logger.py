"""Run logs: every process writes ``log_rank<R>.txt`` in the output folder (``eval_log_rank<R>.txt`` for an
evaluation, ``throughput_...`` for a measurement, so neither touches the training's log); rank 0 also prints, in
colour, and writes TensorBoard scalars when the optional ``tensorboard`` package is installed."""

from __future__ import annotations

import logging
import os
import sys

from termcolor import colored

_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"


def create_logger(output_dir: str, dist_rank: int = 0, name: str = "dfvt", prefix: str = "") -> logging.Logger:
    """A logger writing to ``output_dir/<prefix>log_rank<dist_rank>.txt`` and, on rank 0, to stdout."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(
            logging.Formatter(
                colored("[%(asctime)s %(name)s]", "green")
                + colored("(%(filename)s %(lineno)d)", "yellow")
                + ": %(levelname)s %(message)s",
                datefmt=_DATEFMT,
            )
        )
        logger.addHandler(console)
    os.makedirs(output_dir, exist_ok=True)
    file_handler = logging.FileHandler(os.path.join(output_dir, f"{prefix}log_rank{dist_rank}.txt"), mode="a")
    file_handler.setFormatter(logging.Formatter(_FORMAT, datefmt=_DATEFMT))
    logger.addHandler(file_handler)
    return logger


def create_tensorboard_writer(output_dir: str, dist_rank: int, logger: logging.Logger):
    """A ``SummaryWriter`` on ``output_dir/tensorboard`` for rank 0, or None (other ranks, or no tensorboard)."""
    if dist_rank != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard logging off: `pip install tensorboard` to enable it")
        return None
    path = os.path.join(output_dir, "tensorboard")
    logger.info(f"TensorBoard logs in {path} (tensorboard --logdir {path})")
    return SummaryWriter(log_dir=path)
