"""DATA.CLASS_MAP (which model output each class folder is), evaluation on a subset of a 1000-class model's classes
(logits restricted, as timm's ``--valid-labels``) and the ImageNet-ReaL figures of TEST.REAL_LABELS, each checked
against a computation by hand; the two-process run of main.py is ``slow``."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from config import load_config
from data import build_loader
from engine import Precision, validate
from errors import ConfigError, DataError
from models import build_model
from tests.helpers import (
    check,
    config_path,
    launcher,
    log_of,
    main_args,
    run,
    summaries,
    write_image_folder,
    write_zip_dataset,
)
from utils import DistEnv

# ImageNet-1k indices of a few synsets, written out here (not looked up by the code under test).
SYNSETS = {
    "n15075141": 999,  # toilet tissue
    "n02123045": 281,  # tabby cat
    "n01440764": 0,  # tench
    "n04591713": 907,  # wine bottle
    "n02099601": 207,  # golden retriever
    "n01443537": 1,  # goldfish
    "n01498041": 6,  # stingray
}
CPU = DistEnv(0, 1, 0, torch.device("cpu"))
FP32 = Precision(None, False)
REAL_LINE = re.compile(r"\* ReaL@1 (\d+\.\d{3}) ReaL@5 (\d+\.\d{3})")


def cfg(root: Path, *opts: str, dataset: str = "imagenet", eval_mode: bool = True):
    """A small config over ``root``, in EVAL_MODE unless told (batch 4, or 1 for training on a few images)."""
    batch = 4 if eval_mode else 1
    base = ["DATA.DATA_PATH", str(root), "DATA.DATASET", dataset, "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0"]
    base += ["DATA.BATCH_SIZE", str(batch), "EVAL_MODE", str(eval_mode), "AUG.MIXUP", "0.0", "AUG.CUTMIX", "0.0"]
    return load_config(config_path("tiny"), base + list(opts))


def folders(tmp_path: Path, classes, n_train: int = 1, n_val: int = 1, name: str = "data") -> Path:
    return write_image_folder(tmp_path / name, classes=classes, n_train=n_train, n_val=n_val, size=(36, 36))


def labels_by_folder(dataset) -> dict[str, set[int]]:
    """Folder name -> the labels its images got."""
    out: dict[str, set[int]] = {}
    for path, label in dataset.samples:
        out.setdefault(Path(path).parent.name, set()).add(label)
    return out


# ----------------------------------------------------------------------------------------------- CLASS_MAP


def test_auto_maps_synset_folders_to_their_imagenet_indices(tmp_path):
    names = ["n15075141", "n02123045", "n01440764"]  # not in index order, not consecutive
    root = folders(tmp_path, names)
    data = build_loader(cfg(root))
    info = data.info
    assert info.num_classes == 1000  # MODEL.NUM_CLASSES, not the 3 folders
    assert info.class_names == ("n01440764", "n02123045", "n15075141") and info.class_indices == (0, 281, 999)
    assert labels_by_folder(data.val.dataset) == {name: {SYNSETS[name]} for name in names}
    assert sorted(torch.cat([y for _, y in data.val]).tolist()) == [0, 281, 999]

    # Training needs every class of DATA.DATASET imagenet; DATA.DATASET folder trains on these (counted).
    with pytest.raises(DataError, match="holds 3 of the 1000 classes.*--opts DATA.DATASET folder"):
        build_loader(cfg(root, eval_mode=False))
    counted = build_loader(cfg(root, dataset="folder", eval_mode=False))
    assert counted.info.num_classes == 3 and counted.info.class_indices is None
    expected = {"n01440764": {0}, "n02123045": {1}, "n15075141": {2}}  # in ImageNet order
    assert labels_by_folder(counted.train.dataset) == labels_by_folder(counted.val.dataset) == expected


def test_digit_folders_are_imagenet_v2_indices(tmp_path):
    root = folders(tmp_path, ["0", "2", "10", "999"])
    data = build_loader(cfg(root))
    assert data.info.num_classes == 1000 and data.info.class_indices == (0, 2, 10, 999)
    assert labels_by_folder(data.val.dataset) == {name: {int(name)} for name in ("0", "2", "10", "999")}

    # All of 0..n-1 (here 12 classes, "10" sorting before "2" as text): output i is folder "i", train and val.
    names = [str(i) for i in range(12)]
    full = build_loader(cfg(folders(tmp_path, names, name="v2"), dataset="folder", eval_mode=False))
    assert full.info.num_classes == 12 and full.info.class_names == tuple(names) and full.info.class_indices is None
    expected = {name: {int(name)} for name in names}
    assert labels_by_folder(full.train.dataset) == labels_by_folder(full.val.dataset) == expected

    # DATA.CLASS_MAP sorted: ImageFolder's text order.
    plain = build_loader(cfg(tmp_path / "v2", "DATA.CLASS_MAP", "sorted", dataset="folder"))
    text_order = sorted(names)
    assert labels_by_folder(plain.val.dataset) == {name: {text_order.index(name)} for name in names}
    assert plain.info.class_names == tuple(text_order)


def test_class_map_file(tmp_path):
    root = folders(tmp_path, ["cat", "dog", "zebra"])
    mapping = tmp_path / "classes.txt"
    mapping.write_text("zebra\nbird\n  cat \ndog\n\n")  # line i is class i; surrounding spaces and final blanks go
    imagenet = build_loader(cfg(root, "DATA.CLASS_MAP", str(mapping)))
    assert imagenet.info.num_classes == 1000 and imagenet.info.class_indices == (0, 2, 3)
    assert labels_by_folder(imagenet.val.dataset) == {"zebra": {0}, "cat": {2}, "dog": {3}}
    counted = build_loader(cfg(root, "DATA.CLASS_MAP", str(mapping), dataset="folder", eval_mode=False))
    assert counted.info.num_classes == 3 and counted.info.class_names == ("zebra", "cat", "dog")
    assert labels_by_folder(counted.train.dataset) == {"zebra": {0}, "cat": {1}, "dog": {2}}

    mapping.write_text("zebra\ncat\n")
    with pytest.raises(DataError) as err:
        build_loader(cfg(root, "DATA.CLASS_MAP", str(mapping)))
    assert str(root / "val" / "dog") in str(err.value) and str(mapping) in str(err.value)
    mapping.write_text("zebra\n\ncat\ndog\n")
    with pytest.raises(DataError, match="line 2 is blank"):
        build_loader(cfg(root, "DATA.CLASS_MAP", str(mapping)))
    mapping.write_text("zebra\ncat\ndog\ncat\n")
    with pytest.raises(DataError, match="lists 'cat' twice"):
        build_loader(cfg(root, "DATA.CLASS_MAP", str(mapping)))
    with pytest.raises(ConfigError, match="nowhere.txt"):
        build_loader(cfg(root, "DATA.CLASS_MAP", str(tmp_path / "nowhere.txt")))


def test_custom_names_are_sorted_and_mixes_are_refused(tmp_path):
    root = folders(tmp_path, ["dogs", "cats"])
    data = build_loader(cfg(root, dataset="folder"))  # no synset, no number: auto is sorted
    assert data.info.num_classes == 2 and data.info.class_names == ("cats", "dogs")
    with pytest.raises(DataError) as err:  # ImageNet needs ImageNet classes
        build_loader(cfg(root))
    assert str(root / "val" / "cats") in str(err.value) and "DATA.DATASET folder" in str(err.value)

    for known in ("n01440764", "7"):
        mixed = folders(tmp_path, [known, "cats"], name=f"mixed{known}")
        for dataset in ("folder", "imagenet"):
            with pytest.raises(DataError) as err:
                build_loader(cfg(mixed, dataset=dataset))
            msg = str(err.value)
            assert str(mixed / "val" / "cats") in msg and known in msg and "\n" not in msg

    with pytest.raises(DataError, match="2 classes but DATA.DATASET imagenet expects MODEL.NUM_CLASSES 1000"):
        build_loader(cfg(root, "DATA.CLASS_MAP", "sorted"))


def test_class_map_is_for_folders_not_zip_maps(tmp_path):
    zips = write_zip_dataset(folders(tmp_path, ["a", "b"], n_train=2), tmp_path / "zips")
    with pytest.raises(ConfigError, match="DATA.CLASS_MAP 'sorted'.*zip"):
        build_loader(cfg(zips, "DATA.ZIP_MODE", "True", "DATA.CLASS_MAP", "sorted", dataset="folder"))


# ----------------------------------------------------------------------------------------------- subset evaluation


def model_outputs(model, loader) -> torch.Tensor:
    """The model's logits over the loader's images, batch by batch as the loader gives them."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x).float() for x, _ in loader])


