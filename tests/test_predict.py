"""predict.py: JPEG/PNG files and a nested folder with a corrupt file, text and JSON output checked against an
independent forward pass, class names, and the errors a user meets. The tests call ``predict.main`` in this process
(the command line without an interpreter start); one runs ``python predict.py`` as a user would."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import ImageNetInfo

import predict as predict_script
from config import load_config
from data import build_transform
from models import build_model
from tests.helpers import ROOT, call_script, run, upstream_checkpoint

OPTS = ["--opts", "DATA.IMG_SIZE", "32"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREDICTION = re.compile(r"^  +(\d+\.\d{2})%  class (\d+)(?:: (.+))?$")


def write_image(path: Path, seed: int) -> Path:
    """A smooth random colour field (so different files get different predictions), saved as JPEG or PNG."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
    h, w = 40 + seed, 48
    y, x = np.linspace(0, 1, h)[:, None, None], np.linspace(0, 1, w)[None, :, None]
    pixels = (corners[0, 0] * (1 - y) * (1 - x) + corners[0, 1] * (1 - y) * x) + (
        corners[1, 0] * y * (1 - x) + corners[1, 1] * y * x
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def tiny_model(num_classes: int = 1000) -> torch.nn.Module:
    torch.manual_seed(0)
    config = load_config(
        str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32", "MODEL.NUM_CLASSES", str(num_classes)]
    )
    model = build_model(config)
    with torch.no_grad():
        model.head.weight.mul_(20)  # spread the logits so that the ranking is decisive
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A seeded 1000-class checkpoint; two loose images and a nested folder with a corrupt JPEG and a text file."""
    root = tmp_path_factory.mktemp("predict")
    model = tiny_model()
    ckpt = root / "dfvt_tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 299}, ckpt)
    loose = [write_image(root / "a.jpg", 1), write_image(root / "b.png", 2)]
    folder = root / "photos"
    nested = [write_image(folder / "trip" / "day2" / "y.PNG", 4), write_image(folder / "x.jpg", 3)]  # sorted path order
    corrupt = folder / "trip" / "broken.jpg"
    corrupt.write_bytes(loose[0].read_bytes()[:300])  # a truncated JPEG
    (folder / "trip" / "notes.txt").write_text("not an image")
    return {"root": root, "model": model.eval(), "ckpt": ckpt, "loose": loose, "nested": nested, "corrupt": corrupt}


def expected_probs(model: torch.nn.Module, path: Path) -> torch.Tensor:
    """The independent computation of the default (fast) eval pipeline, written out: PIL decode, antialiased bicubic
    resize of the uint8 pixels so the short side is 32 / 0.875 (the long side scaled and truncated, as torchvision
    does), centre crop 32, ``(x / 255 - mean) / std``, forward, softmax."""
    pixels = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    h, w = pixels.shape[1:]
    short = int(32 / 0.875)
    size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    resized = F.interpolate(pixels[None], size=size, mode="bicubic", antialias=True)[0]
    top, left = round((size[0] - 32) / 2), round((size[1] - 32) / 2)
    crop = resized[:, top : top + 32, left : left + 32].float() / 255
    image = (crop - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.no_grad():
        return model(image[None]).softmax(dim=-1)[0]


def upstream_probs(model: torch.nn.Module, path: Path) -> torch.Tensor:
    """The upstream pipeline's computation: PIL image, torchvision eval transform, forward, softmax."""
    config = load_config(str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32"])
    image = build_transform(False, config)(Image.open(path).convert("RGB"))
    with torch.no_grad():
        return model(image[None]).softmax(dim=-1)[0]


@pytest.fixture
def predict(capsys):
    """``predict(*args)``: run ``predict.main`` with the tiny config and ``args``; exit status and output."""
    return lambda *args: call_script(predict_script.main, capsys, *args)


def parse_text(stdout: str) -> dict[str, list[tuple[float, int, str]]]:
    """``{path: [(prob, class, name), ...]}`` from the text output (a nameless class prints as ``class <i>``)."""
    blocks: dict[str, list[tuple[float, int, str]]] = {}
    current = None
    for line in stdout.splitlines():
        match = PREDICTION.match(line)
        if match:
            index = int(match.group(2))
            name = match.group(3) if match.group(3) is not None else f"class {index}"
            blocks[current].append((float(match.group(1)) / 100, index, name))
        else:
            current = line
            blocks[current] = []
    return blocks


def test_text_output_for_files_and_a_nested_folder(setup, predict):
    proc = predict("--resume", setup["ckpt"], *setup["loose"], setup["root"] / "photos", *OPTS)
    assert proc.returncode == 0, proc.stderr
    # The corrupt file is reported once, by name, and skipped; the text file is not an image and is ignored.
    assert proc.stderr.count(str(setup["corrupt"])) == 1 and "skipped" in proc.stderr
    assert "notes.txt" not in proc.stdout + proc.stderr
    blocks = parse_text(proc.stdout)
    assert list(blocks) == [str(p) for p in setup["loose"] + setup["nested"]]
    names = ImageNetInfo()
    top1 = set()
    for path, rows in blocks.items():
        probs = [p for p, _, _ in rows]
        assert len(rows) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0
        expected = expected_probs(setup["model"], Path(path))
        assert [c for _, c, _ in rows] == expected.topk(5).indices.tolist()
        assert probs == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
        assert [n for _, _, n in rows] == [names.index_to_description(c) for _, c, _ in rows]
        top1.add(rows[0][1])
    assert len(top1) > 1  # the images are told apart, not one constant answer


def test_json_output_matches_and_batching_does_not_matter(setup, predict):
    proc = predict(
        "--resume", setup["ckpt"], *setup["loose"], setup["root"] / "photos", "--json", "--topk", "3",
        "--batch-size", "3", *OPTS,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [e["path"] for e in doc["errors"]] == [str(setup["corrupt"])]
    assert "cannot read image" in doc["errors"][0]["error"]
    assert [r["path"] for r in doc["images"]] == [str(p) for p in setup["loose"] + setup["nested"]]
    for result in doc["images"]:
        expected = expected_probs(setup["model"], Path(result["path"]))
        top = expected.topk(3)
        assert [p["class"] for p in result["predictions"]] == top.indices.tolist()
        # float32 rounding differs with the batch size and thread count (matrix products block differently); the
        # logits of the head scaled by 20 carry it into the probabilities: 1.1e-5 relative was seen, so the
        # project's float32 bound of 1e-4 applies.
        assert [p["prob"] for p in result["predictions"]] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-6)
        assert all(p["name"] == ImageNetInfo().index_to_description(p["class"]) for p in result["predictions"])


def test_custom_classes_upstream_file_and_class_names(setup, tmp_path, predict):
    model = tiny_model(num_classes=3)
    ckpt = tmp_path / "upstream_3.pth"
    torch.save(upstream_checkpoint(model), ckpt)
    image = setup["loose"][0]
    top = expected_probs(model.eval(), image).topk(3)
    plain = parse_text(predict("--resume", ckpt, image, *OPTS).stdout)[str(image)]
    assert [(c, n) for _, c, n in plain] == [(c, f"class {c}") for c in top.indices.tolist()]

    names_file = tmp_path / "names.txt"
    names_file.write_text("cat\ndog\nfox\n")
    split = tmp_path / "train"
    for name in ("cat", "dog", "fox"):
        (split / name).mkdir(parents=True)
    for source in (names_file, split):
        named = parse_text(predict("--resume", ckpt, image, "--class-names", source, *OPTS).stdout)[str(image)]
        assert [n for _, _, n in named] == [["cat", "dog", "fox"][c] for c in top.indices.tolist()]

    names_file.write_text("cat\ndog\n")
    proc = predict("--resume", ckpt, image, "--class-names", names_file, *OPTS)
    assert proc.returncode == 2 and "gives 2 names but the model has 3 classes" in proc.stderr


def test_use_ema_predicts_with_the_weight_average(setup, tmp_path, predict):
    """TEST.USE_EMA True: the checkpoint's model_ema weights predict, not its model weights (which differ)."""
    ema = tiny_model()
    with torch.no_grad():
        ema.head.weight.neg_()  # another ranking of the classes
    ckpt = tmp_path / "with_ema.pth"
    torch.save({"model": setup["model"].state_dict(), "model_ema": ema.state_dict(), "epoch": 9}, ckpt)
    image = setup["loose"][0]
    expected = {
        "True": expected_probs(ema.eval(), image).topk(5),
        "False": expected_probs(setup["model"], image).topk(5),
    }
    assert expected["True"].indices.tolist() != expected["False"].indices.tolist()  # the two are told apart
    for use_ema, top in expected.items():
        proc = predict("--resume", ckpt, image, "--json", *OPTS, "TEST.USE_EMA", use_ema)
        assert proc.returncode == 0, proc.stderr
        (result,) = json.loads(proc.stdout)["images"]
        assert [p["class"] for p in result["predictions"]] == top.indices.tolist(), use_ema
        assert [p["prob"] for p in result["predictions"]] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_missing_resume_is_refused(setup, predict):
    proc = predict(*setup["loose"])
    assert proc.returncode == 2
    assert "--resume CKPT is required" in proc.stderr and "random weights" in proc.stderr


def test_nothing_readable_exits_1(setup, predict):
    proc = predict("--resume", setup["ckpt"], setup["corrupt"], setup["root"] / "missing.jpg", *OPTS)
    assert proc.returncode == 1 and proc.stdout == ""
    assert str(setup["corrupt"]) in proc.stderr and "missing.jpg: no such file or folder" in proc.stderr


def test_bad_checkpoint_gives_one_line(setup, tmp_path, predict):
    small = tmp_path / "small.pth"
    config = load_config(str(ROOT / "configs" / "small.yaml"), ["DATA.IMG_SIZE", "32"])
    torch.save({"model": build_model(config).state_dict()}, small)
    proc = predict("--resume", small, *setup["loose"], *OPTS)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "this looks like DFvT-S: use configs/small.yaml" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(setup, predict):
    args = ["--resume", setup["ckpt"], *setup["loose"], "--json", *OPTS]
    cpu = json.loads(predict(*args, "--device", "cpu").stdout)["images"]
    gpu = json.loads(predict(*args, "--device", "cuda").stdout)["images"]
    for a, b in zip(cpu, gpu, strict=True):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        assert [p["prob"] for p in a["predictions"]] == pytest.approx([p["prob"] for p in b["predictions"]], abs=1e-4)


def test_topk_beyond_the_class_count_says_so(setup, tmp_path, predict):
    ckpt = tmp_path / "three.pth"
    torch.save({"model": tiny_model(num_classes=3).state_dict()}, ckpt)
    proc = predict("--resume", ckpt, setup["loose"][0], "--topk", "10", *OPTS)
    assert proc.returncode == 0
    assert "--topk 10 exceeds the model's 3 classes; printing 3" in proc.stderr
    assert len(parse_text(proc.stdout)[str(setup["loose"][0])]) == 3


@pytest.mark.slow
def test_the_command_line_as_a_user_runs_it(setup):
    args = ["--resume", setup["ckpt"], setup["loose"][0], "--topk", "2", *OPTS]
    proc = run([sys.executable, "predict.py", "--cfg", "configs/tiny.yaml", *map(str, args)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = parse_text(proc.stdout)[str(setup["loose"][0])]
    expected = expected_probs(setup["model"], setup["loose"][0]).topk(2)
    assert [c for _, c, _ in rows] == expected.indices.tolist()
    assert [p for p, _, _ in rows] == pytest.approx(expected.values.tolist(), abs=1e-4)


def test_upstream_pipeline_option_reproduces_the_pil_path(setup, predict):
    proc = predict("--json", "--resume", setup["ckpt"], *setup["loose"], *OPTS, "DATA.PIPELINE", "upstream")
    assert proc.returncode == 0, proc.stderr
    for result in json.loads(proc.stdout)["images"]:
        expected = upstream_probs(setup["model"], Path(result["path"]))
        got = [p["prob"] for p in result["predictions"]]
        assert got == pytest.approx(expected.topk(len(got)).values.tolist(), abs=1e-5)  # batched vs alone
