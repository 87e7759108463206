"""Caption decoding strategies, written once against the decoder step interface.

Every strategy returns token ids with ``<eos>`` and everything after it as ``<pad>``, the sum of
the chosen words' log-probabilities (``<eos>`` included) and, for attention decoders, the
attention weights behind every generated word. ``<pad>`` and ``<bos>`` are never generated.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from captioning.models.encoders import EncodedImages


@dataclass
class DecodedCaptions:
    """Generated captions, one row per caption."""

    tokens: torch.Tensor  # (rows, max_generated)
    log_probs: torch.Tensor  # (rows,)
    attention: torch.Tensor | None = None  # (rows, max_generated, num_pixels)


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int = 0


def _word_log_probs(logits: torch.Tensor, special: SpecialTokens, allow_eos: bool) -> torch.Tensor:
    """Log-softmax over the vocabulary, with the words that may not be generated set to -inf."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # (rows, vocab_size)
    log_probs[:, special.pad] = -torch.inf
    log_probs[:, special.bos] = -torch.inf
    if not allow_eos:
        log_probs[:, special.eos] = -torch.inf
    return log_probs


def _finish(words: list[torch.Tensor], log_probs: torch.Tensor, attention: list[torch.Tensor],
            special: SpecialTokens) -> DecodedCaptions:
    rows, device = log_probs.shape[0], log_probs.device
    tokens = torch.stack(words, dim=1) if words else torch.zeros(rows, 0, dtype=torch.long, device=device)
    weights = torch.stack(attention, dim=1) if attention else None
    return DecodedCaptions(tokens.masked_fill(tokens == special.eos, special.pad), log_probs, weights)


Chooser = Callable[[torch.Tensor], torch.Tensor]  # (rows, vocab) log-probs -> (rows,) token ids


class _BeamStep(NamedTuple):
    """One beam-search step, kept so that captions are read back once at the end."""

    origin: torch.Tensor  # (rows,) the row each new beam extends
    token: torch.Tensor  # (rows,) the word it adds
    weights: torch.Tensor | None  # (rows, num_pixels) attention of the rows the step extended


