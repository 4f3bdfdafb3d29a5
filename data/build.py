"""``build_loader(config)``: datasets, distributed loaders and Mixup from the config, after checking the data, and
what the data decides (class count, names and map; the ReaL labels of evaluation) as a :class:`DataInfo` and
:class:`Data`; the config is never changed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from yacs.config import CfgNode

from config import check_config
from errors import ConfigError, DataError

from .class_map import ClassLayout, RealLabels, class_layout, load_real_labels
from .dali import build_dali_loaders
from .device import DeviceLoader, collate_uint8
from .digits import prepare_digits
from .folder import LAYOUT, build_image_folder, check_same_classes, check_split_folder
from .images import EncodedImage, decode_rgb_image, load_rgb_image, read_encoded
from .samplers import ResumableSampler, ShardedEvalSampler, ShardRandomSampler
from .seeding import SeededSamples, ignore_stop_signals
from .transforms import build_mixup, build_transform, build_uint8_transform
from .unreadable import SkipUnreadable
from .zip_dataset import ZipImageDataset, parse_map_file

ZIP_LAYOUT = "<root>/train.zip, <root>/train_map.txt, <root>/val.zip, <root>/val_map.txt"


@dataclass(frozen=True)
class DataInfo:
    """What the data decides, for the model and the logs.

    Args:
        root: the folder the data was read from (for the digits demo, where it was written).
        num_classes: classes of the model's head: counted from the folders (``folder``, ``digits``), or
            ``MODEL.NUM_CLASSES`` (``imagenet`` folders), or max label + 1 of the zip maps.
        class_names: the class folders in label order (by the model output they are, see ``DATA.CLASS_MAP``), or
            None (zip maps carry labels only).
        num_train, num_val: images in the training split (None when it is not read) and the validation split.
        class_indices: the model output (= label) of each of ``class_names`` when the folders hold only some of the
            ``num_classes`` outputs (ImageNet-A/R in ``EVAL_MODE``): evaluation restricts the logits to these. None
            when class ``i`` of ``class_names`` is output ``i`` for every output.
    """

    root: Path
    num_classes: int
    class_names: tuple[str, ...] | None
    num_train: int | None
    num_val: int
    class_indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Data:
    """The loaders of one process, yielding model-ready batches on its device; ``train`` and ``mixup_fn`` are None
    in ``EVAL_MODE``; ``num_workers`` is the loader worker count ``DATA.NUM_WORKERS`` resolved to; ``real_labels``
    the ReaL labels of the validation images (``TEST.REAL_LABELS`` in ``EVAL_MODE``), else None; ``unreadable``
    the training set's :class:`SkipUnreadable` with ``DATA.SKIP_UNREADABLE`` (drain it after each epoch);
    ``loader`` the loader in words, for the run summary."""

    info: DataInfo
    train: DeviceLoader | None
    val: DeviceLoader
    mixup_fn: Mixup | None
    num_workers: int = 0
    real_labels: RealLabels | None = None
    unreadable: SkipUnreadable | None = None
    loader: str = ""


def dist_rank_world() -> tuple[int, int]:
    """This process's rank and the world size from ``torch.distributed``, or (0, 1) when it is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_num_workers(value: str | int, local_processes: int | None = None, cores: int | None = None) -> int:
    """``DATA.NUM_WORKERS`` as a number: ``auto`` is this machine's usable cores shared among its local processes
    (``LOCAL_WORLD_SIZE``, set by torchrun), minus one each for the process itself; at least 0."""
    text = str(value).strip().lower()
    if text == "auto":
        if local_processes is None:
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(0, cores // max(1, local_processes) - 1)
    if text.isdigit():
        return int(text)
    raise ConfigError(f"DATA.NUM_WORKERS {value!r} must be 'auto' or a number of worker processes (0 or more).")


def _data_root(config: CfgNode) -> Path:
    """``DATA.DATA_PATH`` as an existing folder; the digits demo is written there (or to its default) first."""
    if config.DATA.DATASET == "digits":
        return prepare_digits(config.DATA.DATA_PATH or None)
    if not config.DATA.DATA_PATH:
        raise DataError(
            "DATA.DATA_PATH is empty; pass --data-path /path/to/dataset (a folder laid out as "
            f"{LAYOUT}), or try the built-in demo with --cfg configs/digits.yaml."
        )
    root = Path(config.DATA.DATA_PATH).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist; check --data-path (DATA.DATA_PATH).")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder; --data-path must be the folder holding train/ and val/.")
    return root


