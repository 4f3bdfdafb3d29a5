"""Export a trained DFvT to ONNX (or TorchScript) and check the exported file against PyTorch.

    python export.py --cfg configs/tiny.yaml --resume dfvt_tiny.pth --output dfvt_tiny.onnx
    python export.py --cfg configs/tiny.yaml --resume dfvt_tiny.pth --output dfvt_tiny.pt    # TorchScript
    python export.py --cfg configs/digits.yaml --resume output/.../ckpt_epoch_9.pth --output digits.onnx

``--resume`` takes what ``predict.py`` takes: an upstream checkpoint, one of this repo, or a raw ``state_dict`` file,
read safely (no pickled code runs) and loaded strictly; the class count comes from the checkpoint's head (a file
without a head gives a feature extractor whose output is ``features``); what the loader adapts (e.g. bias tables
of another window layout) is noted on stderr. ``--cfg`` must describe the checkpoint's variant. The window layout
is fixed at build time by ``DATA.IMG_SIZE`` (``--img-size`` or ``--opts``), so the exported graph takes
``batch x 3 x IMG_SIZE x IMG_SIZE`` float32 images, normalised as the evaluation transform does (ImageNet mean and
std), and returns float32 logits ``batch x classes``. The batch axis is dynamic (named ``batch``); the graph is the
eval-mode function (no dropout, BatchNorm with running statistics, which the ONNX optimizer folds into the
convolutions).

The format is ``--format`` or, without it, the suffix of ``--output`` (``.pt``: TorchScript, otherwise ONNX); the
default output is the checkpoint's path with ``.onnx`` (or ``.pt``). An ONNX file always passes ``onnx.checker``
(full check); then the file is run (onnxruntime's CPU provider, or ``torch.jit.load``) against the PyTorch model on
3 random images, a batch size other than the one exported with, and the result printed::

    onnxruntime vs PyTorch on 3 images: max abs err 2.1e-06, max rel err 6.7e-07

where the relative error is the absolute one divided by the largest absolute logit. Exit status: 0 when the
error is within ``TOLERANCE`` of the logits' scale (``--no-check`` skips the runtime check), 1 when it is not (the
file stays for inspection), 2 for a bad command line, config or checkpoint, or a missing optional package
(``pip install -r requirements-export.txt`` installs onnx, onnxruntime and onnxscript).

Exporter: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, torch's default since 2.9),
opset 18 by default (18-23 allowed). With torch 2.14 it exports both model paths with a dynamic batch axis, with
no warnings, and matches PyTorch to ~1e-6 relative; the legacy TorchScript-based exporter (``dynamo=False``) works
too and runs a few times faster, but it is deprecated ("will be removed"), warns about the tracer, and bakes Python
shape checks into a trace. Opset 18 is the lowest the new exporter implements natively (it silently keeps 18 when
asked for 17), so it is the widest-supported choice; LayerNormalization needs 17 anyway. The export runs under
``torch.no_grad()``: with autograd on, the torch.export decomposition of the fast path's attention cannot be
exported.

Model path: ``--no-fast-path`` (the default) exports the straightforward computation, ``--fast-path`` the faster
PyTorch one (see ``models/fast_ops.py``); both compute the same function. For ONNX the straightforward path gives
the smaller graph (DFvT-T: 404 nodes vs 453, no run-time Shape/Concat for the window reshapes) at the same
onnxruntime speed and parity, so it is the default for both formats.

TorchScript (``torch.jit.trace``) is offered because it is cheap, but torch 2.14 deprecates ``torch.jit``
(its trace and load print FutureWarnings; the ones of the trace are silenced here): prefer ONNX.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from yacs.config import CfgNode

from config import load_config
from errors import CheckpointError, ConfigError
from models import DFvT, load_checkpoint_model

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
DEFAULT_OPSET = 18
OPSETS = range(18, 24)  # what torch 2.14's exporter implements (its ONNX_MAX_OPSET is 23)
EXPORT_BATCH = 2  # the example batch traced; the check uses another size, so it exercises the dynamic axis
CHECK_BATCH = 3
TOLERANCE = 1e-4  # max abs error allowed, relative to the logits' scale: max(1, max |logit|)
INSTALL_HINT = "pip install -r requirements-export.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the format and output path are resolved (``args.format``, ``args.output``)."""
    parser = argparse.ArgumentParser(description="Export a trained DFvT to ONNX or TorchScript and check it.")
    parser.add_argument("--cfg", metavar="FILE", required=True, help="the model's config (configs/tiny.yaml, ...)")
    parser.add_argument("--resume", metavar="CKPT", required=True, help="trained weights (ours, upstream or raw)")
    parser.add_argument("--output", metavar="FILE", help="the exported file (default: the checkpoint, as .onnx/.pt)")
    parser.add_argument("--format", choices=sorted(FORMATS), help="default: from --output's suffix, else onnx")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--img-size", "--img_size", dest="img_size", type=int, help="sets DATA.IMG_SIZE")
    parser.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=True, help="compare the file with PyTorch"
    )
    parser.add_argument(
        "--fast-path",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="sets MODEL.DFVT.FAST_PATH: export the fast computation (default: the straightforward one)",
    )
    parser.add_argument("--opts", nargs="+", default=None, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    suffix = Path(args.output).suffix.lower() if args.output else ""
    inferred = next((fmt for fmt, ext in FORMATS.items() if ext == suffix), None)
    if args.format and inferred and args.format != inferred:
        parser.error(f"--format {args.format} does not fit --output {args.output}; use a {FORMATS[args.format]} file.")
    args.format = args.format or inferred or "onnx"
    if args.output is None:
        args.output = str(Path(args.resume).with_suffix(FORMATS[args.format]))
    if os.path.abspath(args.output) == os.path.abspath(args.resume):
        parser.error(f"--output {args.output} is the checkpoint itself; choose another file.")
    if args.opset not in OPSETS:
        parser.error(f"--opset {args.opset} is not supported: use {OPSETS.start} to {OPSETS.stop - 1}.")
    return args


def missing_package(fmt: str, check: bool) -> str | None:
    """The one-line message for the first optional package the export needs but cannot import, else None."""
    needed = {"onnx": ["onnx", "onnxscript"] + (["onnxruntime"] if check else []), "torchscript": []}[fmt]
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            why = "to check the exported file (--no-check skips the check)" if name == "onnxruntime" else "to export"
            return f"ONNX export needs the {name} package {why}; install it with: {INSTALL_HINT}"
    return None


def load_model(args: argparse.Namespace) -> tuple[DFvT, CfgNode]:
    """The config's eval-mode model with the checkpoint's class count, loaded strictly from ``args.resume``."""
    opts = list(args.opts or [])
    if args.img_size is not None:
        opts += ["DATA.IMG_SIZE", str(args.img_size)]
    opts += ["MODEL.DFVT.FAST_PATH", str(args.fast_path)]
    config = load_config(args.cfg, opts)
    model, _, notes = load_checkpoint_model(config, args.resume)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return model.float().eval(), config


def example_images(batch: int, img_size: int, seed: int) -> torch.Tensor:
    """``batch`` standard-normal float32 images (the scale of normalised inputs), reproducible by ``seed``."""
    return torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))


