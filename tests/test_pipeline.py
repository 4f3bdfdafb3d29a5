"""The fast input pipeline against the upstream one: decoding, timm's crop draws, the uint8 + device path, the
device loader, uint8 collation, worker seeding and the worker count."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from benchmarks.imagenet_like import make_imagenet_like
from config import load_config
from data import (
    DeviceLoader,
    EncodedImage,
    build_loader,
    build_transform,
    build_uint8_transform,
    decode_uint8,
    read_encoded,
    resolve_num_workers,
)
from data.device import collate_uint8
from data.transforms import LazyRandAugment, augment_ops
from errors import ConfigError, DataError
from tests.helpers import FIXTURES, build, load_fixture_weights

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """ImageNet-like JPEGs cut from real photographs: 16 train and 16 val images in 2 classes."""
    return make_imagenet_like(tmp_path_factory.mktemp("photos"), 16, 16, classes=2)


def files(root: Path, split: str) -> list[Path]:
    return sorted((root / split).rglob("*.JPEG"))


def config(root: Path | None = None, *opts: str):
    base = ["DATA.DATASET", "folder", "DATA.BATCH_SIZE", "4", "DATA.NUM_WORKERS", "0"]
    if root is not None:
        base += ["DATA.DATA_PATH", str(root)]
    return load_config(None, base + list(opts))


def to_tensor_normalize(pixels: torch.Tensor) -> torch.Tensor:
    """The upstream float path on the same uint8 pixels: torchvision ToTensor + Normalize."""
    image = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
    return transforms.Normalize(MEAN, STD)(transforms.ToTensor()(image))


def encode(image: Image.Image, fmt: str, **kwargs) -> EncodedImage:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return EncodedImage(buffer.getvalue(), f"test.{fmt.lower()}")


# ----------------------------------------------------------------------------------------------- decoding


def test_decoding_is_pil_bit_for_bit(photos):
    photo = Image.open(files(photos, "val")[0])
    cases = [encode(photo.convert(mode), "JPEG", quality=90) for mode in ("RGB", "L", "CMYK")]
    cases += [encode(photo.convert("RGBA"), "PNG"), encode(photo.convert("P"), "PNG"), encode(photo, "WEBP")]
    for image in cases:
        expected = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
        got = decode_uint8(image)
        assert got.dtype == torch.uint8 and got.shape == (3, *expected.shape[:2])
        assert np.array_equal(got.permute(1, 2, 0).numpy(), expected), image.source


def test_unreadable_images_name_the_file(tmp_path, photos):
    data = files(photos, "val")[0].read_bytes()
    for name, content in (("truncated.jpg", data[: len(data) // 3]), ("text.jpg", b"not an image")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=rf"cannot read image {path}: .*remove or replace the file"):
            decode_uint8(read_encoded(path))
    with pytest.raises(DataError, match="missing.jpg"):
        read_encoded(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------------------------- training transform


def test_crop_boxes_are_timms_draws(photos):
    crop = build_uint8_transform(True, config()).crop
    images = [read_encoded(path) for path in files(photos, "train")[:4]]
    for seed in range(100):
        image = images[seed % len(images)]
        random.seed(seed)
        pil = Image.open(io.BytesIO(image.data))
        expected = RandomResizedCropAndInterpolation.get_params(pil, (0.08, 1), (3 / 4, 4 / 3))
        random.seed(seed)
        box, mode = crop.params(image)
        assert box == expected and mode == InterpolationMode.BICUBIC
    random_interp = build_uint8_transform(True, config(None, "DATA.INTERPOLATION", "random")).crop
    modes = {random_interp.params(images[0])[1] for _ in range(50)}
    assert modes == {InterpolationMode.BILINEAR, InterpolationMode.BICUBIC}


def seeded(seed: int, fn, *args):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return fn(*args)


def test_training_transform_follows_timm_on_seeded_draws(photos):
    """Same seeds, same draws (crop box, flip, RandAugment ops and magnitudes): the images agree up to the resize
    implementation (torch's uint8 resize vs PIL's); other seeds give other images."""
    cfg = config(None, "AUG.REPROB", "0.0")  # random erasing runs on the device (tested below)
    ours = build_uint8_transform(True, cfg)
    upstream = build_transform(True, cfg)
    same, other = [], []
    for seed, path in enumerate(files(photos, "train")[:12]):
        image = read_encoded(path)
        got = seeded(seed, ours, image)
        assert got.dtype == torch.uint8 and got.shape == (3, 224, 224)
        got = to_tensor_normalize(got)
        pil = Image.open(path).convert("RGB")
        same.append((got - seeded(seed, upstream, pil)).abs().mean().item())
        other.append((got - seeded(seed + 1000, upstream, pil)).abs().mean().item())
    level = 1 / 255 / 0.225  # one grey level in normalised units
    assert np.median(same) < 0.5 * level and max(same) < 3 * level, same
    assert np.median(other) > 20 * level, other


def test_large_jpeg_crops_decode_at_reduced_scale(photos, monkeypatch):
    """A box at least 2x the output on both sides is decoded at 1/2, 1/4 or 1/8 scale (DCT domain): the result is
    close to resizing the fully decoded crop."""
    import data.transforms as module

    big = Image.open(files(photos, "train")[0]).convert("RGB").resize((1600, 1200))
    image = encode(big, "JPEG", quality=90)
    crop = build_uint8_transform(True, config(None, "AUG.SCALE", "(0.9, 1.0)")).crop
    real, reduces = module.decode_uint8, []
    monkeypatch.setattr(module, "decode_uint8", lambda img, reduce=1: reduces.append(reduce) or real(img, reduce))
    reduced = seeded(0, crop, image)
    monkeypatch.setattr(module, "decode_uint8", lambda img, reduce=1: real(img, 1))
    full = seeded(0, crop, image)
    assert reduces == [4] and reduced.shape == full.shape == (3, 224, 224)
    assert (reduced.float() - full.float()).abs().mean() < 2.0  # grey levels


@pytest.mark.parametrize("interpolation", ["bicubic", "random"])
def test_randaugment_is_timms_policy_with_timms_filters(interpolation):
    """The same 15 ops with the same probability, magnitude, noise and resampling filter as timm's transform: the
    config's filter where it pins one (bicubic: what upstream's recipe runs), a random choice per call otherwise."""
    cfg = config(None, "DATA.INTERPOLATION", interpolation)
    ops = list(augment_ops(build_uint8_transform(True, cfg).pil_ops))
    upstream = list(augment_ops(build_transform(True, cfg)))
    assert [op.name for op in ops] == [op.name for op in upstream] and len(ops) == 15
    for op, ref in zip(ops, upstream, strict=True):
        assert (op.prob, op.magnitude, op.magnitude_std) == (ref.prob, ref.magnitude, ref.magnitude_std)
        assert op.kwargs["resample"] == ref.kwargs["resample"]
    rotate = next(op for op in ops if op.name == "Rotate").kwargs["resample"]
    assert rotate == (Image.BICUBIC if interpolation == "bicubic" else (Image.BILINEAR, Image.BICUBIC))


def test_lazy_randaugment_is_timms_image_for_image_and_draw_for_draw(photos):
    """The same images as timm's RandAugment on PIL images for the same seeds, and the random generators left in
    the same state (so every later draw of the pipeline is timm's too); images no op touched are not converted."""
    lazy = build_uint8_transform(True, config())._augment
    assert isinstance(lazy, LazyRandAugment)
    timm_ra = lazy.augment  # the very RandAugment timm's create_transform built
    image = build_uint8_transform(False, config())(read_encoded(files(photos, "val")[0]))
    untouched = 0
    for seed in range(120):
        got = seeded(seed, lazy, image)
        states = random.getstate(), np.random.get_state()[1].copy()
        expected = torch.from_numpy(np.array(seeded(seed, timm_ra, Image.fromarray(image.permute(1, 2, 0).numpy()))))
        assert torch.equal(got, expected.permute(2, 0, 1)), seed
        assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
        untouched += got is image
    assert 15 < untouched < 50  # timm: each of the 2 ops applies with p 0.5, so about a quarter (30 of 120)


# ----------------------------------------------------------------------------------------------- evaluation transform


def test_eval_pixels_match_upstream(photos):
    ours, upstream = build_uint8_transform(False, config()), build_transform(False, config())
    differing = []
    for path in files(photos, "val"):
        got = to_tensor_normalize(ours(read_encoded(path)))
        expected = upstream(Image.open(path).convert("RGB"))
        diff = ((got - expected).abs() * 0.225 * 255).round()  # in grey levels
        assert diff.max() <= 2
        differing.append((diff > 0).float().mean().item())
    assert np.mean(differing) < 0.02
    # No resize needed (short side already 256): bit-identical after centre crop and normalisation.
    exact = encode(Image.open(files(photos, "val")[0]).convert("RGB").resize((341, 256)), "JPEG", quality=95)
    pil = Image.open(io.BytesIO(exact.data)).convert("RGB")
    assert torch.equal(to_tensor_normalize(ours(exact)), upstream(pil))


def test_eval_pipelines_differ_less_than_autocast_does(photos):
    """DFvT-T (fixture weights) on the photos: the logits of the fast and upstream eval pipelines differ far less
    than fp32 and bf16 autocast differ on the same input, and every top-1 prediction is the same."""
    model = load_fixture_weights(build("tiny")).eval()
    logits = {}
    for pipeline in ("fast", "upstream"):
        loader = build_loader(config(photos, "DATA.PIPELINE", pipeline, "EVAL_MODE", "True")).val
        images = torch.cat([x for x, _ in loader])
        with torch.no_grad():
            logits[pipeline] = model(images)
            if pipeline == "upstream":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits["bf16"] = model(images).float()
    pipeline_gap = (logits["fast"] - logits["upstream"]).abs().max().item()
    autocast_gap = (logits["bf16"] - logits["upstream"]).abs().max().item()
    print(f"max |logit difference|: pipelines {pipeline_gap:.2e}, fp32 vs bf16 autocast {autocast_gap:.2e}")
    assert pipeline_gap < 0.1 * autocast_gap, (pipeline_gap, autocast_gap)
    assert torch.equal(logits["fast"].argmax(1), logits["upstream"].argmax(1))


# ----------------------------------------------------------------------------------------------- batches and devices


def test_collate_uint8_is_channels_last_and_checks_sizes():
    images = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8) for _ in range(3)]
    images[1] = images[1].permute(1, 2, 0).contiguous().permute(2, 0, 1)  # interleaved memory, as decoders give
    batch, labels = collate_uint8([(img, i) for i, img in enumerate(images)])
    assert torch.equal(batch, torch.stack(images)) and batch.is_contiguous(memory_format=torch.channels_last)
    assert labels.tolist() == [0, 1, 2] and labels.dtype == torch.int64
    with pytest.raises(DataError, match=r"images of one batch differ in size"):
        collate_uint8([(images[0], 0), (torch.zeros(3, 5, 6, dtype=torch.uint8), 1)])


