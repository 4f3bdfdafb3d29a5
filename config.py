"""Every setting of the repo, with its default. YAML files (``configs/``) override what differs,
``--opts KEY VALUE`` and the command-line flags override the rest."""

from __future__ import annotations

import argparse
import ast
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yacs.config import CfgNode as CN

from errors import ConfigError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"  # the variants' and recipes' YAML files
# Keys that take a number or the word "auto": held as text, so a YAML or --opts number passes yacs' type check.
NUMBER_OR_AUTO = ("DATA.NUM_WORKERS",)

_C = CN()
_C.BASE = []  # YAML files merged before this one (paths relative to it)

# Data
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128  # images per process per micro-batch
_C.DATA.DATA_PATH = ""  # dataset root (train/ and val/ folders, or the zip files)
# imagenet (MODEL.NUM_CLASSES outputs; eval may hold a subset), folder (any ImageFolder; classes counted) or digits
_C.DATA.DATASET = "imagenet"
_C.DATA.IMG_SIZE = 224  # input side in pixels
_C.DATA.INTERPOLATION = "bicubic"  # resize interpolation: random, bilinear or bicubic
_C.DATA.ZIP_MODE = False  # read train.zip/val.zip with *_map.txt instead of folders
_C.DATA.CACHE_MODE = "part"  # zip mode cache: no, part (a shard per process) or full
_C.DATA.PIN_MEMORY = True  # pin host memory in the loaders (faster host-to-GPU copies)
_C.DATA.NUM_WORKERS = "auto"  # loader workers per process; auto: the node's cores shared by its processes, minus one
# fast: uint8 batches from torchvision's JPEG decoder and torch's resize, normalised, erased and prefetched on the
# device; upstream: PIL + timm's create_transform in the workers, float batches (the released recipe, bit for bit)
_C.DATA.PIPELINE = "fast"
# torch: the DataLoader pipelines above; dali: NVIDIA DALI decodes and augments (on the GPU with device="mixed", else
# on the CPU), same samplers, normalisation and erasing (pip install -r requirements-dali.txt)
_C.DATA.LOADER = "torch"
# Folder name -> class index: auto (ImageNet synsets -> ImageNet indices, folders 0..999 -> that index, other
# names sorted with DATA.DATASET folder), sorted (plain ImageFolder order), or a text file with one folder name
# per line (line = index)
_C.DATA.CLASS_MAP = "auto"
# Replace an unreadable training image by the next readable one (named in the log each epoch); the run stops when
# more than 1 % of an epoch's images are unreadable. Off: the first unreadable image stops the run.
_C.DATA.SKIP_UNREADABLE = False

# Model (the defaults are DFvT-T)
_C.MODEL = CN()
_C.MODEL.TYPE = "dfvt"  # architecture family
_C.MODEL.NAME = "dfvt_tiny"  # run name, also the output sub-folder
_C.MODEL.PRETRAINED = ""  # weights to fine-tune from (model only)
_C.MODEL.RESUME = ""  # checkpoint to resume or evaluate
_C.MODEL.NUM_CLASSES = 1000  # classifier outputs (0: pooled features)
_C.MODEL.DROP_RATE = 0.0  # dropout rate
_C.MODEL.DROP_PATH_RATE = 0.0  # stochastic depth rate of the last block
_C.MODEL.LABEL_SMOOTHING = 0.1  # label smoothing when Mixup is off

