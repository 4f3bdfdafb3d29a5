"""Write an ImageNet-like folder dataset of JPEGs cut from real photographs, for loader and end-to-end benchmarks.

Random-noise JPEGs decode unrealistically fast or slow; these are crops of scikit-learn's two sample photographs
(on disk with scikit-learn, a runtime dependency), resized to the sizes ImageNet's files mostly have (500×375,
375×500, 500×333, ..., some larger) and saved at JPEG qualities 75-95, laid out as ``<root>/{train,val}/<class>/``.

    python benchmarks/imagenet_like.py /tmp/imagenet_like --train 2000 --val 500 --classes 10
"""

from __future__ import annotations

import argparse
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

# (width, height) with weights: most ImageNet files are 500 px on the long side; a tail is larger or smaller.
SIZES = {
    (500, 375): 40,
    (375, 500): 12,
    (500, 333): 12,
    (333, 500): 5,
    (500, 400): 6,
    (400, 300): 5,
    (640, 480): 8,
    (800, 600): 5,
    (1024, 768): 4,
    (1600, 1200): 3,
}
QUALITIES = (75, 85, 90, 95)


def _photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def _write(job: tuple[str, str]) -> None:
    path, seed = job
    rng = random.Random(seed)
    photo = rng.choice(_PHOTOS)
    width, height = rng.choices(list(SIZES), weights=list(SIZES.values()))[0]
    pw, ph = photo.size
    crop_w = int(pw * rng.uniform(0.4, 1.0))
    crop_h = min(ph, int(crop_w * height / width))
    crop_w = int(crop_h * width / height)
    x, y = rng.randint(0, pw - crop_w), rng.randint(0, ph - crop_h)
    image = photo.crop((x, y, x + crop_w, y + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image.save(path, quality=rng.choice(QUALITIES))


_PHOTOS: list[Image.Image] = []


def _init() -> None:
    _PHOTOS[:] = _photos()


def make_imagenet_like(root: str | os.PathLike, n_train: int, n_val: int, classes: int = 10, seed: int = 0) -> Path:
    """Write ``n_train`` + ``n_val`` JPEGs (spread over ``classes`` class folders) under ``root``; returns it."""
    root = Path(root)
    jobs = []
    for split, count in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            (root / split / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / split / f"class{i % classes:03d}" / f"{split}_{i:06d}.JPEG"
            jobs.append((str(path), f"{seed}/{split}/{i}"))  # str seeds are hashed deterministically
    workers = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 16))
    if workers == 1 or len(jobs) < 64:
        _init()
        for job in jobs:
            _write(job)
    else:
        with ProcessPoolExecutor(workers, initializer=_init) as pool:
            list(pool.map(_write, jobs, chunksize=32))
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="folder to write (train/ and val/ inside)")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--classes", type=int, default=10, help="class folders per split")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = make_imagenet_like(args.root, args.train, args.val, args.classes, args.seed)
    print(f"wrote {args.train} train and {args.val} val JPEGs under {root}")


if __name__ == "__main__":
    main()
