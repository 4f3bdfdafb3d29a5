"""Datasets, transforms and distributed loaders: ImageNet folders, zip archives and the built-in digits demo."""

from .build import Data, DataInfo, build_loader, dist_rank_world, resolve_num_workers
from .class_map import RealLabels, imagenet_index, load_real_labels, resolve_class_map
from .device import DeviceLoader, normalize_uint8
from .digits import prepare_digits
from .images import EncodedImage, decode_rgb_image, decode_uint8, load_rgb_image, read_encoded
from .samplers import ResumableSampler, ShardedEvalSampler, ShardRandomSampler
from .seeding import SeededSamples, derive_seed, isolated_rng
from .transforms import build_mixup, build_transform, build_uint8_transform, describe_eval_transform
from .zip_dataset import ZipImageDataset, parse_map_file

__all__ = [
    "Data",
    "DataInfo",
    "DeviceLoader",
    "EncodedImage",
    "RealLabels",
    "ResumableSampler",
    "SeededSamples",
    "ShardRandomSampler",
    "ShardedEvalSampler",
    "ZipImageDataset",
    "build_loader",
    "build_mixup",
    "build_transform",
    "build_uint8_transform",
    "decode_rgb_image",
    "decode_uint8",
    "derive_seed",
    "describe_eval_transform",
    "dist_rank_world",
    "imagenet_index",
    "isolated_rng",
    "load_real_labels",
    "load_rgb_image",
    "normalize_uint8",
    "parse_map_file",
    "prepare_digits",
    "read_encoded",
    "resolve_class_map",
    "resolve_num_workers",
]
