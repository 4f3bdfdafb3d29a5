"""Datasets, transforms and distributed loaders: ImageNet folders, zip archives and the built-in digits demo."""

from .build import Data, DataInfo, build_loader, dist_rank_world
from .digits import prepare_digits
from .images import decode_rgb_image, load_rgb_image
from .samplers import ShardedEvalSampler, ShardRandomSampler
from .transforms import build_mixup, build_transform
from .zip_dataset import ZipImageDataset, parse_map_file

__all__ = [
    "Data",
    "DataInfo",
    "ShardRandomSampler",
    "ShardedEvalSampler",
    "ZipImageDataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "decode_rgb_image",
    "dist_rank_world",
    "load_rgb_image",
    "parse_map_file",
    "prepare_digits",
]
