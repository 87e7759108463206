"""Loading precomputed region features: each ``.npz`` read per item vs the converted, memory-mapped cache.

Writes ``--images`` random feature files in ruotianluo/ImageCaptioning.pytorch's layout
(``<id>.npz`` with ``feat`` (regions, dim) via ``np.savez_compressed``, regions drawn from
``--regions``, ReLU-like values so they compress as real features do), converts them once into the
cache (its cost is reported, paid once), then times, the best of ``--repeats`` passes each: reading
every archive per item (what a loader without the cache does), ``PrecomputedFeatures`` per image,
and a shuffled ``DataLoader`` (batches padded with their masks) in the main process and with
``--workers`` processes (which pass each batch back through shared memory: a copy). All
read warm files (in the page cache after the first pass), so the figures are the CPU cost per
epoch; ``MB/s`` is the stored bytes each method gets through per second (archives or shards): a
disk slower than that is what bounds an epoch. Prints a table; writes JSON with ``--json FILE``.

    python benchmarks/precomputed.py --json precomputed.json
"""

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from captioning.data.batch import collate_captions
from captioning.data.datasets import CaptionDataset, CaptionedImage
from captioning.data.precomputed import read_feature_rows
from captioning.data.sources import PrecomputedFeatures


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="feature files to write")
    parser.add_argument("--regions", type=int, nargs=2, default=(10, 100), metavar=("MIN", "MAX"),
                        help="regions per image, drawn uniformly")
    parser.add_argument("--dim", type=int, default=2048, help="features per region")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="the cache's dtype")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader and conversion processes")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per method; the best counts")
    parser.add_argument("--folder", type=Path, help="where to write files and cache (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def write_files(folder: Path, count: int, regions: tuple[int, int], dim: int) -> list[CaptionedImage]:
    rng = np.random.default_rng(0)
    (folder / "att").mkdir(parents=True, exist_ok=True)
    for image_id in range(count):
        rows = np.maximum(rng.standard_normal((int(rng.integers(regions[0], regions[1] + 1)), dim)), 0)
        np.savez_compressed(folder / "att" / f"{image_id}.npz", feat=rows.astype(np.float32))
    return [CaptionedImage(image_id, folder / "images" / f"{image_id}.jpg", ("a caption",)) for image_id in
            range(count)]


def best_pass(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def run(args: argparse.Namespace, folder: Path) -> dict:
    images = write_files(folder, args.images, tuple(args.regions), args.dim)
    file_bytes = sum(p.stat().st_size for p in (folder / "att").iterdir())
    source = PrecomputedFeatures(folder / "att", None, folder / "cache", args.dtype, args.workers)
    start = time.perf_counter()
    source.prepare(images, torch.device("cpu"))
    convert_seconds = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in source.cache.directory.glob("shard-*.npy"))

    def per_file() -> None:
        for image in images:
            read_feature_rows(image.image_id, folder / "att", None)

    def through_source() -> None:
        for image in images:
            source(image)

    dataset = CaptionDataset(images, lambda caption: [1, 4, 2], source)

    def through_loader(workers: int) -> Callable[[], None]:
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                            collate_fn=collate_captions, persistent_workers=workers > 0)

        def epoch() -> None:
            for _ in loader:
                pass
        return epoch

    methods = {"npz per item": (per_file, file_bytes), "cache, per image": (through_source, shard_bytes)}
    for workers in sorted({0, args.workers}):
        methods[f"cache, DataLoader, {workers} workers"] = (through_loader(workers), shard_bytes)
    results = {}
    for name, (method, stored) in methods.items():
        seconds = best_pass(method, args.repeats)
        results[name] = {"seconds": seconds, "images_per_second": len(images) / seconds,
                         "megabytes_per_second": stored / seconds / 1e6}
    return {
        "images": len(images), "regions": list(args.regions), "dim": args.dim, "dtype": args.dtype,
        "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats, "methods": results,
        "conversion": {"seconds": convert_seconds, "npz_bytes": file_bytes, "shard_bytes": shard_bytes},
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }


def main() -> None:
    args = parse_args()
    if args.folder is not None:
        result = run(args, args.folder)
    else:
        with tempfile.TemporaryDirectory(prefix="precomputed-bench-") as folder:
            result = run(args, Path(folder))

    table = Table(title=f"{result['images']} images of {args.regions[0]}-{args.regions[1]} regions x {args.dim}, "
                        f"best of {args.repeats} warm passes")
    for column in ("method", "seconds", "images/s", "MB/s", "speed-up"):
        table.add_column(column, justify="left" if column == "method" else "right")
    baseline = result["methods"]["npz per item"]["seconds"]
    for name, timing in result["methods"].items():
        table.add_row(name, f"{timing['seconds']:.3f}", f"{timing['images_per_second']:.0f}",
                      f"{timing['megabytes_per_second']:.0f}", f"{baseline / timing['seconds']:.1f}x")
    console = Console()
    console.print(table)
    conversion = result["conversion"]
    console.print(f"converted once in {conversion['seconds']:.2f} s with {args.workers} workers: "
                  f"{conversion['npz_bytes'] / 1e6:.0f} MB of .npz -> {conversion['shard_bytes'] / 1e6:.0f} MB "
                  f"of {args.dtype} shards", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
