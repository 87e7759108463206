"""Score generated captions against references with pycocoevalcap's scorers.

The numbers are those of pycocoevalcap's ``COCOEvalCap`` (same tokenizer, same scorers, same
inputs), without its failure modes:

- SPICE runs only where it can (Stanford CoreNLP 3.6.0's jars present and Java 8); otherwise it is
  skipped with one warning, instead of a download attempt and a crash;
- without Java, tokenization falls back to a pure-Python PTB tokenizer that gives the same tokens
  on caption text, and METEOR is skipped with one warning (BLEU, ROUGE_L and CIDEr still come out);
- temp files live in the system temporary directory, never inside site-packages;
- references are tokenized once per evaluator; one METEOR Java process per Python process starts
  with the first evaluator (loading its paraphrase tables while captions are tokenized), serves
  every evaluator, scores concurrently with the Python scorers, and is shut down by
  ``meteor.shutdown_meteor()`` or at exit.

Empty captions are scored as they are (as ``COCOEvalCap`` does: they match nothing).
"""

import logging
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module
from pycocotools.coco import COCO

from captioning.data.tokenize import ptb_tokenize_python_batch
from captioning.evaluation.meteor import MeteorScorer, shared_meteor
from captioning.evaluation.tokenizer import ptb_tokenize

log = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_LIBRARY = Path(spice_module.__file__).with_name("lib")
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

Tokenized = dict[int, list[str]]


