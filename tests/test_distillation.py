"""distillation.py: the soft and hard losses against hand-written formulas (plain and Mixup targets), gradients reach
the student only, and teachers built from a repo config or a timm model name with their checkpoints, or refused with
one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from config import load_config
from distillation import DistillationLoss, Renormalized, build_teacher, check_settings, with_distillation
from errors import CheckpointError, ConfigError
from tests.helpers import build, config_path, upstream_checkpoint

CLASSES = 5
BATCH = 4


def make_teacher() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, CLASSES))


def student_logits(seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(BATCH, CLASSES, generator=generator)).requires_grad_()


def images(seed: int = 3) -> torch.Tensor:
    return torch.randn(BATCH, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def hand_log_softmax(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.exp().sum(dim=1, keepdim=True).log()


def hand_soft_term(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """sum over samples and classes of p_t (log p_t - log p_s), times tau², over batch x classes (DeiT's)."""
    log_s, log_t = hand_log_softmax(student / tau), hand_log_softmax(teacher / tau)
    return (log_t.exp() * (log_t - log_s)).sum() * tau**2 / (student.shape[0] * student.shape[1])


def hand_cross_entropy(student: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-(q · log p) averaged over samples; a one-hot q gives plain cross-entropy."""
    return -(target_probs.double() * hand_log_softmax(student)).sum(dim=1).mean()


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return torch.eye(CLASSES, dtype=torch.float64)[labels]


def distill_config(teacher: str = "", checkpoint: str = "", *opts: str):
    """configs/tiny.yaml at 32 pixels with the TRAIN.DISTILL keys set."""
    return load_config(
        config_path("tiny"),
        ["DATA.IMG_SIZE", "32", "TRAIN.DISTILL.TEACHER", teacher, "TRAIN.DISTILL.CHECKPOINT", checkpoint, *opts],
    )


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_soft_loss_equals_the_formula(tau, alpha):
    teacher, x, student = make_teacher(), images(), student_logits()
    labels = torch.tensor([0, 3, 1, 4])
    loss, terms = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", alpha, tau)(x, student, labels)
    with torch.no_grad():
        t = teacher(x)
    base = hand_cross_entropy(student, one_hot(labels))
    distill = hand_soft_term(student, t, tau)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), (1 - alpha) * base + alpha * distill, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["base"].double(), base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["distill"].double(), distill, rtol=1e-5, atol=1e-6)
    assert not terms["base"].requires_grad and not terms["distill"].requires_grad


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_hard_loss_equals_the_formula(alpha):
    teacher, x, student = make_teacher(), images(), student_logits()
    labels = torch.tensor([2, 2, 0, 1])
    loss, terms = DistillationLoss(nn.CrossEntropyLoss(), teacher, "hard", alpha, 7.0)(x, student, labels)
    with torch.no_grad():
        teacher_top1 = teacher(x).argmax(dim=1)
    base = hand_cross_entropy(student, one_hot(labels))
    distill = hand_cross_entropy(student, one_hot(teacher_top1))  # TAU plays no part
    torch.testing.assert_close(loss.double(), (1 - alpha) * base + alpha * distill, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["distill"].double(), distill, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_mixup_targets_go_to_the_base_loss_and_mixed_images_to_the_teacher(kind):
    teacher = make_teacher()
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=CLASSES)
    torch.manual_seed(5)
    x, soft_targets = mixup(images(), torch.tensor([0, 1, 2, 3]))
    assert soft_targets.shape == (BATCH, CLASSES)
    student = student_logits()
    loss, terms = DistillationLoss(SoftTargetCrossEntropy(), teacher, kind, 0.25, 2.0)(x, student, soft_targets)
    with torch.no_grad():
        t = teacher(x)  # the teacher sees the mixed images
    base = hand_cross_entropy(student, soft_targets)
    distill = hand_soft_term(student, t, 2.0) if kind == "soft" else hand_cross_entropy(student, one_hot(t.argmax(1)))
    torch.testing.assert_close(loss.double(), 0.75 * base + 0.25 * distill, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["base"].double(), base, rtol=1e-5, atol=1e-6)


def test_gradients_reach_the_student_only_and_the_teacher_stays_in_eval_mode():
    teacher = make_teacher().requires_grad_(False)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, CLASSES), nn.Dropout(0.1))
    criterion = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 2.0)
    student.train()
    criterion.train()
    assert not teacher.training
    teacher.train()  # even a direct call is undone at the next forward
    x = images()
    loss, _ = criterion(x, student(x), torch.tensor([0, 1, 2, 3]))
    assert not teacher.training
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teacher_runs_under_the_callers_autocast_and_the_loss_in_float32():
    teacher = make_teacher()
    seen = []
    teacher.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = DistillationLoss(nn.CrossEntropyLoss(), teacher, "soft", 0.5, 1.0)(
            x, student_logits(), torch.tensor([0, 1, 2, 3])
        )
    assert seen == [torch.bfloat16]
    assert loss.dtype == terms["base"].dtype == terms["distill"].dtype == torch.float32


def test_settings_are_checked_with_the_key_named():
    for kind, alpha, tau, key in (("medium", 0.5, 1.0, "TYPE"), ("soft", 1.5, 1.0, "ALPHA"), ("soft", 0.5, 0, "TAU")):
        with pytest.raises(ConfigError, match=f"TRAIN.DISTILL.{key}"):
            check_settings(kind, alpha, tau)


def test_with_distillation_wraps_only_when_there_is_a_teacher():
    base = nn.CrossEntropyLoss()
    config = distill_config()
    assert with_distillation(config, base, None) is base
    wrapped = with_distillation(config, base, make_teacher())
    assert isinstance(wrapped, DistillationLoss) and (wrapped.kind, wrapped.alpha, wrapped.tau) == ("soft", 0.5, 1.0)


# ----------------------------------------------------------------------------------------------- the teacher


def tiny_source(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build("tiny", "DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", str(classes)).eval()


def assert_frozen_copy(teacher: nn.Module, source: nn.Module) -> None:
    """``teacher`` is in eval mode, without gradients, and holds ``source``'s weights and buffers."""
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    own = teacher.state_dict()
    assert own.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)


def test_no_teacher_is_none():
    assert build_teacher(distill_config(), torch.device("cpu"), 3) is None


@pytest.mark.parametrize(("teacher_name", "layout"), [("config", "ours"), ("config", "upstream"), ("variant", "ours")])
def test_teacher_from_a_repo_config_and_checkpoint(tmp_path: Path, teacher_name, layout, caplog):
    source = tiny_source()
    path = tmp_path / "teacher.pth"
    if layout == "ours":
        torch.save({"model": source.state_dict(), "epoch": 3, "class_names": ["a", "b", "x"]}, path)
    else:
        torch.save(upstream_checkpoint(source), path)
    name = config_path("tiny") if teacher_name == "config" else "dfvt_tiny"
    with caplog.at_level(logging.INFO):
        teacher = build_teacher(distill_config(name, str(path)), torch.device("cpu"), 3, class_names=("a", "b", "c"))
    assert_frozen_copy(teacher, source)
    assert teacher.patch_embed.img_size == 32  # configs/tiny.yaml says 224: the teacher takes the student's size
    assert "Distillation: teacher" in caplog.text
    assert ("other class names" in caplog.text) == (layout == "ours")  # 'x' vs 'c' at output 2


def test_timm_teacher_from_its_name_and_a_state_dict(tmp_path: Path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    path = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), path)
    teacher = build_teacher(distill_config("test_resnet", str(path)), torch.device("cpu"), 3)
    # test_resnet expects inputs normalised with mean = std = 0.5: the student's ImageNet-normalised ones are mapped
    assert isinstance(teacher, Renormalized)
    x = torch.randn(2, 3, 32, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225])
    pixels = x * std.view(1, 3, 1, 1) + mean
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), source((pixels - 0.5) / 0.5), rtol=1e-4, atol=1e-5)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())


