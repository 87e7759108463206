"""SCST reward speed: ``CiderD.scores`` vs pycocoevalcap's CIDEr-D scorer computing the same numbers.

Every image of a COCO captions file is a training image (its captions the references, which give
the document frequencies). A batch like one SCST step's (``--images`` images × ``--samples``
candidates, e.g. 5 samples + 1 greedy) is made from real captions: some of the image's own, some of
other images', with words dropped, shuffled and cut at 16. pycocoevalcap scores it as an SCST
codebase calls it: the training df computed once, the batch's references and candidates cooked on
each call, ``ref_len`` fixed to the training set's. Both must give the same numbers (to 1e-9).
Each timing is the fastest of ``--repeats`` runs. Prints a table and writes JSON (``--json FILE``).

    python benchmarks/cider_reward.py --images 32 --samples 6 --json cider_reward.json
"""

import argparse
import json
import os
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test
from rich.console import Console
from rich.table import Table

from captioning.data.datasets import load_coco_references
from captioning.data.tokenize import ptb_tokenize_python_batch
from captioning.evaluation.cider_reward import CiderD

SHARED_DIR = Path(os.environ.get("CAPTIONING_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
DEFAULT_ANNOTATIONS = SHARED_DIR / "data" / "coco-val2017-mini" / "annotations" / "captions_mini.json"
MAX_LENGTH = 16


class TrainingCorpusScorer(CiderScorer):
    """pycocoevalcap's scorer with the training set's df and ``ref_len`` (``compute_cider`` would set
    ``ref_len`` from the images it scores)."""

    def __init__(self, document_frequency: Mapping[tuple[str, ...], float], ref_len: float) -> None:
        super().__init__(n=4, sigma=6.0)
        self.document_frequency = defaultdict(float, document_frequency)
        self._training_ref_len = ref_len

    @property
    def ref_len(self) -> float:
        return self._training_ref_len

    @ref_len.setter
    def ref_len(self, value: float | None) -> None:
        """Ignored: the value ``compute_cider`` would set is the scored images' own."""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=Path, default=DEFAULT_ANNOTATIONS,
                        help="COCO captions JSON: every image is a training image")
    parser.add_argument("--images", type=int, default=32, help="images per batch")
    parser.add_argument("--samples", type=int, default=6, help="candidates per image")
    parser.add_argument("--repeats", type=int, default=20, help="time each side this many times, keep the fastest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args()


def tokenized_references(references: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    """The references PTB-tokenized in one batch, as ``CiderD`` and the evaluator tokenize them."""
    flat = ptb_tokenize_python_batch([caption for captions in references.values() for caption in captions])
    tokenized, start = {}, 0
    for image_id, captions in references.items():
        tokenized[image_id] = flat[start:start + len(captions)]
        start += len(captions)
    return tokenized


def sampled_batch(tokenized: Mapping[int, list[str]], images: int, samples: int, seed: int
                  ) -> tuple[list[int], list[str]]:
    """Caption-like candidates: mostly the image's own captions, words dropped and shuffled, cut at 16."""
    rng = random.Random(seed)
    image_ids = rng.sample(list(tokenized), images)
    batch_ids, candidates = [], []
    for image_id in image_ids:
        for _ in range(samples):
            source = image_id if rng.random() < 0.7 else rng.choice(list(tokenized))
            words = [w for w in rng.choice(tokenized[source]).split() if rng.random() > 0.15]
            if rng.random() < 0.3:
                rng.shuffle(words)
            batch_ids.append(image_id)
            candidates.append(" ".join(words[:MAX_LENGTH]))
    return batch_ids, candidates


def fastest(run: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return result, best


def main() -> None:
    args = parse_args()
    references = load_coco_references(args.annotations)
    ptb_tokenize_python_batch(["warm up"])  # builds the tokenizer's regexes once (about 0.1 s), for neither side
    start = time.perf_counter()
    reward = CiderD(references)
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    tokenized = tokenized_references(references)
    corpus = CiderScorer(n=4, sigma=6.0)
    corpus.crefs = [cook_refs(tokenized[i]) for i in tokenized]
    corpus.compute_doc_freq()
    document_frequency = dict(corpus.document_frequency)
    reference_setup_s = time.perf_counter() - start

    image_ids, candidates = sampled_batch(tokenized, args.images, args.samples, args.seed)

    def pycocoevalcap() -> np.ndarray:
        scorer = TrainingCorpusScorer(document_frequency, reward.ref_len)
        scorer.crefs = [cook_refs(tokenized[i]) for i in image_ids]
        scorer.ctest = [cook_test(candidate) for candidate in candidates]
        return np.array(scorer.compute_cider())

    expected, reference_s = fastest(pycocoevalcap, args.repeats)
    ours, ours_s = fastest(lambda: reward.scores(image_ids, candidates), args.repeats)
    difference = float(np.abs(ours - expected).max())
    speedup = reference_s / ours_s

    console = Console()
    table = Table(title=f"CIDEr-D of {len(candidates)} candidates ({args.images} images × {args.samples}), "
                        f"{len(references)} training images ({args.annotations.name})")
    for column in ("scorer", "set-up once (s)", "ms per batch", "candidates/s", "mean reward"):
        table.add_column(column, justify="left" if column == "scorer" else "right")
    table.add_row("pycocoevalcap CiderScorer, training df", f"{reference_setup_s:.3f}", f"{reference_s * 1e3:.2f}",
                  f"{len(candidates) / reference_s:,.0f}", f"{expected.mean():.6f}")
    table.add_row("CiderD.scores", f"{build_s:.3f}", f"{ours_s * 1e3:.2f}",
                  f"{len(candidates) / ours_s:,.0f}", f"{ours.mean():.6f}")
    console.print(table)
    console.print(f"speedup {speedup:.1f}x; largest difference {difference:.2e} "
                  f"({'identical to 1e-9' if difference <= 1e-9 else 'NOT identical'})")
    if args.json:
        args.json.write_text(json.dumps({
            "annotations": str(args.annotations), "training_images": len(references), "images": args.images,
            "samples": args.samples, "candidates": len(candidates), "repeats": args.repeats,
            "build_seconds": build_s, "reference_setup_seconds": reference_setup_s,
            "ours_seconds": ours_s, "reference_seconds": reference_s,
            "ours_candidates_per_second": len(candidates) / ours_s,
            "reference_candidates_per_second": len(candidates) / reference_s,
            "speedup": speedup, "max_abs_difference": difference}, indent=2))


if __name__ == "__main__":
    main()