class Pixels(Dataset):
    def __init__(self, n: int, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def test_device_loader_normalises_bit_for_bit_and_ends_epochs():
    dataset = Pixels(10)
    loader = DeviceLoader(DataLoader(dataset, batch_size=4, collate_fn=collate_uint8), torch.device("cpu"), MEAN, STD)
    assert len(loader) == 3 and loader.dataset is dataset
    for _ in range(2):  # a second epoch starts afresh
        batches = list(loader)
        assert [len(y) for _, y in batches] == [4, 4, 2]
        images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        assert labels.tolist() == list(range(10)) and images.dtype == torch.float32
        assert torch.equal(images, torch.stack([to_tensor_normalize(img) for img in dataset.images]))
    partial = iter(loader)
    next(partial)  # leaving an epoch early and starting another is fine
    assert len(list(loader)) == 3
    floats = torch.randn(4, 3, 8, 8)  # the upstream pipeline's batches are already normalised: moved unchanged
    moved = DeviceLoader([(floats, torch.arange(4))], torch.device("cpu"), MEAN, STD)
    assert torch.equal(next(iter(moved))[0], floats)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetching_device_loader_matches_the_cpu():
    """On CUDA the next batch is copied and normalised on a side stream while the caller computes on the current
    one: every epoch must still yield each batch once, in order, with the CPU's values, however busy the caller."""
    dataset = Pixels(20, size=64)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_uint8, pin_memory=True)
    expected = [x for x, _ in DeviceLoader(loader, torch.device("cpu"), MEAN, STD)]
    cuda = DeviceLoader(loader, torch.device("cuda"), MEAN, STD)
    weight = torch.randn(4096, 4096, device="cuda")
    for _ in range(2):
        got = []
        for x, y in cuda:
            for _ in range(3):  # keep the caller's stream busy while the next batch is prepared
                weight = (weight @ weight).tanh_()
            got.append((x.cpu(), y.cpu()))
            del x, y  # freed blocks may be reused by the side stream's next allocations
        assert [y.tolist() for _, y in got] == [list(range(i, min(i + 4, 20))) for i in range(0, 20, 4)]
        for (x, _), ref in zip(got, expected, strict=True):
            torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)


