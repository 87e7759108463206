"""Scheduled sampling (Bengio et al., 2015): train on some of the model's own words instead of the truth.

Written against the decoder step interface, so it works for every decoder. It steps word by word
(no packed fast path), which is the price of feeding back the model's own samples.
"""

from dataclasses import dataclass

import torch

from captioning.models.decoders import CaptionDecoder, DecoderOutput, PreparedImages
from captioning.models.encoders import EncodedImages


@dataclass(frozen=True)
class SamplingSchedule:
    """Probability of feeding a sampled word in epoch ``e`` (counted from 0), as
    ruotianluo/ImageCaptioning.pytorch's ``scheduled_sampling_*`` options set it (tools/train.py):
    0 up to ``start_epoch``, then ``increase_by * ((e - start_epoch) // increase_every)``, capped at
    ``max_probability``; with the defaults, epochs 0-4 give 0, 5-9 give 0.05, 25 and later 0.25."""

    start_epoch: int = 0
    increase_every: int = 5
    increase_by: float = 0.05
    max_probability: float = 0.25

    def probability(self, epoch: int) -> float:
        if epoch <= self.start_epoch:
            return 0.0
        increases = (epoch - self.start_epoch) // self.increase_every
        return min(self.max_probability, increases * self.increase_by)


def scheduled_sampling_forward(decoder: CaptionDecoder, features: EncodedImages | PreparedImages,
                               tokens: torch.Tensor, lengths: torch.Tensor, probability: float,
                               generator: torch.Generator | None = None) -> DecoderOutput:
    """Like ``decoder(features, tokens, lengths)``, but each input word after ``<bos>`` is, with
    ``probability``, a word sampled from the model's previous prediction (no gradient through it)."""
    features = decoder.prepare(features)
    state = decoder.init_state(features)
    steps = tokens.shape[1] - 1
    valid = torch.arange(steps, device=tokens.device).unsqueeze(0) < (lengths - 1).unsqueeze(1)  # (batch, steps)
    all_logits, all_weights = [], []
    previous: torch.Tensor | None = None
    for t in range(steps):
        word = tokens[:, t]  # (batch,)
        if previous is not None and probability > 0:
            sampled = torch.multinomial(torch.softmax(previous.detach().float(), dim=-1), 1,
                                        generator=generator).squeeze(1)
            use_sample = torch.rand(word.shape, device=word.device, generator=generator) < probability
            word = torch.where(use_sample, sampled, word)
        previous, state, weights = decoder.step(word, state, features)  # (batch, vocab_size)
        all_logits.append(previous)
        if weights is not None:
            all_weights.append(weights * valid[:, t:t + 1])
    word_logits = torch.stack(all_logits, dim=1)[valid]  # (words, vocab_size)
    attention = torch.stack(all_weights, dim=1) if all_weights else None
    return DecoderOutput(word_logits, valid, attention, features.mask)
