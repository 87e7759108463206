"""Captioning speed of a checkpoint (PyTorch) and of its export (``captioning export``, onnxruntime), on the CPU.

Both run through ``Captioner`` end to end (JPEG decoding and resizing included, the same for both),
greedy and beam, on the same image files, with the same number of threads; one warm-up batch is
not timed. Also counts how many captions differ between the two. Prints a table; ``--json FILE``
writes the numbers too.

    python benchmarks/export_speed.py --checkpoint best.ckpt --onnx exported/ \\
        --images ../shared/data/coco-val2017-mini/val2017 --count 100 --threads 2
"""

import argparse
import json
import platform
import time
from pathlib import Path

import onnxruntime
import torch
from rich.console import Console
from rich.table import Table

from captioning.caption import Captioner, expand_inputs
from captioning.onnx_runtime import onnx_captioner


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, required=True, help="the checkpoint's export folder")
    parser.add_argument("--images", required=True, help="a folder or glob of images")
    parser.add_argument("--count", type=int, default=100, help="images timed (after a warm-up batch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def timed(captioner: Captioner, files: list[Path], batch_size: int) -> tuple[float, list[str]]:
    """Images per second over ``files`` after one untimed batch, and the captions."""
    captioner.caption(files[:batch_size], batch_size)
    start = time.perf_counter()
    results = captioner.caption(files, batch_size)
    return len(files) / (time.perf_counter() - start), [r.caption for r in results]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    files = expand_inputs([args.images])[:args.count]
    rows = []
    for beam in args.beam_sizes:
        reference = Captioner.from_checkpoint(args.checkpoint, device="cpu", beam_size=beam)
        exported = onnx_captioner(args.onnx, beam_size=beam, threads=args.threads)
        torch_rate, torch_captions = timed(reference, files, args.batch_size)
        onnx_rate, onnx_captions = timed(exported, files, args.batch_size)
        differ = sum(a != b for a, b in zip(torch_captions, onnx_captions))
        rows.append({"beam_size": beam, "torch_images_per_s": round(torch_rate, 2),
                     "onnx_images_per_s": round(onnx_rate, 2), "speedup": round(onnx_rate / torch_rate, 2),
                     "captions_differing": differ})
    table = Table(title=f"{len(files)} images, batch {args.batch_size}, {args.threads} threads, "
                        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*map(str, row.values()))
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"images": len(files), "batch_size": args.batch_size, "threads": args.threads,
                                         "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                                         "cpu": platform.processor() or platform.machine(), "results": rows},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
