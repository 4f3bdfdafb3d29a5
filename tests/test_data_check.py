"""Unreadable images found before a run needs them: the validation split before training, --check-data for all."""

from __future__ import annotations

import io

import pytest
from PIL import Image

import main
from data.build import build_image_folder
from data.check import check_image, check_images
from data.images import load_rgb_image
from data.zip_dataset import ZipImageDataset, parse_map_file
from tests.helpers import log_of, main_args, write_image_folder, write_zip_dataset


def _folder_with_problems(root):
    """Six images: fine, cut short, garbage, fine with bytes after the JPEG end marker, a PNG cut short, fine PNG."""
    data = write_image_folder(root, classes=("a",), n_train=1, n_val=4)
    val = data / "val" / "a"
    whole = (val / "0.jpg").read_bytes()
    (val / "1.jpg").write_bytes(whole[: len(whole) // 2])
    (val / "2.jpg").write_bytes(b"not an image at all")
    (val / "3.jpg").write_bytes(whole + b"\x00" * 100)  # decoders accept trailing bytes: not a problem
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(png, format="PNG")
    (val / "4.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (val / "5.png").write_bytes(png.getvalue())
    return data


@pytest.mark.parametrize("full", [False, True])
def test_the_check_names_exactly_the_unreadable_files(tmp_path, full):
    data = _folder_with_problems(tmp_path / "data")
    dataset = build_image_folder(data, "val", None, load_rgb_image)
    names = [path.rsplit("/", 1)[1] for path, _ in dataset.samples]
    verdicts = {name: check_image(dataset, i, full) for i, name in enumerate(names)}
    assert {name for name, problem in verdicts.items() if problem} == {"1.jpg", "2.jpg", "4.png"}
    assert all(f"cannot read image {data / 'val' / 'a' / name}" in verdicts[name] for name in ("1.jpg", "2.jpg"))
    # The same verdicts as actually loading every image (the independent truth).
    for i, name in enumerate(names):
        try:
            load_rgb_image(dataset.samples[i][0]).load()
            readable = True
        except Exception:
            readable = False
        assert readable == (verdicts[name] is None), name
    assert check_images(dataset, range(len(names)), full)[0] == 6


def test_zip_members_are_checked_too(tmp_path):
    data = _folder_with_problems(tmp_path / "data")
    root = write_zip_dataset(data, tmp_path / "zips")
    dataset = ZipImageDataset(root / "val.zip", root / "val_map.txt", None, "no")
    members = [member for member, _ in parse_map_file(root / "val_map.txt")]
    bad = {members[i] for i, _ in enumerate(members) if check_image(dataset, i, full=False)}
    assert bad == {"a/1.jpg", "a/2.jpg", "a/4.png"}


def test_a_bad_validation_image_stops_training_before_the_first_step(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data")
    bad = data / "val" / "b" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "out"
    assert main.main([str(a) for a in main_args(data, out)[1:]]) == 2
    log = log_of(out)
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert (
        len(errors) == 1
        and f"1 of 9 validation images under {data} are unreadable: cannot read image {bad}" in errors[0]
    )
    assert "Train: [" not in log  # no epoch was spent first
    assert errors[0].count("remove or replace") == 1  # the fix is said once, after the files


def test_a_file_that_is_no_image_is_named_plainly(tmp_path):
    data = write_image_folder(tmp_path / "data")
    bad = data / "val" / "a" / "0.jpg"
    bad.write_text("not a picture")
    out = tmp_path / "out"
    assert main.main([str(a) for a in main_args(data, out)[1:]]) == 2
    errors = [line for line in log_of(out).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and f"cannot read image {bad}: not an image file PIL can identify;" in errors[0]
    assert "<_io" not in errors[0]  # PIL's own message names its file object, not the file


def test_check_data_reads_both_splits_and_leaves_the_training_files_alone(tmp_path):
    data = write_image_folder(tmp_path / "data")
    out = tmp_path / "out"
    assert main.main([str(a) for a in main_args(data, out, "--check-data")[1:]]) == 0
    log = log_of(out, mode="check")
    assert "validation split: 9 images checked (decoded" in log and "training split: 12 images checked" in log
    assert "every image of both splits is readable" in log
    assert not (out / "dfvt_tiny" / "t" / "log_rank0.txt").exists() and not list(out.rglob("ckpt_*.pth"))
    # A training image whose end is missing (its header reads fine): only a full read finds it.
    bad = data / "train" / "c" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])
    assert main.main([str(a) for a in main_args(data, out, "--check-data")[1:]]) == 2
    log = log_of(out, mode="check")
    assert f"training split: cannot read image {bad}" in log
    assert f"1 of 12 training images under {data} are unreadable: cannot read image {bad}" in log
