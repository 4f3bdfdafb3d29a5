"""LR scaling with the total batch, and the per-optimizer-step schedules (cosine, linear, step).

The schedules are timm schedulers (``timm.scheduler.scheduler.Scheduler``), so a param group's
``"lr_scale"`` (set by ``optimizer.build_optimizer``) multiplies every scheduled value.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from yacs.config import CfgNode

from errors import ConfigError

REFERENCE_BATCH = 512  # the total batch the configured LRs are given for


class LearningRates(NamedTuple):
    """The peak, warm-up start and final LRs of a run (for a group of ``lr_scale`` 1)."""

    base: float
    warmup: float
    min: float


def configured_lrs(config: CfgNode) -> LearningRates:
    """``TRAIN.BASE_LR``, ``TRAIN.WARMUP_LR`` and ``TRAIN.MIN_LR`` as configured (unscaled)."""
    t = config.TRAIN
    return LearningRates(float(t.BASE_LR), float(t.WARMUP_LR), float(t.MIN_LR))


def linear_scaled_lrs(config: CfgNode, world_size: int) -> LearningRates:
    """The configured LRs × total batch / 512; the config is left as it is.

    Total batch = ``DATA.BATCH_SIZE`` (per process) × ``world_size`` × ``TRAIN.ACCUMULATION_STEPS``.
    """
    total_batch = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS
    factor = total_batch / REFERENCE_BATCH
    return LearningRates(*(lr * factor for lr in configured_lrs(config)))


def optimizer_steps_per_epoch(micro_batches: int, accumulation_steps: int) -> int:
    """Optimizer steps in an epoch of ``micro_batches``: one per full window of ``accumulation_steps``.

    A trailing partial window (``micro_batches % accumulation_steps``) makes no optimizer step.
    """
    if accumulation_steps < 1:
        raise ConfigError(f"TRAIN.ACCUMULATION_STEPS {accumulation_steps} must be >= 1.")
    steps = micro_batches // accumulation_steps
    if steps < 1:
        raise ConfigError(
            f"An epoch of {micro_batches} micro-batches makes no optimizer step with TRAIN.ACCUMULATION_STEPS "
            f"{accumulation_steps}; lower it or DATA.BATCH_SIZE, or use more data."
        )
    return steps


class LinearLRScheduler(Scheduler):
    """Linear warm-up from ``warmup_lr_init`` over ``warmup_t``, then linear decay to ``lr_min`` over ``t_initial``.

    After ``warmup_t + t_initial`` the value stays at ``lr_min``. Values are for a group of ``lr_scale`` 1.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        t_initial: int,
        lr_min: float = 0.0,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        t_in_epochs: bool = True,
        initialize: bool = True,
    ) -> None:
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs, initialize=initialize)
        if t_initial <= 0:
            raise ValueError(f"t_initial must be positive, got {t_initial}.")
        self.t_initial = t_initial
        self.lr_min = lr_min
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values]
            super().update_groups(warmup_lr_init)
        else:
            self.warmup_steps = [0.0 for _ in self.base_values]

    def _get_lr(self, t: int) -> list[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        frac = min((t - self.warmup_t) / self.t_initial, 1.0)
        return [v + (self.lr_min - v) * frac for v in self.base_values]


def build_scheduler(
    config: CfgNode, optimizer: torch.optim.Optimizer, steps_per_epoch: int, lrs: LearningRates | None = None
) -> Scheduler:
    """The ``TRAIN.LR_SCHEDULER.NAME`` schedule (``cosine``, ``linear`` or ``step``), counted in optimizer steps.

    Contract with the training loop:

    * ``steps_per_epoch`` is the number of OPTIMIZER steps per epoch, i.e. micro-batches per epoch
      ``// TRAIN.ACCUMULATION_STEPS`` (:func:`optimizer_steps_per_epoch`); a trailing partial
      accumulation window makes no step.
    * After each optimizer step call ``scheduler.step_update(n)`` with ``n`` the number of optimizer
      steps done so far in the whole run (``epoch * steps_per_epoch + steps done this epoch``); it sets
      the LR of the next step. Never call it per micro-batch, nor ``scheduler.step(epoch)``.
    * The first step runs at ``lrs.warmup`` (set here); the LR rises linearly to the base LR at
      ``n = WARMUP_EPOCHS * steps_per_epoch`` and (cosine, linear) reaches ``lrs.min`` at
      ``n = EPOCHS * steps_per_epoch``. Every value is multiplied by a group's ``lr_scale``.

    The base LR is each group's ``initial_lr`` (set by ``optimizer.build_optimizer``); ``lrs`` defaults to the
    configured, unscaled values (:func:`configured_lrs`; a run passes :func:`linear_scaled_lrs`). On resume, load
    the saved ``state_dict()`` with ``load_state_dict``.
    """
    t = config.TRAIN
    lrs = lrs or configured_lrs(config)
    name = str(t.LR_SCHEDULER.NAME).lower()
    if steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be >= 1 optimizer step, got {steps_per_epoch}.")
    warmup_t = int(t.WARMUP_EPOCHS * steps_per_epoch)
    warmup = {"warmup_t": warmup_t, "warmup_lr_init": lrs.warmup, "t_in_epochs": False}
    if name == "step":
        decay_t = int(t.LR_SCHEDULER.DECAY_EPOCHS * steps_per_epoch)
        if decay_t < 1:
            raise ConfigError(f"TRAIN.LR_SCHEDULER.DECAY_EPOCHS {t.LR_SCHEDULER.DECAY_EPOCHS} must be positive.")
        return StepLRScheduler(
            optimizer, decay_t=decay_t, decay_rate=t.LR_SCHEDULER.DECAY_RATE, warmup_prefix=True, **warmup
        )
    decay_t = int(t.EPOCHS * steps_per_epoch) - warmup_t
    if decay_t < 1:
        raise ConfigError(
            f"TRAIN.EPOCHS {t.EPOCHS} must exceed TRAIN.WARMUP_EPOCHS {t.WARMUP_EPOCHS} for the {name} schedule "
            f"(lower TRAIN.WARMUP_EPOCHS for short runs)."
        )
    if name == "linear":
        return LinearLRScheduler(optimizer, t_initial=decay_t, lr_min=lrs.min, **warmup)
    return CosineLRScheduler(optimizer, t_initial=decay_t, lr_min=lrs.min, cycle_limit=1, warmup_prefix=True, **warmup)
