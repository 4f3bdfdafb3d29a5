"""End-to-end training images/s of DFvT on a folder dataset, against the same training step fed a synthetic batch.

Everything is built as ``main.py`` builds it (config, loaders, model, optimizer, LR schedule, precision, grad scaler,
criterion, Mixup) and the timed part is ``engine.train_one_epoch``. The input pipelines: ``fast`` and ``upstream``
(``DATA.PIPELINE``, the torch loader) and ``dali`` (``DATA.LOADER dali``: NVIDIA DALI, decoding on the GPU with
``--device cuda``; ``pip install -r requirements-dali.txt``). Each (variant, pipeline) row runs twice:

- synthetic: one pre-made batch of the same shape, already on the device, given to the loop again and again (no
  loader at all): the speed of the training step alone. It runs first, so it also warms the model up (cuDNN's
  algorithm search, ``torch.compile``, the caching allocator) for the real run.
- real: the training loader of ``--data-path``, workers, decoding, augmentation, the copy to the device and the
  device-side normalisation included.

real / synthetic is how loader-bound training is: 1.00 means the loader keeps up, 0.50 that it halves the speed.

Timing: each run feeds ``train_one_epoch`` ``--warmup`` + ``--steps`` optimizer steps' worth of batches; the clock
starts (after a device sync) once the warm-up batches have been consumed and stops (after a sync) when the loop
returns, so exactly ``--steps`` steps are timed, with the loader's time in them for the real run. ``--warmup auto``
(the default) is the smallest multiple of the loader's worker count that is at least 5 (5 without workers, and for
DALI, whose pipeline is built and its decoder started in the first step): the workers start together and deliver
their first batches at once, a burst a steady run never sees, and it stays out of the timed part. Batches then
arrive in rounds of one per worker, so take ``--steps`` as a multiple of the worker count, or much larger. Where
warm-up + steps exceed an epoch, the loader starts a new epoch (new workers, or a new DALI pipeline, as training
does every epoch); the table says how often that happened in the timed part. ``--synthetic-only`` skips the real run
(and needs no dataset): the training loop's speed for a given config, e.g. upstream-like vs the defaults.

    python benchmarks/imagenet_like.py /tmp/imagenet_like --train 8000 --val 500
    python benchmarks/train_e2e.py --data-path /tmp/imagenet_like --device cuda --pipeline fast --pipeline upstream
    python benchmarks/train_e2e.py --data-path /tmp/imagenet_like --device cuda --variant tiny small --pipeline dali
    python benchmarks/train_e2e.py --synthetic-only --device cuda --variant tiny small base \\
        --opts MODEL.DFVT.FAST_PATH False AMP_DTYPE float16
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from config import CONFIGS_DIR, load_config  # noqa: E402
from data import build_loader, build_mixup, resolve_num_workers  # noqa: E402
from errors import DFvTError  # noqa: E402
from lr_scheduler import build_scheduler, linear_scaled_lrs, optimizer_steps_per_epoch  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402
from utils import DistEnv, set_seed  # noqa: E402

VARIANTS = ("tiny", "small", "base")
PIPELINES = ("fast", "upstream", "dali")  # DATA.PIPELINE fast|upstream of the torch loader; DATA.LOADER dali
QUIET_PRINT_FREQ = 10**9  # train_one_epoch then reports once, at the end of the epoch (to a WARNING-level logger)


def warmup_count(text: str) -> int | None:
    """``--warmup``: a number of steps (0 or more), or ``auto`` (None: chosen from the loader's worker count)."""
    if text.strip().lower() == "auto":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"--warmup {text} must be 0 or more (or auto)")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", help="folder dataset root (train/<class>/*, val/<class>/*)")
    parser.add_argument("--variant", nargs="+", default=["tiny"], choices=VARIANTS, help="configs/<variant>.yaml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=128, help="images per micro-batch (DATA.BATCH_SIZE)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument(
        "--warmup", type=warmup_count, default=None, help="untimed steps before each timed run (default auto)"
    )
    parser.add_argument(
        "--pipeline",
        action="append",
        choices=PIPELINES,
        help="DATA.PIPELINE fast|upstream, or dali (DATA.LOADER dali); repeat it to compare (default fast)",
    )
    parser.add_argument("--workers", default="auto", help="loader workers per process (DATA.NUM_WORKERS)")
    parser.add_argument("--img-size", type=int, help="input side (DATA.IMG_SIZE; default the config's, 224)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (TRAIN.COMPILE)")
    parser.add_argument("--synthetic-only", action="store_true", help="only the synthetic run (no --data-path)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to PATH as JSON")
    parser.add_argument("--opts", nargs="+", default=[], metavar="KEY VALUE", help="config overrides, applied last")
    args = parser.parse_args(argv)
    if not args.synthetic_only and not args.data_path:
        parser.error("--data-path is required (or pass --synthetic-only)")
    if args.batch_size < 1 or args.steps < 1:
        parser.error("--batch-size and --steps must be positive")
    args.pipeline = args.pipeline or ["fast"]
    return args


def build_config(args: argparse.Namespace, variant: str, pipeline: str):
    """``configs/<variant>.yaml`` with the benchmark's settings, then ``--opts`` (frozen, as ``load_config`` gives)."""
    opts = [
        "DATA.DATASET", "folder",
        "DATA.BATCH_SIZE", str(args.batch_size),
        *(("DATA.LOADER", "dali") if pipeline == "dali" else ("DATA.PIPELINE", pipeline)),
        "DATA.NUM_WORKERS", str(args.workers),
        "TRAIN.COMPILE", str(args.compile),
        "PRINT_FREQ", str(QUIET_PRINT_FREQ),
    ]  # fmt: skip
    if args.data_path:
        opts += ["DATA.DATA_PATH", str(args.data_path)]
    if args.img_size:
        opts += ["DATA.IMG_SIZE", str(args.img_size)]
    return load_config(str(CONFIGS_DIR / f"{variant}.yaml"), opts + list(args.opts))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA is asynchronous), so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MarkedBatches:
    """``total`` micro-batches for ``train_one_epoch``, drawn from ``epoch_source(epoch)`` for epoch 0, 1, ... as
    long as needed; ``marked_at`` is the clock (after a device sync) when the first ``mark`` have been consumed, that
    is when the loop asks for the next one. ``restarts_after_mark`` counts the new epochs begun after the mark.

    The epoch's iterator (a loader's workers) is kept alive after the last batch, so that shutting the workers down
    falls outside the timed part; :meth:`release` lets it go.
    """

    def __init__(self, epoch_source: Callable[[int], Iterable], total: int, mark: int, device: torch.device) -> None:
        if not 0 <= mark < total:
            raise ValueError(f"mark {mark} must be in [0, {total})")
        self.epoch_source, self.total, self.mark, self.device = epoch_source, total, mark, device
        self.marked_at: float | None = None
        self.restarts_after_mark = 0
        self._current: Iterator | None = None

    def release(self) -> None:
        """Drop the last epoch's iterator (for a loader: shut its workers down)."""
        self._current = None

    def __len__(self) -> int:
        return self.total

    def _mark(self) -> None:
        synchronize(self.device)
        self.marked_at = time.perf_counter()

    def __iter__(self) -> Iterator:
        self.marked_at, self.restarts_after_mark = None, 0
        consumed, epoch = 0, 0
        if self.mark == 0:
            self._mark()
        while True:
            if epoch > 0 and consumed >= self.mark:
                self.restarts_after_mark += 1
            empty = True
            self._current = iter(self.epoch_source(epoch))
            for batch in self._current:
                empty = False
                yield batch
                consumed += 1  # the loop has finished with this batch and asks for the next one
                if consumed == self.mark:
                    self._mark()
                if consumed == self.total:
                    return
            if empty:
                raise RuntimeError("the batch source yielded nothing for a whole epoch")
            epoch += 1


def loader_epochs(loader) -> Callable[[int], Iterable]:
    """Epoch ``e`` of a training loader: set to ``e`` (a new shuffle and new augmentation draws, as ``engine.train``
    does), then it."""

    def epoch(e: int) -> Iterable:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(e)
        elif hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(e)
        return loader

    return epoch


def repeated_batch(batch: tuple[torch.Tensor, torch.Tensor], count: int) -> Callable[[int], Iterable]:
    """Every epoch: ``batch`` itself, ``count`` times (Mixup/CutMix mix it in place; that changes no cost)."""

    def epoch(_: int) -> Iterable:
        return (batch for _ in range(count))

    return epoch


def timed_epoch(
    config, state: engine.RunState, model, criterion, source, mixup_fn, warmup: int, steps: int, precision, env, logger
) -> tuple[float, int]:
    """Run ``train_one_epoch`` over ``warmup + steps`` optimizer steps of ``source``; the seconds of the last
    ``steps`` and the new epochs the source began in them."""
    accum = config.TRAIN.ACCUMULATION_STEPS
    batches = MarkedBatches(source, (warmup + steps) * accum, warmup * accum, env.device)
    engine.train_one_epoch(config, state, model, criterion, batches, mixup_fn, 0, precision, env, logger)
    synchronize(env.device)
    seconds = time.perf_counter() - batches.marked_at
    batches.release()
    return seconds, batches.restarts_after_mark


def measure(args: argparse.Namespace, variant: str, pipeline: str, device: torch.device, logger) -> dict:
    """One row: build what ``main.run`` builds for training, then the synthetic and (unless ``--synthetic-only``) the
    real run, each ``--steps`` timed steps after its warm-up."""
    config = build_config(args, variant, pipeline)
    set_seed(config.SEED)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    data = None if args.synthetic_only else build_loader(config, device)
    num_classes = data.info.num_classes if data is not None else config.MODEL.NUM_CLASSES
    mixup_fn = data.mixup_fn if data is not None else build_mixup(config, num_classes)
    bare = build_model(config, num_classes)
    bare.to(device)
    precision = engine.choose_precision(config, device)
    model = torch.compile(bare) if config.TRAIN.COMPILE else bare

    accum = config.TRAIN.ACCUMULATION_STEPS
    workers = data.num_workers if data is not None else resolve_num_workers(config.DATA.NUM_WORKERS)
    burst = workers if workers and config.DATA.LOADER == "torch" else 1  # DALI threads deliver no burst
    warmup = args.warmup if args.warmup is not None else burst * math.ceil(5 / burst)
    micro_batches = len(data.train) if data is not None else (warmup + args.steps) * accum
    steps_per_epoch = optimizer_steps_per_epoch(micro_batches, accum)
    lrs = linear_scaled_lrs(config, env.world_size)
    optimizer = build_optimizer(config, bare, lrs.base)
    scheduler = build_scheduler(config, optimizer, steps_per_epoch, lrs)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    state = engine.RunState(bare, optimizer, scheduler, scaler, next_epoch=0)
    criterion = engine.build_criterion(config, mixup_fn is not None)

    size, batch = config.DATA.IMG_SIZE, config.DATA.BATCH_SIZE
    generator = torch.Generator().manual_seed(config.SEED)
    images = torch.randn(batch, config.MODEL.DFVT.IN_CHANS, size, size, generator=generator).to(device)
    targets = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    synthetic = repeated_batch((images, targets), (warmup + args.steps) * accum)
    run = (config, state, model, criterion)
    synthetic_s, _ = timed_epoch(*run, synthetic, mixup_fn, warmup, args.steps, precision, env, logger)
    images_timed = args.steps * accum * batch
    row = {
        "variant": variant,
        "pipeline": pipeline if data is not None else None,
        "workers": workers if data is not None else None,
        "batch_size": batch,
        "img_size": size,
        "accumulation_steps": accum,
        "warmup_steps": warmup,
        "timed_steps": args.steps,
        "precision": precision.describe(),
        "fast_path": bool(config.MODEL.DFVT.FAST_PATH),
        "compile": bool(config.TRAIN.COMPILE),
        "synthetic_s": synthetic_s,
        "synthetic_ips": images_timed / synthetic_s,
        "real_s": None,
        "real_ips": None,
        "real_over_synthetic": None,
        "loader_batches_per_epoch": len(data.train) if data is not None else None,
        "loader_restarts_timed": None,
        "num_train": data.info.num_train if data is not None else None,
    }
    if data is not None:
        real_s, restarts = timed_epoch(
            *run, loader_epochs(data.train), mixup_fn, warmup, args.steps, precision, env, logger
        )
        row.update(
            real_s=real_s,
            real_ips=images_timed / real_s,
            real_over_synthetic=(images_timed / real_s) / row["synthetic_ips"],
            loader_restarts_timed=restarts,
        )
    return row


def format_table(rows: list[dict]) -> str:
    """Markdown table: variant, pipeline, workers, real and synthetic images/s and their ratio."""

    def cell(value, spec: str = "") -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| variant | pipeline | workers | images/s real | images/s synthetic | real / synthetic |"
        " loader restarts (timed) |",
        "|" + " --- |" * 7,
    ]
    for r in rows:
        cells = [
            r["variant"],
            cell(r["pipeline"]),
            cell(r["workers"]),
            cell(r["real_ips"], ".1f"),
            cell(r["synthetic_ips"], ".1f"),
            cell(r["real_over_synthetic"], ".2f"),
            cell(r["loader_restarts_timed"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    """The device's name (and CUDA version), or ``cpu`` with torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"cpu, {torch.get_num_threads()} torch threads"


def quiet_logger() -> logging.Logger:
    """The engine's logger for the benchmark: warnings (e.g. steps the grad scaler skipped) to stderr, nothing else."""
    logger = logging.getLogger("dfvt.train_e2e")
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
    return logger


def main(argv: list[str] | None = None) -> list[dict]:
    """Measure every (variant, pipeline), print the table, write ``--json``; returns the rows."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA device is visible")
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True  # as main.py does
    logger = quiet_logger()
    pipelines = [None] if args.synthetic_only else list(dict.fromkeys(args.pipeline))
    rows = []
    for variant in args.variant:
        for pipeline in pipelines:
            rows.append(measure(args, variant, pipeline or "fast", device, logger))
            print(f"[{variant} {pipeline or 'synthetic'} done]", flush=True)
    first = rows[0]
    print(
        f"device {device_description(device)} | torch {torch.__version__} | {first['precision']} | "
        f"{'fast' if first['fast_path'] else 'straightforward'} path{' | compiled' if first['compile'] else ''} | "
        f"batch {first['batch_size']} x {first['accumulation_steps']} micro-batch(es) at {first['img_size']} px | "
        f"{args.steps} timed steps after {first['warmup_steps']} warm-up"
    )
    print(format_table(rows))
    if any(r["loader_restarts_timed"] for r in rows):
        print(
            "loader restarts (timed): new epochs (new workers) begun in the timed steps; a dataset with more batches "
            "per epoch than warm-up + steps keeps them out."
        )
    if args.json:
        result = {
            "device": device_description(device),
            "torch": torch.__version__,
            "steps": args.steps,
            "data_path": args.data_path,
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    try:
        main()
    except DFvTError as e:  # a bad config or dataset: one line, as main.py prints it
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
