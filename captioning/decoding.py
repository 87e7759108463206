"""Caption generation: one entry point, ``generate(decoder, features, tokens, settings)``, and the
strategies behind it, written once against the decoder step interface (``CaptionDecoder``).

Validation/test, the ``caption`` CLI and ``Captioner`` all call ``generate`` with a
``GenerationSettings``, so they cannot decode differently for the same settings.
Every strategy returns token ids with ``<eos>`` and everything after it as ``<pad>``, the sum of
the chosen words' log-probabilities (``<eos>`` included) and, for attention decoders, the
attention weights behind every generated word. ``<pad>`` and ``<bos>`` are never generated, nor is
``<unk>`` when its id is given.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, NamedTuple, Protocol

import torch

from captioning.errors import check_choice
from captioning.models.decoders import CaptionDecoder, PreparedImages
from captioning.models.encoders import EncodedImages

Images = EncodedImages | PreparedImages  # the encoder's outputs, or the decoder's prepared ones
Strategy = Literal["greedy", "beam", "sample"]
STRATEGIES: tuple[Strategy, ...] = ("greedy", "beam", "sample")


@dataclass
class DecodedCaptions:
    """Generated captions, one row per caption."""

    tokens: torch.Tensor  # (rows, max_generated)
    log_probs: torch.Tensor  # (rows,)
    attention: torch.Tensor | None = None  # (rows, max_generated, num_pixels)
    # greedy and sample: each generated word's log-probability, 0 after <eos> (differentiable for SCST)
    word_log_probs: torch.Tensor | None = None  # (rows, max_generated)
    lengths: torch.Tensor | None = None  # (rows,) generated words, <eos> included


class TokenIds(Protocol):
    """The special token ids of a vocabulary (``captioning.data.vocab.Vocabulary`` has them)."""

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def unk_id(self) -> int: ...


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int = 0
    unk: int | None = None  # None: <unk> may be generated

    @classmethod
    def of(cls, ids: "SpecialTokens | TokenIds") -> "SpecialTokens":
        """A vocabulary's special tokens (``<unk>`` included: ``GenerationSettings.allow_unk`` decides)."""
        if isinstance(ids, SpecialTokens):
            return ids
        return cls(ids.bos_id, ids.eos_id, ids.pad_id, ids.unk_id)


# a CaptioningLitModule hyperparameter -> the GenerationSettings field it sets (the hyperparameters keep their names)
HPARAM_FIELDS = {"beam_size": "beam_size", "max_decode_length": "max_length", "length_penalty": "length_penalty",
                 "block_trigrams": "block_trigrams", "allow_unk": "allow_unk"}


