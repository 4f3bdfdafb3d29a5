"""Which model output each class folder is (``DATA.CLASS_MAP``), and the ImageNet-ReaL labels of the validation
images (``TEST.REAL_LABELS``), both as timm's ``validate.py`` reads them.

``DATA.CLASS_MAP`` gives every folder a class index: ``auto`` maps ImageNet-1k synsets (``n01440764``) to their
ImageNet index and folders named ``0`` .. ``999`` (the ImageNet-V2 layout) to that index, and sorts other names;
``sorted`` is torchvision's ImageFolder order; any other value is a text file with one folder name per line (line
``i``, counted from 0, is class ``i``). :func:`class_layout` then decides the model's outputs from it:

- ``DATA.DATASET imagenet``: the model has ``MODEL.NUM_CLASSES`` outputs (ImageNet's classes) and each folder's label
  is its class index. Folders holding only some of them (ImageNet-A/R: 200 synsets) are evaluated on those outputs
  only (:attr:`ClassLayout.class_indices`); training needs every class.
- ``folder`` and ``digits``: one output per folder (the classes are counted), numbered in the order of their class
  indices, so the map only orders them.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from yacs.config import CfgNode

from errors import ConfigError, DataError

IMAGENET_CLASSES = 1000
REAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[^./\\]+")
REAL_HINT = "a JSON list whose entry i lists the labels of ILSVRC2012_val_{i+1:08d}.JPEG, as the ReaL real.json"


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The ImageNet-1k synsets in class-index order (timm's copy, shipped with timm: nothing is downloaded)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


@functools.cache
def _synset_index() -> dict[str, int]:
    return {synset: i for i, synset in enumerate(imagenet_synsets())}


def imagenet_index(name: str) -> int | None:
    """The ImageNet-1k index a folder name stands for: a synset's index, or the number of a folder named ``0`` ..
    ``999`` (written without leading zeros, as ImageNet-V2 names them); None for any other name."""
    if name.isascii() and name.isdigit() and name == str(int(name)) and int(name) < IMAGENET_CLASSES:
        return int(name)
    return _synset_index().get(name)


def _read_map_file(path: Path) -> dict[str, int]:
    """Folder name -> line index (from 0) of a class-map file; blank lines are allowed only at its end."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"class map {path} is not UTF-8 text ({e}); write one folder name per line.") from e
    while lines and not lines[-1].strip():
        lines.pop()
    names: dict[str, int] = {}
    for index, line in enumerate(lines):
        name = line.strip()
        if not name:
            raise DataError(
                f"class map {path} line {index + 1} is blank; each line names one class folder (line i, from 0, is "
                f"class index i), so a blank line would shift the classes after it."
            )
        if name in names:
            raise DataError(f"class map {path} lists {name!r} twice (lines {names[name] + 1} and {index + 1}).")
        names[name] = index
    if not names:
        raise DataError(f"class map {path} is empty; write one class folder name per line (line i is class i).")
    return names


