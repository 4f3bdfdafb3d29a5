"""DATA.LOADER dali in DALI's CPU-only mode: batches, labels, shards, agreement with the torch loader, timm's
RandAugment rebuilt in DALI, the missing package. (The GPU mode runs in benchmarks/gpu_check.sh.)"""

from __future__ import annotations

import math
import random
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
    LEVEL_STEPS,
    DaliLoader,
    RandAugmentPolicy,
    _without_dali_deprecations,
    centre_crop_geometry,
    import_dali,
    op_param,
    rand_augment,
    rand_augment_draws,
    rand_augment_ops,
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
    assert rand_augment_settings("rand-m9-mstd0.5-inc1") == RandAugmentPolicy(n=2, m=9, mstd=0.5, increasing=True)
    assert rand_augment_settings("rand-n3-m15") == RandAugmentPolicy(n=3, m=15)
    assert rand_augment_settings("rand-m9-mstd101").mstd == math.inf  # timm: mstd > 100 samples uniformly in [0, m]
    assert rand_augment_settings("none") is None
    with pytest.raises(ConfigError, match="RandAugment"):
        rand_augment_settings("augmix-m5")
    with pytest.raises(ConfigError, match="default RandAugment op sets"):
        rand_augment_settings("rand-m9-tweights")  # timm's weighted op choice (without replacement): not here
    with pytest.raises(ConfigError, match="not a timm RandAugment policy"):
        rand_augment_settings("rand-m9-x3")  # timm asserts on an unknown section
    with pytest.raises(ConfigError, match="DATA.LOADER dali runs RandAugment"):
        cfg(Path("."), "DATA.LOADER", "dali", "AUG.AUTO_AUGMENT", "original")


@pytest.mark.parametrize(
    "policy", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-n3-m15", "rand-m7-mstd101-p0.3", "rand-n1-m5-mmax15"]
)
def test_policy_reads_as_timm_reads_it(policy):
    """The truth is timm's own parse: its RandAugment's layers, op names and order, magnitude, noise, bound, p."""
    from timm.data.auto_augment import rand_augment_transform

    timm_ra = rand_augment_transform(policy, {})
    ours = rand_augment_settings(policy)
    assert ours.n == timm_ra.num_layers and timm_ra.choice_weights is None  # uniform, with replacement
    assert ours.ops == tuple(op.name for op in timm_ra.ops)
    assert [op.name for op in rand_augment_ops(ours, 32, 32)] == list(ours.ops)
    for op in timm_ra.ops:
        assert (op.magnitude, op.magnitude_std, op.prob) == (ours.m, ours.mstd, ours.p)
        assert (op.magnitude_max or 10) == ours.upper


def timm_arg(name: str, level: float, negate: bool):
    """timm's own argument for op ``name`` at ``level``, its random sign forced (``_randomly_negate`` negates when
    ``random.random() > 0.5``)."""
    from timm.data import auto_augment as ta

    real = random.random
    random.random = (lambda: 1.0) if negate else (lambda: 0.0)
    try:
        level_fn = ta.LEVEL_TO_ARG[name]
        return level_fn(level, {}) if level_fn is not None else ()
    finally:
        random.random = real


def dali_arg(name: str, param: np.ndarray, height: int, width: int) -> tuple:
    """Read timm's argument back from the parameter DALI's op gets (a hand inverse of each op's parameter form)."""
    base = name.removesuffix("Increasing")
    if name == "Rotate":  # a rotation about the centre: the centre stays put
        centre = np.array([width / 2, height / 2])
        assert np.allclose(param[:, :2] @ centre + param[:, 2], centre, atol=1e-4)
        return (math.degrees(math.atan2(param[1, 0], param[0, 0])),)
    if name in ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        return (
            {
                "ShearX": param[0, 1],
                "ShearY": param[1, 0],
                "TranslateXRel": param[0, 2] / width,
                "TranslateYRel": param[1, 2] / height,
            }[name].item(),
        )
    if base == "Sharpness":  # factor * identity + (1 - factor) * Pillow's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1) / 13
        return (1 - 13 * param[0, 0].item(),)
    if base == "Posterize":  # the AND mask keeping the top bits
        bits = bin(int(param)).count("1")
        assert int(param) == (255 << (8 - bits)) & 255
        return (bits,)
    return (param.item(),)