_C.MODEL.DFVT = CN()
_C.MODEL.DFVT.PATCH_SIZE = 4  # stem down-sampling factor (fixed at 4 by the stem's two stride-2 convs)
_C.MODEL.DFVT.IN_CHANS = 3  # input image channels
_C.MODEL.DFVT.EMBED_DIM = 48  # channels of the first stage
_C.MODEL.DFVT.DEPTHS = [1, 1, 2, 1]  # transformer blocks per stage
_C.MODEL.DFVT.NUM_HEADS = [3, 6, 12, 24]  # attention heads per stage
_C.MODEL.DFVT.WINDOW_SIZE = 7  # attention window side
_C.MODEL.DFVT.MLP_RATIO = 4.0  # MLP hidden/input channels
_C.MODEL.DFVT.QKV_BIAS = True  # learn a query/key/value bias
_C.MODEL.DFVT.QK_SCALE = None  # attention scale override (None: head_dim ** -0.5)
_C.MODEL.DFVT.APE = False  # learned absolute position embedding after the stem
_C.MODEL.DFVT.PATCH_NORM = True  # BatchNorm in the stem
_C.MODEL.DFVT.FAST_PATH = True  # fast execution path (same function and weights); False: the upstream-like one

# Training
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0  # first epoch to run (a resumed run continues after its checkpoint's epoch instead)
_C.TRAIN.EPOCHS = 300  # total epochs
_C.TRAIN.WARMUP_EPOCHS = 20  # linear warm-up epochs
_C.TRAIN.WEIGHT_DECAY = 0.05  # weight decay of the decayed parameter groups
_C.TRAIN.BASE_LR = 5e-4  # peak LR for a total batch of 512 (scaled linearly)
_C.TRAIN.WARMUP_LR = 5e-7  # LR at the start of warm-up, for a total batch of 512
_C.TRAIN.MIN_LR = 5e-6  # final LR of the schedule, for a total batch of 512
_C.TRAIN.CONV_LR_SCALE = 2.0  # LR multiplier of the convolutional branch (convlayers, multiresolution_conv)
_C.TRAIN.CLIP_GRAD = 5.0  # gradient-norm clipping (0 or None: off)
_C.TRAIN.AUTO_RESUME = True  # resume from the newest complete checkpoint in the output folder
_C.TRAIN.ACCUMULATION_STEPS = 1  # micro-batches per optimizer step
_C.TRAIN.USE_CHECKPOINT = False  # gradient checkpointing of the transformer blocks (saves memory)
_C.TRAIN.COMPILE = False  # torch.compile the model (opt-in)
_C.TRAIN.LAYER_DECAY = 1.0  # layer-wise LR decay (Swin's): a block's LR x DECAY^(layers above it); 1.0 = off

# Exponential moving average of the weights and buffers, updated after each optimizer step
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998

# Knowledge distillation from a teacher's logits (DeiT's soft/hard losses on the single head)
_C.TRAIN.DISTILL = CN()
_C.TRAIN.DISTILL.TEACHER = ""  # a timm model name or a config file ("": off)
_C.TRAIN.DISTILL.CHECKPOINT = ""  # the teacher's weights (read safely)
_C.TRAIN.DISTILL.TYPE = "soft"  # soft (KL of tempered softmaxes) or hard (the teacher's top-1 as the label)
_C.TRAIN.DISTILL.ALPHA = 0.5  # weight of the distillation term; 1 - ALPHA goes to the usual loss
_C.TRAIN.DISTILL.TAU = 1.0  # temperature of the soft loss

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = "cosine"  # cosine, linear or step
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30  # step schedule: epochs between decays
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1  # step schedule: LR factor per decay

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = "adamw"  # adamw or sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8  # AdamW epsilon
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)  # AdamW betas
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9  # SGD momentum (Nesterov)

# Augmentation
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4  # colour jitter strength (0: off)
_C.AUG.AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # timm auto-augment policy ("none": off)
_C.AUG.REPROB = 0.25  # random erasing probability
_C.AUG.REMODE = "pixel"  # random erasing fill mode
_C.AUG.RECOUNT = 1  # random erasing count
_C.AUG.MIXUP = 0.8  # Mixup alpha (0: off)
_C.AUG.CUTMIX = 1.0  # CutMix alpha (0: off)
_C.AUG.CUTMIX_MINMAX = None  # CutMix box ratio bounds (None: from alpha)
_C.AUG.MIXUP_PROB = 1.0  # probability of applying Mixup or CutMix to a batch
_C.AUG.MIXUP_SWITCH_PROB = 0.5  # probability of CutMix instead of Mixup when both are on
_C.AUG.MIXUP_MODE = "batch"  # batch, pair or elem
_C.AUG.HFLIP = 0.5  # horizontal flip probability (0: off)
_C.AUG.SCALE = (0.08, 1.0)  # RandomResizedCrop area range, as fractions of the image

