"""export.py: ONNX files run by onnxruntime against the PyTorch model built independently from the same weights, on
batch sizes other than the exported one (the batch axis is dynamic), and DFvT-T at 224 against the upstream golden
logits; the three checkpoint formats (upstream, ours, raw state_dict); the TorchScript round trip; the errors a
user meets. Most tests call ``export.main`` in this process; one runs ``python export.py`` as a user would."""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import export as export_script
from tests.helpers import (
    build,
    call_script,
    fixture_input,
    golden_logits,
    load_fixture_weights,
    run,
    upstream_checkpoint,
)

SIZE = ["--img-size", "32"]
PARITY = re.compile(r"^(onnxruntime|TorchScript) vs PyTorch on 3 images: max abs err (\S+), max rel err (\S+)$", re.M)
TOLERANCE = 1e-4  # float32 bound of the project, relative to the logits' scale


@pytest.fixture
def export(capsys):
    """``export(*args)``: run ``export.main`` with the tiny config and ``args``; exit status and output."""
    return lambda *args: call_script(export_script.main, capsys, *args)


def tiny(size: int = 32, num_classes: int | None = None) -> torch.nn.Module:
    """DFvT-T at ``size`` with the fixture weights, in eval mode (built here, independently of export.py)."""
    opts = ["DATA.IMG_SIZE", str(size)] + ([] if num_classes is None else ["MODEL.NUM_CLASSES", str(num_classes)])
    return load_fixture_weights(build("tiny", *opts)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """The fixture-weight DFvT-T at 32 and the same weights in the three file formats export.py reads."""
    root = tmp_path_factory.mktemp("export")
    model = tiny()
    files = {"upstream": root / "upstream.pth", "own": root / "own.pth", "raw": root / "raw.pth"}
    torch.save(upstream_checkpoint(model), files["upstream"])
    torch.save({"model": model.state_dict(), "epoch": 7}, files["own"])
    torch.save(model.state_dict(), files["raw"])
    return {"model": model, **files}


def images(batch: int, size: int = 32, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).numpy()


def assert_close(out: np.ndarray, ref: np.ndarray) -> None:
    assert out.shape == ref.shape and out.dtype == np.float32
    err = np.abs(out - ref).max()
    assert err <= TOLERANCE * max(1.0, np.abs(ref).max()), f"max abs err {err} (logits up to {np.abs(ref).max()})"


def onnx_session(path: Path):
    onnxruntime = pytest.importorskip("onnxruntime")
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_onnx_file(path: Path, size: int, classes: int = 1000) -> None:
    """Valid ONNX, opset 18, one float32 input and output whose first axis is the symbolic ``batch``."""
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(path), full_check=True)
    graph_model = onnx.load(str(path))
    assert {(o.domain, o.version) for o in graph_model.opset_import if o.domain in ("", "ai.onnx")} == {("", 18)}
    (inp,), (out,) = graph_model.graph.input, graph_model.graph.output
    shape = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, shape) == ("images", ["batch", 3, size, size])
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", classes]
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def jit_load(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without its deprecation warning (torch 2.14 deprecates torch.jit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path))


def parity_line(stdout: str) -> tuple[str, float, float]:
    match = PARITY.search(stdout)
    assert match, stdout
    return match.group(1), float(match.group(2)), float(match.group(3))


