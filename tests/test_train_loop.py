"""engine.py: train_one_epoch (accumulation, schedule stepping, clipping, non-finite losses), precision and loss
choice, and the run state's state_dict round trip."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from config import load_config
from engine import Precision, RunState, build_criterion, choose_precision, train_one_epoch
from errors import ConfigError, NonFiniteLossError
from lr_scheduler import build_scheduler
from utils import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FP32 = Precision(None, False)


def run_epoch(config, model, batches, optimizer, epoch, recorder, scaler=None, precision=FP32):
    """``train_one_epoch`` with plain cross-entropy, no Mixup, on the CPU (no grad scaler by default)."""
    run = RunState(model, optimizer, recorder, scaler or torch.amp.GradScaler("cpu", enabled=False))
    criterion = nn.CrossEntropyLoss()
    return train_one_epoch(config, run, model, criterion, batches, None, epoch, precision, CPU, logging.getLogger("t"))


class StepRecorder:
    """Records the step indices the loop hands to the LR scheduler."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def step_update(self, num_updates: int) -> None:
        self.calls.append(num_updates)


@pytest.mark.parametrize("accum,n_micro", [(1, 5), (3, 7), (2, 6)])
def test_accumulation_applies_mean_gradient_once_per_n_micro_batches(accum, n_micro):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    reference = copy.deepcopy(model)
    batches = [(torch.randn(3, 6), torch.randint(0, 4, (3,))) for _ in range(n_micro)]
    config = load_config(None, ["TRAIN.ACCUMULATION_STEPS", str(accum), "TRAIN.CLIP_GRAD", "0.0", "PRINT_FREQ", "1"])
    lr = 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    steps_taken = []
    original_step = optimizer.step
    optimizer.step = lambda *a, **k: (steps_taken.append(1), original_step(*a, **k))[1]
    recorder = StepRecorder()
    epoch = 2
    run_epoch(config, model, batches, optimizer, epoch, recorder)
    n_steps = n_micro // accum
    assert len(steps_taken) == n_steps
    assert recorder.calls == [epoch * n_steps + s for s in range(1, n_steps + 1)]
    # Independent computation: each step subtracts lr × the mean of its micro-batch gradients.
    loss_fn = nn.CrossEntropyLoss()
    for s in range(n_steps):
        grads = []
        for x, y in batches[s * accum : (s + 1) * accum]:
            reference.zero_grad()
            loss_fn(reference(x), y).backward()
            grads.append([p.grad.clone() for p in reference.parameters()])
        with torch.no_grad():
            for i, p in enumerate(reference.parameters()):
                p -= lr * torch.stack([g[i] for g in grads]).mean(0)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradient_clipping_bounds_the_applied_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    before = [p.detach().clone() for p in model.parameters()]
    batches = [(100 * torch.randn(8, 6), torch.randint(0, 4, (8,)))]
    config = load_config(None, ["TRAIN.CLIP_GRAD", "0.01"])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    run_epoch(config, model, batches, optimizer, 0, StepRecorder())
    delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    assert delta.norm().item() == pytest.approx(0.01, rel=1e-4)


def _precision(device, *opts, cuda_bf16=None):
    p = choose_precision(load_config(None, list(opts)), torch.device(device), cuda_bf16=cuda_bf16)
    return p.dtype, p.use_scaler


def test_precision_choice():
    fp16_scaled, bf16 = (torch.float16, True), (torch.bfloat16, False)
    assert _precision("cpu", "AMP_OPT_LEVEL", "O0") == (None, False)
    assert _precision("cuda", "AMP_ENABLE", "False") == (None, False)
    # auto: bf16 without a scaler where the GPU has it (Ampere+) and on the CPU; fp16 + scaler on older GPUs.
    assert _precision("cuda", "AMP_OPT_LEVEL", "O1", cuda_bf16=True) == bf16
    assert _precision("cuda", "AMP_OPT_LEVEL", "O1", cuda_bf16=False) == fp16_scaled
    assert _precision("cpu", "AMP_OPT_LEVEL", "O2") == bf16
    # Forced: float16 always with a scaler (the CPU too), bfloat16 never.
    assert _precision("cuda", "AMP_DTYPE", "float16", cuda_bf16=True) == fp16_scaled
    assert _precision("cpu", "AMP_DTYPE", "float16") == fp16_scaled
    assert _precision("cuda", "AMP_DTYPE", "bfloat16", cuda_bf16=False) == bf16
    assert _precision("cuda", "AMP_DTYPE", "bfloat16", "AMP_OPT_LEVEL", "O0") == (None, False)
    with pytest.raises(ConfigError, match="AMP_DTYPE 'half' must be one of auto, bfloat16, float16"):
        _precision("cpu", "AMP_DTYPE", "half")
    assert Precision(torch.float16, True).name == "float16" and Precision(None, False).name == "fp32"
    auto_gpu = choose_precision(load_config(), torch.device("cuda"), cuda_bf16=True).describe()
    assert auto_gpu == "bfloat16 autocast (AMP_DTYPE auto: the GPU supports bfloat16)"
    forced = choose_precision(load_config(None, ["AMP_DTYPE", "float16"]), torch.device("cpu"))
    assert forced.describe() == "float16 autocast with GradScaler (AMP_DTYPE float16)"