def output_name(model: DFvT) -> str:
    """The exported output's name: ``logits``, or ``features`` for a model without a classifier."""
    return "logits" if model.num_classes else "features"


def export_onnx(model: DFvT, path: Path, img_size: int, opset: int) -> None:
    """Write ``model`` to ``path`` as one ONNX file (weights inside) with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(
            model,
            (example_images(EXPORT_BATCH, img_size, seed=1),),
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=[output_name(model)],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )


def export_torchscript(model: DFvT, path: Path, img_size: int) -> None:
    """Write ``model`` traced by ``torch.jit.trace`` to ``path`` (its shape ops follow the batch size)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the input check's shape comparison
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(model, (example_images(EXPORT_BATCH, img_size, seed=1),), check_trace=False)
    traced.save(str(path))


def dims(shape) -> str:
    """``batch x 3 x 224 x 224`` from an ONNX tensor shape."""
    return " x ".join(d.dim_param or str(d.dim_value) for d in shape.dim)


def describe_onnx(path: Path) -> list[str]:
    """Check the file's structure and types (``onnx.checker``, full) and describe its inputs and outputs."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    elem = onnx.helper.tensor_dtype_to_np_dtype
    return [
        f"{kind} {value.name}: {dims(value.type.tensor_type.shape)} ({elem(value.type.tensor_type.elem_type)})"
        for kind, values in (("input", graph.input), ("output", graph.output))
        for value in values
    ]


def describe_torchscript(model: DFvT, img_size: int) -> list[str]:
    """The traced module's input and output, as for ONNX (TorchScript files carry no shapes)."""
    out = model.num_classes or model.num_features
    return [
        f"input images: batch x 3 x {img_size} x {img_size} (float32)",
        f"output {output_name(model)}: batch x {out} (float32)",
    ]


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    """onnxruntime's CPU provider on ``images``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    """The file loaded back with ``torch.jit.load``, on ``images``."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")(images).numpy()


def parity(out: np.ndarray, ref: np.ndarray) -> tuple[float, float, bool]:
    """Max abs error, that error relative to the largest absolute reference value, and whether it is within
    ``TOLERANCE`` of ``max(1, max |ref|)``."""
    if out.shape != ref.shape:
        return float("inf"), float("inf"), False
    err = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max())
    scale = float(np.abs(ref).max())
    return err, err / scale if scale else err, err <= TOLERANCE * max(1.0, scale)


def main(argv: list[str] | None = None) -> int:
    """Export, describe and check; the exit status of the module docstring."""
    args = parse_args(argv)
    missing = missing_package(args.format, args.check)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        model, config = load_model(args)
    except (ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    img_size = config.DATA.IMG_SIZE
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if args.format == "onnx":
        export_onnx(model, path, img_size, args.opset)
        lines = describe_onnx(path)
        what = f"ONNX opset {args.opset}"
    else:
        export_torchscript(model, path, img_size)
        lines = describe_torchscript(model, img_size)
        what = "TorchScript"
    seconds = time.perf_counter() - start
    route = "fast" if args.fast_path else "straightforward"
    print(f"wrote {path} ({what}, {path.stat().st_size / 2**20:.1f} MiB, {route} path) in {seconds:.1f} s")
    for line in lines:
        print(f"  {line}")
    if not args.check:
        return 0

    images = example_images(CHECK_BATCH, img_size, seed=0)
    with torch.no_grad():
        ref = model(images).numpy()
    out = run_onnx(path, images) if args.format == "onnx" else run_torchscript(path, images)
    err, rel, ok = parity(out, ref)
    runtime = "onnxruntime" if args.format == "onnx" else "TorchScript"
    print(f"{runtime} vs PyTorch on {CHECK_BATCH} images: max abs err {err:.1e}, max rel err {rel:.1e}")
    if not ok:
        print(
            f"error: {path} differs from the PyTorch model by more than {TOLERANCE:g} of the logits' scale "
            f"(output shape {out.shape} vs {ref.shape}); the file is kept for inspection.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