# Testing
_C.TEST = CN()
_C.TEST.CROP = True  # resize the short side to IMG_SIZE / CROP_PCT, then centre-crop (else resize to IMG_SIZE)
_C.TEST.CROP_PCT = 0.875  # the centre crop's share of the resized short side (timm's crop_pct)
_C.TEST.USE_EMA = False  # evaluate / predict / export with the checkpoint's EMA weights (model_ema)
_C.TEST.REAL_LABELS = ""  # ImageNet-ReaL labels (real.json): also report ReaL@1/@5 in evaluation

# Throughput measurement
_C.THROUGHPUT = CN()
_C.THROUGHPUT.WARMUP_ITERS = 50  # untimed iterations first
_C.THROUGHPUT.ITERS = 30  # timed iterations

# Misc
_C.AMP_ENABLE = True  # mixed precision (torch.amp autocast)
_C.AMP_OPT_LEVEL = "O1"  # O0: fp32 (same as AMP_ENABLE False); O1/O2: autocast in AMP_DTYPE
# auto: bfloat16 without a GradScaler on GPUs that support it (Ampere and newer) and on the CPU, float16 with a
# GradScaler on older GPUs; bfloat16 or float16 force one (float16 always with a GradScaler)
_C.AMP_DTYPE = "auto"
_C.OUTPUT = "output"  # output root; runs go to OUTPUT/MODEL.NAME/TAG
_C.TAG = "default"  # run tag
_C.SAVE_FREQ = 1  # checkpoint every SAVE_FREQ epochs (also at the last epoch and on a new best)
_C.SAVE_KEEP = 3  # epoch checkpoints kept (the newest; 0 keeps all), besides ckpt_best.pth
# also write a mid-epoch recovery checkpoint (ckpt_recovery.pth, only the newest kept) every SAVE_STEPS optimizer
# steps, so a kill -9 loses at most that many steps (0: off; SIGINT/SIGTERM/SIGUSR1 write one in any case)
_C.SAVE_STEPS = 0
_C.PRINT_FREQ = 10  # log every PRINT_FREQ steps
_C.SEED = 0  # random seed (offset by the rank)
_C.EVAL_MODE = False  # evaluate only
_C.THROUGHPUT_MODE = False  # measure throughput only


# ---------------------------------------------------------------------------------------------------------------
# What each key accepts: one rule per key (test_config walks every key with a bad value), then the relations
# between keys. check_config applies them when a config is loaded, before anything runs.

DATASETS = ("imagenet", "folder", "digits")
PIPELINES = ("fast", "upstream")
CACHE_MODES = ("no", "part", "full")
INTERPOLATIONS = ("bicubic", "bilinear", "random")
SCHEDULERS = ("cosine", "linear", "step")
OPTIMIZERS = ("adamw", "sgd")
DISTILL_TYPES = ("soft", "hard")
AMP_DTYPES = ("auto", "bfloat16", "float16")
AUTO_AUGMENT_FAMILIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")  # timm's policy names


@dataclass(frozen=True)
class Rule:
    """What one key accepts: ``accepts(value)`` and the phrase completing "KEY value must be ..."."""

    accepts: Callable[[Any], bool]
    expect: str


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int, high: int | None = None) -> Rule:
    above = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Rule(lambda v: _is_int(v) and v >= low and (high is None or v <= high), above)


