"""Model behaviour beyond the fixtures: shifted windows against a brute-force attention, gradient
checkpointing, heads, stochastic depth, and the errors a user meets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config import load_config
from errors import ConfigError
from models import build_model
from models.dfvt import DFvTBlock

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
SMALL = str(ROOT / "configs" / "small.yaml")
BASE = str(ROOT / "configs" / "base.yaml")


def brute_force_attention(block: DFvTBlock, x: torch.Tensor) -> torch.Tensor:
    """Window attention of ``block`` written from the definition: full attention over the grid,
    allowed only inside a shifted window, -100 between regions a cyclic shift joined."""
    attn, r, w, s = block.attn, block.resolution, block.window_size, block.shift_size
    b, n_tok, c = x.shape
    heads, d = attn.num_heads, c // attn.num_heads
    ys, xs = torch.div(torch.arange(n_tok), r, rounding_mode="floor"), torch.arange(n_tok) % r
    sy, sx = (ys - s) % r, (xs - s) % r  # coordinates after rolling by -s

    def region(v):
        return (v >= r - w).long() + (v >= r - s).long() if s else torch.zeros_like(v)

    win = (sy // w) * (r // w) + sx // w
    label = region(sy) * 3 + region(sx)
    dy = (sy % w)[:, None] - (sy % w)[None, :]
    dx = (sx % w)[:, None] - (sx % w)[None, :]
    bias = attn.relative_position_bias_table[(dy + w - 1) * (2 * w - 1) + (dx + w - 1)].permute(2, 0, 1)
    extra = torch.where(label[:, None] != label[None, :], -100.0, 0.0).to(x.dtype)
    extra = extra.masked_fill(win[:, None] != win[None, :], float("-inf"))
    q, k, v = attn.qkv(x).view(b, n_tok, 3, heads, d).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * d**-0.5 + bias + extra
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n_tok, c)
    return attn.proj(out)


@pytest.mark.parametrize("stage,block_index", [(0, 1), (1, 1), (0, 0), (2, 1)])
def test_window_attention_equals_brute_force(stage, block_index):
    torch.manual_seed(0)
    model = build_model(load_config(BASE)).double().eval()
    block = model.layers[stage].blocks[block_index]
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        x = torch.randn(2, block.resolution**2, block.attn.dim, dtype=torch.float64)
        expected = brute_force_attention(block, x)
        actual = block.attend(x)
    assert (block.shift_size > 0) == (stage < 2 and block_index == 1)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_gradient_checkpointing_matches_plain_forward():
    plain_cfg = load_config(SMALL, ["MODEL.NUM_CLASSES", "10"])
    ckpt_cfg = load_config(SMALL, ["MODEL.NUM_CLASSES", "10", "TRAIN.USE_CHECKPOINT", "True"])
    torch.manual_seed(0)
    plain = build_model(plain_cfg).double().train()
    ckpt = build_model(ckpt_cfg).double().train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    target = torch.tensor([3, 7])
    losses, grads = [], []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same drop-path draws in both runs
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-9, atol=1e-12, msg=name)
    # The fusion partner must receive gradient through the checkpointed blocks.
    assert grads[1]["multiresolution_conv.0.3.weight"].abs().sum() > 0


def test_num_classes_zero_gives_pooled_features():
    model = build_model(load_config(TINY, ["MODEL.NUM_CLASSES", "0"])).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model(x)
        tokens = model.forward_features(x)
    assert feats.shape == (2, model.num_features) == (2, 384)
    assert tokens.shape == (2, 49, 384)
    torch.testing.assert_close(feats, tokens.mean(1))
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), feats)


def test_forward_split_and_custom_head():
    model = build_model(load_config(TINY, ["MODEL.NUM_CLASSES", "10"])).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = model(x)
        split = model.forward_head(model.forward_features(x))
        manual = model.head(model.forward_features(x).mean(1))
    assert logits.shape == (1, 10)
    torch.testing.assert_close(logits, split)
    torch.testing.assert_close(logits, manual)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model(x).shape == (1, 5)


def test_drop_path_rates_and_train_mode_randomness():
    model = build_model(load_config(BASE))
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in model.layers for b in stage.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 12))
    model = build_model(load_config(SMALL, ["MODEL.NUM_CLASSES", "10"]))
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        model.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(2)
        b = model(x)
        torch.manual_seed(1)
        a_again = model(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, a_again)


def test_no_weight_decay_names():
    model = build_model(load_config(TINY))
    assert model.no_weight_decay() == {"absolute_pos_embed"}
    keywords = model.no_weight_decay_keywords()
    assert keywords == {"relative_position_bias_table"}
    assert any(k in name for name, _ in model.named_parameters() for k in keywords)


def test_absolute_position_embedding_option():
    model = build_model(load_config(TINY, ["MODEL.DFVT.APE", "True"]))
    assert model.state_dict()["absolute_pos_embed"].shape == (1, 3136, 48)


@pytest.mark.parametrize(
    "shape,needle",
    [((1, 3, 192, 192), "224x224"), ((1, 1, 224, 224), "3 input channels"), ((3, 224, 224), "4-D")],
)
def test_wrong_input_is_rejected_with_expected_size(shape, needle):
    model = build_model(load_config(TINY)).eval()
    with pytest.raises(ValueError, match=needle) as err:
        model(torch.randn(shape))
    assert "3 x 224 x 224" in str(err.value)


def test_other_image_size_builds_when_configured():
    model = build_model(load_config(TINY, ["DATA.IMG_SIZE", "448"])).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 448, 448)).shape == (1, 1000)


@pytest.mark.parametrize(
    "opts,key",
    [
        (["MODEL.DFVT.DEPTHS", "[1, 1, 2]"], "MODEL.DFVT.NUM_HEADS"),
        (["MODEL.DFVT.NUM_HEADS", "[5, 6, 12, 24]"], "MODEL.DFVT.NUM_HEADS[0]"),
        (["DATA.IMG_SIZE", "200"], "DATA.IMG_SIZE"),
        (["DATA.IMG_SIZE", "256"], "MODEL.DFVT.WINDOW_SIZE"),
        (["MODEL.DFVT.EMBED_DIM", "8"], "MODEL.DFVT.EMBED_DIM"),
        (["MODEL.NUM_CLASSES", "-1"], "MODEL.NUM_CLASSES"),
        (["MODEL.TYPE", "swin"], "MODEL.TYPE"),
    ],
)
def test_inconsistent_config_is_rejected_at_build_time(opts, key):
    with pytest.raises(ConfigError) as err:
        build_model(load_config(TINY, opts))
    assert key in str(err.value)