@torch.no_grad()
def _decode_one_path(decoder: nn.Module, features: EncodedImages, special: SpecialTokens, max_length: int,
                     min_length: int, choose: Chooser) -> DecodedCaptions:
    """One word per step per image, picked by ``choose``, until ``<eos>`` or ``max_length`` words."""
    features = decoder.prepare(features)
    rows, device = features.global_features.shape[0], features.global_features.device
    state = decoder.init_state(features)
    token = torch.full((rows,), special.bos, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    total = torch.zeros(rows, device=device)
    words: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []
    for t in range(max_length):
        logits, state, weights = decoder.step(token, state, features)  # (rows, vocab_size)
        log_probs = _word_log_probs(logits, special, allow_eos=t >= min_length)
        token = choose(log_probs)  # (rows,)
        total += log_probs.gather(1, token.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
        words.append(token.masked_fill(finished, special.pad))
        if weights is not None:
            attention.append(weights.masked_fill(finished.unsqueeze(1), 0.0))
        finished |= token == special.eos
        if finished.all():
            break
    return _finish(words, total, attention, special)


def greedy_decode(decoder: nn.Module, features: EncodedImages, bos_id: int, eos_id: int, max_length: int,
                  pad_id: int = 0, min_length: int = 0) -> DecodedCaptions:
    """The most probable word at every step."""
    return _decode_one_path(decoder, features, SpecialTokens(bos_id, eos_id, pad_id), max_length, min_length,
                            lambda log_probs: log_probs.argmax(dim=-1))


def sample_decode(decoder: nn.Module, features: EncodedImages, bos_id: int, eos_id: int, max_length: int,
                  pad_id: int = 0, min_length: int = 0, temperature: float = 1.0, top_k: int = 0,
                  generator: torch.Generator | None = None) -> DecodedCaptions:
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

    return _decode_one_path(decoder, features, SpecialTokens(bos_id, eos_id, pad_id), max_length, min_length,
                            draw)


@torch.no_grad()
def beam_search(decoder: nn.Module, features: EncodedImages, bos_id: int, eos_id: int, max_length: int,
                beam_size: int = 3, pad_id: int = 0, min_length: int = 0, length_penalty: float = 0.0,
                n_best: int = 1) -> DecodedCaptions:
    """Beam search over all images and beams at once (one decoder call per step).

    Finished hypotheses stay in the beam with their score frozen, competing with running ones.
    The final ranking divides each sum of log-probabilities by ``length ** length_penalty``
    (0: plain log-probability). Returns ``n_best`` rows per image, image-major and best first:
    row ``i * n_best + j`` is image i's j-th best caption.
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size={beam_size}, got {n_best}")
    special = SpecialTokens(bos_id, eos_id, pad_id)
    features = decoder.prepare(features)
    images, device = features.global_features.shape[0], features.global_features.device
    rows = images * beam_size
    image_of_row = torch.arange(images, device=device).repeat_interleave(beam_size)  # (rows,)
    row_offset = (torch.arange(images, device=device) * beam_size).unsqueeze(1)  # (images, 1)
    # All beams start as the same empty caption: the first step runs once per image, then only
    # beam 0 extends it.
    state = decoder.init_state(features)
    token = torch.full((images,), bos_id, dtype=torch.long, device=device)
    step_features = features
    scores = torch.full((images, beam_size), -torch.inf, device=device)
    scores[:, 0] = 0.0
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    finished_scores = torch.full((1, beam_size), -torch.inf, device=device)
    finished_scores[0, 0] = 0.0  # a finished caption continues with free padding only
    steps: list[_BeamStep] = []
    for t in range(max_length):
        logits, state, weights = decoder.step(token, state, step_features)  # (images or rows, vocab_size)
        # no word outside a beam's own best ``beam_size`` can be among its image's best ``beam_size``
        words_kept = min(beam_size, logits.shape[1])
        word_scores, words = _word_log_probs(logits, special, allow_eos=t >= min_length).topk(words_kept, dim=1)
        if t == 0:
            word_scores, words = word_scores[image_of_row], words[image_of_row]  # (rows, words_kept)
            state = tuple(part.index_select(1, image_of_row) for part in state)
            weights = None if weights is None else weights[image_of_row]
            step_features = features.select(image_of_row)
        word_scores = torch.where(finished.unsqueeze(1), finished_scores[:, :words_kept], word_scores)
        words = words.masked_fill(finished.unsqueeze(1), pad_id)
        candidates = (scores.view(rows, 1) + word_scores).view(images, beam_size * words_kept)
        scores, best = candidates.topk(beam_size, dim=1)  # (images, beam_size)
        origin = (row_offset + best // words_kept).view(rows)  # which row each new beam extends
        token = words.view(images, beam_size * words_kept).gather(1, best).view(rows)
        state = tuple(part.index_select(1, origin) for part in state)
        was_finished = finished[origin]
        lengths = lengths[origin] + ~was_finished
        finished = was_finished | (token == eos_id)
        steps.append(_BeamStep(origin, token, weights))
        if finished.all():
            break
    ranking = scores / lengths.view(images, beam_size).clamp(min=1) ** length_penalty
    chosen = (row_offset + ranking.topk(n_best, dim=1).indices).view(-1)  # (images * n_best,)
    tokens, attention = _backtrack(steps, chosen, special)
    return DecodedCaptions(tokens, scores.view(rows)[chosen], attention)


def _backtrack(steps: list[_BeamStep], chosen: torch.Tensor, special: SpecialTokens
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The words (and attention) of the ``chosen`` final beams, following the backpointers once.

    Reordering whole histories at every step would copy them ``max_length`` times instead.
    """
    row = chosen  # (chosen,)
    words: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []
    for step in reversed(steps):
        words.append(step.token[row])
        row = step.origin[row]  # the row the word was predicted from
        if step.weights is not None:
            attention.append(step.weights[row])
    if not words:
        return torch.zeros(chosen.shape[0], 0, dtype=torch.long, device=chosen.device), None
    tokens = torch.stack(words[::-1], dim=1)  # (chosen, steps)
    is_eos = tokens == special.eos
    after_eos = is_eos.cumsum(dim=1) > is_eos  # the beam had finished before this step
    tokens = tokens.masked_fill(is_eos, special.pad)
    if not attention:
        return tokens, None
    weights = torch.stack(attention[::-1], dim=1)  # (chosen, steps, num_pixels)
    return tokens, weights.masked_fill(after_eos.unsqueeze(2), 0.0)
