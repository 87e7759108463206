"""The SCST reward equals pycocoevalcap's CIDEr-D computed with the training document frequencies."""

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from captioning.data.datasets import load_coco_references
from captioning.data.tokenize import ptb_tokenize_python_batch
from captioning.evaluation.cider_reward import CiderD
from captioning.evaluation.java import find_java
from captioning.evaluation.tokenizer import ptb_tokenize

TRAINING_IMAGES = 200


class _TrainingCorpusScorer(CiderScorer):
    """pycocoevalcap's scorer with a fixed ``document_frequency`` and ``ref_len``.

    ``compute_cider`` sets ``ref_len`` from the images it scores; SCST takes both from the training set.
    """

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


def _evaluator_tokens(references: Mapping[int, Sequence[str]]) -> dict[int, list[str]]:
    """The references as ``CocoCaptionEvaluator`` tokenizes them (Java's PTB tokenizer where there is Java)."""
    flat = [caption for captions in references.values() for caption in captions]
    tokens = ptb_tokenize(flat) if find_java() is not None else ptb_tokenize_python_batch(flat)
    tokenized, start = {}, 0
    for image_id, captions in references.items():
        tokenized[image_id] = tokens[start:start + len(captions)]
        start += len(captions)
    return tokenized


def _pycocoevalcap(training: Mapping[int, list[str]], image_ids: Sequence[int], candidates: Sequence[str]
                   ) -> np.ndarray:
    """pycocoevalcap's per-candidate CIDEr-D, df and ref_len from the tokenized ``training`` references."""
    corpus = CiderScorer(n=4, sigma=6.0)
    corpus.crefs = [cook_refs(training[i]) for i in training]
    corpus.compute_doc_freq()
    scorer = _TrainingCorpusScorer(corpus.document_frequency, np.log(float(len(training))))
    scorer.crefs = [cook_refs(training[i]) for i in image_ids]
    scorer.ctest = [cook_test(candidate) for candidate in candidates]
    return np.array(scorer.compute_cider())


@pytest.fixture(scope="module")
def coco(shared_data: Path) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Raw mini-COCO references of 200 "training" images (the k-th keeps 1 + k % 5 captions) and of
    the other 50."""
    references = load_coco_references(shared_data / "coco-val2017-mini" / "annotations" / "captions_mini.json")
    image_ids = list(references)
    training = {image_id: references[image_id][:1 + k % 5] for k, image_id in enumerate(image_ids[:TRAINING_IMAGES])}
    return training, {i: references[i] for i in image_ids[TRAINING_IMAGES:]}


def _held_out_captions(held_out: Mapping[int, list[str]]) -> list[str]:
    return [caption for captions in _evaluator_tokens(held_out).values() for caption in captions]


def _candidates(tokenized: Mapping[int, list[str]], others: list[str], seed: int
                ) -> tuple[list[int], list[str]]:
    """Several candidates per image, in shuffled order: a reference, shuffled, truncated, repeated,
    another image's caption, words never seen in training, the empty caption."""
    rng = random.Random(seed)
    image_ids, candidates = [], []
    for image_id in list(tokenized)[::4]:
        words = tokenized[image_id][0].split()
        shuffled = rng.sample(words, len(words))
        for candidate in (" ".join(words), " ".join(shuffled), rng.choice(others), " ".join(words[:1]),
                          " ".join(words[:2]), " ".join(words * 2), "a a a a a a a a", "",
                          f"zzyzx {words[0]} qwertz zzyzx {words[0]} qwertz"):
            image_ids.append(image_id)
            candidates.append(candidate)
    order = rng.sample(range(len(candidates)), len(candidates))
    return [image_ids[k] for k in order], [candidates[k] for k in order]


def test_scores_equal_pycocoevalcap_with_the_training_document_frequencies(coco: tuple) -> None:
    training, held_out = coco
    tokenized = _evaluator_tokens(training)
    image_ids, candidates = _candidates(tokenized, _held_out_captions(held_out), seed=0)
    scores = CiderD(training).scores(image_ids, candidates)
    assert scores.dtype == np.float64 and scores.shape == (len(candidates),)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, _pycocoevalcap(tokenized, image_ids, candidates), rtol=0, atol=1e-9)
    assert scores.max() > 1.0 and (scores == 0).any()  # the comparison covers high and zero scores


def test_document_frequencies_and_ref_len_are_pycocoevalcaps_over_the_training_images(coco: tuple) -> None:
    """Also without pinning anything: one candidate per training image, pycocoevalcap's own
    ``compute_score`` takes df and ref_len from exactly those images."""
    training, held_out = coco
    tokenized = _evaluator_tokens(training)
    reward = CiderD(training)
    scorer = CiderScorer(n=4, sigma=6.0)
    scorer.crefs = [cook_refs(tokenized[i]) for i in tokenized]
    others = _held_out_captions(held_out)
    scorer.ctest = [cook_test(others[k % len(others)]) for k in range(len(tokenized))]
    _, expected = scorer.compute_score()
    # pycocoevalcap's lookups add the candidates' unseen n-grams to its df with 0
    assert reward.document_frequencies() == {ngram: df for ngram, df in scorer.document_frequency.items() if df}
    assert reward.ref_len == math.log(TRAINING_IMAGES)
    candidates = [others[k % len(others)] for k in range(len(tokenized))]
    np.testing.assert_allclose(reward.scores(list(tokenized), candidates), expected, rtol=0, atol=1e-9)