def test_random_erasing_runs_per_sample_on_the_device_loader(tmp_path):
    torch.manual_seed(0)
    random.seed(0)
    cfg = config(tmp_path, "AUG.REPROB", "0.5", "AUG.REMODE", "pixel")
    from timm.data.random_erasing import RandomErasing

    erasing = RandomErasing(cfg.AUG.REPROB, mode=cfg.AUG.REMODE, max_count=cfg.AUG.RECOUNT, device="cpu")
    dataset = Pixels(400, size=32)
    loader = DataLoader(dataset, batch_size=50, collate_fn=collate_uint8)
    plain = torch.cat([x for x, _ in DeviceLoader(loader, torch.device("cpu"), MEAN, STD)])
    erased = torch.cat([x for x, _ in DeviceLoader(loader, torch.device("cpu"), MEAN, STD, erasing)])
    changed = (erased != plain).flatten(1).any(1).float()
    assert 0.4 < changed.mean().item() < 0.6  # about REPROB of the samples, each decided on its own
    # An erased sample changes in one rectangle, with normal noise (mode pixel) in place of the image there.
    first = int(changed.nonzero()[0])
    mask = (erased[first] != plain[first]).any(0)
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float().mean() > 0.99


def test_build_loader_pipelines_agree_and_workers_match_in_process(photos):
    fast = build_loader(config(photos, "EVAL_MODE", "True"))
    upstream = build_loader(config(photos, "DATA.PIPELINE", "upstream", "EVAL_MODE", "True"))
    with_workers = build_loader(config(photos, "EVAL_MODE", "True", "DATA.NUM_WORKERS", "2"))
    assert fast.num_workers == 0 and with_workers.num_workers == 2
    a, b, c = (torch.cat([x for x, _ in d.val]) for d in (fast, upstream, with_workers))
    assert a.shape == b.shape == (16, 3, 224, 224) and a.is_contiguous(memory_format=torch.channels_last)
    assert ((a - b).abs() * 0.225 * 255).round().max() <= 2
    assert torch.equal(a, c)  # worker processes (shared-memory batches) give the same batches