@dataclass
class EvaluationResult:
    """Corpus metrics (pycocoevalcap's names) and every image's own scores."""

    metrics: dict[str, float]
    per_image: dict[int, dict[str, float]]


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` the first time only: every evaluator of a run would repeat it."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def references_from_coco(coco: COCO) -> dict[int, list[str]]:
    """``{image_id: [captions]}`` of a pycocotools ``COCO`` caption dataset, in its image order."""
    return {int(i): [a["caption"] for a in coco.imgToAnns[i]] for i in coco.getImgIds()}


def java_major_version(java: str) -> int | None:
    """The major version of ``java`` (8 for "1.8.0_..."), or None if it does not answer."""
    try:
        completed = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', completed.stderr + completed.stdout)
    if found is None:
        return None
    major, minor = int(found.group(1)), int(found.group(2) or 0)
    return minor if major == 1 else major


def spice_unavailable_reason(java: str | None) -> str | None:
    """Why SPICE cannot run here (None when it can): it needs CoreNLP 3.6.0's jars and Java 8."""
    if java is None:
        return "SPICE needs Java 8, and no java is on PATH"
    missing = [name for name in SPICE_CORENLP_JARS if not (SPICE_LIBRARY / name).is_file()]
    if missing:
        return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} in {SPICE_LIBRARY}); "
                "pycocoevalcap would download it at first use, which this evaluator never does")
    version = java_major_version(java)
    if version != 8:
        return f"SPICE needs Java 8 and crashes under newer ones; {java} is Java {version}"
    return None


class CocoCaptionEvaluator:
    """Scores ``{image_id: caption}`` against fixed references (``{image_id: [captions]}`` or a ``COCO``)."""

    def __init__(self, references: Mapping[int, Sequence[str]] | COCO, spice: bool = True) -> None:
        self._meteor: MeteorScorer | None = None
        if isinstance(references, COCO):
            references = references_from_coco(references)
        self.references = {int(i): list(captions) for i, captions in references.items()}
        empty = [i for i, captions in self.references.items() if not captions]
        if empty:
            raise ValueError(f"{len(empty)} reference images have no caption, e.g. image id {empty[0]}")
        self.java = shutil.which("java")
        if self.java is None:
            _warn_once("Java not found on PATH: captions are tokenized by the pure-Python PTB tokenizer (the "
                       "same tokens on caption text) and METEOR is skipped; install a JRE for METEOR")
        skip_spice = spice_unavailable_reason(self.java) if spice else "SPICE not requested"
        if spice and skip_spice is not None:
            _warn_once(f"SPICE skipped: {skip_spice}")
        self.metric_names = tuple(name for name in METRICS if name != "METEOR" or self.java is not None)
        if skip_spice is None:
            self.metric_names += ("SPICE",)
        self._tokenized_references: Tokenized | None = None
        if "METEOR" in self.metric_names:
            self._meteor_scorer()  # its Java process loads its tables (~6 s) while we tokenize

    def score(self, captions: Mapping[int, str]) -> EvaluationResult:
        """Metrics over the images in ``captions``; each must be a reference image."""
        if not captions:
            raise ValueError("no captions to score")
        unknown = [i for i in captions if int(i) not in self.references]
        if unknown:
            raise ValueError(f"{len(unknown)} results have image ids with no references, e.g. {unknown[0]}")
        not_text = [i for i, caption in captions.items() if not isinstance(caption, str)]
        if not_text:
            raise ValueError(f"the caption of image {not_text[0]} is a {type(captions[not_text[0]]).__name__}, "
                             "not a string")
        image_ids = sorted(int(i) for i in captions)
        results = dict(zip(image_ids, ([c] for c in self._tokenize([captions[i] for i in image_ids]))))
        references = self.tokenized_references()
        return self._score_tokenized({i: references[i] for i in image_ids}, results)

    def human_agreement(self) -> dict[str, float]:
        """Leave-one-out human scores: each reference scored against the others, averaged.

        Round ``j`` takes every image's ``j``-th reference as the "result" and its other references
        as the ground truth; the metrics are averaged over rounds. Images with one reference are left out.
        """
        references = self.tokenized_references()
        rounds = max(len(r) for r in references.values())
        totals = dict.fromkeys(self.metric_names, 0.0)
        for j in range(rounds):
            held_out = {i: r for i, r in references.items() if len(r) > max(j, 1)}
            result = self._score_tokenized({i: r[:j] + r[j + 1:] for i, r in held_out.items()},
                                           {i: [r[j]] for i, r in held_out.items()})
            for name in self.metric_names:
                totals[name] += result.metrics[name] / rounds
        return totals

    def tokenized_references(self) -> Tokenized:
        if self._tokenized_references is None:
            image_ids = list(self.references)
            flat = self._tokenize([c for i in image_ids for c in self.references[i]])
            self._tokenized_references, start = {}, 0
            for i in image_ids:
                count = len(self.references[i])
                self._tokenized_references[i] = flat[start:start + count]
                start += count
        return self._tokenized_references

    def _tokenize(self, captions: list[str]) -> list[str]:
        return ptb_tokenize(captions) if self.java is not None else ptb_tokenize_python_batch(captions)

    def _score_tokenized(self, references: Tokenized, results: Tokenized) -> EvaluationResult:
        image_ids = list(references)
        metrics: dict[str, float] = {}
        per_image: dict[int, dict[str, float]] = {i: {} for i in image_ids}

        def record(name: str, corpus: float, scores: Sequence[float]) -> None:
            metrics[name] = float(corpus)
            for image_id, value in zip(image_ids, scores):
                per_image[image_id][name] = float(value)

        with ThreadPoolExecutor(max_workers=2) as java_scorers:  # Java works while Python scores
            meteor = (java_scorers.submit(self._meteor_scorer().compute_score, references, results)
                      if "METEOR" in self.metric_names else None)
            spice = (java_scorers.submit(spice_module.Spice().compute_score, references, results)
                     if "SPICE" in self.metric_names else None)
            bleu, bleu_per_image = Bleu(4).compute_score(references, results, verbose=0)
            for n in range(4):
                record(f"Bleu_{n + 1}", bleu[n], bleu_per_image[n])
            record("ROUGE_L", *Rouge().compute_score(references, results))
            record("CIDEr", *Cider().compute_score(references, results))
            if meteor is not None:
                record("METEOR", *meteor.result())
            if spice is not None:
                corpus, details = spice.result()
                record("SPICE", corpus, [d["All"]["f"] for d in details])
        return EvaluationResult({name: metrics[name] for name in self.metric_names}, per_image)

    def _meteor_scorer(self) -> MeteorScorer:
        if self._meteor is None or self._meteor.process.poll() is not None:
            self._meteor = shared_meteor(self.java)
        return self._meteor

    def close(self) -> None:
        """Let go of the shared METEOR process (``meteor.shutdown_meteor`` stops it; so does exit)."""
        self._meteor = None

    def __enter__(self) -> "CocoCaptionEvaluator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
