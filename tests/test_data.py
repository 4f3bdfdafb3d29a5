"""data/: folder and zip datasets, cache modes, samplers, transforms, the digits demo, and readable data errors."""

from __future__ import annotations

import gc
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

import data.build
from config import load_config
from data import (
    DataInfo,
    ResumableSampler,
    ShardedEvalSampler,
    ShardRandomSampler,
    ZipImageDataset,
    build_loader,
    build_transform,
    prepare_digits,
)
from data.digits import MARKER
from data.transforms import augment_ops, posterize
from errors import ConfigError, DataError
from models import build_model
from tests.helpers import write_zip_dataset

ROOT = Path(__file__).parent.parent
IMG = 32


def cfg(path: Path | str, *opts: str, dataset: str = "folder"):
    """A small, fast config over ``path``."""
    base = ["DATA.DATA_PATH", str(path), "DATA.DATASET", dataset, "DATA.IMG_SIZE", str(IMG)]
    base += ["DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0"]
    return load_config(None, base + list(opts))


def check_batches(loader: DataLoader, n_batches: int, num_classes: int, total: int | None = None) -> None:
    seen = 0
    batches = list(loader)
    assert len(batches) == n_batches
    for x, y in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (3, IMG, IMG)
        assert y.shape == (x.shape[0],) and 0 <= int(y.min()) and int(y.max()) < num_classes
        seen += x.shape[0]
    if total is not None:
        assert seen == total


# ----- folder and zip loaders -----


def test_folder_loaders_yield_batches(image_folder):
    config = cfg(image_folder)
    data = build_loader(config)
    loader_train, loader_val, mixup_fn = data.train, data.val, data.mixup_fn
    ds_train, ds_val = loader_train.dataset, loader_val.dataset
    assert data.info == DataInfo(image_folder, 3, ("a", "b", "c"), 12, 9)
    assert config == cfg(image_folder) and config.MODEL.NUM_CLASSES == 1000  # the data never rewrites the config
    assert (len(ds_train), len(ds_val)) == (12, 9)
    assert isinstance(loader_train.sampler, ResumableSampler) and loader_train.loader.drop_last
    assert isinstance(loader_train.sampler.sampler, DistributedSampler)
    assert isinstance(loader_val.sampler, ShardedEvalSampler) and not loader_val.loader.drop_last
    loader_train.set_epoch(1)
    check_batches(loader_train, 3, 3)
    check_batches(loader_val, 3, 3, total=9)
    assert isinstance(mixup_fn, Mixup) and mixup_fn.num_classes == 3
    assert (mixup_fn.mixup_alpha, mixup_fn.cutmix_alpha, mixup_fn.label_smoothing) == (0.8, 1.0, 0.1)


def test_num_classes_follows_the_folder(make_image_folder):
    root = make_image_folder(classes=[f"k{i}" for i in range(5)], n_train=1, n_val=1)
    config = cfg(root, "DATA.BATCH_SIZE", "2")
    assert build_loader(config).info.num_classes == 5


def test_eval_mode_builds_no_training_data(image_folder):
    (image_folder / "train" / "a" / "0.jpg").unlink()  # train is not even looked at
    data = build_loader(cfg(image_folder, "EVAL_MODE", "True"))
    assert data.train is None and data.mixup_fn is None and data.info.num_train is None
    check_batches(data.val, 3, 3, total=9)


def test_mixup_off_and_grayscale_png(tmp_path):
    for split in ("train", "val"):
        for name in ("x", "y"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 40 * i, np.uint8), mode="L").save(tmp_path / split / name / f"{i}.png")
    opts = ["AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0", "DATA.BATCH_SIZE", "2"]
    data = build_loader(cfg(tmp_path, *opts))
    assert data.mixup_fn is None
    check_batches(data.train, 2, 2)
    check_batches(data.val, 2, 2, total=4)