def test_fast_training_batches_through_build_loader(photos, tmp_path):
    data = build_loader(config(photos, "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"))
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert data.train.erasing is not None  # AUG.REPROB 0.25 by default: erasing moved to the device loader
    low, high = (0 - max(MEAN)) / min(STD), (1 - min(MEAN)) / min(STD)
    inside = (x >= low - 1e-6) & (x <= high + 1e-6)
    assert inside.float().mean() > 0.9  # normalised pixels (erased patches hold normal noise, which may exceed)


# ----------------------------------------------------------------------------------------------- workers


class NumpyDraws(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.tensor(np.random.randint(0, 2**31))


def test_workers_draw_distinct_reproducible_numpy_streams():
    """timm's RandAugment picks its ops with NumPy: torch's DataLoader must seed NumPy per worker from the main
    generator (which checkpoints restore), or workers would repeat each other's ops or resume would drift."""

    def draws(seed: int) -> list[int]:
        torch.manual_seed(seed)
        return [int(x) for x in DataLoader(NumpyDraws(), batch_size=None, num_workers=2)]

    first = draws(0)
    assert len(set(first)) == 4 and draws(0) == first and draws(1) != first


def test_num_workers_auto_and_numbers():
    assert resolve_num_workers("auto", local_processes=1, cores=16) == 15
    assert resolve_num_workers("auto", local_processes=8, cores=16) == 1
    assert resolve_num_workers("auto", local_processes=4, cores=2) == 0
    assert resolve_num_workers("AUTO", local_processes=2, cores=16) == 7
    assert resolve_num_workers("3") == 3 and resolve_num_workers(0) == 0
    for bad in ("-1", "many", "2.5"):
        with pytest.raises(ConfigError, match=rf"DATA.NUM_WORKERS '{bad}' must be 'auto' or a number"):
            resolve_num_workers(bad)
    assert load_config().DATA.NUM_WORKERS == "auto"
    assert load_config(None, ["DATA.NUM_WORKERS", "4"]).DATA.NUM_WORKERS == "4"
    digits = load_config(str(FIXTURES.parent.parent / "configs" / "digits.yaml"))
    assert resolve_num_workers(digits.DATA.NUM_WORKERS) == 2  # a YAML number is read as the number


def test_bad_pipeline_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="DATA.PIPELINE 'turbo' must be one of fast, upstream"):
        build_loader(config(tmp_path, "DATA.PIPELINE", "turbo"))


