"""Score generated captions against references with pycocoevalcap's scorers.

The numbers are those of pycocoevalcap's ``COCOEvalCap`` (same tokenizer, same scorers, same
inputs), without its failure modes: SPICE is not run (it downloads Stanford CoreNLP and fails under
Java 17), temp files stay out of site-packages, the references are tokenized once per evaluator and
the METEOR Java process is reused across calls and shut down by ``close()``.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from captioning.evaluation.tokenizer import java_executable, ptb_tokenize

log = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

Tokenized = dict[int, list[str]]


@dataclass
class EvaluationResult:
    """Corpus metrics (pycocoevalcap's names) and every image's own scores."""

    metrics: dict[str, float]
    per_image: dict[int, dict[str, float]]


class CocoCaptionEvaluator:
    """Scores ``{image_id: caption}`` against fixed references ``{image_id: [captions]}``."""

    def __init__(self, references: Mapping[int, Sequence[str]]) -> None:
        self.references = {int(i): list(captions) for i, captions in references.items()}
        empty = [i for i, captions in self.references.items() if not captions]
        if empty:
            raise ValueError(f"{len(empty)} reference images have no caption, e.g. image id {empty[0]}")
        self._tokenized_references: Tokenized | None = None
        self._meteor: Meteor | None = None

    def score(self, captions: Mapping[int, str]) -> EvaluationResult:
        """Metrics over the images in ``captions``; each must be a reference image."""
        if not captions:
            raise ValueError("no captions to score")
        unknown = [i for i in captions if int(i) not in self.references]
        if unknown:
            raise ValueError(f"{len(unknown)} results have image ids with no references, e.g. {unknown[0]}")
        image_ids = sorted(int(i) for i in captions)
        results = dict(zip(image_ids, ([c] for c in ptb_tokenize([captions[i] for i in image_ids]))))
        references = self.tokenized_references()
        return self._score_tokenized({i: references[i] for i in image_ids}, results)

    def human_agreement(self) -> dict[str, float]:
        """Leave-one-out human scores: each reference scored against the others, averaged.

        Round ``j`` takes every image's ``j``-th reference as the "result" and its other references
        as the ground truth; the metrics are averaged over rounds. Images with one reference are left out.
        """
        references = self.tokenized_references()
        rounds = max(len(r) for r in references.values())
        totals = dict.fromkeys(METRICS, 0.0)
        for j in range(rounds):
            held_out = {i: r for i, r in references.items() if len(r) > max(j, 1)}
            result = self._score_tokenized({i: r[:j] + r[j + 1:] for i, r in held_out.items()},
                                           {i: [r[j]] for i, r in held_out.items()})
            for name in METRICS:
                totals[name] += result.metrics[name] / rounds
        return totals

    def tokenized_references(self) -> Tokenized:
        if self._tokenized_references is None:
            image_ids = list(self.references)
            flat = ptb_tokenize([c for i in image_ids for c in self.references[i]])
            self._tokenized_references, start = {}, 0
            for i in image_ids:
                count = len(self.references[i])
                self._tokenized_references[i] = flat[start:start + count]
                start += count
        return self._tokenized_references

    def _score_tokenized(self, references: Tokenized, results: Tokenized) -> EvaluationResult:
        image_ids = list(references)
        metrics: dict[str, float] = {}
        per_image: dict[int, dict[str, float]] = {i: {} for i in image_ids}

        def record(name: str, corpus: float, scores: Sequence[float]) -> None:
            metrics[name] = float(corpus)
            for image_id, value in zip(image_ids, scores):
                per_image[image_id][name] = float(value)

        bleu, bleu_per_image = Bleu(4).compute_score(references, results, verbose=0)
        for n in range(4):
            record(f"Bleu_{n + 1}", bleu[n], bleu_per_image[n])
        record("METEOR", *self._meteor_scorer().compute_score(references, results))
        record("ROUGE_L", *Rouge().compute_score(references, results))
        record("CIDEr", *Cider().compute_score(references, results))
        return EvaluationResult(metrics, per_image)

    def _meteor_scorer(self) -> Meteor:
        if self._meteor is None:
            java_executable()
            self._meteor = Meteor()
        return self._meteor

    def close(self) -> None:
        """Stop the METEOR Java process (safe to call twice)."""
        if self._meteor is not None:
            process = self._meteor.meteor_p
            process.stdin.close()
            process.kill()
            process.wait()
            self._meteor = None

    def __enter__(self) -> "CocoCaptionEvaluator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