def test_onnx_of_an_upstream_checkpoint_matches_pytorch_on_other_batch_sizes(checkpoints, tmp_path, export):
    path = tmp_path / "nested" / "dfvt_tiny.onnx"
    proc = export("--resume", checkpoints["upstream"], "--output", path, *SIZE)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {path} (ONNX opset 18, " in proc.stdout and "straightforward path" in proc.stdout
    assert "input images: batch x 3 x 32 x 32 (float32)" in proc.stdout
    assert "output logits: batch x 1000 (float32)" in proc.stdout
    runtime, err, rel = parity_line(proc.stdout)
    assert runtime == "onnxruntime" and 0 <= rel <= err < 1e-3  # logits of the fixture weights exceed 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # weights inside: one file, no .data
    check_onnx_file(path, 32)
    session = onnx_session(path)
    for batch in (5, 1):  # exported with 2, checked by export.py with 3
        x = images(batch, seed=batch)
        assert_close(session.run(None, {"images": x.numpy()})[0], reference(checkpoints["model"], x))


@pytest.mark.parametrize("fmt", ["upstream", "own", "raw"])
def test_torchscript_round_trip_of_each_checkpoint_format(checkpoints, tmp_path, export, fmt):
    path = tmp_path / f"{fmt}.pt"  # the suffix picks the format
    proc = export("--resume", checkpoints[fmt], "--output", path, *SIZE)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {path} (TorchScript, " in proc.stdout and "output logits: batch x 1000 (float32)" in proc.stdout
    assert parity_line(proc.stdout)[0] == "TorchScript"
    loaded = jit_load(path)
    for batch in (4, 1):
        x = images(batch, seed=batch)
        with torch.no_grad():
            out = loaded(x).numpy()
        np.testing.assert_allclose(out, reference(checkpoints["model"], x), rtol=0, atol=1e-5)


def test_torchscript_default_output_path_and_a_headless_checkpoint(tmp_path, export):
    """Without --output the file goes next to the checkpoint; a file without a head exports pooled features."""
    model = tiny(num_classes=0)
    ckpt = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), ckpt)
    proc = export("--resume", ckpt, "--format", "torchscript", *SIZE)
    assert proc.returncode == 0, proc.stderr
    assert "output features: batch x 384 (float32)" in proc.stdout
    loaded = jit_load(tmp_path / "backbone.pt")
    x = images(3)
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), reference(model, x), rtol=0, atol=1e-5)


def test_use_ema_exports_the_weight_average(checkpoints, tmp_path, export):
    """TEST.USE_EMA True: the exported file computes the checkpoint's model_ema, not its model (which differs)."""
    ema = tiny()
    with torch.no_grad():
        for param in ema.parameters():
            param.mul_(0.5)
    ckpt = tmp_path / "with_ema.pth"
    torch.save({"model": checkpoints["model"].state_dict(), "model_ema": ema.state_dict(), "epoch": 7}, ckpt)
    path = tmp_path / "ema.pt"
    proc = export("--resume", ckpt, "--output", path, *SIZE, "--opts", "TEST.USE_EMA", "True")
    assert proc.returncode == 0, proc.stderr
    assert parity_line(proc.stdout)[0] == "TorchScript"
    x = images(3)
    with torch.no_grad():
        out = jit_load(path)(x).numpy()
    np.testing.assert_allclose(out, reference(ema, x), rtol=0, atol=1e-5)
    assert np.abs(out - reference(checkpoints["model"], x)).max() > 1e-2  # not the model's weights


def test_a_result_beyond_the_tolerance_exits_1_and_keeps_the_file(checkpoints, tmp_path, export, monkeypatch):
    real = export_script.run_torchscript
    monkeypatch.setattr(export_script, "run_torchscript", lambda path, x: real(path, x) + 0.05)  # a broken runtime
    path = tmp_path / "broken.pt"
    proc = export("--resume", checkpoints["own"], "--output", path, *SIZE)
    assert proc.returncode == 1 and path.is_file()
    assert parity_line(proc.stdout)[1] == pytest.approx(0.05, rel=1e-3)
    assert proc.stderr.count("\n") == 1 and "differs from the PyTorch model" in proc.stderr


