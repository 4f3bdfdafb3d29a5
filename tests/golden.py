"""The fixture weights and input of the golden-logit tests (rule from the reference fixtures' README)."""

from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn

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