# ----------------------------------------------------------------------------------------------- high bit depths


def high_bit_depth_files(tmp_path: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """16-bit PNG and float TIFF gradients, each with the 8-bit grey image it stands for (computed here by hand)."""
    ramp = np.linspace(0, 1, 48 * 64).reshape(48, 64)
    files = {
        "png16": (Image.fromarray(np.rint(ramp * 65535).astype(np.uint16)), "png", np.rint(ramp * 65535) * 255 / 65535),
        "tiff01": (Image.fromarray(ramp.astype(np.float32)), "tiff", ramp.astype(np.float32) * 255.0),
        "tiff255": (Image.fromarray((ramp * 255).astype(np.float32)), "tiff", (ramp * 255).astype(np.float32)),
    }
    out = {}
    for name, (image, ext, grey) in files.items():
        path = tmp_path / f"{name}.{ext}"
        image.save(path)
        out[name] = (path, np.rint(grey).astype(np.uint8))
    return out


def test_high_bit_depth_images_keep_their_range_in_both_pipelines(tmp_path):
    from data import load_rgb_image

    for name, (path, grey) in high_bit_depth_files(tmp_path).items():
        expected = np.repeat(grey[:, :, None], 3, axis=2)
        assert np.array_equal(np.asarray(load_rgb_image(path)), expected), name  # upstream pipeline
        assert np.array_equal(decode_uint8(read_encoded(path)).permute(1, 2, 0).numpy(), expected), name  # fast
        assert 100 < expected.mean() < 155  # a mid-grey ramp, not all white (PIL's clip) or all black
    for values, why in ((np.full((8, 8), 300.0), r"\[300, 300\], neither \[0, 1\] nor \[0, 255\]"),
                        (np.full((8, 8), np.nan), "not finite")):  # fmt: skip
        path = tmp_path / "odd.tiff"
        Image.fromarray(values.astype(np.float32)).save(path)
        for read in (load_rgb_image, lambda p: decode_uint8(read_encoded(p))):
            with pytest.raises(DataError, match=rf"cannot read image {path}: .*{why}.*convert it to 8-bit"):
                read(path)


def test_predict_on_a_16_bit_png_equals_its_8_bit_twin(tmp_path, capsys):
    import json

    import predict

    path, grey = high_bit_depth_files(tmp_path)["png16"]
    twin = tmp_path / "png8.png"
    Image.fromarray(grey).convert("RGB").save(twin)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": build("tiny", "DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", "5").state_dict()}, ckpt)
    args = ["--cfg", "configs/tiny.yaml", "--resume", str(ckpt), str(path), str(twin), "--json", "--topk", "5"]
    assert predict.main([*args, "--opts", "DATA.IMG_SIZE", "32"]) == 0
    first, second = json.loads(capsys.readouterr().out)["images"]
    assert [p["class"] for p in first["predictions"]] == [p["class"] for p in second["predictions"]]
    probs = [p["prob"] for p in second["predictions"]]
    assert [p["prob"] for p in first["predictions"]] == pytest.approx(probs, abs=1e-6)  # two rows of one batch