def resolve_class_map(spec: str, folders: Sequence[str], split_dir: Path, dataset: str) -> dict[str, int]:
    """Class index of each folder of ``split_dir`` by ``DATA.CLASS_MAP`` ``spec`` (see the module docstring).

    With ``auto``, folders that are all ImageNet classes (synsets or ``0`` .. ``999``) get their ImageNet index and
    folders that are none of them are sorted (except for ``DATA.DATASET imagenet``, which needs ImageNet classes);
    a mix is a :class:`DataError` naming a folder. A map file that does not list a folder is one too.
    """
    text = str(spec).strip()
    if text == "sorted":
        return {name: i for i, name in enumerate(sorted(folders))}
    if text == "auto":
        known = {name: imagenet_index(name) for name in folders}
        unknown = [name for name in folders if known[name] is None]
        if len(unknown) == len(folders) and dataset != "imagenet":
            return {name: i for i, name in enumerate(sorted(folders))}
        if unknown:
            if len(unknown) < len(folders):
                other = next(name for name in folders if known[name] is not None)
                raise DataError(
                    f"class folder {split_dir / unknown[0]} is neither an ImageNet-1k synset (like n01440764) nor a "
                    f"class index 0..999, while {other!r} is one: DATA.CLASS_MAP auto needs the folders to be all "
                    f"ImageNet classes or none; pass DATA.CLASS_MAP sorted or a class-map file (one folder per line)."
                )
            raise DataError(
                f"class folder {split_dir / unknown[0]} is neither an ImageNet-1k synset (like n01440764) nor a "
                f"class index 0..999, as DATA.DATASET imagenet needs (1000 classes); for another dataset pass "
                f"--opts DATA.DATASET folder (its {len(folders)} classes are counted), or map the names with "
                f"DATA.CLASS_MAP path/to/classes.txt."
            )
        seen: dict[int, str] = {}
        for name in sorted(folders):
            index = known[name]
            if index in seen:
                raise DataError(
                    f"class folders {split_dir / seen[index]} and {split_dir / name} are both ImageNet class {index}; "
                    f"keep one of them."
                )
            seen[index] = name
        return known
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"DATA.CLASS_MAP {spec!r} is neither auto, sorted nor an existing file (one class folder name per line, "
            f"line i is class i)."
        )
    names = _read_map_file(path)
    for name in sorted(folders):
        if name not in names:
            raise DataError(
                f"class folder {split_dir / name} is not listed in the class map {path} ({len(names)} names); add it "
                f"as a line (line i, from 0, is class i) or remove the folder."
            )
    return {name: names[name] for name in folders}


@dataclass(frozen=True)
class ClassLayout:
    """The model's outputs for a dataset.

    Args:
        num_classes: the model's outputs.
        class_names: the class folders, ordered by the output they are (None in zip mode: labels only).
        class_indices: the output of each of ``class_names`` when the folders hold only some of the outputs (their
            logits are then the only ones evaluated); None when folder ``i`` is output ``i`` for every output.
        labels: the label (output index) of each folder, for the dataset (None in zip mode).
        imagenet_indices: the ImageNet-1k index of each output (None: output ``i`` is ImageNet class ``i``), for the
            ReaL labels; an entry is None where the folder is not an ImageNet class.
    """

    num_classes: int
    class_names: tuple[str, ...] | None
    class_indices: tuple[int, ...] | None
    labels: dict[str, int] | None
    imagenet_indices: tuple[int | None, ...] | None


def class_layout(config: CfgNode, folders: Sequence[str], split_dir: Path) -> ClassLayout:
    """The model's outputs for the class ``folders`` of ``split_dir`` under ``DATA.CLASS_MAP`` and ``DATA.DATASET``
    (see the module docstring); unusable folders raise :class:`DataError`."""
    dataset, spec = config.DATA.DATASET, str(config.DATA.CLASS_MAP).strip()
    mapping = resolve_class_map(spec, folders, split_dir, dataset)
    ordered = tuple(sorted(folders, key=lambda name: (mapping[name], name)))
    if dataset != "imagenet":
        labels = {name: i for i, name in enumerate(ordered)}
        imagenet = tuple(imagenet_index(name) for name in ordered)
        return ClassLayout(len(ordered), ordered, None, labels, imagenet)
    head = config.MODEL.NUM_CLASSES
    root = split_dir.parent
    if spec == "sorted" and len(folders) != head:
        raise DataError(
            f"{root} has {len(folders)} classes but DATA.DATASET imagenet expects MODEL.NUM_CLASSES {head}; for "
            f"another dataset pass --opts DATA.DATASET folder (classes are counted)."
        )
    for name in ordered:
        if mapping[name] >= head:
            raise DataError(
                f"class folder {split_dir / name} is class {mapping[name]} by DATA.CLASS_MAP {spec}, beyond the "
                f"MODEL.NUM_CLASSES {head} outputs of DATA.DATASET imagenet; fix the class map or MODEL.NUM_CLASSES."
            )
    indices = tuple(mapping[name] for name in ordered)
    full = indices == tuple(range(head))
    if not full and not config.EVAL_MODE:
        raise DataError(
            f"{root} holds {len(indices)} of the {head} classes of DATA.DATASET imagenet; training needs every class "
            f"(evaluating a subset works with --eval). To train a {len(indices)}-class model on these folders pass "
            f"--opts DATA.DATASET folder."
        )
    return ClassLayout(head, ordered, None if full else indices, mapping, None)


