"""Per-core speed of the input pipelines: images per second of one process with one thread and no workers.

Columns, for the training and the evaluation split:

- ``upstream``: torchvision ``ImageFolder`` (PIL loader) + timm ``create_transform`` with the recipe (the evaluation
  split: resize, centre crop, ``ToTensor``, ``Normalize``) + the default collate: what the upstream repo runs;
- ``fast (host)``: the project's loader with ``DATA.PIPELINE fast``, its host part only (decode, crop, resize,
  RandAugment, uint8 collate): what a loader worker spends per image on a GPU node;
- ``fast (all on CPU)``: the same plus the device part (normalisation, random erasing) run on this CPU too;
- ``dali (CPU)``: ``DATA.LOADER dali`` in DALI's CPU-only mode, one DALI thread, its uint8 output (decode, crop,
  resize, flip, RandAugment; a new pipeline per pass, as per epoch), when DALI is installed.

    python benchmarks/loader.py                      # generates 400 ImageNet-like JPEGs in a temporary folder
    python benchmarks/loader.py --data-path DIR      # DIR/train/<class>/..., DIR/val/<class>/...

Repetitions alternate between the pipelines; each figure is the best of ``--repeats`` passes over the images.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.imagenet_like import make_imagenet_like  # noqa: E402
from config import load_config  # noqa: E402
from data import build_loader, build_transform  # noqa: E402
from data.dali import import_dali  # noqa: E402
from errors import ConfigError  # noqa: E402


def _upstream_loader(config, root: Path, split: str) -> DataLoader:
    transform = build_transform(split == "train", config)  # timm's create_transform (+ the Pillow 13 posterize fix)
    dataset = ImageFolder(str(root / split), transform=transform)
    return DataLoader(dataset, batch_size=config.DATA.BATCH_SIZE, shuffle=split == "train", num_workers=0)


def _images_per_second(loader) -> float:
    count, start = 0, time.perf_counter()
    for images, _ in loader:
        count += images.shape[0]
    return count / (time.perf_counter() - start)


def measure(root: Path, batch_size: int, repeats: int, opts: list[str]) -> dict[str, dict[str, float]]:
    """``{split: {column: images/s}}`` for the ``train`` and ``val`` splits of the folder dataset at ``root``."""
    torch.set_num_threads(1)
    common = ["DATA.DATASET", "folder", "DATA.DATA_PATH", str(root), "DATA.BATCH_SIZE", str(batch_size)]
    common += ["DATA.NUM_WORKERS", "0", *opts]
    fast = build_loader(load_config(None, [*common, "DATA.PIPELINE", "fast"]))
    config = load_config(None, common)
    loaders = {
        "train": {
            "upstream": _upstream_loader(config, root, "train"),
            "fast (host)": fast.train.loader,
            "fast (all on CPU)": fast.train,
        },
        "val": {
            "upstream": _upstream_loader(config, root, "val"),
            "fast (host)": fast.val.loader,
            "fast (all on CPU)": fast.val,
        },
    }
    try:
        import_dali()
    except ConfigError:
        pass  # no DALI column without the optional package
    else:
        dali = build_loader(load_config(None, [*common, "DATA.LOADER", "dali"]))
        loaders["train"]["dali (CPU)"], loaders["val"]["dali (CPU)"] = dali.train.loader, dali.val.loader
    best: dict[str, dict[str, float]] = {split: dict.fromkeys(cols, 0.0) for split, cols in loaders.items()}
    for _ in range(repeats):
        for split, columns in loaders.items():
            for name, loader in columns.items():
                best[split][name] = max(best[split][name], _images_per_second(loader))
    return best


def table(figures: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(figures.values())))
    lines = [
        "| split | " + " | ".join(f"{c} img/s" for c in columns) + " | fast (host) / upstream |",
        "|---" * (len(columns) + 2) + "|",
    ]
    for split, row in figures.items():
        ratio = row["fast (host)"] / row["upstream"]
        lines.append(f"| {split} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", type=Path, help="folder dataset (default: generate ImageNet-like JPEGs)")
    parser.add_argument("--images", type=int, default=400, help="images per split to generate (without --data-path)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes per pipeline; the best is reported")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--opts", nargs="*", default=[], help="config KEY VALUE pairs (e.g. DATA.IMG_SIZE 160)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_path or make_imagenet_like(Path(tmp) / "data", args.images, args.images, classes=4)
        figures = measure(root, args.batch_size, args.repeats, args.opts)
    print(f"Per-core loader speed (1 process, 1 thread, no workers), torch {torch.__version__}, data {root}")
    print(table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