def by_hand(logits: np.ndarray, targets: list[int]) -> tuple[float, float, float]:
    """Top-1, top-5 (%) and mean cross-entropy in float64 numpy (top-k capped at the class count)."""
    k = min(5, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")
    t = np.asarray(targets)
    top1 = 100.0 * np.mean(order[:, 0] == t)
    topk = 100.0 * np.mean([t[i] in order[i, :k] for i in range(len(t))])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return top1, topk, float(-np.mean(log_probs[np.arange(len(t)), t]))


@pytest.fixture(scope="module")
def model_1000():
    torch.manual_seed(0)
    return build_model(cfg(Path("."), dataset="imagenet")).eval()


def test_subset_evaluation_restricts_the_logits(tmp_path, model_1000, caplog):
    names = list(SYNSETS)  # 7 synsets: top-5 is not trivially 100 %
    root = folders(tmp_path, names, n_val=2)
    data = build_loader(cfg(root))
    assert data.info.class_indices == tuple(sorted(SYNSETS.values()))
    logger = logging.getLogger("test_class_map")
    with caplog.at_level(logging.INFO, logger="test_class_map"):
        got = validate(cfg(root), data.val, model_1000, 1000, FP32, CPU, logger, data.info.class_indices)
    assert "evaluating on 7 of 1000 classes (logits restricted)" in caplog.text

    kept = sorted(SYNSETS.values())
    logits = model_outputs(model_1000, data.val).double().numpy()[:, kept]
    targets = [kept.index(SYNSETS[Path(p).parent.name]) for p, _ in data.val.dataset.samples]
    acc1, acc5, loss = by_hand(logits, targets)
    assert got.acc1 == pytest.approx(acc1, abs=1e-9) and got.acc5 == pytest.approx(acc5, abs=1e-9)
    assert got.loss == pytest.approx(loss, rel=1e-5) and got.real1 is None
    assert acc5 < 100.0 or acc1 < acc5  # the figures say something


def test_subset_of_fewer_than_five_classes_caps_top_k_at_their_count(tmp_path, model_1000, caplog):
    """3 of the 1000 classes: top-5 over the restricted logits is top-3 (every image's class is among them, 100 %),
    not a topk(5) of 3 columns; top-1 and the loss are those of the 3 restricted logits."""
    names = ["n01440764", "n02123045", "n15075141"]  # outputs 0, 281, 999
    root = folders(tmp_path, names, n_val=2)
    data = build_loader(cfg(root))
    kept = [SYNSETS[name] for name in names]
    assert data.info.class_indices == tuple(kept)
    logger = logging.getLogger("test_class_map")
    with caplog.at_level(logging.INFO, logger="test_class_map"):
        got = validate(cfg(root), data.val, model_1000, 1000, FP32, CPU, logger, data.info.class_indices)
    assert "evaluating on 3 of 1000 classes (logits restricted)" in caplog.text
    assert "Acc@5 100.000" in caplog.text and got.acc5 == 100.0

    logits = model_outputs(model_1000, data.val).double().numpy()
    targets = [kept.index(SYNSETS[Path(p).parent.name]) for p, _ in data.val.dataset.samples]
    acc1, acc5, loss = by_hand(logits[:, kept], targets)
    assert got.acc1 == pytest.approx(acc1, abs=1e-9) and acc5 == 100.0
    assert got.loss == pytest.approx(loss, rel=1e-5)
    full = np.argsort(-logits, axis=1, kind="stable")[:, :5]  # the unrestricted top-5 of 1000 outputs
    assert np.mean([kept[t] in row for t, row in zip(targets, full, strict=True)]) < 1.0  # the cap, not luck


# ----------------------------------------------------------------------------------------------- ReaL labels


def write_real_data(tmp_path: Path, names: list[str], n_val: int = 3, name: str = "real") -> tuple[Path, list[int]]:
    """An image folder whose validation images are named ``ILSVRC2012_val_000000NN.JPEG``; the numbers, in the
    dataset's order (folder, then file name), are returned."""
    root = folders(tmp_path, names, n_val=n_val, name=name)
    numbers = iter([7, 2, 11, 5, 1, 14, 9, 3, 12, 4, 8, 6, 13, 10, 15, 16, 17, 18, 19, 20, 21])
    for folder in sorted((root / "val").iterdir()):
        for image in sorted(folder.iterdir()):
            image.rename(folder / f"ILSVRC2012_val_{next(numbers):08d}.JPEG")
    dataset_order = []
    for folder in sorted((root / "val").iterdir()):
        dataset_order += [int(p.stem.split("_")[-1]) for p in sorted(folder.iterdir())]
    return root, dataset_order


def real_lists(ranked: list[list[int]], numbers: list[int], size: int) -> list[list[int]]:
    """A ReaL file of ``size`` entries for images ``numbers`` whose predictions (ImageNet indices, best first) are
    ``ranked``: a mix of top-1 hits, top-5-only hits, misses (some with classes outside the data), empty lists."""
    entries: list[list[int]] = [[] for _ in range(size)]
    for i, (number, ranks) in enumerate(zip(numbers, ranked, strict=True)):
        kind = i % 5
        if kind == 0:
            entries[number - 1] = [ranks[0], 500]
        elif kind == 1:
            entries[number - 1] = [ranks[min(3, len(ranks) - 1)]]
        elif kind == 2:
            entries[number - 1] = [ranks[-1], 998]
        elif kind == 3:
            entries[number - 1] = []
        else:
            entries[number - 1] = [ranks[1], ranks[0]]
    return entries


def real_by_hand(ranked: list[list[int]], numbers: list[int], entries: list[list[int]]) -> tuple[float, float]:
    right1 = right5 = counted = 0
    for number, ranks in zip(numbers, ranked, strict=True):
        labels = entries[number - 1]
        if labels:
            counted += 1
            right1 += ranks[0] in labels
            right5 += any(r in labels for r in ranks[:5])
    return 100.0 * right1 / counted, 100.0 * right5 / counted


@pytest.mark.parametrize("dataset", ["imagenet", "folder"])
def test_real_figures_by_hand(tmp_path, model_1000, dataset, caplog):
    names = ["n02123045", "n01440764", "n15075141", "n04591713", "n02099601", "n01443537"]
    root, numbers = write_real_data(tmp_path, names)
    kept = sorted(SYNSETS[n] for n in names)  # the outputs' ImageNet indices: restricted (imagenet) or counted
    if dataset == "imagenet":
        model = model_1000
    else:
        torch.manual_seed(1)
        model = build_model(cfg(root), len(names)).eval()
    plain = build_loader(cfg(root, dataset=dataset))
    logits = model_outputs(model, plain.val).double().numpy()
    if dataset == "imagenet":
        logits = logits[:, kept]
    ranked = [[kept[j] for j in np.argsort(-row, kind="stable")] for row in logits]
    entries = real_lists(ranked, numbers, size=25)
    real = tmp_path / "real.json"
    real.write_text(json.dumps(entries))

    config = cfg(root, "TEST.REAL_LABELS", str(real), dataset=dataset)
    data = build_loader(config)
    logger = logging.getLogger("test_class_map")
    with caplog.at_level(logging.INFO, logger="test_class_map"):
        info = data.info
        got = validate(
            config, data.val, model, info.num_classes, FP32, CPU, logger, info.class_indices, data.real_labels
        )
    real1, real5 = real_by_hand(ranked, numbers, entries)
    assert (got.real1, got.real5) == (pytest.approx(real1, abs=1e-9), pytest.approx(real5, abs=1e-9))
    assert 0 < real1 < real5 < 100  # hits at 1, hits only in the top 5, misses
    lines = caplog.text.splitlines()
    acc_at = next(i for i, line in enumerate(lines) if "* Acc@1" in line)
    assert REAL_LINE.search(lines[acc_at + 1]).groups() == (f"{real1:.3f}", f"{real5:.3f}")
    assert "ReaL: 15 of 18 images have ReaL labels" in caplog.text


def test_real_file_errors(tmp_path):
    root, _ = write_real_data(tmp_path, ["n02123045", "n01440764"], n_val=2)
    real = tmp_path / "real.json"

    def fails(*fragments: str, dataset: str = "imagenet", data: Path = root, path: Path = real) -> None:
        with pytest.raises(DataError) as err:
            build_loader(cfg(data, "TEST.REAL_LABELS", str(path), dataset=dataset))
        msg = str(err.value)
        assert "\n" not in msg and all(f in msg for f in fragments), msg

    real.write_text("[[1], [2], ")  # truncated
    fails(str(real), "not valid JSON")
    real.write_text(json.dumps([[1]] * 5 + [{"label": 3}]))
    fails(str(real), "entry 5")
    real.write_text(json.dumps([[1], [1000]]))
    fails("entry 1", "0..999")
    fails(str(tmp_path / "none.json"), "does not exist", path=tmp_path / "none.json")
    real.write_text(json.dumps([[5]] * 6))  # images are numbered up to 7
    fails("number 7", "beyond the 6 entries", str(real))
    real.write_text(json.dumps([[]] * 30))
    fails("none of the 4 validation images has ReaL labels")

    real.write_text(json.dumps([[5]] * 30))
    odd = next((root / "val" / "n01440764").iterdir())
    odd.rename(odd.with_name("holiday.jpg"))
    fails(str(odd.with_name("holiday.jpg")), "ILSVRC2012_val_XXXXXXXX")

    custom, _ = write_real_data(tmp_path, ["cats", "dogs"], n_val=2, name="custom")
    fails("no class folder is one", dataset="folder", data=custom)
    # Only evaluation reads the file: training ignores it.
    assert (
        build_loader(cfg(custom, "TEST.REAL_LABELS", str(real), dataset="folder", eval_mode=False)).real_labels is None
    )


# ----------------------------------------------------------------------------------------------- main.py


@pytest.mark.slow
def test_main_real_line_is_the_same_in_one_and_two_processes(tmp_path, model_1000):
    """11 validation images of 4 synsets (6 + 5 over two ranks, batch 2): the Acc and ReaL lines of --eval agree."""
    names = ["n02123045", "n01440764", "n15075141", "n04591713"]
    root, numbers = write_real_data(tmp_path, names)
    removed = sorted((root / "val" / "n15075141").iterdir())[0]
    numbers.remove(int(removed.stem.split("_")[-1]))
    removed.unlink()
    kept = sorted(SYNSETS[n] for n in names)
    logits = model_outputs(model_1000, build_loader(cfg(root)).val).double().numpy()[:, kept]
    ranked = [[kept[j] for j in np.argsort(-row, kind="stable")] for row in logits]
    entries = real_lists(ranked, numbers, size=20)
    real = tmp_path / "real.json"
    real.write_text(json.dumps(entries))
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model_1000.state_dict()}, ckpt)

    flags = ("--eval", "--resume", str(ckpt))
    opts = ("DATA.DATASET", "imagenet", "TEST.REAL_LABELS", str(real))
    one = check(run([sys.executable, *main_args(root, tmp_path / "one", *flags, batch=2, opts=opts)])).stdout
    check(run(launcher("torch.distributed.run") + main_args(root, tmp_path / "two", *flags, batch=2, opts=opts)))
    two = log_of(tmp_path / "two", mode="eval")
    assert "rank 1/2" in log_of(tmp_path / "two", 1, mode="eval")
    assert len(summaries(one)) == 1 and summaries(two) == summaries(one)
    expected = tuple(f"{v:.3f}" for v in real_by_hand(ranked, numbers, entries))
    assert REAL_LINE.findall(two) == REAL_LINE.findall(one) == [expected]
    assert "evaluating on 4 of 1000 classes (logits restricted)" in one