# ----------------------------------------------------------------------------------------------- ReaL labels


@dataclass(frozen=True)
class RealLabels:
    """The ImageNet-ReaL labels of each validation image, as model outputs.

    Args:
        path: the ReaL file.
        labels: ``N × L`` int64, row ``i`` the outputs that are a right answer for image ``i`` of the validation
            dataset, padded with -1 (ReaL labels that are no output of the model are left out: never predicted).
        counted: ``N`` bool, whether image ``i`` counts (its ReaL list is not empty).
    """

    path: Path
    labels: torch.Tensor
    counted: torch.Tensor


def _read_real_file(path: Path) -> list[list[int]]:
    if not path.is_file():
        raise DataError(f"TEST.REAL_LABELS {path} does not exist; pass the ReaL labels file ({REAL_HINT}).")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"TEST.REAL_LABELS {path} is not valid JSON ({e}); expected {REAL_HINT}.") from e
    if not isinstance(entries, list) or not entries:
        raise DataError(f"TEST.REAL_LABELS {path} holds no list of labels; expected {REAL_HINT}.")
    for i, entry in enumerate(entries):
        ok = isinstance(entry, list) and all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < IMAGENET_CLASSES for x in entry
        )
        if not ok:
            raise DataError(
                f"TEST.REAL_LABELS {path} entry {i} is {str(entry)[:80]}, not a list of class indices 0..999; "
                f"expected {REAL_HINT}."
            )
    return entries


def load_real_labels(
    path: str | Path, sample_paths: Sequence[str], imagenet_indices: Sequence[int | None] | None, num_classes: int
) -> RealLabels:
    """The ReaL labels of the validation images ``sample_paths`` (dataset order; file names
    ``ILSVRC2012_val_XXXXXXXX.<ext>``), translated to model outputs by ``imagenet_indices`` (the ImageNet index of
    each output; None: output ``i`` is ImageNet class ``i``). Raises :class:`DataError` for an unreadable file, an
    image not named as an ImageNet validation image or beyond the file, or no image with labels."""
    path = Path(path).expanduser()
    entries = _read_real_file(path)
    if imagenet_indices is None:
        to_output = {i: i for i in range(min(num_classes, IMAGENET_CLASSES))}
    else:
        to_output = {index: out for out, index in enumerate(imagenet_indices) if index is not None}
        if not to_output:
            raise DataError(
                f"TEST.REAL_LABELS {path} labels ImageNet-1k classes, but no class folder is one (a synset like "
                f"n01440764 or 0..999); drop TEST.REAL_LABELS for other data."
            )
    rows: list[list[int]] = []
    counted: list[bool] = []
    for sample in sample_paths:
        name = Path(sample).name
        match = REAL_NAME.fullmatch(name)
        if not match:
            raise DataError(
                f"validation image {sample} is not named ILSVRC2012_val_XXXXXXXX.<ext>: TEST.REAL_LABELS {path} labels "
                f"the ImageNet-1k validation images by file name; drop TEST.REAL_LABELS for other data."
            )
        number = int(match.group(1))
        if not 1 <= number <= len(entries):
            raise DataError(
                f"validation image {sample} is number {number}, beyond the {len(entries)} entries of "
                f"TEST.REAL_LABELS {path}; use the real.json of the ImageNet-1k validation set."
            )
        labels = entries[number - 1]
        rows.append(sorted({to_output[x] for x in labels if x in to_output}))
        counted.append(bool(labels))
    if not any(counted):
        raise DataError(
            f"none of the {len(counted)} validation images has ReaL labels in TEST.REAL_LABELS {path} (all their "
            f"lists are empty), so ReaL accuracy is undefined; check the file and the images."
        )
    width = max(1, max(len(row) for row in rows))
    table = torch.full((len(rows), width), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return RealLabels(path, table, torch.tensor(counted, dtype=torch.bool))