@pytest.mark.parametrize("increasing", [True, False])
def test_each_op_s_parameter_is_timm_s_at_its_magnitude(increasing):
    """m9 means 9/10 of each op's range as in timm (Rotate 27 degrees, not DALI's 9/30 of 30), at both signs, and a
    noisy magnitude (3.75, 10) too; the truth is timm's LEVEL_TO_ARG."""
    height, width = 40, 56
    for name in RandAugmentPolicy(increasing=increasing).ops:
        for level in (9, 3.75, 10, 0):
            for negate in (False, True):
                expected = timm_arg(name, level, negate)
                if not expected:
                    assert name in ("AutoContrast", "Equalize", "Invert")
                    continue
                signed_bin = round(level * LEVEL_STEPS) * (-1 if negate else 1)
                got = dali_arg(name, op_param(name, height, width, signed_bin), height, width)
                assert got == pytest.approx(expected, rel=1e-5, abs=1e-4), (name, level, negate)
    assert timm_arg("Rotate", 9, False) == (27.0,)  # the recipe's magnitude, by hand


def pipeline_of(images, outputs, batch_size=None, seed=7):
    """Run one batch of a DALI CPU pipeline over ``images`` (HWC uint8; None: no input), returning numpy arrays."""
    dali = import_dali()

    @dali.pipeline_def(
        batch_size=batch_size or len(images), num_threads=1, device_id=None, seed=seed, enable_conditionals=True
    )
    def pipe():
        data = dali.fn.external_source(source=lambda: images, batch=True, layout="HWC") if images else None
        return outputs(data)

    with _without_dali_deprecations():
        p = pipe()
        p.build()
        return [np.array(out.as_tensor()) for out in p.run()]


def test_ops_give_timm_s_pillow_pixels():
    """Each op, at magnitude 7.3 and either sign, on non-square smooth images, against timm's own Pillow op with the
    recipe's fill (the mean pixel, 124 116 104 from ImageNet's mean) and bilinear resampling: the geometry (sign,
    centre, fill, border) and the levels agree to within rounding; Equalize is DALI's (OpenCV's formula)."""
    from PIL import ImageFilter
    from timm.data.auto_augment import NAME_TO_OP

    height, width, level = 40, 56, 7.3
    rng = np.random.default_rng(0)
    images = [
        np.array(
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).filter(
                ImageFilter.GaussianBlur(radius)
            )
        )
        for radius in (1, 2)
    ]
    names = sorted(set(RandAugmentPolicy(increasing=True).ops + RandAugmentPolicy().ops))
    policy = RandAugmentPolicy()
    ops = rand_augment_ops(policy, height, width, names=names)
    k = round(level * LEVEL_STEPS)
    types = import_dali().types
    outputs = pipeline_of(
        images,
        lambda x: tuple(op(x, index=types.Constant(np.int32(negate)), bins=(k, -k)) for op in ops for negate in (0, 1)),
    )
    for i, (name, negate) in enumerate((name, negate) for name in names for negate in (0, 1)):
        for image, got in zip(images, outputs[i], strict=True):
            ref = NAME_TO_OP[name](
                Image.fromarray(image),
                *timm_arg(name, level, bool(negate)),
                fillcolor=(124, 116, 104),
                resample=Image.BILINEAR,
            )
            gap = np.abs(np.asarray(ref, dtype=int) - got.astype(int))
            assert got.shape == image.shape and got.dtype == np.uint8
            if name == "Equalize":
                assert gap.mean() < 12, (name, gap.mean())
            else:
                assert gap.max() <= 2 and gap.mean() < 0.8, (name, negate, gap.max(), gap.mean())