@pytest.mark.parametrize("package", ["onnxruntime", "onnx", "onnxscript"])
def test_a_missing_onnx_package_gives_the_install_hint(checkpoints, tmp_path, export, monkeypatch, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    path = tmp_path / "m.onnx"
    proc = export("--resume", checkpoints["own"], "--output", path, *SIZE)
    assert proc.returncode == 2 and proc.stdout == "" and not path.exists()
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"needs the {package} package" in proc.stderr
    assert proc.stderr.rstrip().endswith("pip install -r requirements-export.txt")


def test_user_errors_are_one_line_with_status_2(checkpoints, tmp_path, export):
    small = tmp_path / "small.pth"
    torch.save({"model": build("small", "DATA.IMG_SIZE", "32").state_dict()}, small)
    cases = {
        "does not exist": ["--resume", tmp_path / "missing.pth", *SIZE],
        "this looks like DFvT-S: use configs/small.yaml": ["--resume", small, "--output", tmp_path / "s.onnx", *SIZE],
        "Check the key names": ["--resume", checkpoints["own"], "--opts", "MODEL.NO_SUCH_KEY", "1"],
    }
    for expected, args in cases.items():
        proc = export(*args)
        assert proc.returncode == 2 and proc.stdout == "", (expected, proc)
        assert proc.stderr.count("\n") == 1 and expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "s.onnx").exists()


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--format", "torchscript", "--output", "m.onnx"], "--format torchscript does not fit --output m.onnx"),
        (["--opset", "17"], "--opset 17 is not supported: use 18 to 23"),
        (["--output", "SAME"], "is the checkpoint itself"),
    ],
)
def test_bad_command_lines_exit_2(checkpoints, export, args, expected):
    args = [str(checkpoints["own"]) if a == "SAME" else a for a in args]
    proc = export("--resume", checkpoints["own"], *args)
    assert proc.returncode == 2 and expected in proc.stderr


@pytest.mark.slow
def test_the_command_line_as_a_user_runs_it_with_our_format_and_the_fast_path(checkpoints, tmp_path):
    path = tmp_path / "fast.onnx"
    cmd = [sys.executable, "export.py", "--cfg", "configs/tiny.yaml", "--resume", str(checkpoints["own"])]
    proc = run([*cmd, "--output", str(path), "--fast-path", *SIZE], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fast path" in proc.stdout and parity_line(proc.stdout)[0] == "onnxruntime"
    assert proc.stderr == ""  # no exporter chatter or warnings
    check_onnx_file(path, 32)
    x = images(4)
    assert_close(onnx_session(path).run(None, {"images": x.numpy()})[0], reference(checkpoints["model"], x))


@pytest.mark.slow
def test_raw_state_dict_without_onnxruntime_and_no_check(checkpoints, tmp_path, export, monkeypatch):
    onnxruntime = pytest.importorskip("onnxruntime")  # the test's own copy, before it is hidden from export.py
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    path = tmp_path / "raw.onnx"
    proc = export("--resume", checkpoints["raw"], "--output", path, "--no-check", *SIZE)
    assert proc.returncode == 0, proc.stderr
    assert "output logits: batch x 1000 (float32)" in proc.stdout and "vs PyTorch" not in proc.stdout
    check_onnx_file(path, 32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(6)
    assert_close(session.run(None, {"images": x.numpy()})[0], reference(checkpoints["model"], x))


@pytest.mark.slow
def test_dfvt_t_at_224_matches_the_upstream_golden_logits(tmp_path, export):
    """The exported graph against the upstream implementation's float64 logits (tests/fixtures), batches 2 and 3."""
    ckpt = tmp_path / "dfvt_tiny.pth"
    torch.save(upstream_checkpoint(tiny(224)), ckpt)
    path = tmp_path / "dfvt_tiny.onnx"
    proc = export("--resume", ckpt, "--output", path)
    assert proc.returncode == 0, proc.stderr
    check_onnx_file(path, 224)
    session = onnx_session(path)
    x, golden = fixture_input().float(), golden_logits("tiny").numpy()
    for rows in ([0, 1], [1, 0, 1]):
        out = session.run(None, {"images": x[rows].numpy()})[0].astype(np.float64)
        ref = golden[rows]
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5
