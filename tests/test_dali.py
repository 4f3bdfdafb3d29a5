"""DATA.LOADER dali in DALI's CPU-only mode: batches, labels, shards, agreement with the torch loader, the missing
package. (The GPU mode runs in benchmarks/gpu_check.sh.)"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from config import load_config
from data import build_loader
from data.dali import (
    DaliLoader,
    _without_dali_deprecations,
    centre_crop_geometry,
    import_dali,
    rand_augment_settings,
)
from errors import ConfigError, DataError
from tests.helpers import check, config_path, launcher, main_args, run, summaries, write_zip_dataset

pytest.importorskip("nvidia.dali", reason="DALI is optional: pip install -r requirements-dali.txt")

COLOURS = {"a": (220, 30, 30), "b": (30, 220, 30), "c": (30, 30, 220)}  # one dominant channel per class


@pytest.fixture(scope="module")
def coloured(tmp_path_factory) -> Path:
    """Class folders of noisy images whose dominant channel is the class (a: red, b: green, c: blue), varied sizes."""
    root = tmp_path_factory.mktemp("dali") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 5)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                w, h = 40 + 8 * i, 36 + 4 * i
                pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=92)
    return root


def cfg(root: Path, *opts: str):
    base = ["DATA.DATA_PATH", str(root), "DATA.DATASET", "folder", "DATA.IMG_SIZE", "32", "DATA.BATCH_SIZE", "4"]
    return load_config(config_path("tiny"), [*base, "DATA.NUM_WORKERS", "1", *opts])


def dominant(images: torch.Tensor) -> list[int]:
    """The class each image's dominant channel says (0 red, 1 green, 2 blue)."""
    return images.float().mean(dim=(2, 3)).argmax(dim=1).tolist()


def test_centre_crop_geometry_is_torchvision_s():
    # Hand-computed: 500x375 to a short side of 256 is 341x256, centred 224 crop at (16, 58); odd margins round half
    # to even as Python's round does (torchvision's CenterCrop).
    assert centre_crop_geometry(500, 375, 256, 224) == (256, 341, 16, 58)
    assert centre_crop_geometry(375, 500, 256, 224) == (341, 256, 58, 16)
    assert centre_crop_geometry(41, 40, 36, 32) == (36, 36, 2, 2)
    assert centre_crop_geometry(47, 40, 37, 32) == (37, 43, 2, 6)  # margins 5 and 11: round(2.5) = 2, round(5.5) = 6