def _zip_files(root: Path, split: str) -> tuple[Path, Path]:
    zip_path, map_path = root / f"{split}.zip", root / f"{split}_map.txt"
    for path in (zip_path, map_path):
        if not path.is_file():
            raise DataError(f"zip mode: {path} does not exist; expected {ZIP_LAYOUT} (or drop --zip for folders).")
    return zip_path, map_path


def _check_num_classes(config: CfgNode, num_classes: int, root: Path) -> None:
    if config.DATA.DATASET == "imagenet" and num_classes != config.MODEL.NUM_CLASSES:
        raise DataError(
            f"{root} has {num_classes} classes but DATA.DATASET imagenet expects MODEL.NUM_CLASSES "
            f"{config.MODEL.NUM_CLASSES}; for another dataset pass --opts DATA.DATASET folder (classes are counted)."
        )


def _build_datasets(
    config: CfgNode, root: Path, train: bool, rank: int, world: int
) -> tuple[Dataset | None, Dataset, ClassLayout]:
    """Check the data under ``root``, then build the (train, val) datasets; also the model's outputs for them."""
    fast = config.DATA.PIPELINE == "fast"
    make_transform = build_uint8_transform if fast else build_transform
    tf_train = make_transform(True, config) if train else None
    tf_val = make_transform(False, config)
    decode, load = (EncodedImage, read_encoded) if fast else (decode_rgb_image, load_rgb_image)
    if config.DATA.ZIP_MODE:
        val_files = _zip_files(root, "val")
        train_files = _zip_files(root, "train") if train else None
        val_samples = parse_map_file(val_files[1])
        train_map = train_files[1] if train_files else root / "train_map.txt"
        train_samples = parse_map_file(train_map) if train or train_map.is_file() else []
        labels = {label for _, label in val_samples + train_samples}
        num_classes = max(labels) + 1
        if len(labels) < num_classes:
            missing = sorted(set(range(num_classes)) - labels)
            shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise DataError(
                f"the labels of {val_files[1]} and {train_map} skip {shown} (of 0..{num_classes - 1}), which would "
                f"make classes without images; number the classes 0, 1, ... without gaps."
            )
        _check_num_classes(config, num_classes, root)
        mode = config.DATA.CACHE_MODE
        ds_val = ZipImageDataset(*val_files, tf_val, mode, rank, world, samples=val_samples, decode=decode)
        ds_train = (
            ZipImageDataset(*train_files, tf_train, mode, rank, world, samples=train_samples, decode=decode)
            if train
            else None
        )
        return ds_train, ds_val, ClassLayout(num_classes, None, None, None, None)
    val_classes = check_split_folder(root, "val")
    if train:
        check_same_classes(root, check_split_folder(root, "train"), val_classes)
    layout = class_layout(config, val_classes, root / "val")
    # Sorted folders labelled 0, 1, ... are ImageFolder's own labels: no map needed.
    labels = None if layout.labels == {name: i for i, name in enumerate(val_classes)} else layout.labels
    ds_train = build_image_folder(root, "train", tf_train, load, labels) if train else None
    ds_val = build_image_folder(root, "val", tf_val, load, labels)
    return ds_train, ds_val, layout


