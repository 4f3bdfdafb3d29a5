"""How far the fast evaluation pipeline moves a trained model's figures: the logits of ``DATA.PIPELINE fast`` (torch
decode and uint8 resize) against ``upstream`` (PIL, exactly upstream's pixels) on the same validation images, next to
how far bfloat16 autocast moves the upstream figures (the scale of float noise). Both in float32 on the CPU.

    python benchmarks/eval_pipelines.py --cfg configs/tiny.yaml --resume dfvt_tiny.pth --data-path /data/imagenet
    python benchmarks/eval_pipelines.py ... --max-images 5000        # a part of the split (the first images in order)

Prints top-1 and loss of each, and per pair the largest and mean logit difference, the images whose top-1 changes
and the loss difference. A subset of classes (ImageNet-A/R) is evaluated on the restricted logits, as ``--eval`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import load_config  # noqa: E402
from data import build_loader  # noqa: E402
from models import load_checkpoint_model  # noqa: E402

PAIRS = (("fast fp32", "upstream fp32"), ("upstream bf16", "upstream fp32"))


def logits_of(config_path: str | None, opts: list[str], checkpoint: str, max_images: int | None) -> dict:
    """``{"labels": targets, "fast fp32" | "upstream fp32" | "upstream bf16": logits}`` over the validation images,
    in the loader's order (the same for both pipelines), restricted to the data's classes where they are a subset."""
    out: dict[str, list[torch.Tensor]] = {"labels": []}
    model = None
    for pipeline in ("fast", "upstream"):
        config = load_config(config_path, [*opts, "EVAL_MODE", "True", "DATA.PIPELINE", pipeline])
        data = build_loader(config)
        if model is None:
            model = load_checkpoint_model(config, checkpoint)[0]
        columns = ("fp32", "bf16") if pipeline == "upstream" else ("fp32",)
        seen = 0
        for images, targets in data.val:
            for column in columns:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=column == "bf16"):
                    logits = model(images).float()
                if data.info.class_indices is not None:
                    logits = logits[:, list(data.info.class_indices)]
                out.setdefault(f"{pipeline} {column}", []).append(logits)
            if pipeline == "fast":
                out["labels"].append(targets)
            seen += images.shape[0]
            if max_images is not None and seen >= max_images:
                break
    return {key: torch.cat(parts)[:max_images] for key, parts in out.items()}


def compare(results: dict) -> dict:
    """Top-1 (%) and mean cross-entropy of each logits entry, and per pair of :data:`PAIRS` the largest and mean
    absolute logit difference, the images whose top-1 class differs and the difference of the losses."""
    labels = results["labels"]
    figures: dict = {}
    for key, logits in results.items():
        if key != "labels":
            top1 = (logits.argmax(1) == labels).double().mean().item() * 100
            figures[key] = {"top1": top1, "loss": F.cross_entropy(logits.double(), labels).item()}
    for a, b in PAIRS:
        diff = (results[a] - results[b]).abs()
        figures[f"{a} vs {b}"] = {
            "max_logit_diff": diff.max().item(),
            "mean_logit_diff": diff.mean().item(),
            "top1_changed": int((results[a].argmax(1) != results[b].argmax(1)).sum()),
            "loss_diff": abs(figures[a]["loss"] - figures[b]["loss"]),
        }
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg", help="config file (the model variant, data set and eval transform)")
    parser.add_argument("--resume", required=True, help="checkpoint to evaluate")
    parser.add_argument("--data-path", help="dataset root (val/ inside)")
    parser.add_argument("--max-images", type=int, help="only the first N validation images")
    parser.add_argument("--opts", nargs="*", default=[], help="config KEY VALUE pairs")
    args = parser.parse_args(argv)
    opts = [*args.opts, *(["DATA.DATA_PATH", args.data_path] if args.data_path else [])]
    results = logits_of(args.cfg, opts, args.resume, args.max_images)
    figures = compare(results)
    print(f"{len(results['labels'])} validation images, {args.resume}")
    for key, row in figures.items():
        if "top1" in row:
            print(f"{key:>14}: top-1 {row['top1']:.3f} %  loss {row['loss']:.6f}")
        else:
            print(
                f"{key}: logits differ by {row['max_logit_diff']:.2e} at most ({row['mean_logit_diff']:.2e} mean), "
                f"top-1 changes on {row['top1_changed']} image(s), loss by {row['loss_diff']:.2e}"
            )
    return figures


if __name__ == "__main__":
    main()
