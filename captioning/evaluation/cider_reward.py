"""CIDEr-D rewards for self-critical sequence training: pycocoevalcap's numbers, computed fast.

SCST rewards every sampled caption with CIDEr-D against its image's training references, hundreds
of captions per step. pycocoevalcap's ``CiderScorer`` rebuilds every reference's tf-idf vector in
Python dicts on each call, which would dominate a step. ``CiderD`` gives the same numbers (σ = 6,
clipped tf-idf, Gaussian length penalty, mean over the references and over n = 1..4, ×10) with the
document frequencies and ``ref_len`` of the *training* references, as SCST uses them (Rennie et al.,
2017), instead of those of the images in one call:

- built once per run from the training references, which are tokenized as the evaluator tokenizes
  them (the pure-Python PTB tokenizer: the Java tokenizer's tokens, no Java needed, the same on
  every DDP rank); n-grams are interned to integer ids, document frequencies count an n-gram once
  per image, and every reference's tf-idf weights and norms are cached;
- a batch of candidates is scored with a fixed number of numpy operations whatever its size; the
  only Python loops left split the candidates and look up their words' and images' ids.

Memory: about 17 bytes per distinct n-gram of each reference (COCO val2017's 25k captions: 15 MB;
Karpathy train's 566k: ~0.35 GB). Building takes ~1.3 s per 25k captions, mostly tokenization.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from captioning.data.tokenize import ptb_tokenize_python_batch

log = logging.getLogger(__name__)

MAX_N = 4
SIGMA = 6.0
_PAST_EVERY_KEY = np.iinfo(np.int64).max  # ends each sorted key table: a search always lands on an entry


@dataclass(frozen=True)
class _Ngrams:
    """The n-grams of concatenated token sequences, interned order by order.

    ``keys[n - 1]`` are the sorted distinct keys of order n: the word id for n = 1, else the id of the
    n-gram's (n-1)-gram prefix × ``base`` + the id of its last word, so no key overflows. ``ids[n - 1]``
    gives each token position the id (index in ``keys[n - 1]``) of the n-gram starting there, -1 where
    its sequence has fewer than n tokens left.
    """

    keys: list[np.ndarray]
    ids: list[np.ndarray]


def _remaining(lengths: np.ndarray) -> np.ndarray:
    """For each token of the concatenated sequences, how many tokens its sequence has from it on."""
    ends = np.cumsum(lengths)  # (S,)
    return np.repeat(ends, lengths) - np.arange(int(lengths.sum()))  # (T,)


def _intern(words: np.ndarray, lengths: np.ndarray, base: int) -> _Ngrams:
    """Intern the n-grams (n = 1..4) of sequences given as word ids (< ``base``) and their lengths."""
    remaining = _remaining(lengths)  # (T,)
    keys: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    for n in range(1, MAX_N + 1):
        starts = np.flatnonzero(remaining >= n)  # (S_n,)
        last = words[starts + n - 1]
        distinct, inverse = np.unique(last if n == 1 else ids[-1][starts] * base + last, return_inverse=True)
        order_ids = np.full(len(words), -1, dtype=np.int64)  # (T,)
        order_ids[starts] = inverse
        keys.append(distinct)
        ids.append(order_ids)
    return _Ngrams(keys, ids)


class CiderD:
    """CIDEr-D of candidate captions against their image's training references.

    ``CiderD(references).scores(image_ids, candidates)[k]`` equals pycocoevalcap's ``CiderScorer``
    (n = 4, σ = 6) score of ``candidates[k]`` against the PTB-tokenized ``references[image_ids[k]]``
    when that scorer's ``document_frequency`` and ``ref_len`` are those of all of ``references``.

    ``end_token`` (e.g. ``"<eos>"``) ends every tokenized reference, as the research codebase's SCST
    scores them (ruotianluo/ImageCaptioning.pytorch ``prepro_ngrams.py``): a candidate then earns it
    only by ending where its words end (the caller appends it to candidates that generated ``<eos>``),
    so a fragment such as "a man with a" is not rewarded like a whole caption (Hu et al., 2023,
    "SacreEOS", jchenghu/sacreeos).
    """

    def __init__(self, references: Mapping[int, Sequence[str]], end_token: str | None = None) -> None:
        if not references:
            raise ValueError("CIDEr-D needs training references: got no image")
        empty = [image_id for image_id, captions in references.items() if not captions]
        if empty:
            raise ValueError(f"{len(empty)} training images have no reference caption, e.g. image id {empty[0]}")
        self._image_index = {int(image_id): k for k, image_id in enumerate(references)}
        self._ref_counts = np.array([len(captions) for captions in references.values()])  # (I,)
        self._first_ref = np.cumsum(self._ref_counts) - self._ref_counts  # (I,)
        ending = [end_token] if end_token else []
        sentences = [caption.split() + ending for caption in ptb_tokenize_python_batch(
            [caption for captions in references.values() for caption in captions])]
        self._word_ids: dict[str, int] = {}
        words = np.fromiter((self._word_ids.setdefault(word, len(self._word_ids)) for sentence in sentences
                             for word in sentence), dtype=np.int64)  # (T,)
        lengths = np.array([len(sentence) for sentence in sentences], dtype=np.int64)  # (R,)
        ngrams = _intern(words, lengths, base=len(self._word_ids))
        self._keys = [np.append(keys, _PAST_EVERY_KEY) for keys in ngrams.keys]
        sizes = [len(keys) for keys in ngrams.keys]
        self._offsets = np.cumsum(sizes) - sizes  # (4,) global id of each order's first n-gram
        self._ngram_count = total = int(sum(sizes))

        # every n-gram occurrence: its reference and global n-gram id
        ref_of_token = np.repeat(np.arange(len(sentences)), lengths)  # (T,)
        refs = np.concatenate([ref_of_token[ids >= 0] for ids in ngrams.ids])  # (O,)
        grams = np.concatenate([ids[ids >= 0] + offset for ids, offset in zip(ngrams.ids, self._offsets)])  # (O,)
        image_of_ref = np.repeat(np.arange(len(references)), self._ref_counts)  # (R,)
        in_images = np.unique(image_of_ref[refs] * total + grams)  # each (image, n-gram) once
        self._document_frequency = np.bincount(in_images % total, minlength=total)  # (G,)
        self.ref_len = float(np.log(float(len(references))))
        self._idf = self.ref_len - np.log(np.maximum(1.0, self._document_frequency))  # (G,)

        pairs, term_frequency = np.unique(refs * total + grams, return_counts=True)  # (P,) by reference, n-gram
        pair_refs, pair_grams = pairs // total, pairs % total
        weights = term_frequency * self._idf[pair_grams]  # (P,) each reference's tf-idf vector
        orders = np.searchsorted(self._offsets, pair_grams, side="right") - 1  # (P,) n - 1
        self._ref_norms = np.sqrt(_sums(pair_refs * MAX_N + orders, weights ** 2,
                                        len(sentences) * MAX_N)).reshape(-1, MAX_N)  # (R, 4)
        self._ref_lengths = _penalty_lengths(lengths)  # (R,)
        # searchable by (image, n-gram); a stable sort keeps an image's references in their order
        lookup = image_of_ref[pair_refs] * total + pair_grams  # (P,)
        by_key = np.argsort(lookup, kind="stable")
        self._lookup_keys = lookup[by_key]
        self._lookup_weights = weights[by_key]
        slot_type = np.min_scalar_type(int(self._ref_counts.max()) - 1)
        self._lookup_slots = (pair_refs - self._first_ref[image_of_ref[pair_refs]])[by_key].astype(slot_type)
        log.info("CIDEr-D reward: %d training images, %d references, %d distinct n-grams",
                 len(references), len(sentences), total)

    def scores(self, image_ids: Sequence[int], candidates: Sequence[str]) -> np.ndarray:
        """CIDEr-D of each candidate against its image's training references, float64 ``(C,)``.

        Candidates are the words the model's vocabulary decodes, joined by spaces: the vocabulary's
        tokens are the evaluator's PTB tokens, which PTB tokenization gives back unchanged, so they
        are split on whitespace as pycocoevalcap splits its tokenized captions.
        """
        if len(image_ids) != len(candidates):
            raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
        if not candidates:
            return np.zeros(0)
        images = np.array([self._image(image_id) for image_id in image_ids], dtype=np.int64)  # (C,)
        cand, orders, grams, weights, lengths = self._candidate_vectors(candidates)
        norms = np.sqrt(_sums(cand * MAX_N + orders, weights ** 2,
                              len(candidates) * MAX_N)).reshape(-1, MAX_N)  # (C, 4)

        # each candidate n-gram meets its weight in every reference of its image that has it
        query = np.where(grams >= 0, images[cand] * self._ngram_count + grams, -1)  # (E,) -1 matches nothing
        low = np.searchsorted(self._lookup_keys, query, side="left")
        matches = np.searchsorted(self._lookup_keys, query, side="right") - low  # (E,)
        entry = np.repeat(np.arange(len(query)), matches)  # (M,)
        found = np.repeat(low - (np.cumsum(matches) - matches), matches) + np.arange(len(entry))  # (M,)
        reference_weights = self._lookup_weights[found]
        clipped = np.minimum(weights[entry], reference_weights) * reference_weights  # (M,)
        counts = self._ref_counts[images]  # (C,)
        width = int(counts.max())
        dots = _sums((cand[entry] * width + self._lookup_slots[found]) * MAX_N + orders[entry], clipped,
                     len(candidates) * width * MAX_N).reshape(-1, width, MAX_N)  # (C, W, 4)

        present = np.arange(width) < counts[:, None]  # (C, W) image's references, the rest padding
        refs = self._first_ref[images][:, None] + np.minimum(np.arange(width), counts[:, None] - 1)  # (C, W)
        reference_norms = self._ref_norms[refs]  # (C, W, 4)
        nonzero = (norms[:, None, :] != 0) & (reference_norms != 0)  # pycocoevalcap divides only then
        cosine = np.divide(dots, norms[:, None, :] * reference_norms, out=dots, where=nonzero)
        delta = (lengths[:, None] - self._ref_lengths[refs]).astype(np.float64)  # (C, W)
        penalty = np.exp(-(delta ** 2) / (2 * SIGMA ** 2))
        per_order = np.where(present[..., None], cosine * penalty[..., None], 0.0).sum(axis=1)  # (C, 4)
        return per_order.mean(axis=1) / counts * 10.0

    def document_frequencies(self) -> dict[tuple[str, ...], int]:
        """Each training n-gram's document frequency, keyed as pycocoevalcap's ``document_frequency``.

        For inspection and tests; scoring reads the integer arrays.
        """
        words = list(self._word_ids)  # id -> word
        ngrams: list[tuple[str, ...]] = []
        prefixes: list[tuple[str, ...]] = []
        for n, keys in enumerate(self._keys, start=1):
            keys = keys[:-1].tolist()
            prefixes = ([(words[k],) for k in keys] if n == 1
                        else [prefixes[k // len(words)] + (words[k % len(words)],) for k in keys])
            ngrams.extend(prefixes)
        return dict(zip(ngrams, self._document_frequency.tolist()))

    def _image(self, image_id: int) -> int:
        try:
            return self._image_index[int(image_id)]
        except KeyError:
            raise KeyError(f"image id {image_id} has no training references to score a caption against") from None

    def _candidate_vectors(self, candidates: Sequence[str]
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One entry per distinct n-gram of each candidate: candidate, n - 1, global n-gram id (-1 if
        never in training), tf-idf weight; and each candidate's penalty length."""
        sentences = [candidate.split() for candidate in candidates]
        lengths = np.array([len(sentence) for sentence in sentences], dtype=np.int64)  # (C,)
        flat = [word for sentence in sentences for word in sentence]
        words = np.array([self._word_ids.get(word, -1) for word in flat], dtype=np.int64)  # (T,)
        # words never in training: an id each from ``known`` on, so that their n-grams are counted apart
        unseen = np.flatnonzero(words < 0)
        unseen_words, unseen_ids = np.unique(np.array([flat[k] for k in unseen], dtype=str), return_inverse=True)
        known = len(self._word_ids)
        words[unseen] = known + unseen_ids
        base = known + len(unseen_words)
        batch = _intern(words, lengths, base)  # identifies n-grams within the batch, unseen ones too
        cand_of_token = np.repeat(np.arange(len(candidates)), lengths)  # (T,)
        columns: list[tuple[np.ndarray, ...]] = []
        training: np.ndarray | None = None
        for n, (distinct, ids) in enumerate(zip(batch.keys, batch.ids), start=1):
            training = self._training_ids(n, distinct, base, training)
            starts = ids >= 0
            size = len(distinct)
            pairs, term_frequency = np.unique(cand_of_token[starts] * size + ids[starts], return_counts=True)
            in_training = training[pairs % size]  # (E_n,)
            grams = np.where(in_training >= 0, in_training + self._offsets[n - 1], -1)
            idf = np.where(grams >= 0, self._idf[grams], self.ref_len)  # df 0 counts as 1: log(1) = 0
            columns.append((pairs // size, np.full(len(pairs), n - 1), grams, term_frequency * idf))
        cand, orders, grams, weights = (np.concatenate(column) for column in zip(*columns))
        return cand, orders, grams, weights, _penalty_lengths(lengths)

    def _training_ids(self, n: int, distinct: np.ndarray, base: int, prefix_ids: np.ndarray | None) -> np.ndarray:
        """The order-n training id of each of a batch's distinct order-n keys, -1 where never in training.

        ``prefix_ids`` are the training ids of the batch's distinct (n-1)-grams (None for n = 1).
        """
        known = len(self._word_ids)
        if n == 1:
            key, seen = distinct, distinct < known
        else:
            prefix, last = prefix_ids[distinct // base], distinct % base
            key, seen = prefix * known + last, (prefix >= 0) & (last < known)
        table = self._keys[n - 1]
        position = np.searchsorted(table, key)  # the final _PAST_EVERY_KEY keeps it in range
        return np.where(seen & (table[position] == key), position, -1)


def _sums(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """``weights`` summed by ``index`` into ``size`` float64 bins (``np.bincount`` gives int64 when empty)."""
    return np.bincount(index, weights=weights, minlength=size).astype(np.float64, copy=False)


def _penalty_lengths(lengths: np.ndarray) -> np.ndarray:
    """The length pycocoevalcap's penalty compares: its bigram count (``n == 1`` in its loop), words - 1."""
    return np.maximum(lengths - 1, 0)
