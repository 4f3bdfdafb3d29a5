"""checkpoint.py and models/weights.py: atomic writes, safe reading (ours, upstream's, hostile files), weight loading
and auto-resume."""

from __future__ import annotations

import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

from checkpoint import (
    atomic_save,
    capture_rng_state,
    find_resumable,
    load_file,
    model_state_of,
    restore_rng_state,
)
from config import load_config
from errors import CheckpointError
from models import build_model, load_model_weights
from models.variants import suggest_config
from tests.helpers import ROOT, Hostile, upstream_checkpoint


def tiny(*opts: str):
    return build_model(load_config(str(ROOT / "configs" / "tiny.yaml"), ["DATA.IMG_SIZE", "32", *opts]))


def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt_epoch_0.pth"
    atomic_save({"v": torch.tensor([1.0])}, str(path))
    real_save = torch.save

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"v": torch.tensor([2.0])}, str(path))
    monkeypatch.setattr(torch, "save", real_save)
    assert load_file(str(path))["v"].item() == 1.0
    assert os.listdir(tmp_path) == ["ckpt_epoch_0.pth"]  # no temporary file left behind


@pytest.mark.slow
def test_kill_during_repeated_saves_never_leaves_a_torn_file(tmp_path):
    """SIGKILL a process that keeps rewriting a ~8 MB checkpoint: the final name always holds a complete file."""
    path = tmp_path / "ckpt_epoch_0.pth"
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); from checkpoint import atomic_save\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    atomic_save({'i': i, 'w': torch.full((2_000_000,), float(i))}, sys.argv[1])\n"
    )
    for delay in (0.8, 1.3, 1.9):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(ROOT)])
        deadline = time.time() + 60
        while not path.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(delay + random.random() * 0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_file(str(path))
        assert torch.equal(state["w"], torch.full((2_000_000,), float(state["i"])))


def test_our_checkpoints_load_with_weights_only(tmp_path):
    model = tiny()
    state = {"model": model.state_dict(), "epoch": 3, "config": "MODEL:\n  NAME: x\n", "rng": [capture_rng_state()]}
    atomic_save(state, str(tmp_path / "c.pth"))
    loaded = torch.load(tmp_path / "c.pth", weights_only=True)
    assert loaded["epoch"] == 3 and isinstance(loaded["config"], str)


def test_rng_state_round_trip():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_upstream_format_loads_through_the_restricted_unpickler(tmp_path):
    model = tiny()
    path = tmp_path / "upstream.pth"
    torch.save(upstream_checkpoint(model), path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why the restricted path exists
    ckpt = load_file(str(path))
    assert isinstance(ckpt["config"], CfgNode) and ckpt["config"].MODEL.NAME == "dfvt_tiny"
    assert ckpt["amp"]["loss_scaler0"]["loss_scale"] == 65536.0
    fresh = tiny()
    load_model_weights(fresh, model_state_of(ckpt, str(path)), str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


@pytest.mark.parametrize("legacy", [False, True])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, legacy):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "x": Hostile(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as err:
        load_file(str(path))
    assert not marker.exists()
    assert str(path) in str(err.value) and "posix.system" in str(err.value)


def test_plain_pickle_with_hostile_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.pkl"
    path.write_bytes(pickle.dumps(Hostile(marker)))
    with pytest.raises(CheckpointError, match="refused"):
        load_file(str(path))
    assert not marker.exists()


def test_truncated_corrupt_missing_and_foreign_files(tmp_path):
    good = tmp_path / "good.pth"
    atomic_save({"model": tiny().state_dict(), "epoch": 0}, str(good))
    data = good.read_bytes()
    cases = {
        "truncated.pth": data[: len(data) // 2],
        "zeros.pth": bytes(4096),
        "text.pth": b"hello, this is not a checkpoint\n",
        "image.pth": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(100),
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="cannot be read") as err:
            load_file(str(tmp_path / name))
        assert str(tmp_path / name) in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(str(tmp_path / "missing.pth"))
    torch.save({"accuracy": 3.0}, tmp_path / "no_model.pth")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        model_state_of(load_file(str(tmp_path / "no_model.pth")), "no_model.pth")


def test_wrong_variant_names_mismatches_and_suggests_the_config():
    small = build_model(load_config(str(ROOT / "configs" / "small.yaml"))).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_model_weights(build_model(load_config(str(ROOT / "configs" / "tiny.yaml"))), small, "dfvt_small.pth")
    message = str(err.value)
    assert "patch_embed.proj1.weight (48, 3, 3, 3) vs (24, 3, 3, 3)" in message
    assert "this looks like DFvT-S: use configs/small.yaml" in message
    base = build_model(load_config(str(ROOT / "configs" / "base.yaml"))).state_dict()
    assert suggest_config(base) == "this looks like DFvT-B: use configs/base.yaml"
    assert suggest_config({"fc.weight": torch.zeros(2, 2)}) == "these weights are not a DFvT model"


def test_ddp_prefix_is_stripped():
    state = {f"module.{k}": v for k, v in tiny().state_dict().items()}
    assert all(not k.startswith("module.") for k in model_state_of({"model": state}, "x"))


def test_auto_resume_picks_newest_loadable_checkpoint(tmp_path, caplog):
    good = {"model": {"w": torch.zeros(1)}, "epoch": 0}
    for epoch in (0, 1, 10):
        atomic_save({**good, "epoch": epoch}, str(tmp_path / f"ckpt_epoch_{epoch}.pth"))
    data = (tmp_path / "ckpt_epoch_10.pth").read_bytes()
    (tmp_path / "ckpt_epoch_10.pth").write_bytes(data[:100])  # torn
    (tmp_path / "ckpt_epoch_11.pth").write_bytes(b"")  # empty
    (tmp_path / ".tmp-ckpt_epoch_12.pth.abc").write_bytes(data)  # a crashed save's temporary file
    with caplog.at_level(logging.WARNING):
        path, ckpt = find_resumable(str(tmp_path), logging.getLogger("t"))
    assert path.endswith("ckpt_epoch_1.pth") and ckpt["epoch"] == 1  # 10 sorts numerically after 1
    assert "ckpt_epoch_10.pth" in caplog.text and "ckpt_epoch_11.pth" in caplog.text
    assert find_resumable(str(tmp_path / "empty"), logging.getLogger("t")) is None