def number(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False) -> Rule:
    """A finite number in the interval from ``low`` to ``high`` (closed unless ``open_*``; no ``high``: unbounded)."""

    def accepts(v: Any) -> bool:
        if not _is_number(v) or v < low or (open_low and v == low):
            return False
        return high is None or v < high or (v == high and not open_high)

    if high is None:
        expect = f"a number {'>' if open_low else '>='} {low:g}"
    else:
        expect = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return Rule(accepts, expect)


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: v in choices, f"one of {', '.join(choices)}")


def optional(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.accepts(v), f"None or {rule.expect}")


def fraction_pair(*, strict: bool) -> Rule:
    """(min, max) fractions with 0 < min <= max <= 1 (``strict``: min < max)."""

    def accepts(v: Any) -> bool:
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_number(x) for x in v):
            return False
        return 0 < v[0] < v[1] <= 1 if strict else 0 < v[0] <= v[1] <= 1

    return Rule(accepts, f"(min, max) fractions with 0 < min {'<' if strict else '<='} max <= 1")


def integers(min_len: int, low: int) -> Rule:
    return Rule(
        lambda v: isinstance(v, (list, tuple)) and len(v) >= min_len and all(_is_int(x) and x >= low for x in v),
        f"a list of at least {min_len} integers >= {low}",
    )


def _name(v: Any) -> bool:
    return isinstance(v, str) and bool(v.strip()) and v not in (".", "..") and "/" not in v and "\\" not in v


def _auto_augment(v: Any) -> bool:
    return isinstance(v, str) and (v.strip().lower() in ("", "none") or v.split("-")[0] in AUTO_AUGMENT_FAMILIES)


def _workers(v: Any) -> bool:
    return str(v).strip().lower() == "auto" or str(v).strip().isdigit()


BOOL = Rule(lambda v: isinstance(v, bool), "True or False")
TEXT = Rule(lambda v: isinstance(v, str), "text")  # paths and names that are checked where they are opened
NAME = Rule(_name, "a non-empty folder name without '/'")
PROBABILITY = number(0, 1)