def test_the_document_frequencies_are_the_training_sets(coco: tuple) -> None:
    """The same candidate scores differently once other images join the reference set, and each number
    is pycocoevalcap's with that set's df: a reward taking df from anything else fails here."""
    training, held_out = coco
    image_id = list(training)[4]  # five references
    candidate = _evaluator_tokens({image_id: training[image_id]})[image_id][0]
    larger = {**training, **{i + 10 ** 9: captions for i, captions in held_out.items()}}
    alone = CiderD(training).scores([image_id], [candidate])
    joined = CiderD(larger).scores([image_id], [candidate])
    assert abs(alone[0] - joined[0]) > 1e-3
    np.testing.assert_allclose(alone, _pycocoevalcap(_evaluator_tokens(training), [image_id], [candidate]),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(joined, _pycocoevalcap(_evaluator_tokens(larger), [image_id], [candidate]),
                               rtol=0, atol=1e-9)


def test_a_hand_computed_case() -> None:
    """Two images, ref_len = log 2: "a" is in both (idf 0), every other training n-gram in one (idf log 2)."""
    reward = CiderD({1: ["A red circle."], 2: ["A blue square."]})
    same, shuffled, too_long = reward.scores([1, 1, 1], ["a red circle", "circle red a", "a red circle a red circle"])
    # n = 1, 2, 3 match exactly (cosine 1), no 4-gram (0): 10 * 3 / 4
    assert same == pytest.approx(7.5, abs=1e-12)
    # only the unigrams match
    assert shuffled == pytest.approx(2.5, abs=1e-12)
    # unseen n-grams ("circle a") weigh log 2 (df 0 counts as 1); 5 bigrams against 2: delta 3
    cosines = [2 / 4, 2 / (3 * math.sqrt(2)), 1 / math.sqrt(6), 0.0]
    assert too_long == pytest.approx(10 * math.exp(-9 / 72) * sum(cosines) / 4, abs=1e-12)
    assert same > too_long and same > shuffled


def test_an_end_token_rewards_whole_captions_over_fragments() -> None:
    """With ``end_token``, references end with it: a caption that ends where a reference ends earns it, a
    fragment cut mid-caption does not, and the numbers are pycocoevalcap's on those token sequences."""
    references = {1: ["A red circle left of a blue square."], 2: ["A green triangle."]}
    reward = CiderD(references, end_token="<eos>")
    whole, fragment = reward.scores([1, 1], ["a red circle left of a blue square . <eos>", "a red circle left of a"])
    assert whole > fragment
    plain = CiderD(references).scores([1], ["a red circle left of a"])
    assert fragment < plain[0]  # the same fragment scores less once references end with <eos>
    ended = {image: [caption + " <eos>" for caption in captions]
             for image, captions in _evaluator_tokens(references).items()}
    np.testing.assert_allclose([whole, fragment], _pycocoevalcap(ended, [1, 1], [
        "a red circle left of a blue square . <eos>", "a red circle left of a"]), rtol=0, atol=1e-9)


def test_edge_cases_score_as_pycocoevalcap_does_without_nan() -> None:
    """One reference, a reference with no words left after tokenization, empty and unseen candidates."""
    references = {7: ["A dog."], 8: ["...", "A cat sits on a mat"], 9: ["a dog runs", "A dog", "dog"]}
    image_ids = [7, 7, 8, 8, 9, 9, 9, 7]
    candidates = ["", "a dog", "a cat", "cat", "dog dog dog", "a dog runs fast", "zebra", "a dog a dog"]
    scores = CiderD(references).scores(image_ids, candidates)
    assert np.isfinite(scores).all() and scores[0] == 0.0
    np.testing.assert_allclose(scores, _pycocoevalcap(_evaluator_tokens(references), image_ids, candidates),
                               rtol=0, atol=1e-9)
    assert CiderD(references).scores([], []).shape == (0,)
    assert CiderD(references).scores([7, 8], ["zebra", ""]).tolist() == [0.0, 0.0]  # nothing matches at all


def test_unknown_images_and_bad_input_are_refused_with_a_clear_error() -> None:
    reward = CiderD({1: ["a dog"], 2: ["a cat"]})
    with pytest.raises(KeyError, match="image id 3 has no training references"):
        reward.scores([1, 3], ["a dog", "a cat"])
    with pytest.raises(ValueError, match="2 image ids for 1 candidates"):
        reward.scores([1, 2], ["a dog"])
    with pytest.raises(ValueError, match="image id 5"):
        CiderD({1: ["a dog"], 5: []})
    with pytest.raises(ValueError, match="no image"):
        CiderD({})


def test_decoded_captions_need_no_second_tokenization(coco: tuple) -> None:
    """Candidates are split on spaces, not re-tokenized: the vocabulary's tokens are PTB tokens, and
    PTB tokenization of PTB tokens joined by spaces gives them back."""
    training, held_out = coco
    tokenized = [c for captions in _evaluator_tokens({**training, **held_out}).values() for c in captions]
    assert ptb_tokenize_python_batch(tokenized) == tokenized
