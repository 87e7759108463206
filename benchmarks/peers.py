"""Our Show-Attend-Tell decoder beside the popular PyTorch tutorial's, same configuration, one process.

The peer is sgrvinod's "a-PyTorch-Tutorial-to-Image-Captioning", re-implemented here from its
published description (``TutorialDecoder``, ``tutorial_beam_search``): an LSTMCell over
``[embedding; gated context]``, additive attention with ReLU that projects the whole grid again at
every word, the initial state from the mean grid vector, a ``(batch, steps, vocab)`` buffer of
scores packed for the loss, and a beam search over one image at a time. Both decoders get the same
sizes, the same grid and the same captions (lengths of real COCO captions), and are timed side by
side: a training step (forward, cross-entropy + the doubly stochastic attention penalty, backward;
no optimizer, which costs both the same) and beam search. The FLOPs of our step come from the
profiler's count of matrix products, so its GFLOP/s can be set beside a large ``sgemm``'s on the
same machine (``torch.mm``, and the same product through oneDNN, which our per-step products use: the
fraction of the faster one is ``best_gemm_fraction``). ``--compile`` and ``--bf16`` time our step and
beam search also under ``torch.compile`` and bfloat16 autocast. Prints a table; writes JSON (``--json FILE``).

    python benchmarks/peers.py --json peers.json
"""

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioning.data.tokenize import tokenize
from captioning.decoding import GenerationSettings, SpecialTokens, generate
from captioning.losses import doubly_stochastic_penalty, masked_cross_entropy
from captioning.models.decoders import PreparedImages, ShowAttendTellDecoder
from captioning.models.encoders import EncodedImages

SHARED_DIR = Path(os.environ.get("CAPTIONING_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
CAPTIONS = SHARED_DIR / "data" / "coco-val2017-mini" / "annotations" / "captions_mini.json"
TOKENS = SpecialTokens(bos=1, eos=2)
logger = logging.getLogger("peers")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=512, help="embedding, attention and hidden size")
    parser.add_argument("--grid-size", type=int, default=14, help="attention over grid_size² cells")
    parser.add_argument("--encoder-dim", type=int, default=2048)
    parser.add_argument("--captions", type=int, default=32, help="captions (one per image) per training step")
    parser.add_argument("--beam-images", type=int, default=8, help="images beam-searched by each side")
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=20, help="longest generated caption (words)")
    parser.add_argument("--repeats", type=int, default=5, help="time each side this many times, keep the fastest "
                        "(training steps alternate between the two sides; their medians are reported too)")
    parser.add_argument("--compile", action="store_true", help="also time our decoder under torch.compile")
    parser.add_argument("--bf16", action="store_true", help="also time our decoder under bfloat16 autocast")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, the machine's cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