RULES: dict[str, Rule] = {
    "BASE": Rule(lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v), "a list of files"),
    "DATA.BATCH_SIZE": integer(1),
    "DATA.DATA_PATH": TEXT,
    "DATA.DATASET": one_of(*DATASETS),
    "DATA.IMG_SIZE": integer(1),
    "DATA.INTERPOLATION": one_of(*INTERPOLATIONS),
    "DATA.ZIP_MODE": BOOL,
    "DATA.CACHE_MODE": one_of(*CACHE_MODES),
    "DATA.PIN_MEMORY": BOOL,
    "DATA.NUM_WORKERS": Rule(_workers, "'auto' or a number of worker processes (0 or more)"),
    "DATA.PIPELINE": one_of(*PIPELINES),
    "DATA.LOADER": one_of("torch", "dali"),
    "DATA.SKIP_UNREADABLE": BOOL,
    "DATA.CLASS_MAP": Rule(lambda v: isinstance(v, str) and bool(v.strip()), "auto, sorted or a names file"),
    "MODEL.TYPE": one_of("dfvt"),
    "MODEL.NAME": NAME,
    "MODEL.PRETRAINED": TEXT,
    "MODEL.RESUME": TEXT,
    "MODEL.NUM_CLASSES": integer(0),
    "MODEL.DROP_RATE": number(0, 1, open_high=True),
    "MODEL.DROP_PATH_RATE": number(0, 1, open_high=True),
    "MODEL.LABEL_SMOOTHING": number(0, 1, open_high=True),
    "MODEL.DFVT.PATCH_SIZE": Rule(lambda v: v == 4, "4 (the DFvT stem down-samples by 4)"),
    "MODEL.DFVT.IN_CHANS": integer(1),
    "MODEL.DFVT.EMBED_DIM": Rule(lambda v: _is_int(v) and v >= 16 and v % 2 == 0, "even and at least 16"),
    "MODEL.DFVT.DEPTHS": integers(2, 1),
    "MODEL.DFVT.NUM_HEADS": integers(2, 1),
    "MODEL.DFVT.WINDOW_SIZE": integer(1),
    "MODEL.DFVT.MLP_RATIO": number(0, open_low=True),
    "MODEL.DFVT.QKV_BIAS": BOOL,
    "MODEL.DFVT.QK_SCALE": optional(number(0, open_low=True)),
    "MODEL.DFVT.APE": BOOL,
    "MODEL.DFVT.PATCH_NORM": BOOL,
    "MODEL.DFVT.FAST_PATH": BOOL,
    "TRAIN.START_EPOCH": integer(0),
    "TRAIN.EPOCHS": integer(1),
    "TRAIN.WARMUP_EPOCHS": number(0),
    "TRAIN.WEIGHT_DECAY": number(0),
    "TRAIN.BASE_LR": number(0, open_low=True),
    "TRAIN.WARMUP_LR": number(0),
    "TRAIN.MIN_LR": number(0),
    "TRAIN.CONV_LR_SCALE": number(0, open_low=True),
    "TRAIN.CLIP_GRAD": optional(number(0)),
    "TRAIN.AUTO_RESUME": BOOL,
    "TRAIN.ACCUMULATION_STEPS": integer(1),
    "TRAIN.USE_CHECKPOINT": BOOL,
    "TRAIN.COMPILE": BOOL,
    "TRAIN.LAYER_DECAY": number(0, 1, open_low=True),
    "TRAIN.EMA.ENABLE": BOOL,
    "TRAIN.EMA.DECAY": number(0, 1, open_low=True, open_high=True),
    "TRAIN.DISTILL.TEACHER": TEXT,
    "TRAIN.DISTILL.CHECKPOINT": TEXT,
    "TRAIN.DISTILL.TYPE": one_of(*DISTILL_TYPES),
    "TRAIN.DISTILL.ALPHA": PROBABILITY,
    "TRAIN.DISTILL.TAU": number(0, open_low=True),
    "TRAIN.LR_SCHEDULER.NAME": one_of(*SCHEDULERS),
    "TRAIN.LR_SCHEDULER.DECAY_EPOCHS": number(0, open_low=True),
    "TRAIN.LR_SCHEDULER.DECAY_RATE": number(0, 1, open_low=True),
    "TRAIN.OPTIMIZER.NAME": one_of(*OPTIMIZERS),
    "TRAIN.OPTIMIZER.EPS": number(0, open_low=True),
    "TRAIN.OPTIMIZER.BETAS": Rule(
        lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) and 0 <= x < 1 for x in v),
        "two numbers in [0, 1)",
    ),
    "TRAIN.OPTIMIZER.MOMENTUM": number(0, 1, open_high=True),
    "AUG.COLOR_JITTER": number(0),
    "AUG.AUTO_AUGMENT": Rule(_auto_augment, f"none or a timm policy ({', '.join(AUTO_AUGMENT_FAMILIES)}-...)"),
    "AUG.REPROB": PROBABILITY,
    "AUG.REMODE": one_of("const", "rand", "pixel"),
    "AUG.RECOUNT": integer(1),
    "AUG.MIXUP": number(0),
    "AUG.CUTMIX": number(0),
    "AUG.CUTMIX_MINMAX": optional(fraction_pair(strict=True)),
    "AUG.MIXUP_PROB": PROBABILITY,
    "AUG.MIXUP_SWITCH_PROB": PROBABILITY,
    "AUG.MIXUP_MODE": one_of("batch", "pair", "elem"),
    "AUG.HFLIP": PROBABILITY,
    "AUG.SCALE": fraction_pair(strict=False),
    "TEST.CROP": BOOL,
    "TEST.CROP_PCT": number(0, 1, open_low=True),
    "TEST.USE_EMA": BOOL,
    "TEST.REAL_LABELS": TEXT,
    "THROUGHPUT.WARMUP_ITERS": integer(0),
    "THROUGHPUT.ITERS": integer(1),
    "AMP_ENABLE": BOOL,
    "AMP_OPT_LEVEL": one_of("O0", "O1", "O2"),
    "AMP_DTYPE": one_of(*AMP_DTYPES),
    "OUTPUT": Rule(lambda v: isinstance(v, str) and bool(v.strip()), "a folder"),
    "TAG": NAME,
    "SAVE_FREQ": integer(1),
    "SAVE_KEEP": integer(0),
    "SAVE_STEPS": integer(0),
    "PRINT_FREQ": integer(1),
    "SEED": integer(0, 2**32 - 1),
    "EVAL_MODE": BOOL,
    "THROUGHPUT_MODE": BOOL,
}


