"""lr_scheduler.py: LR scaling, the cosine/linear/step schedules in optimizer steps, conv groups at 2x, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from config import get_default_config
from errors import ConfigError
from lr_scheduler import (
    LinearLRScheduler,
    build_scheduler,
    linear_scaled_lrs,
    optimizer_steps_per_epoch,
)
from optimizer import build_optimizer

B, W, M = 1e-3, 1e-6, 1e-5  # base, warm-up and min LR
EPOCHS, WARMUP_EPOCHS, SPE = 10, 2, 5  # SPE: optimizer steps per epoch
WARM_T, TOTAL_T = WARMUP_EPOCHS * SPE, EPOCHS * SPE
DECAY_EPOCHS, DECAY_RATE = 3, 0.5


def make_config(name: str = "cosine", **train):
    c = get_default_config()
    c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR = B, W, M
    c.TRAIN.EPOCHS, c.TRAIN.WARMUP_EPOCHS = EPOCHS, WARMUP_EPOCHS
    c.TRAIN.LR_SCHEDULER.NAME = name
    c.TRAIN.LR_SCHEDULER.DECAY_EPOCHS, c.TRAIN.LR_SCHEDULER.DECAY_RATE = DECAY_EPOCHS, DECAY_RATE
    for k, v in train.items():
        c.TRAIN[k] = v
    c.freeze()
    return c


def small_model() -> nn.Module:
    """Parameters in all four groups: conv branch and others, each with weights and biases."""
    m = nn.Module()
    m.convlayers = nn.ModuleList([nn.Conv2d(2, 2, 1)])
    m.multiresolution_conv = nn.ModuleList([nn.BatchNorm2d(2)])
    m.head = nn.Linear(2, 2)
    return m


def setup(name: str = "cosine", spe: int = SPE, **train):
    config = make_config(name, **train)
    opt = build_optimizer(config, small_model())
    return opt, build_scheduler(config, opt, spe)


def lrs(opt: torch.optim.Optimizer) -> tuple[float, float]:
    """(LR of the 1x groups, LR of the conv groups), checking the groups of each kind agree."""
    plain = {g["lr"] for g in opt.param_groups if "lr_scale" not in g}
    conv = {g["lr"] for g in opt.param_groups if "lr_scale" in g}
    assert len(plain) == 1 and len(conv) == 1
    return plain.pop(), conv.pop()


def warmup(t: int) -> float:
    return W + (B - W) * t / WARM_T


def cosine(t: int) -> float:
    if t < WARM_T:
        return warmup(t)
    x = min((t - WARM_T) / (TOTAL_T - WARM_T), 1.0)
    return M + 0.5 * (B - M) * (1 + math.cos(math.pi * x))


def linear(t: int) -> float:
    if t < WARM_T:
        return warmup(t)
    return B + (M - B) * min((t - WARM_T) / (TOTAL_T - WARM_T), 1.0)


def step(t: int) -> float:
    if t < WARM_T:
        return warmup(t)
    return B * DECAY_RATE ** ((t - WARM_T) // (DECAY_EPOCHS * SPE))


FORMULAS = {"cosine": cosine, "linear": linear, "step": step}


@pytest.mark.parametrize("name", FORMULAS)
def test_schedule_matches_closed_form_and_conv_is_exactly_2x(name):
    opt, sched = setup(name)
    assert sched.base_values == [B] * len(opt.param_groups)  # not B * lr_scale: no double scaling
    assert lrs(opt) == (pytest.approx(W), pytest.approx(2 * W))  # set at construction: the first step's LR
    for t in range(TOTAL_T + 8):
        sched.step_update(t)
        plain, conv = lrs(opt)
        assert plain == pytest.approx(FORMULAS[name](t), rel=1e-12, abs=1e-15), t
        assert conv == 2 * plain, t


def test_landmarks():
    opt, sched = setup("cosine")
    checks = {0: W, WARM_T // 2: (W + B) / 2, WARM_T: B, (WARM_T + TOTAL_T) // 2: (B + M) / 2, TOTAL_T: M}
    for t, value in checks.items():
        sched.step_update(t)
        assert lrs(opt)[0] == pytest.approx(value, rel=1e-12), t
    sched.step_update(TOTAL_T + 100)
    assert lrs(opt) == (pytest.approx(M), pytest.approx(2 * M))

    opt, sched = setup("linear")
    for t, value in {WARM_T: B, (WARM_T + TOTAL_T) // 2: (B + M) / 2, TOTAL_T: M, TOTAL_T + 9: M}.items():
        sched.step_update(t)
        assert lrs(opt)[0] == pytest.approx(value, rel=1e-12), t

    opt, sched = setup("step")
    d = DECAY_EPOCHS * SPE
    for t, value in {
        WARM_T: B,
        WARM_T + d - 1: B,
        WARM_T + d: B * DECAY_RATE,
        WARM_T + 2 * d: B * DECAY_RATE**2,
    }.items():
        sched.step_update(t)
        assert lrs(opt)[0] == pytest.approx(value, rel=1e-12), t


def test_optimizer_is_2x_before_any_scheduler():
    opt = build_optimizer(make_config(), small_model())
    assert lrs(opt) == (B, 2 * B)
    assert all(g["initial_lr"] == B for g in opt.param_groups)


@pytest.mark.parametrize("name", FORMULAS)
def test_no_warmup(name):
    opt, sched = setup(name, WARMUP_EPOCHS=0)
    assert lrs(opt) == (pytest.approx(B), pytest.approx(2 * B))
    sched.step_update(EPOCHS * SPE)
    expected = {"cosine": M, "linear": M, "step": B * DECAY_RATE ** (EPOCHS // DECAY_EPOCHS)}[name]
    assert lrs(opt)[0] == pytest.approx(expected)


def test_lr_scaling():
    c = get_default_config()
    c.DATA.BATCH_SIZE, c.TRAIN.ACCUMULATION_STEPS = 128, 2
    c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR = 5e-4, 5e-7, 5e-6
    assert linear_scaled_lrs(c, 4) == pytest.approx((1e-3, 1e-6, 1e-5))  # 128 x 4 x 2 = 1024 -> x2
    c.TRAIN.ACCUMULATION_STEPS = 1
    assert linear_scaled_lrs(c, 1) == pytest.approx((1.25e-4, 1.25e-7, 1.25e-6))  # 128 -> x1/4
    assert linear_scaled_lrs(c, 1).base == pytest.approx(1.25e-4)  # named fields
    # The scaled values are returned; the config keeps the configured ones.
    assert (c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR) == (5e-4, 5e-7, 5e-6)


def test_scaled_lrs_reach_the_optimizer_and_schedule():
    # A run passes the scaled LRs as values: the first step runs at the scaled warm-up LR, and the peak is the scaled
    # base LR (x the conv branch's 2x), while the config still holds the configured ones.
    config = make_config(BASE_LR=5e-4, WARMUP_LR=5e-7, MIN_LR=5e-6)
    config.defrost()
    config.DATA.BATCH_SIZE = 64  # x 1 process: factor 1/8
    config.freeze()
    lrs = linear_scaled_lrs(config, 1)
    opt = build_optimizer(config, small_model(), lrs.base)
    sched = build_scheduler(config, opt, SPE, lrs)
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([5e-4 / 8] * len(opt.param_groups))
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(5e-7 / 8)
    sched.step_update(WARM_T)
    assert {round(g["lr"] / (5e-4 / 8), 9) for g in opt.param_groups} == {1.0, 2.0}
    sched.step_update(TOTAL_T)
    assert min(g["lr"] for g in opt.param_groups) == pytest.approx(5e-6 / 8)
    assert config.TRAIN.BASE_LR == 5e-4


@pytest.mark.parametrize("name", FORMULAS)
def test_state_dict_round_trip_resumes(name):
    opt, sched = setup(name)
    done = 23
    for t in range(done + 1):
        sched.step_update(t)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # plain Python values only
    # a fresh run with other LRs: the saved state must win
    config = make_config(name, BASE_LR=7.0, MIN_LR=0.5, WARMUP_LR=0.1)
    opt2 = build_optimizer(config, small_model())
    sched2 = build_scheduler(config, opt2, SPE)
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["lr_scheduler"])
    assert lrs(opt2) == lrs(opt)
    for t in range(done + 1, TOTAL_T + 3):
        sched.step_update(t)
        sched2.step_update(t)
        assert lrs(opt2) == lrs(opt), t


def test_linear_scheduler_round_trip_keeps_its_fields():
    opt, sched = setup("linear")
    assert isinstance(sched, LinearLRScheduler)
    state = sched.state_dict()
    assert "optimizer" not in state and state["t_initial"] == TOTAL_T - WARM_T and state["warmup_t"] == WARM_T


@pytest.mark.parametrize(("micro_batches", "accumulation"), [(23, 4), (20, 4), (7, 1), (9, 3)])
def test_accumulation_contract(micro_batches, accumulation):
    """Simulate the training loop: one step_update per optimizer step, never per micro-batch."""
    spe = optimizer_steps_per_epoch(micro_batches, accumulation)
    assert spe == micro_batches // accumulation
    opt, sched = setup("cosine", spe=spe)
    warm_t, total_t = WARMUP_EPOCHS * spe, EPOCHS * spe
    used = []  # the LR of every optimizer step
    last = None
    for epoch in range(EPOCHS):
        done = 0
        for idx in range(micro_batches):
            if (idx + 1) % accumulation == 0:  # a full window: optimizer step
                used.append(lrs(opt))
                done += 1
                last = epoch * spe + done
                sched.step_update(last)
            sched.step(epoch)  # a stray per-epoch call must change nothing (t_in_epochs=False)
        assert done == micro_batches // accumulation
        assert last == (epoch + 1) * spe  # advanced exactly N // A steps this epoch
    assert len(used) == total_t
    assert used[0] == (pytest.approx(W), pytest.approx(2 * W))
    assert used[warm_t][0] == pytest.approx(B)
    assert used[-1][0] == pytest.approx(
        M + 0.5 * (B - M) * (1 + math.cos(math.pi * (total_t - 1 - warm_t) / (total_t - warm_t)))
    )
    assert lrs(opt) == (pytest.approx(M), pytest.approx(2 * M))  # the schedule ends at MIN_LR
    assert all(conv == 2 * plain for plain, conv in used)


def test_errors_name_the_key():
    opt = build_optimizer(make_config(), small_model())
    # (an unknown schedule name is refused by the config table: tests/test_config.py walks every key)
    with pytest.raises(ConfigError, match="TRAIN.WARMUP_EPOCHS"):
        build_scheduler(make_config(EPOCHS=2), opt, SPE)
    with pytest.raises(ConfigError, match="ACCUMULATION_STEPS"):
        optimizer_steps_per_epoch(3, 4)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_scheduler(make_config(), opt, 0)
