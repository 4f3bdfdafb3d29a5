"""Time overhead of each recipe option on the DFvT-T training step: weight EMA, layer-wise LR decay, and soft
distillation from a DFvT teacher, each alone and all together, against the plain step.

Every variant runs ``engine.train_one_epoch`` (the real loop: Mixup, clipping, the repo's optimizer, the EMA update,
the teacher's forward) over the same synthetic in-memory batches; repetitions alternate between variants and the
median seconds per step are reported with the ratio to the plain step.

    python benchmarks/recipe.py                          # DFvT-T at 224, batch 16, CPU
    python benchmarks/recipe.py --device cuda --batch-size 128 --teacher small
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from config import CONFIGS_DIR, load_config  # noqa: E402
from data import build_mixup  # noqa: E402
from distillation import build_teacher, with_distillation  # noqa: E402
from lr_scheduler import build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from utils import DistEnv  # noqa: E402

VARIANTS = {
    "plain": (),
    "EMA": ("TRAIN.EMA.ENABLE", "True"),
    "layer decay 0.9": ("TRAIN.LAYER_DECAY", "0.9"),
    "distillation (soft)": ("DISTILL",),
    "all three": ("TRAIN.EMA.ENABLE", "True", "TRAIN.LAYER_DECAY", "0.9", "DISTILL"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per repetition")
    parser.add_argument("--reps", type=int, default=5, help="alternating repetitions (median reported)")
    parser.add_argument("--teacher", default="tiny", choices=["tiny", "small", "base"], help="the DFvT teacher")
    return parser.parse_args(argv)


def make_runner(opts: tuple[str, ...], args: argparse.Namespace, teacher_ckpt: Path, device: torch.device):
    """A function running ``args.steps`` training steps of DFvT-T with the recipe options ``opts``."""
    config_opts = ["DATA.IMG_SIZE", str(args.img_size), "DATA.BATCH_SIZE", str(args.batch_size), "PRINT_FREQ", "1000"]
    config_opts += ["TRAIN.WARMUP_EPOCHS", "0"]
    for key, value in zip(opts[0::2], opts[1::2], strict=False):
        config_opts += [key, value]
    if "DISTILL" in opts:
        config_opts += [
            "TRAIN.DISTILL.TEACHER", str(CONFIGS_DIR / f"{args.teacher}.yaml"),
            "TRAIN.DISTILL.CHECKPOINT", str(teacher_ckpt),
        ]  # fmt: skip
    config = load_config(str(CONFIGS_DIR / "tiny.yaml"), config_opts)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, args.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    run = engine.RunState(model, optimizer, scheduler, scaler, ema=engine.build_ema(config, model))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    logger = logging.getLogger("recipe")
    teacher = build_teacher(config, device, config.MODEL.NUM_CLASSES, None, logger)
    criterion = with_distillation(config, engine.build_criterion(config, mixup_active=True), teacher)
    mixup = build_mixup(config, config.MODEL.NUM_CLASSES)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, config.MODEL.NUM_CLASSES, (args.batch_size,), device=device)
    batches = [(x, y)] * args.steps
    precision = engine.choose_precision(config, device)

    def steps() -> None:
        engine.train_one_epoch(config, run, model, criterion, batches, mixup, 0, precision, env, logger)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device(args.device)
    logging.getLogger("recipe").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        teacher_ckpt = Path(tmp) / "teacher.pth"
        teacher_config = load_config(str(CONFIGS_DIR / f"{args.teacher}.yaml"), ["DATA.IMG_SIZE", str(args.img_size)])
        torch.save({"model": build_model(teacher_config).state_dict()}, teacher_ckpt)
        runners = {name: make_runner(opts, args, teacher_ckpt, device) for name, opts in VARIANTS.items()}
        for run in runners.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runners}
        for rep in range(args.reps):
            for name in runners if rep % 2 == 0 else reversed(list(runners)):
                start = time.perf_counter()
                runners[name]()
                times[name].append((time.perf_counter() - start) / args.steps)
    per_step = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"DFvT-T training step with each recipe option: {device}, batch {args.batch_size}, {args.img_size} px, "
        f"teacher DFvT-{args.teacher[0].upper()}, torch {torch.__version__}; median of {args.reps} alternating "
        f"repetitions of {args.steps} steps"
    )
    print("| option | s/step | vs plain |\n| --- | --- | --- |")
    for name, seconds in per_step.items():
        print(f"| {name} | {seconds:.4f} | {seconds / per_step['plain']:.2f}x |")
    return per_step


if __name__ == "__main__":
    main()