def test_policy_settings():
    assert rand_augment_settings("rand-m9-mstd0.5-inc1") == (2, 9)
    assert rand_augment_settings("rand-n3-m15") == (3, 15)
    assert rand_augment_settings("none") is None
    with pytest.raises(ConfigError, match="RandAugment"):
        rand_augment_settings("augmix-m5")
    with pytest.raises(ConfigError, match="DATA.LOADER dali runs RandAugment"):
        cfg(Path("."), "DATA.LOADER", "dali", "AUG.AUTO_AUGMENT", "original")


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_are_uint8_with_the_labels_of_their_images(coloured, split):
    config = cfg(coloured, "DATA.LOADER", "dali", "AUG.AUTO_AUGMENT", "none", "AUG.REPROB", "0")
    data = build_loader(config)
    device_loader = data.train if split == "train" else data.val
    raw = device_loader.loader
    assert isinstance(raw, DaliLoader)
    device_loader.set_epoch(1)
    seen, labels_seen = 0, []
    for images, labels in raw:  # what DALI hands over: uint8 N x 3 x 32 x 32
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32) and images.shape[0] <= 4
        assert labels.dtype == torch.int64 and dominant(images) == labels.tolist()  # each image has its own label
        seen += images.shape[0]
        labels_seen += labels.tolist()
    expected = 16 if split == "train" else 15  # training drops the last partial batch; validation keeps every image
    assert seen == expected and len(raw) == -(-expected // 4)
    # The order is the torch loader's sampler's: the same labels in the same order.
    dataset = raw.dataset
    assert labels_seen == [dataset.samples[i][1] for i in list(raw.sampler)[:expected]]
    # Through the device loader: normalised floats in the range of ImageNet normalisation.
    images, _ = next(iter(device_loader))
    assert images.dtype == torch.float32 and -2.2 < float(images.min()) and float(images.max()) < 2.7


def test_an_epoch_s_order_is_the_torch_loader_s_and_a_resume_continues_at_its_batch(coloured):
    dali = build_loader(cfg(coloured, "DATA.LOADER", "dali", "AUG.AUTO_AUGMENT", "none")).train
    plain = build_loader(cfg(coloured, "AUG.AUTO_AUGMENT", "none")).train
    for loader in (dali, plain):
        loader.set_epoch(3)
    whole = [labels.tolist() for _, labels in dali]
    assert whole == [labels.tolist() for _, labels in plain] and len(whole) == 4
    dali.set_epoch(3, first_batch=2)  # as a run continued from a mid-epoch checkpoint at step 2 starts
    assert [labels.tolist() for _, labels in dali] == whole[2:]
    dali.set_epoch(4)
    assert [labels.tolist() for _, labels in dali] != whole  # a new epoch, a new shuffle


def test_colour_jitter_without_randaugment_as_timm(tmp_path):
    """timm applies ColorJitter(j, j, j) when there is no RandAugment policy: on uniform grey 128 images (crop, flip
    and contrast/saturation leave them grey 128), each image becomes 128 x its brightness factor, in [0.6, 1.4]."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(tmp_path / split / name / f"{i}.png")
    means = {}
    for jitter in ("0.4", "0"):
        loader = build_loader(
            cfg(tmp_path, "DATA.LOADER", "dali", "AUG.AUTO_AUGMENT", "none", "AUG.COLOR_JITTER", jitter)
        )
        images = torch.cat([x for x, _ in loader.train.loader]).float()
        assert (images.amax(dim=(1, 2, 3)) - images.amin(dim=(1, 2, 3))).max() <= 1  # still (nearly) uniform
        means[jitter] = images.mean(dim=(1, 2, 3))
    assert means["0"].eq(128).all()
    jittered = means["0.4"]
    assert jittered.min() >= 0.6 * 128 - 1 and jittered.max() <= 1.4 * 128 + 1
    assert jittered.std() > 15  # uniform over [77, 179]: 29.6 expected


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_batches_on_the_device_cuda_or_cpu(coloured, device):
    """On CUDA DALI decodes with device="mixed" and its batches stay on the GPU; the CPU run of the same body keeps
    the GPU check from meeting a typo first."""
    dali = ("DATA.LOADER", "dali", "AUG.AUTO_AUGMENT", "none", "AUG.REPROB", "0")
    data = build_loader(cfg(coloured, *dali), torch.device(device))
    pipeline_device = data.train.loader.device  # "cuda" resolved to the current GPU's number, DALI's device_id
    assert pipeline_device.type == device and pipeline_device.index == (0 if device == "cuda" else None)
    where = "decoding on the GPU, device=mixed" if device == "cuda" else "CPU-only mode"
    assert data.loader == f"DALI ({where}) | 1 DALI thread(s) per process"  # the run summary's Loader line
    data.train.set_epoch(0)
    for images, labels in data.train.loader:
        assert images.device.type == device and images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        assert labels.device.type == "cpu" and dominant(images) == labels.tolist()
    images, labels = next(iter(data.train))  # model-ready: normalised on the device (on CUDA, on a side stream)
    assert images.device.type == labels.device.type == device and images.dtype == torch.float32
    # Evaluation: the torch loader's pixels (CPU, torchvision) within the decoders' and resamplers' differences.
    reference = torch.cat([x for x, _ in build_loader(cfg(coloured)).val])
    got = torch.cat([x.cpu() for x, _ in data.val])
    gap = (reference - got).abs()
    assert got.shape == reference.shape and gap.mean().item() < 0.02, (gap.mean().item(), gap.max().item())


def test_every_validation_image_once_across_two_shards(coloured):
    config = cfg(coloured, "DATA.LOADER", "dali")
    whole = build_loader(config).val.loader
    from data.samplers import ShardedEvalSampler

    shards = []
    for rank in (0, 1):
        loader = DaliLoader(whole.dataset, ShardedEvalSampler(15, rank, 2), 4, False, whole._build, whole.device)
        shards.append(sorted(i for batch in loader._batches() for i in batch))
        assert sum(images.shape[0] for images, _ in loader) == len(shards[-1])
    assert sorted(shards[0] + shards[1]) == list(range(15)) and not set(shards[0]) & set(shards[1])


def test_evaluation_inputs_agree_with_the_torch_loader(coloured):
    torch_val = build_loader(cfg(coloured)).val
    dali_val = build_loader(cfg(coloured, "DATA.LOADER", "dali")).val
    a = torch.cat([x for x, _ in torch_val])
    b = torch.cat([x for x, _ in dali_val])
    assert a.shape == b.shape == (15, 3, 32, 32)
    assert torch.equal(torch.cat([y for _, y in torch_val]), torch.cat([y for _, y in dali_val]))
    # The same geometry (short side 36, the same centre 32x32, computed as torchvision does); only the cubic
    # resampling differs a little (on ImageNet-like photos at 224: 0.0025 mean, 0.12 at most).
    gap = (a - b).abs()
    assert gap.mean().item() < 0.01 and gap.max().item() < 0.25, (gap.mean().item(), gap.max().item())


@pytest.mark.parametrize("mode", ["no", "part"])
def test_zip_datasets_give_the_folder_s_batches(coloured, tmp_path, mode):
    """DATA.ZIP_MODE: DALI decodes the zip members' bytes; the same pixels and labels as from the folders."""
    zips = write_zip_dataset(coloured, tmp_path / "zips")
    dali = ("DATA.LOADER", "dali", "AUG.AUTO_AUGMENT", "none")  # RandAugment could invert the colours
    folder = build_loader(cfg(coloured, *dali))
    zipped = build_loader(cfg(zips, *dali, "DATA.ZIP_MODE", "True", "DATA.CACHE_MODE", mode))
    assert isinstance(zipped.val.loader, DaliLoader)
    for a, b in zip(folder.val.loader, zipped.val.loader, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    zipped.train.set_epoch(2)
    for images, labels in zipped.train.loader:
        assert dominant(images) == labels.tolist()


def test_dali_s_own_deprecation_warnings_are_dropped_and_others_kept(coloured):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _without_dali_deprecations():
            warnings.warn_explicit("alias", DeprecationWarning, "/x/nvidia/dali/ops/__init__.py", 1)
            warnings.warn("ours", DeprecationWarning, stacklevel=1)
            warnings.warn("a user warning", UserWarning, stacklevel=1)
        build_loader(cfg(coloured, "DATA.LOADER", "dali")).train.set_epoch(0)
        next(iter(build_loader(cfg(coloured, "DATA.LOADER", "dali")).train))  # builds the RandAugment pipeline
    assert sorted(str(w.message) for w in caught) == ["a user warning", "ours"]


def test_without_dali_the_error_says_how_to_install_it(monkeypatch, coloured):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ConfigError, match=r"pip install -r requirements-dali.txt") as e:
        import_dali()
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="DATA.LOADER dali needs NVIDIA DALI"):
        build_loader(cfg(coloured, "DATA.LOADER", "dali"))


