"""Helpers shared by the tests: paths and configs, tiny image datasets written on the fly, the golden-logit
fixture rule, checkpoints in the upstream and a hostile format, and running the entry points as a user would."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from yacs.config import CfgNode

from config import load_config
from models import DFvT, build_model

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ----------------------------------------------------------------------------------------------- configs and models


def config_path(variant: str) -> str:
    """``configs/<variant>.yaml`` (tiny, small, base, digits, finetune)."""
    return str(ROOT / "configs" / f"{variant}.yaml")


def build(variant: str, *opts: str) -> DFvT:
    """``build_model`` of ``configs/<variant>.yaml`` with ``KEY VALUE`` overrides."""
    return build_model(load_config(config_path(variant), list(opts)))


# ----------------------------------------------------------------------------------------------- data


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("a", "b", "c"),
    n_train: int = 4,
    n_val: int = 3,
    size: tuple[int, int] = (40, 48),
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<class>/<i>.jpg`` random-noise RGB JPEGs of ``size`` (width, height); return root."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def write_zip_dataset(folder: Path, dest: Path) -> Path:
    """The zip-mode version of an ImageFolder tree: ``{split}.zip`` + ``{split}_map.txt`` (member<TAB>label)."""
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        classes = sorted(p.name for p in (folder / split).iterdir())
        lines = []
        with zipfile.ZipFile(dest / f"{split}.zip", "w") as zf:
            for label, name in enumerate(classes):
                for img in sorted((folder / split / name).iterdir()):
                    member = f"{name}/{img.name}"
                    zf.write(img, member)
                    lines.append(f"{member}\t{label}\n")
        (dest / f"{split}_map.txt").write_text("".join(lines))
    return dest


# ----------------------------------------------------------------------------------------------- golden fixtures

KEPT_AS_BUILT = ("num_batches_tracked", "relative_position_index", "attn_mask")


def fixture_value(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float64 value the fixture rule assigns to state_dict entry ``key`` of ``shape``."""
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    z = rng.standard_normal(shape)
    if key.endswith("running_var"):
        return 0.5 + rng.random(shape)
    if key.endswith("running_mean"):
        return 0.1 * z
    if key.endswith("relative_position_bias_table"):
        return 0.5 * z
    if len(shape) == 1 and key.endswith("weight"):
        return 1.0 + 0.1 * z
    if len(shape) == 1:
        return 0.1 * z
    return z / np.sqrt(np.prod(shape[1:]))


def load_fixture_weights(model: nn.Module) -> nn.Module:
    """Fill a float32 ``model`` with the fixture weights (strictly), leaving derived buffers as built."""
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(KEPT_AS_BUILT) or not value.is_floating_point():
            state[key] = value
        else:
            state[key] = torch.from_numpy(fixture_value(key, tuple(value.shape))).to(torch.float32)
    model.load_state_dict(state, strict=True)
    return model


def fixture_input() -> torch.Tensor:
    """The float64 input batch ``2 × 3 × 224 × 224``."""
    return torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 224, 224)))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64."""
    out, ref = out.detach().double().cpu(), ref.double().cpu()
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def golden_logits(variant: str) -> torch.Tensor:
    """The upstream model's float64 logits for the fixture weights and input (tiny and small)."""
    return torch.from_numpy(np.load(FIXTURES / f"dfvt_{variant}_golden_logits.npy"))


# ----------------------------------------------------------------------------------------------- checkpoint files


def upstream_checkpoint(model: torch.nn.Module) -> dict:
    """A checkpoint laid out as the upstream repo wrote it: pickled CfgNode config and apex amp state."""
    config = CfgNode({"MODEL": CfgNode({"NAME": "dfvt_tiny", "DROP_PATH_RATE": 0.0}), "TAG": "default"})
    config.freeze()
    return {
        "model": model.state_dict(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
        "lr_scheduler": {"t_initial": 300},
        "max_accuracy": 72.95,
        "epoch": 299,
        "config": config,
        "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}},
    }


class Hostile:
    """Pickles to a call of os.system that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------------- entry points

SMALL_RUN = [
    "DATA.DATASET", "folder", "DATA.IMG_SIZE", "32", "DATA.NUM_WORKERS", "0",
    "TRAIN.EPOCHS", "1", "TRAIN.WARMUP_EPOCHS", "0", "PRINT_FREQ", "1",
    "THROUGHPUT.WARMUP_ITERS", "2", "THROUGHPUT.ITERS", "3",
]  # fmt: skip
SUMMARY = re.compile(r"\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) Loss (\d+\.\d{4})")
FINGERPRINT = re.compile(r"Final weights fingerprint \(sha256 of the state_dict\): ([0-9a-f]{64})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(module: str, nproc: int = 2) -> list[str]:
    """``python -m <module> --nproc_per_node N --master_port P`` for torch.distributed.run or .launch."""
    return [sys.executable, "-m", module, "--nproc_per_node", str(nproc), "--master_port", str(free_port())]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without launcher and SLURM variables (unless given in ``extra``), one thread per process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra or {})}


def run(cmd: list[str], env_extra: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo root, capturing its output."""
    return subprocess.run(cmd, cwd=ROOT, env=clean_env(env_extra), capture_output=True, text=True, timeout=timeout)


def main_args(data: Path | None, out: Path, *extra: str, batch: int = 4, opts: tuple[str, ...] = ()) -> list[str]:
    args = ["main.py", "--cfg", "configs/tiny.yaml", "--batch-size", str(batch), "--amp-opt-level", "O0"]
    args += ["--output", str(out), "--tag", "t"] + list(extra)
    if data is not None:
        args += ["--data-path", str(data)]
    return args + ["--opts", *SMALL_RUN, *opts]


def log_of(out: Path, rank: int = 0, mode: str = "") -> str:
    """The log of process ``rank`` of the tiny run in ``out``: training's, or that of ``mode`` eval or throughput."""
    return (out / "dfvt_tiny" / "t" / f"{mode + '_' if mode else ''}log_rank{rank}.txt").read_text()


def summaries(text: str) -> list[tuple[str, str, str]]:
    return SUMMARY.findall(text)


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    )
    return proc


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str


def call_script(script_main: Callable[[list[str]], int], capsys, *args) -> ScriptResult:
    """Run an entry point's ``main`` in this process with the tiny config and ``args``: exit status and output
    (argparse's own errors, which exit, included)."""
    capsys.readouterr()
    try:
        code = script_main(["--cfg", config_path("tiny"), *map(str, args)])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return ScriptResult(code, out.out, out.err)


def group_of(groups: list[dict]) -> dict[int, dict]:
    """Optimizer parameter groups by parameter id; asserts no parameter is in two groups."""
    out: dict[int, dict] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = g
    return out