@pytest.mark.parametrize("mode", ["no", "part", "full"])
def test_zip_loaders_each_cache_mode(image_folder, tmp_path, mode):
    root = write_zip_dataset(image_folder, tmp_path / "zips")
    config = cfg(root, "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", mode)
    data = build_loader(config)
    loader_train, loader_val = data.train, data.val
    ds_train, ds_val = loader_train.dataset, loader_val.dataset
    assert data.info == DataInfo(root, 3, None, 12, 9)  # zip maps carry labels, not class names
    assert ds_train.cached_indices == ([] if mode == "no" else list(range(12)))
    sampler_type = ShardRandomSampler if mode == "part" else DistributedSampler
    assert isinstance(loader_train.sampler.sampler, sampler_type)
    check_batches(loader_train, 3, 3)
    check_batches(loader_val, 3, 3, total=9)
    # Same pixels as the folder dataset.
    folder_val = build_loader(cfg(image_folder)).val.dataset
    assert torch.equal(ds_val[4][0], folder_val[4][0]) and ds_val[4][1] == folder_val[4][1]


def test_part_cache_holds_only_the_shard(image_folder, tmp_path, monkeypatch):
    root = write_zip_dataset(image_folder, tmp_path / "zips")
    zip_path, map_path = root / "train.zip", root / "train_map.txt"
    world, union = 3, []
    for rank in range(world):
        ds = ZipImageDataset(zip_path, map_path, cache_mode="part", rank=rank, world_size=world)
        assert ds.cached_indices == list(range(rank, 12, world))
        union += ds.cached_indices
        assert ds[(rank + 1) % world][0].size == (40, 48)  # an uncached item is read lazily
    assert sorted(union) == list(range(12))

    # Through build_loader as rank 1 of 2: the training sampler draws only from the local shard.
    monkeypatch.setattr(data.build, "dist_rank_world", lambda: (1, 2))
    config = cfg(root, "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", "part", "DATA.BATCH_SIZE", "2")
    built = build_loader(config)
    loader_train, loader_val = built.train, built.val
    ds_train, ds_val = loader_train.dataset, loader_val.dataset
    assert ds_train.cached_indices == [1, 3, 5, 7, 9, 11] and ds_val.cached_indices == [1, 3, 5, 7]
    for epoch in (0, 1):
        loader_train.sampler.set_epoch(epoch)
        drawn = list(loader_train.sampler)
        assert len(drawn) == 6 and sorted(drawn) == [1, 3, 5, 7, 9, 11]
    assert list(loader_val.sampler) == [1, 3, 5, 7]


def test_zip_dataset_is_fork_and_pickle_safe(image_folder, tmp_path):
    root = write_zip_dataset(image_folder, tmp_path / "zips")
    ds = ZipImageDataset(root / "val.zip", root / "val_map.txt", transforms.PILToTensor(), cache_mode="no")
    first = ds[0][0]  # opens the handle in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zip is None and torch.equal(clone[0][0], first)
    got = [x for x, _ in DataLoader(ds, batch_size=None, num_workers=2)]
    assert len(got) == 9 and torch.equal(got[0], first)


# ----- transforms -----