def _train_sampler(config: CfgNode, dataset: Dataset, root: Path, rank: int, world: int) -> Sampler[int]:
    n = len(dataset)
    if config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part":
        # Each process only holds its shard; all take len // world per epoch so every rank runs the same steps.
        sampler: Sampler[int] = ShardRandomSampler(range(rank, n, world), n // world, seed=config.SEED)
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DataError(
            f"the training set {root} ({n} images over {world} process(es)) gives each process "
            f"{len(sampler)} images, fewer than DATA.BATCH_SIZE {config.DATA.BATCH_SIZE}, so an epoch would have no "
            f"full batch; lower --batch-size or add images."
        )
    return sampler


def build_loader(config: CfgNode, device: torch.device | str = "cpu") -> Data:
    """This process's loaders and Mixup, and what the data decided (:class:`DataInfo`).

    The loaders yield normalised float batches on ``device`` (:class:`DeviceLoader`); with ``DATA.PIPELINE fast``
    the workers send uint8 batches, normalised and randomly erased on ``device``. In ``EVAL_MODE`` the training
    loader and ``mixup_fn`` are None. ``DATA.CLASS_MAP`` labels the class folders (:mod:`data.class_map`);
    ``TEST.REAL_LABELS`` is read in ``EVAL_MODE``. Unusable data raises :class:`DataError` before anything is loaded.
    """
    check_config(config)
    rank, world = dist_rank_world()
    train = not config.EVAL_MODE
    root = _data_root(config)
    ds_train, ds_val, layout = _build_datasets(config, root, train, rank, world)
    num_classes = layout.num_classes
    num_train = len(ds_train) if ds_train is not None else None
    info = DataInfo(root, num_classes, layout.class_names, num_train, len(ds_val), layout.class_indices)
    real = None
    if config.EVAL_MODE and config.TEST.REAL_LABELS:
        paths = [str(sample) for sample, _ in ds_val.samples]  # ImageFolder paths, or zip members
        real = load_real_labels(config.TEST.REAL_LABELS, paths, layout.imagenet_indices, num_classes)

    device = torch.device(device)
    workers = resolve_num_workers(config.DATA.NUM_WORKERS)
    common = {
        "batch_size": config.DATA.BATCH_SIZE,
        "num_workers": workers,
        "pin_memory": bool(config.DATA.PIN_MEMORY and device.type == "cuda"),
        # Fresh workers each epoch; augmentation is seeded per image and epoch (data.seeding): exact resume.
        "persistent_workers": False,
        "worker_init_fn": ignore_stop_signals,
        # The loaders' own generator: creating an iterator then draws nothing from the main process's generators.
        "generator": torch.Generator().manual_seed(config.SEED),
    }
    if config.DATA.PIPELINE == "fast":
        common["collate_fn"] = collate_uint8
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    loader_train, skip = None, None
    dali = config.DATA.LOADER == "dali"  # DALI decodes and augments; the same samplers, normalisation and erasing
    if ds_train is not None:
        sampler = ResumableSampler(_train_sampler(config, ds_train, root, rank, world))
        erasing = None
        if (config.DATA.PIPELINE == "fast" or dali) and config.AUG.REPROB > 0:
            a = config.AUG
            erasing = RandomErasing(a.REPROB, mode=a.REMODE, max_count=a.RECOUNT, device=device)
        if config.DATA.SKIP_UNREADABLE:
            n = len(ds_train)
            part = config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == "part"  # replacements from this shard's cache
            skip = SkipUnreadable(ds_train, range(rank, n, world) if part else None)
        if dali:
            loader = build_dali_loaders(config, ds_train, sampler, device, workers, rank, train=True)
        else:
            dataset = SeededSamples(skip if skip is not None else ds_train, config.SEED)
            loader = DataLoader(dataset, sampler=sampler, drop_last=True, **common)
        loader_train = DeviceLoader(loader, device, mean, std, erasing, seed=config.SEED, rank=rank)
    val_sampler = ShardedEvalSampler(len(ds_val), rank, world)
    if dali:
        loader = build_dali_loaders(config, ds_val, val_sampler, device, workers, rank, train=False)
    else:
        loader = DataLoader(ds_val, sampler=val_sampler, drop_last=False, **common)
    loader_val = DeviceLoader(loader, device, mean, std)
    mixup_fn = build_mixup(config, num_classes) if train else None
    if dali:
        where = "decoding on the GPU, device=mixed" if loader.device.type == "cuda" else "CPU-only mode"
        words = f"DALI ({where}) | {workers} DALI thread(s) per process"
    else:
        words = f"{config.DATA.PIPELINE} pipeline | {workers} worker(s) per process"
    return Data(info, loader_train, loader_val, mixup_fn, workers, real, skip, words)