def test_criterion_follows_mixup_and_smoothing():
    assert isinstance(build_criterion(load_config(), mixup_active=True), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(load_config(), mixup_active=False), LabelSmoothingCrossEntropy)
    plain = build_criterion(load_config(None, ["MODEL.LABEL_SMOOTHING", "0.0"]), mixup_active=False)
    assert type(plain) is nn.CrossEntropyLoss


class NaNAfter(nn.Module):
    """A linear model whose output becomes NaN from its ``n``-th call on."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.n, self.calls = n, 0

    def forward(self, x):
        self.calls += 1
        out = self.fc(x)
        return out * float("nan") if self.calls >= self.n else out


def _epoch(model, scaler, precision=FP32):
    batches = [(torch.randn(3, 6), torch.randint(0, 4, (3,))) for _ in range(4)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return run_epoch(
        load_config(None, ["PRINT_FREQ", "1"]), model, batches, optimizer, 1, StepRecorder(), scaler, precision
    )


def test_non_finite_loss_stops_with_epoch_and_step():
    with pytest.raises(NonFiniteLossError, match=r"is nan at epoch 1, step 2/4"):
        _epoch(NaNAfter(2), torch.amp.GradScaler("cpu", enabled=False))


def test_grad_scaler_skips_non_finite_steps_and_counts_them():
    torch.manual_seed(0)
    model = NaNAfter(3)
    stats = _epoch(model, torch.amp.GradScaler("cpu", enabled=True), Precision(torch.bfloat16, True))
    assert stats["skipped_steps"] == 2  # steps 3 and 4
    assert all(torch.isfinite(p).all() for p in model.parameters())


def small_run(seed: int) -> RunState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = build_scheduler(load_config(None, ["TRAIN.EPOCHS", "3", "TRAIN.WARMUP_EPOCHS", "1"]), optimizer, 2)
    return RunState(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))


def test_run_state_round_trip_continues_identically(caplog):
    a = small_run(0)
    config = load_config(None, ["TRAIN.EPOCHS", "3", "PRINT_FREQ", "1"])
    batches = [(torch.randn(3, 6), torch.randint(0, 4, (3,))) for _ in range(2)]
    train_one_epoch(config, a, a.model, nn.CrossEntropyLoss(), batches, None, 0, FP32, CPU, logging.getLogger("t"))
    a.next_epoch, a.max_accuracy = 1, 42.0
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = small_run(1)  # other weights, fresh optimizer and schedule
    b.load_state_dict(torch.load(buffer, weights_only=True), "buffer", logging.getLogger("t"))
    assert (b.next_epoch, b.max_accuracy, b.state_dict()["epoch"]) == (1, 42.0, 0)
    for run in (a, b):  # the next epoch from the restored state equals the original's
        train_one_epoch(
            config, run, run.model, nn.CrossEntropyLoss(), batches, None, 1, FP32, CPU, logging.getLogger("t")
        )
    for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]


def test_run_state_skips_foreign_pieces_with_a_warning(caplog):
    run = small_run(0)
    foreign = {**run.state_dict(), "optimizer": {"state": {}, "param_groups": [{"lr": 1.0, "params": [0, 1, 2]}]}}
    del foreign["scaler"]
    foreign["amp"] = {"loss_scaler0": {}}
    with caplog.at_level(logging.WARNING):
        run.load_state_dict(foreign, "upstream.pth", logging.getLogger("t"))
    assert "upstream.pth: its optimizer state does not fit this run and was skipped" in caplog.text
    assert "apex loss-scaler state ignored" in caplog.text


def test_non_finite_loss_found_at_the_next_report_names_its_step():
    # Losses are read once per PRINT_FREQ steps (no host sync per step); the error still names the first bad step.
    batches = [(torch.randn(3, 6), torch.randint(0, 4, (3,))) for _ in range(4)]
    optimizer = torch.optim.SGD(NaNAfter(2).parameters(), lr=0.1)
    config = load_config(None, ["PRINT_FREQ", "10"])
    with pytest.raises(NonFiniteLossError, match=r"is nan at epoch 0, step 2/4"):
        model = NaNAfter(2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        run_epoch(config, model, batches, optimizer, 0, StepRecorder())


def test_checkpoints_resume_across_the_precision_choice(caplog):
    """A bf16/fp32 run saves an empty scaler state; resuming it under fp16 + GradScaler starts the scaler afresh
    (said once, no warning), and an fp16 run's scaler state is simply unused by a bf16 run."""
    bf16 = small_run(0)
    fp16 = small_run(0)
    fp16.scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    batches = [(torch.randn(3, 6), torch.randint(0, 4, (3,))) for _ in range(2)]
    config = load_config(None, ["PRINT_FREQ", "1"])
    train_one_epoch(
        config, fp16, fp16.model, nn.CrossEntropyLoss(), batches, None, 0, Precision(torch.float16, True), CPU,
        logging.getLogger("t"),
    )  # fmt: skip
    logger = logging.getLogger("t")
    with caplog.at_level(logging.INFO):
        fresh = small_run(1)
        fresh.scaler = torch.amp.GradScaler("cpu", enabled=True)
        fresh.load_state_dict(bf16.state_dict(), "bf16.pth", logger)
        bf16.load_state_dict(fp16.state_dict(), "fp16.pth", logger)
    assert "bf16.pth: saved without a GradScaler (bfloat16 or fp32); the scaler starts afresh" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert fresh.scaler.get_scale() == 65536.0 and not bf16.scaler.is_enabled()
    assert fp16.state_dict()["scaler"]["scale"] == 1024.0  # the fp16 steps ran with the scaler