def test_rotate_at_m9_turns_27_degrees():
    """The whole RandAugment path (draws, selection, op) with Rotate only, applied always, at m9 without noise: each
    image is Pillow's rotation by +27 or -27 degrees, far from the 9 degrees DALI's own rand_augment gives."""
    size = 40
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([xx * 6, yy * 6, (xx + yy) * 3], axis=-1).astype(np.uint8)  # gradients: a turn shows
    policy = RandAugmentPolicy(n=1, m=9, p=1.0)
    ops = rand_augment_ops(policy, size, size, names=["Rotate"])
    (out,) = pipeline_of([image] * 8, lambda x: (rand_augment(x, policy, ops),))

    def gap(got, degrees):
        ref = Image.fromarray(image).rotate(degrees, resample=Image.BILINEAR, fillcolor=(124, 116, 104))
        return np.abs(np.asarray(ref, dtype=float) - got).mean()

    signs = []
    for got in out:
        by27 = {sign: gap(got, sign * 27) for sign in (1, -1)}
        sign = min(by27, key=by27.get)
        signs.append(sign)
        assert by27[sign] < 0.6 and min(gap(got, 9), gap(got, -9)) > 10 * by27[sign], by27
    assert set(signs) == {1, -1}  # timm negates at random; seeded, so this holds for this run


def test_draws_are_timm_s_choice_probability_and_magnitude_noise():
    """For rand-m9-mstd0.5-inc1, 4000 images x 2 layers: each layer picks one of the 15 ops uniformly, with
    replacement, and applies it with probability 1/2 (index 15: none); the sign is + or - evenly; the magnitude is
    normal(9, 0.5) clipped to [0, 10] (timm: random.gauss, clipped to magnitude_max or 10) on the 0.01 grid."""
    policy = rand_augment_settings("rand-m9-mstd0.5-inc1")
    op, index = pipeline_of(None, lambda _: rand_augment_draws(policy, 15), batch_size=4000)
    assert op.shape == index.shape == (4000, 2)
    counts = np.bincount(op.ravel(), minlength=16)
    assert abs(counts[15] - 4000) < 200  # binomial(8000, 1/2): sd 45
    assert np.all(np.abs(counts[:15] - 8000 / 30) < 80)  # binomial(8000, 1/30): sd 16
    same = (op[:, 0] == op[:, 1]) & (op[:, 0] < 15)
    assert 30 < same.sum() < 110  # with replacement: 4000 x 15 / 30^2 = 67 images draw one op twice
    sign, level = index % 2, (index // 2) / LEVEL_STEPS
    assert abs(sign.mean() - 0.5) < 0.03
    clipped = np.clip(np.random.default_rng(0).normal(9, 0.5, 10**6), 0, 10)  # timm's draw, sampled
    assert abs(level.mean() - clipped.mean()) < 0.03 and abs(level.std() - clipped.std()) < 0.03
    assert level.max() == 10 and level.min() >= 0 and abs((level == 10).mean() - (clipped == 10).mean()) < 0.01


def test_one_op_policy_leaves_half_the_images_unchanged():
    """rand-n1-m9-mstd0.5-inc1 on 600 noise images (values 40-200, so every op at m ~ 9 changes them): timm applies
    its one op with probability 1/2, so about half come out unchanged."""
    rng = np.random.default_rng(1)
    images = [rng.integers(40, 200, (16, 16, 3), dtype=np.uint8) for _ in range(600)]
    policy = rand_augment_settings("rand-n1-m9-mstd0.5-inc1")
    ops = rand_augment_ops(policy, 16, 16)
    (out,) = pipeline_of(images, lambda x: (rand_augment(x, policy, ops),))
    unchanged = sum(np.array_equal(a, b) for a, b in zip(images, out, strict=True))
    assert abs(unchanged - 300) < 60, unchanged  # binomial(600, 1/2): sd 12


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
