"""Loading training images: decoding each file (``open_rgb`` + the transform) vs the resized-image cache.

Writes the cache once (its cost is reported, paid once per image size), then times turning every
image into its (3, s, s) float tensor both ways, the best of ``--repeats`` passes each. Both read
warm files (the photos and the shards sit in the page cache after the first pass), so the figure is
the CPU cost per epoch, not the disk's. Checks that both give bit-identical tensors. Prints a table;
writes JSON with ``--json FILE``.

    python benchmarks/image_cache.py --json image_cache.json
"""

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from captioning.data.datasets import CaptionedImage, load_annotations
from captioning.data.image_cache import ImageCache, write_image_cache
from captioning.data.images import open_rgb
from captioning.data.transforms import build_image_transform

SHARED_DIR = Path(os.environ.get("CAPTIONING_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
MINI = SHARED_DIR / "data" / "coco-val2017-mini"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, default=MINI / "annotations" / "captions_mini.json",
                        help="COCO captions JSON")
    parser.add_argument("--images", type=Path, default=MINI / "val2017", help="its image folder")
    parser.add_argument("--limit", type=int, help="only the first N images (default: all)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method; the best counts")
    parser.add_argument("--cache-dir", type=Path, help="where to write the cache (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def best_pass(load: Callable[[CaptionedImage], torch.Tensor], images: list[CaptionedImage],
              repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            load(image)
        best = min(best, time.perf_counter() - start)
    return best


def run(args: argparse.Namespace, cache_dir: Path) -> dict:
    images = load_annotations("coco", args.annotations, args.images)[: args.limit]
    transform = build_image_transform(args.image_size)

    start = time.perf_counter()
    report = write_image_cache(images, cache_dir, args.image_size, progress=False)
    write_seconds = time.perf_counter() - start
    cache = ImageCache.open(cache_dir, args.image_size, images)
    usable = [image for image in images if image.image_id in cache]

    def decode(image: CaptionedImage) -> torch.Tensor:
        return transform(open_rgb(image.path)[0])

    def cached(image: CaptionedImage) -> torch.Tensor:
        return cache.tensor(image.image_id)

    identical = all(torch.equal(decode(image), cached(image)) for image in usable)
    decode_seconds = best_pass(decode, usable, args.repeats)
    cache_seconds = best_pass(cached, usable, args.repeats)
    shard_bytes = sum(p.stat().st_size for p in report.directory.glob("shard-*.npy"))
    return {
        "images": len(usable), "bad_images": len(report.bad), "image_size": args.image_size,
        "repeats": args.repeats, "bit_identical": identical,
        "decode": {"seconds": decode_seconds, "images_per_second": len(usable) / decode_seconds},
        "cache": {"seconds": cache_seconds, "images_per_second": len(usable) / cache_seconds},
        "speedup": decode_seconds / cache_seconds,
        "cache_write": {"seconds": write_seconds, "written": report.written, "bytes": shard_bytes},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }


def main() -> None:
    args = parse_args()
    if args.cache_dir is not None:
        result = run(args, args.cache_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="image-cache-bench-") as folder:
            result = run(args, Path(folder))

    table = Table(title=f"{result['images']} images to ({3}, {args.image_size}, {args.image_size}) tensors, "
                        f"best of {args.repeats} warm passes")
    for column in ("method", "seconds", "images/s", "speed-up"):
        table.add_column(column, justify="left" if column == "method" else "right")
    table.add_row("decode: open_rgb + Resize + ToTensor", f"{result['decode']['seconds']:.3f}",
                  f"{result['decode']['images_per_second']:.0f}", "1.0x")
    table.add_row("image cache: memory map + ToTensor steps", f"{result['cache']['seconds']:.3f}",
                  f"{result['cache']['images_per_second']:.0f}", f"{result['speedup']:.1f}x")
    console = Console()
    console.print(table)
    write = result["cache_write"]
    console.print(f"cache written once in {write['seconds']:.2f} s ({write['bytes'] / 1e6:.1f} MB of shards); "
                  f"tensors bit-identical: {result['bit_identical']}", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