def test_float16_with_grad_scaler_trains_dfvt_on_the_cpu():
    """AMP_DTYPE float16 also runs on the CPU (autocast + GradScaler), so the GPU's fp16 path is exercised here."""
    from tests.helpers import build

    torch.manual_seed(0)
    model = build("tiny", "DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "4")
    precision = choose_precision(load_config(None, ["AMP_DTYPE", "float16"]), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=precision.use_scaler, init_scale=256.0)  # 65536 overflows at first
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))) for _ in range(3)]
    before = copy.deepcopy(model.state_dict())
    stats = run_epoch(load_config(None, ["PRINT_FREQ", "1"]), model, batches, torch.optim.AdamW(model.parameters()),
                      0, StepRecorder(), scaler, precision)  # fmt: skip
    assert precision.use_scaler and stats["skipped_steps"] == 0 and stats["loss"] > 0
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_compile_falls_back_with_one_warning_when_it_cannot_run(monkeypatch, caplog):
    import engine

    model, logger = nn.Linear(2, 2), logging.getLogger("t")
    assert engine.maybe_compile(model, load_config(), torch.device("cpu"), logger) is model  # off by default
    on = load_config(None, ["TRAIN.COMPILE", "True"])
    monkeypatch.setattr(engine.shutil, "which", lambda name: None)  # no C++ compiler on PATH
    monkeypatch.delenv("CXX", raising=False)
    with caplog.at_level(logging.WARNING):
        assert engine.maybe_compile(model, on, torch.device("cpu"), logger) is model
    assert "TRAIN.COMPILE: torch.compile needs a C++ compiler (g++ or clang++)" in caplog.text
    assert "running without torch.compile" in caplog.text
    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    assert "this torch cannot compile on Python" in engine.compile_blocker(torch.device("cuda"))
    monkeypatch.undo()
    compiled = engine.maybe_compile(model, on, torch.device("cpu"), logger)  # g++ is on this machine
    assert compiled is not model and compiled._orig_mod is model