class TutorialDecoder(nn.Module):
    """The tutorial's ``DecoderWithAttention``, from its description: ReLU additive attention that
    projects the grid inside every step, a sigmoid gate on the context, one LSTMCell, dropout before
    the output layer, the initial h and c from the mean grid vector through two Linear layers."""

    def __init__(self, vocab_size: int, encoder_dim: int, size: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.encoder_att = nn.Linear(encoder_dim, size)
        self.decoder_att = nn.Linear(size, size)
        self.full_att = nn.Linear(size, 1)
        self.embedding = nn.Embedding(vocab_size, size)
        self.dropout = nn.Dropout(dropout)
        self.decode_step = nn.LSTMCell(size + encoder_dim, size)
        self.init_h = nn.Linear(encoder_dim, size)
        self.init_c = nn.Linear(encoder_dim, size)
        self.f_beta = nn.Linear(size, encoder_dim)
        self.fc = nn.Linear(size, vocab_size)

    def attend(self, grid: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, pixels, encoder_dim), (batch, size) -> gated context (batch, encoder_dim), alpha."""
        scores = self.full_att(F.relu(self.encoder_att(grid) + self.decoder_att(hidden).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(scores, dim=1)  # (batch, pixels)
        context = (grid * alpha.unsqueeze(2)).sum(dim=1)  # (batch, encoder_dim)
        return torch.sigmoid(self.f_beta(hidden)) * context, alpha

    def init_state(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = grid.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """Scores (batch, steps, vocab) in a zero buffer, alphas, the sorted tokens and decode lengths."""
        lengths, order = lengths.sort(descending=True)
        grid, tokens = grid[order], tokens[order]
        embeddings = self.embedding(tokens)  # (batch, max_len, size)
        h, c = self.init_state(grid)
        decode_lengths = (lengths - 1).tolist()
        batch, steps = grid.shape[0], max(decode_lengths)
        predictions = torch.zeros(batch, steps, self.vocab_size)
        alphas = torch.zeros(batch, steps, grid.shape[1])
        for t in range(steps):
            active = sum(length > t for length in decode_lengths)
            context, alpha = self.attend(grid[:active], h[:active])
            h, c = self.decode_step(torch.cat([embeddings[:active, t], context], dim=1), (h[:active], c[:active]))
            predictions[:active, t] = self.fc(self.dropout(h))
            alphas[:active, t] = alpha
        return predictions, alphas, tokens, decode_lengths


def tutorial_train_step(decoder: TutorialDecoder, grid: torch.Tensor, tokens: torch.Tensor,
                        lengths: torch.Tensor) -> float:
    """Forward, packed cross-entropy + the attention penalty (alpha_c = 1), backward."""
    decoder.zero_grad(set_to_none=True)
    scores, alphas, sorted_tokens, decode_lengths = decoder(grid, tokens, lengths)
    scores = pack_padded_sequence(scores, decode_lengths, batch_first=True).data
    targets = pack_padded_sequence(sorted_tokens[:, 1:], decode_lengths, batch_first=True).data
    loss = F.cross_entropy(scores, targets) + ((1.0 - alphas.sum(dim=1)) ** 2).mean()
    loss.backward()
    return loss.item()


@torch.no_grad()
def tutorial_beam_search(decoder: TutorialDecoder, grid: torch.Tensor, beam_size: int, max_length: int
                         ) -> tuple[list[int], float]:
    """One image's beam search as the tutorial's caption.py does it: ``beam_size`` copies of the grid,
    the top-k over all (beam, word) pairs, finished beams removed and ``k`` shrunk, the best finished
    sequence by raw log-probability. grid (1, pixels, encoder_dim) -> (words, score)."""
    k = beam_size
    grid = grid.expand(k, *grid.shape[1:])
    words = torch.full((k, 1), TOKENS.bos, dtype=torch.long)
    sequences, top_scores = words, torch.zeros(k, 1)
    h, c = decoder.init_state(grid)
    complete: list[tuple[list[int], float]] = []
    for step in range(max_length):
        context, _ = decoder.attend(grid, h)
        h, c = decoder.decode_step(torch.cat([decoder.embedding(words.squeeze(1)), context], dim=1), (h, c))
        scores = top_scores.expand(-1, decoder.vocab_size) + torch.log_softmax(decoder.fc(h), dim=1)
        flat = scores[0] if step == 0 else scores.view(-1)
        top_scores, top_words = flat.topk(k)
        previous, next_words = top_words // decoder.vocab_size, top_words % decoder.vocab_size
        sequences = torch.cat([sequences[previous], next_words.unsqueeze(1)], dim=1)
        running = next_words != TOKENS.eos
        if step == max_length - 1:
            running = torch.zeros_like(running)
        complete += [(sequences[i].tolist(), top_scores[i].item()) for i in (~running).nonzero().flatten()]
        k = int(running.sum())
        if k == 0:
            break
        sequences, top_scores = sequences[running], top_scores[running].unsqueeze(1)
        h, c, grid = h[previous[running]], c[previous[running]], grid[previous[running]]
        words = next_words[running].unsqueeze(1)
    return max(complete, key=lambda item: item[1])


def coco_lengths(count: int) -> list[int]:
    """Token counts (``<bos>`` and ``<eos>`` included) of the first ``count`` real COCO captions, or, without
    the shared data, of a fixed list with COCO's typical lengths (8-20 words, mean ~10.5)."""
    if CAPTIONS.is_file():
        annotations = json.loads(CAPTIONS.read_text())["annotations"][:count]
        if len(annotations) == count:
            return [len(tokenize(a["caption"])) + 2 for a in annotations]
    logger.warning("%s not found: using fixed caption lengths", CAPTIONS)
    typical = [12, 11, 13, 10, 12, 14, 11, 12, 10, 13, 12, 11, 15, 12, 11, 12, 22, 12, 13, 11]
    return [typical[i % len(typical)] for i in range(count)]


def best_time(run: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` wall-clock times, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def alternating_times(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall-clock times of each run, ``repeats`` rounds that run each once in turn (after one warm-up round),
    so a slow spell of a shared machine falls on both sides."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def sgemm_gflops(size: int = 4096, repeats: int = 5) -> float:
    """The fastest float32 ``torch.mm`` of two size x size matrices (MKL on x86 builds), in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size ** 3 / best_time(lambda: torch.mm(a, b), repeats) / 1e9


def onednn_gemm_gflops(size: int = 4096, repeats: int = 5) -> float | None:
    """The same product through oneDNN with a prepacked weight (what ``PackedLinear`` uses), in GFLOP/s; None
    where torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return None
    a, b = torch.randn(size, size), torch.randn(size, size)
    packed = torch.ops.mkldnn._reorder_linear_weight(b, size)
    product = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")  # noqa: E731
    return 2 * size ** 3 / best_time(product, repeats) / 1e9


def profiled_gflop(run: Callable[[], Any]) -> float:
    """The profiler's FLOP count (matrix products) of one call of ``run``, in GFLOP.

    Counted with oneDNN off: the profiler counts only aten's products, and ``PackedLinear`` then runs the
    very same products through ``F.linear``."""
    with torch.backends.mkldnn.flags(enabled=False), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as profile:
        run()
    return sum(event.flops for event in profile.key_averages()) / 1e9


def ours_train_step(decoder: nn.Module, features: EncodedImages, tokens: torch.Tensor, lengths: torch.Tensor,
                    autocast: bool = False) -> float:
    """The training module's cross-entropy objective on our decoder: forward, loss, backward."""
    decoder.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
        output = decoder(features, tokens, lengths)
        loss = (masked_cross_entropy(output.word_logits, tokens[:, 1:])
                + doubly_stochastic_penalty(output.attention.float(), output.mask))
    loss.backward()
    return loss.item()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pixels, size = args.grid_size ** 2, args.size
    lengths = torch.tensor(coco_lengths(args.captions))
    tokens = torch.randint(3, args.vocab_size, (args.captions, int(lengths.max())))
    tokens[:, 0] = TOKENS.bos
    tokens[torch.arange(args.captions), lengths - 1] = TOKENS.eos
    tokens[torch.arange(tokens.shape[1]) >= lengths.unsqueeze(1)] = 0
    grid = torch.randn(args.captions, pixels, args.encoder_dim)  # a frozen encoder's output: no gradient
    features = EncodedImages(grid.mean(dim=1), grid)
    ours = ShowAttendTellDecoder(args.vocab_size, args.encoder_dim, embed_dim=size, hidden_size=size,
                                 attention_dim=size).train()
    tutorial = TutorialDecoder(args.vocab_size, args.encoder_dim, size).train()

    results: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "vocab_size": args.vocab_size, "size": size, "pixels": pixels,
        "encoder_dim": args.encoder_dim, "captions": args.captions, "words": int((lengths - 1).sum())}
    rows: list[tuple[str, str, str]] = []
    steps = alternating_times({"ours": lambda: ours_train_step(ours, features, tokens, lengths),
                               "tutorial": lambda: tutorial_train_step(tutorial, grid, tokens, lengths)}, args.repeats)
    train_ours, train_tutorial = min(steps["ours"]), min(steps["tutorial"])
    median_ours, median_tutorial = statistics.median(steps["ours"]), statistics.median(steps["tutorial"])
    gflop_ours = profiled_gflop(lambda: ours_train_step(ours, features, tokens, lengths))
    gflop_tutorial = profiled_gflop(lambda: tutorial_train_step(tutorial, grid, tokens, lengths))
    sgemm, onednn = sgemm_gflops(), onednn_gemm_gflops()
    best_gemm = max(sgemm, onednn or 0.0)
    results |= {"train_step_ours_s": train_ours, "train_step_tutorial_s": train_tutorial,
                "train_step_speedup_vs_tutorial": train_tutorial / train_ours,
                "train_step_ours_median_s": median_ours, "train_step_tutorial_median_s": median_tutorial,
                "train_step_speedup_vs_tutorial_medians": median_tutorial / median_ours,
                "sgemm_fraction_median_step": gflop_ours / median_ours / sgemm,
                "train_step_ours_gflop": gflop_ours, "train_step_tutorial_gflop": gflop_tutorial,
                "train_step_ours_gflops": gflop_ours / train_ours, "sgemm_gflops": sgemm,
                "sgemm_fraction": gflop_ours / train_ours / sgemm, "onednn_gemm_gflops": onednn,
                "best_gemm_fraction": gflop_ours / train_ours / best_gemm}
    rows += [("training step, ours", f"{train_ours:.3f} s",
              f"{gflop_ours:.1f} GFLOP, {gflop_ours / train_ours:.0f} GFLOP/s"),
             ("training step, tutorial", f"{train_tutorial:.3f} s",
              f"{gflop_tutorial:.1f} GFLOP, {gflop_tutorial / train_tutorial:.0f} GFLOP/s"),
             ("speed-up", f"{train_tutorial / train_ours:.2f}x",
              f"medians {median_ours:.3f} s and {median_tutorial:.3f} s: {median_tutorial / median_ours:.2f}x"),
             ("sgemm 4096³ (torch.mm)", "", f"{sgemm:.0f} GFLOP/s; ours {gflop_ours / train_ours / sgemm:.0%} of it")]
    if onednn is not None:
        rows.append(("4096³ through oneDNN, prepacked", "",
                     f"{onednn:.0f} GFLOP/s; ours {gflop_ours / train_ours / onednn:.0%} of it"))
    if args.bf16:
        bf16 = best_time(lambda: ours_train_step(ours, features, tokens, lengths, autocast=True), args.repeats)
        results["train_step_ours_bf16_s"] = bf16
        rows.append(("training step, ours, bf16 autocast", f"{bf16:.3f} s", f"{train_ours / bf16:.2f}x fp32"))
    if args.compile:
        compiled = torch.compile(ours)
        try:
            compiled_s = best_time(lambda: ours_train_step(compiled, features, tokens, lengths), args.repeats)
        except Exception as error:  # noqa: BLE001 - a compiler failure is a result to report, not a crash
            logger.warning("torch.compile failed: %s", error)
            results["train_step_ours_compiled_error"] = f"{type(error).__name__}: {error}"[:500]
        else:
            results["train_step_ours_compiled_s"] = compiled_s
            rows.append(("training step, ours, torch.compile", f"{compiled_s:.3f} s",
                         f"{train_ours / compiled_s:.2f}x eager"))

    ours.eval(), tutorial.eval()
    beam_grid = grid[:args.beam_images]
    prepared = ours.prepare(EncodedImages(beam_grid.mean(dim=1), beam_grid))
    settings = GenerationSettings("beam", beam_size=args.beam_size, max_length=args.max_length, min_length=0)

    def ours_single() -> None:
        for i in range(args.beam_images):
            generate(ours, prepared.select(slice(i, i + 1)), TOKENS, settings)

    def tutorial_single() -> None:
        for i in range(args.beam_images):
            tutorial_beam_search(tutorial, beam_grid[i:i + 1], args.beam_size, args.max_length)

    with torch.no_grad():
        beam_batched = best_time(lambda: generate(ours, prepared, TOKENS, settings), args.repeats) / args.beam_images
        beam_ours = best_time(ours_single, args.repeats) / args.beam_images
        beam_tutorial = best_time(tutorial_single, args.repeats) / args.beam_images
        results |= {"beam_ms_per_image_ours_single": 1e3 * beam_ours,
                    "beam_ms_per_image_ours_batched": 1e3 * beam_batched,
                    "beam_ms_per_image_tutorial": 1e3 * beam_tutorial,
                    "beam_single_speedup_vs_tutorial": beam_tutorial / beam_ours,
                    "beam_batched_speedup_vs_tutorial": beam_tutorial / beam_batched}
        rows += [(f"beam {args.beam_size}, tutorial, one image at a time", f"{1e3 * beam_tutorial:.1f} ms/image", ""),
                 (f"beam {args.beam_size}, ours, one image at a time", f"{1e3 * beam_ours:.1f} ms/image",
                  f"{beam_tutorial / beam_ours:.2f}x tutorial"),
                 (f"beam {args.beam_size}, ours, {args.beam_images} images batched",
                  f"{1e3 * beam_batched:.1f} ms/image",
                  f"{beam_tutorial / beam_batched:.2f}x tutorial")]
        if args.bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = best_time(lambda: generate(ours, prepared, TOKENS, settings), args.repeats) / args.beam_images
            results["beam_ms_per_image_ours_batched_bf16"] = 1e3 * bf16
            rows.append((f"beam {args.beam_size}, ours batched, bf16 autocast", f"{1e3 * bf16:.1f} ms/image",
                         f"{beam_batched / bf16:.2f}x fp32"))

    table = Table(title=f"Show-Attend-Tell vs the tutorial: vocab {args.vocab_size}, size {size}, "
                        f"{args.grid_size}x{args.grid_size}x{args.encoder_dim} grid, {args.captions} captions "
                        f"({results['words']} words), {torch.get_num_threads()} threads")
    for column in ("what", "time", "notes"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