def by_hand_eval(path: Path, crop: bool, resample: int) -> torch.Tensor:
    """The evaluation transform recomputed with PIL and numpy."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    if crop:
        short = int(IMG / 0.875)
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((nw, nh), resample)
        left, top = int(round((nw - IMG) / 2)), int(round((nh - IMG) / 2))
        img = img.crop((left, top, left + IMG, top + IMG))
    else:
        img = img.resize((IMG, IMG), resample)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(IMAGENET_DEFAULT_MEAN, np.float32)) / np.array(IMAGENET_DEFAULT_STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


@pytest.mark.parametrize("crop", [True, False])
@pytest.mark.parametrize(("interp", "resample"), [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)])
def test_eval_transform_is_exact(image_folder, crop, interp, resample):
    path = image_folder / "val" / "b" / "1.jpg"  # 40 wide, 48 high: resized to 36x43, cropped at (2, 6)
    config = cfg(image_folder, "TEST.CROP", str(crop), "DATA.INTERPOLATION", interp)
    got = build_transform(False, config)(Image.open(path).convert("RGB"))
    assert got.shape == (3, IMG, IMG)
    torch.testing.assert_close(got, by_hand_eval(path, crop, resample), rtol=0, atol=1e-6)


def test_train_transform_follows_the_config(image_folder):
    def names(config) -> list[str]:
        return [type(t).__name__ for t in build_transform(True, config).transforms]

    default = cfg(image_folder)
    assert names(default)[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert "RandomErasing" in names(default)
    rrc = build_transform(True, default).transforms[0]
    assert tuple(rrc.scale) == (0.08, 1.0) and rrc.size == (IMG, IMG)

    plain = cfg(image_folder, "AUG.HFLIP", "0.0", "AUG.SCALE", "(0.6, 1.0)", "AUG.AUTO_AUGMENT", "none")
    plain_names = names(plain)
    assert "RandomHorizontalFlip" not in plain_names and "RandAugment" not in plain_names
    assert build_transform(True, plain).transforms[0].scale == (0.6, 1.0)
    off = cfg(image_folder, "AUG.AUTO_AUGMENT", "none", "AUG.COLOR_JITTER", "0.0", "AUG.REPROB", "0.0")
    assert not {"ColorJitter", "RandomErasing"} & set(names(off))
    x = build_transform(True, default)(Image.open(image_folder / "train" / "a" / "0.jpg").convert("RGB"))
    assert x.shape == (3, IMG, IMG)


@pytest.mark.parametrize("policy", ["rand-m10-mstd0-inc1", "augmix-m10-w3", "original"])
def test_augmentation_at_top_magnitude_never_fails(image_folder, policy):
    # RandAugment's top level asks posterize for 0 bits: a black image, where Pillow >= 13 would raise.
    config = cfg(image_folder, "AUG.AUTO_AUGMENT", policy)
    transform = build_transform(True, config)
    posterizes = [op for op in augment_ops(transform) if op.name.startswith("Posterize")]
    assert posterizes and all(op.aug_fn is posterize for op in posterizes)
    image = Image.open(image_folder / "train" / "a" / "0.jpg").convert("RGB")
    if policy.startswith("rand"):
        op = posterizes[0]
        op.prob = 1.0
        assert op(image).getextrema() == ((0, 0), (0, 0), (0, 0))
        op.prob = 0.5
    np.random.seed(0)
    for _ in range(150):  # ~10 posterize draws at 0 bits for the RandAugment policy
        assert transform(image).shape == (3, IMG, IMG)


def test_posterize_keeps_the_top_bits():
    image = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    assert np.array_equal(np.asarray(posterize(image, 3)), np.arange(256).reshape(16, 16) & 0b11100000)
    assert posterize(image, 8) is image
    assert posterize(image, 0).getextrema() == (0, 0) and posterize(image, -2).size == image.size


def test_bad_transform_settings_are_config_errors(image_folder):
    for opts in (["DATA.INTERPOLATION", "nearest"], ["AUG.SCALE", "(0.0, 1.0)"], ["AUG.HFLIP", "1.5"]):
        with pytest.raises(ConfigError, match=opts[0]):
            build_transform(True, cfg(image_folder, *opts))


# ----- samplers -----


def test_sharded_eval_sampler_covers_every_index_once():
    for world in range(1, 5):
        for length in range(12):
            parts = [list(ShardedEvalSampler(length, rank, world)) for rank in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(length))
            assert [len(ShardedEvalSampler(length, r, world)) for r in range(world)] == [len(p) for p in parts]
            assert all(p == sorted(p) for p in parts)
    with pytest.raises(ValueError):
        ShardedEvalSampler(5, 2, 2)


def test_shard_random_sampler_reshuffles_per_epoch():
    s = ShardRandomSampler(range(1, 40, 3), num_samples=10, seed=3)
    a, again = list(s), list(s)
    s.set_epoch(1)
    b = list(s)
    assert len(a) == len(b) == len(s) == 10 and a == again and a != b
    assert set(a) <= set(range(1, 40, 3)) and len(set(a)) == 10


# ----- bad data -----


def raises_data_error(config, *fragments: str) -> str:
    with pytest.raises(DataError) as err:
        build_loader(config)
    msg = str(err.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    return msg


def test_missing_and_nonexistent_data_path(tmp_path):
    raises_data_error(cfg(""), "--data-path")
    raises_data_error(cfg(tmp_path / "nowhere"), str(tmp_path / "nowhere"), "does not exist")


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder(image_folder, split):
    os.rename(image_folder / split, image_folder / "other")
    raises_data_error(cfg(image_folder), f"'{split}'", str(image_folder / split), "<root>/train/<class>/<image>")


def test_empty_class_folder_is_named(image_folder):
    b = image_folder / "train" / "b"
    (b / "notes.txt").write_text("no images here")
    (b / "nested").mkdir()
    for f in b.glob("*.jpg"):
        f.rename(b / "nested" / f.name)
    assert build_loader(cfg(image_folder)).info.num_train == 12  # images in sub-folders count, as in ImageFolder
    for f in (b / "nested").glob("*.jpg"):
        f.unlink()
    raises_data_error(cfg(image_folder), str(image_folder / "train" / "b"), "no images")


def test_split_without_class_folders(image_folder):
    for d in (image_folder / "val").iterdir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    raises_data_error(cfg(image_folder), str(image_folder / "val"), "no class folders")


def test_train_and_val_classes_must_match(image_folder):
    os.rename(image_folder / "val" / "c", image_folder / "val" / "z")
    raises_data_error(cfg(image_folder), "only in train: ['c']", "only in val: ['z']")


def test_imagenet_class_count_mismatch_suggests_folder(image_folder):
    raises_data_error(cfg(image_folder, dataset="imagenet"), "3 classes", "1000", "--opts DATA.DATASET folder")


def test_too_few_images_for_a_batch(image_folder):
    raises_data_error(cfg(image_folder, "DATA.BATCH_SIZE", "13"), "12 images", "DATA.BATCH_SIZE 13")


@pytest.mark.parametrize("missing", ["train.zip", "val.zip", "train_map.txt", "val_map.txt"])
def test_zip_missing_file(image_folder, tmp_path, missing):
    root = write_zip_dataset(image_folder, tmp_path / "zips")
    (root / missing).unlink()
    raises_data_error(cfg(root, "DATA.ZIP_MODE", "True"), str(root / missing), "does not exist")


@pytest.mark.parametrize("bad", ["a/0.jpg 0", "a/0.jpg\tzero", "a/0.jpg\t-1", "\t1", "a/0.jpg\t1\textra"])
def test_zip_malformed_map_line(image_folder, tmp_path, bad):
    root = write_zip_dataset(image_folder, tmp_path / "zips")
    lines = (root / "val_map.txt").read_text().splitlines()
    lines[2] = bad
    (root / "val_map.txt").write_text("\n".join(lines) + "\n")
    raises_data_error(cfg(root, "DATA.ZIP_MODE", "True"), str(root / "val_map.txt"), "line 3", "malformed")


def test_zip_member_missing_from_archive(image_folder, tmp_path):
    root = write_zip_dataset(image_folder, tmp_path / "zips")
    with open(root / "train_map.txt", "a") as f:
        f.write("c/ghost.jpg\t2\n")
    raises_data_error(cfg(root, "DATA.ZIP_MODE", "True"), "'c/ghost.jpg'", str(root / "train.zip"))


def test_zip_class_count_is_max_label_plus_one_and_gaps_are_reported(image_folder, tmp_path):
    root = write_zip_dataset(image_folder, tmp_path / "zips")
    with open(root / "val_map.txt", "a") as f:
        f.write("a/0.jpg\t3\n")
    assert build_loader(cfg(root, "DATA.ZIP_MODE", "True")).info.num_classes == 4
    with open(root / "val_map.txt", "a") as f:
        f.write("a/1.jpg\t6\n")  # labels 4 and 5 have no image: silently 7 classes before
    raises_data_error(cfg(root, "DATA.ZIP_MODE", "True"), "skip 4, 5 (of 0..6)", str(root / "val_map.txt"))


@pytest.mark.slow  # a DataLoader whose worker raised takes 5 s per worker to shut down (torch's join timeout)
def test_corrupt_image_in_a_worker_names_the_file(image_folder, tmp_path):
    bad = image_folder / "val" / "a" / "1.jpg"
    bad.write_bytes(b"this is not a JPEG")
    config = cfg(image_folder, "DATA.NUM_WORKERS", "1", "DATA.BATCH_SIZE", "9", "EVAL_MODE", "True")
    loader_val = build_loader(config).val
    with pytest.raises(DataError, match="cannot read image") as err:
        next(iter(loader_val))
    assert str(bad) in str(err.value) and "remove or replace" in str(err.value)

    root = write_zip_dataset(image_folder, tmp_path / "zips")
    ds = ZipImageDataset(root / "val.zip", root / "val_map.txt", cache_mode="full")
    with pytest.raises(DataError, match="a/1.jpg in .*val.zip"):
        list(DataLoader(ds, batch_size=None, num_workers=1))
    gc.collect()  # shut the failed loaders' workers down here, not in whichever test runs next


# ----- the digits demo -----


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    return prepare_digits(tmp_path_factory.mktemp("digits") / "digits")


def test_digits_tree_is_complete_and_reused(digits_root):
    files = {s: sorted((digits_root / s).glob("*/*.png")) for s in ("train", "val")}
    assert len(files["train"]) + len(files["val"]) == 1797
    assert 0.18 < len(files["val"]) / 1797 < 0.22
    for split in ("train", "val"):
        assert sorted(p.name for p in (digits_root / split).iterdir()) == [str(d) for d in range(10)]
    img = Image.open(files["train"][0])
    assert img.size == (8, 8) and img.mode == "L" and np.asarray(img).max() > 200
    before = {p: p.stat().st_mtime_ns for p in [digits_root / MARKER, files["val"][0]]}
    assert prepare_digits(digits_root) == digits_root
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not [p for p in digits_root.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_digits_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not a complete digits dataset"):
        prepare_digits(tmp_path / "d")


def test_digits_config_trains_a_step(digits_root):
    config = load_config(
        str(ROOT / "configs" / "digits.yaml"), ["DATA.DATA_PATH", str(digits_root), "DATA.NUM_WORKERS", "0"]
    )
    assert (config.DATA.DATASET, config.DATA.IMG_SIZE, config.AUG.HFLIP) == ("digits", 32, 0.0)
    data = build_loader(config)
    info = data.info
    assert data.mixup_fn is None and info.num_classes == 10 and info.class_names == tuple(str(d) for d in range(10))
    assert info.num_train + info.num_val == 1797 and info.root == digits_root
    x, y = next(iter(data.train))
    assert x.shape == (64, 3, 32, 32)
    model = build_model(config, info.num_classes)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)


def test_digits_default_location_is_under_the_cwd(tmp_path, monkeypatch, digits_root):
    monkeypatch.chdir(tmp_path)
    os.makedirs("datasets")
    os.symlink(digits_root, "datasets/digits")  # reuse the prepared tree instead of writing it again
    config = load_config(None, ["DATA.DATASET", "digits", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0"])
    info = build_loader(config).info
    assert info.root == Path("datasets") / "digits" and info.num_classes == 10
    assert config.DATA.DATA_PATH == ""  # as configured: where the demo went is a value, not a config change


def test_odd_batch_with_mixup_is_a_config_error(image_folder):
    from data.transforms import build_mixup

    with pytest.raises(ConfigError, match="DATA.BATCH_SIZE \\(5\\) must be even"):
        build_mixup(cfg(image_folder, "DATA.BATCH_SIZE", "5"), 3)
    assert build_mixup(cfg(image_folder, "DATA.BATCH_SIZE", "5", "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"), 3) is None
    assert isinstance(build_mixup(cfg(image_folder, "DATA.BATCH_SIZE", "6"), 3), Mixup)