def test_timm_teacher_with_the_students_normalisation_is_not_wrapped(tmp_path: Path):
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    assert tuple(source.pretrained_cfg["mean"]) == (0.485, 0.456, 0.406)
    path = tmp_path / "effnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)  # timm/DDP layout
    teacher = build_teacher(distill_config("test_efficientnet", str(path)), torch.device("cpu"), 3)
    assert not isinstance(teacher, Renormalized)
    assert_frozen_copy(teacher, source)


# ----------------------------------------------------------------------------------------------- refusals


def test_a_teacher_without_a_checkpoint_is_refused():
    with pytest.raises(ConfigError) as e:
        build_teacher(distill_config("test_resnet", ""), torch.device("cpu"), 3)
    assert "TRAIN.DISTILL.CHECKPOINT" in one_line(e)


def test_a_missing_checkpoint_is_refused(tmp_path: Path):
    for name in ("test_resnet", config_path("tiny")):
        with pytest.raises(CheckpointError) as e:
            build_teacher(distill_config(name, str(tmp_path / "nope.pth")), torch.device("cpu"), 3)
        assert "nope.pth does not exist" in one_line(e)


def test_a_teacher_with_another_class_count_is_refused(tmp_path: Path):
    dfvt = tmp_path / "dfvt5.pth"
    torch.save({"model": tiny_source(5).state_dict()}, dfvt)
    resnet = tmp_path / "resnet5.pth"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), resnet)
    for name, path in ((config_path("tiny"), dfvt), ("test_resnet", resnet)):
        with pytest.raises(ConfigError) as e:
            build_teacher(distill_config(name, str(path)), torch.device("cpu"), 3)
        assert "predicts 5 classes and the student 3" in one_line(e)


def test_an_unknown_timm_name_is_refused_with_suggestions(tmp_path: Path):
    with pytest.raises(ConfigError) as e:
        build_teacher(distill_config("test_resnett", str(tmp_path / "w.pth")), torch.device("cpu"), 3)
    text = one_line(e)
    assert "'test_resnett' is neither a config file nor a timm model name" in text and "test_resnet" in text


def test_weights_of_another_architecture_are_refused(tmp_path: Path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        build_teacher(distill_config("test_efficientnet", str(path)), torch.device("cpu"), 3)
    assert f"{path} does not fit the teacher test_efficientnet" in one_line(e)
    with pytest.raises(CheckpointError) as e:
        build_teacher(distill_config(config_path("tiny"), str(path)), torch.device("cpu"), 3)
    assert one_line(e).startswith(f"Teacher {config_path('tiny')}: Checkpoint {path}")


def test_a_weights_file_as_teacher_and_bad_settings_are_refused(tmp_path: Path):
    path = tmp_path / "w.pth"
    torch.save({"model": tiny_source().state_dict()}, path)
    with pytest.raises(ConfigError) as e:
        build_teacher(distill_config(str(path), str(path)), torch.device("cpu"), 3)
    assert "is a weights file" in one_line(e)
    with pytest.raises(ConfigError) as e:
        build_teacher(distill_config("dfvt_tiny", str(path), "TRAIN.DISTILL.TYPE", "medium"), torch.device("cpu"), 3)
    assert "TRAIN.DISTILL.TYPE" in one_line(e)
    with pytest.raises(ConfigError) as e:
        build_teacher(distill_config(str(tmp_path / "none.yaml"), str(path)), torch.device("cpu"), 3)
    assert "does not exist" in one_line(e)