@dataclass(frozen=True)
class GenerationSettings:
    """How captions are generated, in one object, so every caller that holds the same one decodes alike.

    ``strategy``: ``greedy`` (the most probable word; with ``block_trigrams``, a beam of 1), ``beam``
    (``beam_size`` hypotheses, ``n_best`` captions per image, ranked by log-probability /
    length ** ``length_penalty``) or ``sample`` (``temperature``, ``top_k``; 0 keeps every word).
    ``min_length`` words come before ``<eos>`` may: 1 by default, since an empty caption helps no one.
    ``allow_unk`` lets ``<unk>`` be generated.
    """

    strategy: Strategy = "greedy"
    beam_size: int = 1
    n_best: int = 1
    max_length: int = 20
    min_length: int = 1
    length_penalty: float = 0.0
    block_trigrams: bool = False
    allow_unk: bool = False
    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        check_choice(self.strategy, STRATEGIES, "strategy")
        _check_int("beam_size", self.beam_size, 1)
        if self.beam_size > 1 and self.strategy != "beam":
            raise ValueError(f"beam_size={self.beam_size} needs strategy='beam' (strategy is {self.strategy!r})")
        _check_int("n_best", self.n_best, 1, self.beam_size, f"beam_size={self.beam_size}")
        _check_int("max_length", self.max_length, 1)
        _check_int("min_length", self.min_length, 0, self.max_length, f"max_length={self.max_length}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (strategy='greedy' takes the "
                             "most probable word)")
        _check_int("top_k", self.top_k, 0)
        if self.strategy != "sample" and (self.temperature != 1.0 or self.top_k != 0):
            raise ValueError(f"temperature and top_k apply to strategy='sample' only, got temperature="
                             f"{self.temperature}, top_k={self.top_k} with strategy={self.strategy!r}")
        if self.strategy == "sample" and self.block_trigrams:
            raise ValueError("block_trigrams works with strategy 'greedy' or 'beam', not 'sample'")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any], **overrides: Any) -> "GenerationSettings":
        """The decoding a training run validated with, from its ``CaptioningLitModule`` hyperparameters (as a
        checkpoint stores them), with ``overrides`` by field name (None keeps the run's value).

        The module and ``Captioner.from_checkpoint`` both build their settings here. Without a
        ``strategy`` override, a ``beam_size`` above 1 means beam search and 1 greedy decoding.
        """
        unknown = sorted(set(overrides) - {field.name for field in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation settings {unknown}; valid: {[f.name for f in fields(cls)]}")
        values = {name: hparams[key] for key, name in HPARAM_FIELDS.items() if hparams.get(key) is not None}
        values |= {name: value for name, value in overrides.items() if value is not None}
        values.setdefault("strategy", "beam" if values.get("beam_size", 1) > 1 else "greedy")
        return cls(**values)


def _check_int(name: str, value: Any, low: int, high: int | None = None, high_name: str | None = None) -> None:
    """``low <= value`` (``<= high`` too when given), naming the field and the valid range."""
    valid = f">= {low}" if high is None else f"between {low} and {high_name or high}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {valid}, got {value!r}")


def generate(decoder: CaptionDecoder, features: Images, tokens: SpecialTokens | TokenIds,
             settings: GenerationSettings, generator: torch.Generator | None = None,
             differentiable: bool = False) -> DecodedCaptions:
    """Captions for every image by ``settings``: ``settings.n_best`` rows per image, image-major, best first.

    ``tokens``: a vocabulary or its ``SpecialTokens``. ``generator`` draws the words of ``sample``.
    ``differentiable``: keep the graph from the decoder's weights to ``word_log_probs`` (self-critical
    training samples this way); otherwise nothing is recorded for autograd.
    """
    if differentiable and (settings.strategy == "beam" or settings.block_trigrams):
        raise ValueError("differentiable generation samples or decodes greedily; beam search is not differentiable")
    special = SpecialTokens.of(tokens)
    if settings.allow_unk:
        special = replace(special, unk=None)
    common = {"bos_id": special.bos, "eos_id": special.eos, "pad_id": special.pad, "unk_id": special.unk,
              "max_length": settings.max_length, "min_length": settings.min_length}
    if settings.strategy == "beam" or settings.block_trigrams:  # a beam of 1 is greedy, with the blocking
        return beam_search(decoder, features, beam_size=settings.beam_size, length_penalty=settings.length_penalty,
                           n_best=settings.n_best, block_trigrams=settings.block_trigrams, **common)
    if settings.strategy == "sample":
        return sample_decode(decoder, features, temperature=settings.temperature, top_k=settings.top_k,
                             generator=generator, differentiable=differentiable, **common)
    return greedy_decode(decoder, features, differentiable=differentiable, **common)


def _word_log_probs(logits: torch.Tensor, special: SpecialTokens, allow_eos: bool) -> torch.Tensor:
    """Log-softmax over the vocabulary, with the words that may not be generated set to -inf."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab_size)
    banned = [special.pad, special.bos, *([special.unk] if special.unk is not None else []),
              *([special.eos] if not allow_eos else [])]
    if not log_probs.requires_grad:  # a few columns in place, not a pass over the whole (rows, vocab_size)
        log_probs[:, banned] = -torch.inf
        return log_probs
    mask = torch.zeros(log_probs.shape[1], dtype=torch.bool, device=log_probs.device)
    mask[banned] = True
    return log_probs.masked_fill(mask, -torch.inf)  # not in place: autograd needs log_softmax's output


def _finish(words: list[torch.Tensor], log_probs: torch.Tensor, attention: list[torch.Tensor],
            special: SpecialTokens, word_log_probs: list[torch.Tensor] | None = None) -> DecodedCaptions:
    rows, device = log_probs.shape[0], log_probs.device
    tokens = torch.stack(words, dim=1) if words else torch.zeros(rows, 0, dtype=torch.long, device=device)
    weights = torch.stack(attention, dim=1) if attention else None
    per_word = lengths = None
    if word_log_probs is not None:
        per_word = torch.stack(word_log_probs, dim=1) if word_log_probs else log_probs.new_zeros(rows, 0)
        lengths = (tokens != special.pad).sum(dim=1)  # <eos> still counts here: it is a generated word
    return DecodedCaptions(tokens.masked_fill(tokens == special.eos, special.pad), log_probs, weights, per_word,
                           lengths)


Chooser = Callable[[torch.Tensor], torch.Tensor]  # (rows, vocab) log-probs -> (rows,) token ids


class _BeamStep(NamedTuple):
    """One beam-search step, kept so that captions are read back once at the end."""

    origin: torch.Tensor  # (rows,) the row each new running beam extends
    token: torch.Tensor  # (rows,) the word it adds
    weights: torch.Tensor | None  # (rows, num_pixels) attention of the rows the step extended


class _Finished(NamedTuple):
    """Each image's best finished hypotheses, best first, and where to read their words back."""

    rank: torch.Tensor  # (images, n_best) log-probability / length ** length_penalty
    log_prob: torch.Tensor  # (images, n_best) raw sum of log-probabilities
    step: torch.Tensor  # (images, n_best) the step that added the last word (-1: empty slot)
    origin: torch.Tensor  # (images, n_best) the row that step extended
    token: torch.Tensor  # (images, n_best) the last word: <eos>, or any word when cut at max_length

    def merge(self, other: "_Finished") -> "_Finished":
        """The best ``n_best`` of both, best first."""
        rank, best = torch.cat([self.rank, other.rank], dim=1).topk(self.rank.shape[1], dim=1)
        return _Finished(rank, *(torch.cat([mine, theirs], dim=1).gather(1, best)
                                 for mine, theirs in zip(self[1:], other[1:])))


def _decode_one_path(decoder: CaptionDecoder, features: Images, special: SpecialTokens, max_length: int,
                     min_length: int, choose: Chooser, differentiable: bool) -> DecodedCaptions:
    """One word per step per image, picked by ``choose``, until ``<eos>`` or ``max_length`` words; with
    ``differentiable``, autograd records the way from the weights to ``word_log_probs``."""
    with torch.set_grad_enabled(differentiable):
        return _decode_steps(decoder, features, special, max_length, min_length, choose)


def _decode_steps(decoder: CaptionDecoder, features: Images, special: SpecialTokens, max_length: int,
                  min_length: int, choose: Chooser) -> DecodedCaptions:
    features = decoder.prepare(features)
    rows, device = features.global_features.shape[0], features.global_features.device
    state = decoder.init_state(features)
    token = torch.full((rows,), special.bos, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    total = torch.zeros(rows, device=device)
    words: list[torch.Tensor] = []
    chosen: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []
    for t in range(max_length):
        logits, state, weights = decoder.step(token, state, features)  # (rows, vocab_size)
        log_probs = _word_log_probs(logits, special, allow_eos=t >= min_length)
        token = choose(log_probs.detach())  # (rows,)
        chosen.append(log_probs.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0))  # (rows,)
        total += chosen[-1].detach()
        words.append(token.masked_fill(finished, special.pad))
        if weights is not None:
            attention.append(weights.masked_fill(finished.unsqueeze(1), 0.0))
        finished = finished | (token == special.eos)  # a new tensor: masked_fill above keeps the old for autograd
        if finished.all():
            break
    return _finish(words, total, attention, special, chosen)


def greedy_decode(decoder: CaptionDecoder, features: Images, bos_id: int, eos_id: int, max_length: int,
                  pad_id: int = 0, min_length: int = 0, unk_id: int | None = None,
                  differentiable: bool = False) -> DecodedCaptions:
    """The most probable word at every step."""
    return _decode_one_path(decoder, features, SpecialTokens(bos_id, eos_id, pad_id, unk_id), max_length, min_length,
                            lambda log_probs: log_probs.argmax(dim=-1), differentiable)


def sample_decode(decoder: CaptionDecoder, features: Images, bos_id: int, eos_id: int, max_length: int,
                  pad_id: int = 0, min_length: int = 0, temperature: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None, unk_id: int | None = None,
                  differentiable: bool = False) -> DecodedCaptions:
    """Words drawn from the model's distribution, sharpened by ``temperature`` and cut to the ``top_k``.

    The returned log-probabilities are the model's own (temperature 1, no cut).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use greedy decoding for 0)")

    def draw(log_probs: torch.Tensor) -> torch.Tensor:
        scores = log_probs / temperature
        if top_k > 0:
            kth = scores.topk(min(top_k, scores.shape[1]), dim=1).values[:, -1:]  # (rows, 1)
            scores = scores.masked_fill(scores < kth, -torch.inf)
        return torch.multinomial(torch.softmax(scores, dim=1), 1, generator=generator).squeeze(1)

    return _decode_one_path(decoder, features, SpecialTokens(bos_id, eos_id, pad_id, unk_id), max_length,
                            min_length, draw, differentiable)


@torch.no_grad()
def beam_search(decoder: CaptionDecoder, features: Images, bos_id: int, eos_id: int, max_length: int,
                beam_size: int = 3, pad_id: int = 0, min_length: int = 0, length_penalty: float = 0.0,
                n_best: int = 1, unk_id: int | None = None, block_trigrams: bool = False) -> DecodedCaptions:
    """Beam search over all images and beams at once (one decoder call per step).

    A hypothesis is ranked by its sum of log-probabilities divided by ``length ** length_penalty``
    (0: plain log-probability; the length counts ``<eos>``). It is ranked that way while searching
    too, so the search cannot prune what would have ranked best: a hypothesis that emits ``<eos>``
    among the step's ``beam_size`` best candidates leaves the beam for its image's pool of the
    ``n_best`` best finished ones, the beam goes on with the ``beam_size`` best running ones, and an
    image is done once none of those can still beat its worst pooled one. At ``max_length`` the
    running hypotheses are finished as they are.
    ``block_trigrams`` forbids a word that would repeat a trigram the hypothesis already holds.
    Returns ``n_best`` rows per image, image-major and best first: row ``i * n_best + j`` is image
    i's j-th best caption.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size={beam_size}, got {n_best}")
    special = SpecialTokens(bos_id, eos_id, pad_id, unk_id)
    features = decoder.prepare(features)
    images, device = features.global_features.shape[0], features.global_features.device
    rows = images * beam_size
    image_of_row = torch.arange(images, device=device).repeat_interleave(beam_size)  # (rows,)
    row_offset = (torch.arange(images, device=device) * beam_size).unsqueeze(1)  # (images, 1)
    beam_rows = torch.arange(rows, device=device).view(images, beam_size)
    # All beams start as the same empty caption: the first step runs once per image, then only
    # beam 0 extends it.
    state = decoder.init_state(features)
    token = torch.full((images,), bos_id, dtype=torch.long, device=device)
    step_features = features
    scores = torch.full((images, beam_size), -torch.inf, device=device)  # running hypotheses, best first
    scores[:, 0] = 0.0
    empty = torch.full((images, n_best), -torch.inf, device=device)
    finished = _Finished(empty, empty, torch.full_like(empty, -1, dtype=torch.long),
                         torch.zeros_like(empty, dtype=torch.long), torch.full_like(empty, pad_id, dtype=torch.long))
    history = torch.zeros(rows, 0, dtype=torch.long, device=device)  # running words, kept for trigram blocking
    steps: list[_BeamStep] = []
    for t in range(max_length):
        logits, state, weights = decoder.step(token, state, step_features)  # (images or rows, vocab_size)
        log_probs = _word_log_probs(logits, special, allow_eos=t >= min_length)
        if t == 0:
            log_probs = log_probs[image_of_row]  # (rows, vocab_size)
            state = tuple(part.index_select(1, image_of_row) for part in state)
            weights = None if weights is None else weights[image_of_row]
            step_features = features.select(image_of_row)
        if block_trigrams:
            log_probs = log_probs.masked_fill(_repeated_trigrams(history, log_probs.shape[1]), -torch.inf)
        length = t + 1
        ending = scores + log_probs[:, eos_id].view(images, beam_size)  # (images, beam_size) ends with <eos>
        log_probs[:, eos_id] = -torch.inf
        # no word outside a beam's own best ``beam_size`` can be among its image's best ``beam_size``
        words_kept = min(beam_size, log_probs.shape[1])
        word_scores, words = log_probs.topk(words_kept, dim=1)  # (rows, words_kept)
        candidates = (scores.view(rows, 1) + word_scores).view(images, beam_size * words_kept)
        scores, best = candidates.topk(beam_size, dim=1)  # (images, beam_size)
        origin = (row_offset + best // words_kept).view(rows)  # which row each new beam extends
        token = words.view(images, beam_size * words_kept).gather(1, best).view(rows)
        steps.append(_BeamStep(origin, token, weights))
        # an <eos> outside the step's best ``beam_size`` would not have been in the beam (beam 1 stays greedy)
        kept = torch.cat([ending, scores], dim=1).topk(beam_size, dim=1).values[:, -1:]  # (images, 1)
        ending = ending.masked_fill(ending < kept, -torch.inf)
        finished = finished.merge(_Finished(ending / length ** length_penalty, ending, torch.full_like(beam_rows, t),
                                            beam_rows, torch.full_like(beam_rows, eos_id)))
        if length == max_length:
            finished = finished.merge(_Finished(scores / length ** length_penalty, scores,
                                                torch.full_like(beam_rows, t), origin.view(images, beam_size),
                                                token.view(images, beam_size)))
            break
        # sums only fall, so the best running one bounds them all, at its best final length
        bound = torch.maximum(scores[:, 0] / (length + 1) ** length_penalty,
                              scores[:, 0] / max_length ** length_penalty)  # (images,)
        if (bound < finished.rank[:, -1]).all():
            break
        state = tuple(part.index_select(1, origin) for part in state)
        if block_trigrams:
            history = torch.cat([history[origin], token.unsqueeze(1)], dim=1)  # (rows, length)
    tokens, attention = _backtrack(steps, finished, special)
    return DecodedCaptions(tokens, finished.log_prob.view(-1), attention)


def _repeated_trigrams(history: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(rows, vocab_size): True for the words that would end a trigram already in the row's ``history``."""
    rows, length = history.shape
    blocked = torch.zeros(rows, vocab_size, dtype=torch.long, device=history.device)
    if length >= 3:
        # trigram (history[j], history[j+1], history[j+2]) starts like the one the next word ends
        repeats = (history[:, :-2] == history[:, -2:-1]) & (history[:, 1:-1] == history[:, -1:])  # (rows, length-2)
        blocked.scatter_add_(1, history[:, 2:], repeats.long())
    return blocked > 0


def _backtrack(steps: list[_BeamStep], finished: _Finished, special: SpecialTokens
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The words (and attention) of the finished hypotheses, following the backpointers once.

    Reordering whole histories at every step would copy them ``max_length`` times instead.
    """
    end_step, end_origin, end_token = (field.reshape(-1) for field in finished[2:])  # (chosen,)
    row = torch.zeros_like(end_origin)
    words: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []
    for t in reversed(range(len(steps))):
        step, ends_here, done = steps[t], end_step == t, end_step < t
        words.append(torch.where(ends_here, end_token, step.token[row]).masked_fill(done, special.pad))
        row = torch.where(ends_here, end_origin, step.origin[row])  # the row the word was predicted from
        if step.weights is not None:
            attention.append(step.weights[row].masked_fill(done.unsqueeze(1), 0.0))
    if not words:
        return torch.zeros(end_step.shape[0], 0, dtype=torch.long, device=end_step.device), None
    tokens = torch.stack(words[::-1], dim=1)  # (chosen, steps)
    tokens = tokens.masked_fill(tokens == special.eos, special.pad)
    if not attention:
        return tokens, None
    return tokens, torch.stack(attention[::-1], dim=1)  # (chosen, steps, num_pixels)
