"""Every setting of the repo, with its default. YAML files (``configs/``) override what differs,
``--opts KEY VALUE`` and the command-line flags override the rest."""

from __future__ import annotations

import argparse
import os
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
# Folder name -> class index: auto (ImageNet synsets -> ImageNet indices, folders 0..999 -> that index, other
# names sorted with DATA.DATASET folder), sorted (plain ImageFolder order), or a text file with one folder name
# per line (line = index)
_C.DATA.CLASS_MAP = "auto"

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
_C.PRINT_FREQ = 10  # log every PRINT_FREQ steps
_C.SEED = 0  # random seed (offset by the rank)
_C.EVAL_MODE = False  # evaluate only
_C.THROUGHPUT_MODE = False  # measure throughput only


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
    config.defrost()
    try:
        config.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"Config file {path}: {e}. Check the key names and types against config.py.") from e


def _merge_opts(config: CN, opts: list[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"--opts takes KEY VALUE pairs, got an odd number of items: {opts}.")
    quoted = [repr(str(v)) if i % 2 and opts[i - 1] in NUMBER_OR_AUTO else v for i, v in enumerate(opts)]
    try:
        config.merge_from_list(quoted)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(f"--opts {' '.join(opts)}: {e}. Check the key names against config.py.") from e


def load_config(cfg_path: str | None = None, opts: list[str] | None = None) -> CN:
    """Defaults, then ``cfg_path`` (with its BASE files), then ``opts`` pairs; returned frozen."""
    config = _C.clone()
    if cfg_path:
        _merge_yaml(config, cfg_path)
    config.defrost()
    if opts:
        _merge_opts(config, opts)
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
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()