@pytest.mark.slow
def test_main_trains_and_evaluates_with_dali_in_one_and_two_processes(coloured, tmp_path):
    opts = ("DATA.LOADER", "dali", "DATA.NUM_WORKERS", "1")
    check(run([sys.executable, *main_args(coloured, tmp_path / "train", opts=opts)]))
    ckpt = tmp_path / "train" / "dfvt_tiny" / "t" / "ckpt_epoch_0.pth"
    evaluate = ("--eval", "--resume", str(ckpt))
    one = summaries(check(run([sys.executable, *main_args(coloured, tmp_path / "one", *evaluate, opts=opts)])).stdout)
    two = check(run(launcher("torch.distributed.run") + main_args(coloured, tmp_path / "two", *evaluate, opts=opts)))
    assert len(one) == 1 and summaries(two.stdout) == one  # every image once over the two shards, counts exact


def test_an_unreadable_image_is_one_line(coloured, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(coloured, root)
    for split in ("train", "val"):
        (root / split / "b" / "2.jpg").write_bytes(b"not a JPEG")
    data = build_loader(cfg(root, "DATA.LOADER", "dali"))
    # Validation reads each header first (for the crop geometry): the usual line naming the file.
    with pytest.raises(DataError, match=rf"cannot read image {root / 'val' / 'b' / '2.jpg'}: "):
        list(data.val.loader)
    # Training hands the bytes to DALI's decoder: its reason, one line, and how to find the file.
    with pytest.raises(DataError, match=r"DALI could not read a batch of images \(the first: .*\): ") as e:
        list(data.train.loader)
    assert "\n" not in str(e.value) and "--check-data" in str(e.value)