def _model_layout(c: CN) -> str | None:
    """The stages, heads and windows tile the image: DEPTHS/NUM_HEADS per stage, heads divide channels, grids fit."""
    m = c.MODEL.DFVT
    depths, heads = list(m.DEPTHS), list(m.NUM_HEADS)
    if len(depths) != len(heads):
        return (
            f"MODEL.DFVT.DEPTHS {depths} and MODEL.DFVT.NUM_HEADS {heads} must have one entry per stage "
            f"(got {len(depths)} and {len(heads)})"
        )
    for i, h in enumerate(heads):
        if (m.EMBED_DIM * 2**i) % h:
            return (
                f"MODEL.DFVT.NUM_HEADS[{i}] = {h} does not divide the {m.EMBED_DIM * 2**i} channels of stage {i} "
                f"(MODEL.DFVT.EMBED_DIM {m.EMBED_DIM} x 2^{i})"
            )
    img, step = c.DATA.IMG_SIZE, m.PATCH_SIZE * 2 ** (len(depths) - 1)
    if img % step:
        return f"DATA.IMG_SIZE {img} cannot be tiled: with {len(depths)} stages it must be a multiple of {step}"
    stem = img // m.PATCH_SIZE
    for i in range(len(depths)):
        r = stem // 2 ** (i + 1) if i < len(depths) - 1 else stem // 2**i
        if r > m.WINDOW_SIZE and r % m.WINDOW_SIZE:
            return (
                f"DATA.IMG_SIZE {img} gives a {r}x{r} token grid in stage {i}, which MODEL.DFVT.WINDOW_SIZE "
                f"{m.WINDOW_SIZE} windows cannot tile; use an image size whose stage grids are multiples of the "
                f"window (e.g. 224 for window 7)"
            )
    return None


def _schedule(c: CN) -> str | None:
    t = c.TRAIN
    if t.LR_SCHEDULER.NAME != "step" and t.WARMUP_EPOCHS >= t.EPOCHS:
        return (
            f"TRAIN.EPOCHS {t.EPOCHS} must exceed TRAIN.WARMUP_EPOCHS {t.WARMUP_EPOCHS} for the "
            f"{t.LR_SCHEDULER.NAME} schedule (lower TRAIN.WARMUP_EPOCHS for short runs)"
        )
    if t.START_EPOCH >= t.EPOCHS:
        return f"TRAIN.START_EPOCH {t.START_EPOCH} must be below TRAIN.EPOCHS {t.EPOCHS}"
    return None


def _data_layout(c: CN) -> str | None:
    d = c.DATA
    if d.ZIP_MODE and d.DATASET == "digits":
        return "DATA.DATASET digits is written as folders; turn DATA.ZIP_MODE off (drop --zip)"
    if d.ZIP_MODE and d.CLASS_MAP.strip() != "auto":
        return (
            f"DATA.CLASS_MAP {d.CLASS_MAP!r} maps class folders, but in zip mode (--zip) the map files carry the "
            f"labels; leave DATA.CLASS_MAP auto and write the labels you want into train_map.txt/val_map.txt"
        )
    if d.LOADER == "dali" and d.SKIP_UNREADABLE:
        return "DATA.SKIP_UNREADABLE works with DATA.LOADER torch only (DALI decodes in its own threads)"
    policy = c.AUG.AUTO_AUGMENT.strip().lower()
    if d.LOADER == "dali" and policy not in ("", "none") and policy.split("-")[0] != "rand":
        return f"AUG.AUTO_AUGMENT {c.AUG.AUTO_AUGMENT!r}: DATA.LOADER dali runs RandAugment (rand-...) or none only"
    return None


