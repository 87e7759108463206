"""Decoding speed: captions/s for greedy and beam search, batched vs one image at a time.

The same ``generate`` settings run on the whole batch and, as the reference, on each image alone; the
outputs must be identical (tokens equal, log-probabilities to 1e-4, attention weights to 1e-5). Each
timing is the fastest of ``--repeats`` runs, which keeps a busy machine's hiccups out of both sides.
Prints a table and writes JSON (``--json FILE``).

    python benchmarks/decoding.py --images 64 --json decoding.json
"""

import argparse
import json
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from captioning.decoding import DecodedCaptions, GenerationSettings, SpecialTokens, generate
from captioning.models.decoders import PreparedImages, ShowAttendTellDecoder
from captioning.models.encoders import EncodedImages

TOKENS = SpecialTokens(bos=1, eos=2)  # no <unk>: every word may be generated


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images decoded per batch")
    parser.add_argument("--vocab-size", type=int, default=5000)
    parser.add_argument("--grid-size", type=int, default=7, help="attention over grid_size² cells")
    parser.add_argument("--encoder-dim", type=int, default=512)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the machine's cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="time each side this many times, keep the fastest")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def timed(run: Callable[[], DecodedCaptions], device: str, repeats: int) -> tuple[DecodedCaptions, float]:
    """The result and the fastest of ``repeats`` wall-clock times."""
    fastest = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        fastest = min(fastest, time.perf_counter() - start)
    return result, fastest


def one_at_a_time(decode: Callable[[PreparedImages], DecodedCaptions], features: PreparedImages) -> DecodedCaptions:
    """The same strategy on each image alone; rows padded to a common width."""
    singles = [decode(features.select(torch.tensor([i], device=features.global_features.device)))
               for i in range(features.global_features.shape[0])]
    width = max(single.tokens.shape[1] for single in singles)
    tokens = torch.cat([_pad_steps(s.tokens, width) for s in singles])
    attention = None
    if singles[0].attention is not None:
        attention = torch.cat([_pad_steps(s.attention, width) for s in singles])  # (rows, width, num_pixels)
    return DecodedCaptions(tokens, torch.cat([s.log_probs for s in singles]), attention)


def _pad_steps(values: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, steps, ...) -> (rows, width, ...), zeros after the last step (<pad> for tokens)."""
    padding = [0, 0] * (values.dim() - 2) + [0, width - values.shape[1]]
    return torch.nn.functional.pad(values, padding)


def same_captions(a: DecodedCaptions, b: DecodedCaptions) -> bool:
    width = max(a.tokens.shape[1], b.tokens.shape[1])
    same = (torch.equal(_pad_steps(a.tokens, width), _pad_steps(b.tokens, width))
            and torch.allclose(a.log_probs, b.log_probs, atol=1e-4))
    if a.attention is None or b.attention is None:
        return same and a.attention is None and b.attention is None
    return same and torch.allclose(_pad_steps(a.attention, width), _pad_steps(b.attention, width), atol=1e-5)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    decoder = ShowAttendTellDecoder(args.vocab_size, args.encoder_dim, hidden_size=args.hidden_size).eval()
    decoder.to(args.device)
    grid = torch.randn(args.images, args.grid_size ** 2, args.encoder_dim, device=args.device)
    features = decoder.prepare(EncodedImages(grid.mean(dim=1), grid))
    settings = {"greedy": GenerationSettings(max_length=args.max_length)}
    for k in args.beam_sizes:
        settings[f"beam{k}"] = GenerationSettings("beam", beam_size=k, max_length=args.max_length)
    strategies: dict[str, Callable[[PreparedImages], DecodedCaptions]] = {
        name: lambda f, chosen=chosen: generate(decoder, f, TOKENS, chosen) for name, chosen in settings.items()}
    rows, results = [], {"images": args.images, "device": args.device, "threads": torch.get_num_threads(),
                         "vocab_size": args.vocab_size,
                         "max_length": args.max_length, "repeats": args.repeats, "identical_outputs": True}
    for name, decode in strategies.items():
        decode(features)  # warm-up
        batched, batched_s = timed(lambda: decode(features), args.device, args.repeats)
        single, single_s = timed(lambda: one_at_a_time(decode, features), args.device, args.repeats)
        identical = same_captions(batched, single)
        results["identical_outputs"] &= identical
        results[f"{name}_batched_captions_per_s"] = args.images / batched_s
        results[f"{name}_single_captions_per_s"] = args.images / single_s
        results[f"{name}_batched_vs_single_speedup"] = single_s / batched_s
        rows.append((name, args.images / batched_s, args.images / single_s, single_s / batched_s, identical))
    table = Table(title=f"decoding {args.images} images on {args.device} (vocab {args.vocab_size}, "
                        f"{args.grid_size}x{args.grid_size} grid, max {args.max_length} words)")
    for column in ("strategy", "batched captions/s", "one-at-a-time captions/s", "speed-up", "identical"):
        table.add_column(column, justify="right")
    for name, batched, single, speedup, identical in rows:
        table.add_row(name, f"{batched:.1f}", f"{single:.1f}", f"{speedup:.1f}x", str(identical))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
