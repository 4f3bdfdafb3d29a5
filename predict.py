"""Top-k predictions of a trained DFvT for image files and folders.

    python predict.py --cfg configs/tiny.yaml --resume dfvt_tiny.pth cat.jpg photos/ [--topk 5] [--json]

Folders are walked recursively for image files (the extensions ImageFolder reads). Each image gets
the evaluation transform of the config and its top-k classes with probabilities. An unreadable
file is reported on stderr and skipped; the exit status is 0 if at least one image was predicted,
1 if none was, 2 for a bad command line, config or checkpoint. ``--json`` prints one document instead:
``{"images": [{"path", "predictions": [{"class", "name", "prob"}, ...]}, ...], "errors": [{"path", "error"}, ...]}``.
The class count comes from the checkpoint's head; ``--opts`` (after the images) sets the rest, e.g. DATA.IMG_SIZE.

Class names, first found: ``--class-names`` (a text file with one name per line in class order, or
a dataset split folder whose sorted sub-folders are the classes, as ImageFolder numbers them); a
``class_names`` list stored in the checkpoint; the ImageNet-1K names (timm's copy) for a
1000-class model; otherwise ``class <index>``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode

from config import load_config
from data import build_transform, build_uint8_transform, load_rgb_image, normalize_uint8, read_encoded
from errors import CheckpointError, ConfigError, DataError
from models import DFvT, load_checkpoint_model

IMAGENET_CLASSES = 1000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DFvT prediction: top-k classes of image files and folders.")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders (recursive)")
    parser.add_argument("--cfg", metavar="FILE", required=True, help="the model's config (configs/tiny.yaml, ...)")
    parser.add_argument("--resume", metavar="CKPT", help="trained weights (this repo's or an upstream checkpoint)")
    parser.add_argument("--topk", type=int, default=5, help="classes printed per image (default 5)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32)
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--class-names", metavar="FILE_OR_DIR", help="names file (one per line) or split folder")
    parser.add_argument("--opts", nargs="+", default=None, help="KEY VALUE config overrides (after the images)")
    args = parser.parse_args(argv)
    if not args.resume:
        parser.error(
            "--resume CKPT is required: a model with random weights predicts nothing useful. "
            "Pass a trained checkpoint, e.g. --resume dfvt_tiny.pth."
        )
    if args.topk < 1 or args.batch_size < 1:
        parser.error("--topk and --batch-size must be at least 1.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu.")
    return args


def find_images(paths: list[str]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files named directly, plus image files found recursively in folders (sorted); errors (naming the path)
    for the rest."""
    images, errors = [], []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found = sorted(
                Path(root) / name
                for root, _, files in os.walk(path)
                for name in files
                if name.lower().endswith(IMG_EXTENSIONS)
            )
            if not found:
                errors.append({"path": arg, "error": f"folder {arg} holds no image files ({' '.join(IMG_EXTENSIONS)})"})
            images += found
        elif path.is_file():
            images.append(path)
        else:
            errors.append({"path": arg, "error": f"{arg}: no such file or folder"})
    return images, errors


def load_classifier(args: argparse.Namespace) -> tuple[DFvT, CfgNode, Any]:
    """The config's model with the checkpoint's class count, loaded strictly; the config; the checkpoint."""
    config = load_config(args.cfg, args.opts)
    model, ckpt, notes = load_checkpoint_model(config, args.resume)
    if model.num_classes == 0:
        raise CheckpointError(
            f"Checkpoint {args.resume} has no classifier (no head.weight); pass a trained classifier."
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return model, config, ckpt


def read_class_names(source: str, num_classes: int) -> list[str]:
    """Names from a text file (one per line) or from the sorted sub-folders of a split folder."""
    path = Path(source)
    if path.is_dir():
        names = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
    elif path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ConfigError(f"--class-names {source} does not exist; pass a names file or a dataset split folder.")
    if len(names) != num_classes:
        raise ConfigError(
            f"--class-names {source} gives {len(names)} names but the model has {num_classes} classes; "
            f"pass the names (or the train folder) of the data the checkpoint was trained on."
        )
    return names


def class_names(num_classes: int, ckpt: Any, names_source: str | None) -> list[str]:
    """Human-readable class names, in the order of the module docstring."""
    if names_source:
        return read_class_names(names_source, num_classes)
    stored = ckpt.get("class_names") if isinstance(ckpt, dict) else None
    if isinstance(stored, (list, tuple)) and len(stored) == num_classes:
        return [str(name) for name in stored]
    if num_classes == IMAGENET_CLASSES:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


def format_prediction(pred: dict[str, Any]) -> str:
    """One text line: probability, class index and name, e.g. ``  81.20%  class 281: tabby, tabby cat``."""
    index, name = pred["class"], pred["name"]
    label = name if name == f"class {index}" else f"class {index}: {name}"
    return f"  {100 * pred['prob']:6.2f}%  {label}"


def eval_transform(config: CfgNode) -> Callable[[Path], torch.Tensor]:
    """Image file -> the model's normalised input, by the evaluation pipeline ``DATA.PIPELINE`` names (fast: the
    uint8 decode and resize of ``--eval``, about 3x faster per image than upstream's PIL path)."""
    if config.DATA.PIPELINE == "upstream":
        upstream = build_transform(False, config)
        return lambda path: upstream(load_rgb_image(path))
    uint8 = build_uint8_transform(False, config)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(-1, 1, 1)
    return lambda path: normalize_uint8(uint8(read_encoded(path)), mean, std)


def batches(
    paths: list[Path], transform: Callable[[Path], torch.Tensor], batch_size: int, on_error: Callable[[Path, str], None]
) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Decoded, transformed images in batches; unreadable files go to ``on_error`` and are skipped."""
    ready, tensors = [], []
    for path in paths:
        try:
            tensors.append(transform(path))
        except DataError as e:
            on_error(path, str(e))
            continue
        ready.append(path)
        if len(ready) == batch_size:
            yield ready, torch.stack(tensors)
            ready, tensors = [], []
    if ready:
        yield ready, torch.stack(tensors)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model, config, ckpt = load_classifier(args)
        names = class_names(model.num_classes, ckpt, args.class_names)
        transform = eval_transform(config)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    k = min(args.topk, model.num_classes)
    if k < args.topk:
        print(
            f"note: --topk {args.topk} exceeds the model's {model.num_classes} classes; printing {k}", file=sys.stderr
        )

    paths, errors = find_images(args.images)
    for error in errors:
        print(f"skipped: {error['error']}", file=sys.stderr)

    def on_error(path: Path, message: str) -> None:
        errors.append({"path": str(path), "error": message})
        print(f"skipped: {message}", file=sys.stderr)

    results = []
    with torch.inference_mode():
        for batch_paths, images in batches(paths, transform, args.batch_size, on_error):
            probs = model(images.to(device)).float().softmax(dim=-1)
            top_p, top_i = (t.cpu() for t in probs.topk(k, dim=-1))
            for path, p_row, i_row in zip(batch_paths, top_p.tolist(), top_i.tolist(), strict=True):
                predictions = [{"class": i, "name": names[i], "prob": p} for p, i in zip(p_row, i_row, strict=True)]
                results.append({"path": str(path), "predictions": predictions})
                if not args.json:
                    print(path)
                    for pred in predictions:
                        print(format_prediction(pred))
    if args.json:
        print(json.dumps({"images": results, "errors": errors}, indent=2))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