def mixing_problem(c: CN) -> str | None:
    d, a = c.DATA, c.AUG
    mixing = a.MIXUP > 0 or a.CUTMIX > 0 or a.CUTMIX_MINMAX is not None
    if mixing and d.BATCH_SIZE % 2:
        return (
            f"Mixup/CutMix mixes each batch with its reverse, so DATA.BATCH_SIZE ({d.BATCH_SIZE}) must be even; "
            f"change --batch-size or turn AUG.MIXUP and AUG.CUTMIX off"
        )
    return None


RELATIONS: tuple[Callable[[CN], str | None], ...] = (_model_layout, _data_layout)
# checked when main.py trains
TRAINING_RELATIONS: tuple[Callable[[CN], str | None], ...] = (_schedule, mixing_problem)


def flat_items(node: CN, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf of ``node`` as ``("SECTION.KEY", value)``, in definition order."""
    items = []
    for k, v in node.items():
        if isinstance(v, CN):
            items += flat_items(v, f"{prefix}{k}.")
        else:
            items.append((f"{prefix}{k}", v))
    return items


def check_config(config: CN, training: bool = False) -> None:
    """Raise :class:`ConfigError` naming the first key whose value its rule refuses, then the first broken relation
    (with ``training``, also those of :data:`TRAINING_RELATIONS`).

    Every key of the defaults must have a rule in :data:`RULES` (a key without one is a programming error).
    """
    for key, value in flat_items(config):
        rule = RULES.get(key)
        if rule is None:
            raise KeyError(f"config key {key} has no rule in config.RULES; add one next to the defaults")
        if not rule.accepts(value):
            raise ConfigError(f"{key} {value!r} must be {rule.expect}.")
    for relation in RELATIONS + (TRAINING_RELATIONS if training else ()):
        message = relation(config)
        if message:
            raise ConfigError(f"{message}.")


def _floats_for_float_keys(config: CN, key: str, value: Any) -> Any:
    """An integer given for a key whose default is a float, as that float (yacs refuses ``AUG.MIXUP 0`` otherwise)."""
    try:
        default = config
        for part in key.split("."):
            default = default[part]
    except (KeyError, TypeError):
        return value
    if isinstance(default, float) and _is_int(value):
        return float(value)
    return value


def _merge_yaml(config: CN, cfg_file: str | os.PathLike) -> None:
    """Merge ``cfg_file`` into ``config``, after the files its ``BASE`` list names (recursively)."""
    path = Path(cfg_file)
    if not path.is_file():
        raise ConfigError(
            f"Config file {path} does not exist; pass one of the files in configs/ (e.g. configs/tiny.yaml)."
        )
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Config file {path} is not valid YAML ({e}); fix its syntax.") from e
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of KEY: value, got {type(data).__name__}.")
    for base in data.get("BASE") or []:
        if base:
            _merge_yaml(config, path.parent / base)
    for key in NUMBER_OR_AUTO:
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = repr(str(node[leaf]))  # yacs decodes values with literal_eval: keep text as text
    _coerce_yaml(config, data)
    config.defrost()
    try:
        config.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError, AssertionError) as e:
        typed = _type_message(str(e), {key: value for key, value in flat_items(CN(data))})
        where = f"Config file {path}: "
        raise ConfigError(where + (typed or f"{e}. Check the key names and types against config.py.")) from e


def _type_message(error: str, given: dict[str, Any]) -> str | None:
    """yacs' type-mismatch ``error`` as our one line (the key, the value given, what its rule accepts), or None."""
    match = re.search(r"Type mismatch .* for config key: (\S+)", error)
    if match is None or match.group(1) not in RULES:
        return None
    key = match.group(1)
    return f"{key} {given.get(key, '?')!r} must be {RULES[key].expect}."


def _coerce_yaml(config: CN, data: dict, prefix: str = "") -> None:
    """Integers in a YAML mapping for float keys become floats, in place (see :func:`_floats_for_float_keys`)."""
    for k, v in data.items():
        if isinstance(v, dict):
            _coerce_yaml(config, v, f"{prefix}{k}.")
        else:
            data[k] = _floats_for_float_keys(config, f"{prefix}{k}", v)


def _merge_opts(config: CN, opts: list[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs, got an odd number of items: {opts}.")
    quoted = list(opts)
    for i in range(1, len(opts), 2):
        if opts[i - 1] in NUMBER_OR_AUTO:
            quoted[i] = repr(str(opts[i]))
        elif isinstance(opts[i], str):
            try:
                parsed = ast.literal_eval(opts[i])
            except (ValueError, SyntaxError):
                continue
            coerced = _floats_for_float_keys(config, opts[i - 1], parsed)
            if coerced is not parsed:
                quoted[i] = repr(coerced)
    try:
        config.merge_from_list(quoted)
    except (KeyError, ValueError, AssertionError) as e:
        typed = _type_message(str(e), dict(zip(opts[::2], opts[1::2], strict=True)))
        raise ConfigError(typed or f"--opts {' '.join(opts)}: {e}. Check the key names against config.py.") from e


def load_config(cfg_path: str | None = None, opts: list[str] | None = None) -> CN:
    """Defaults, then ``cfg_path`` (with its BASE files), then ``opts`` pairs; returned frozen."""
    config = _C.clone()
    if cfg_path:
        _merge_yaml(config, cfg_path)
    config.defrost()
    if opts:
        _merge_opts(config, opts)
    check_config(config)
    config.freeze()
    return config


def get_default_config() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()


def set_key(config: CN, key: str, value: Any) -> None:
    """Set the dotted ``key`` (e.g. ``"DATA.IMG_SIZE"``) of an unfrozen ``config`` to ``value``."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value


# Command-line shortcuts: argparse destination -> config key.
_ARG_TO_KEY = {
    "batch_size": "DATA.BATCH_SIZE",
    "data_path": "DATA.DATA_PATH",
    "cache_mode": "DATA.CACHE_MODE",
    "pretrained": "MODEL.PRETRAINED",
    "resume": "MODEL.RESUME",
    "accumulation_steps": "TRAIN.ACCUMULATION_STEPS",
    "amp_opt_level": "AMP_OPT_LEVEL",
    "output": "OUTPUT",
    "tag": "TAG",
}


def update_config(config: CN, args: argparse.Namespace) -> None:
    """Apply ``--cfg``, ``--opts`` and the shortcut flags of ``args`` to ``config`` (left frozen)."""
    if getattr(args, "cfg", None):
        _merge_yaml(config, args.cfg)
    config.defrost()
    if getattr(args, "opts", None):
        _merge_opts(config, args.opts)
    for dest, key in _ARG_TO_KEY.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_key(config, key, value)
    if getattr(args, "zip", False):
        config.DATA.ZIP_MODE = True
    if getattr(args, "use_checkpoint", False):
        config.TRAIN.USE_CHECKPOINT = True
    if getattr(args, "compile", False):
        config.TRAIN.COMPILE = True
    if getattr(args, "eval", False):
        config.EVAL_MODE = True
    if getattr(args, "throughput", False):
        config.THROUGHPUT_MODE = True
    if config.AMP_OPT_LEVEL == "O0":
        config.AMP_ENABLE = False
    check_config(config, training=not (config.EVAL_MODE or config.THROUGHPUT_MODE))
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
