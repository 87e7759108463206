"""Caption decoding strategies, written once against the decoder step interface."""

from dataclasses import dataclass

import torch
from torch import nn

from captioning.models.encoders import EncodedImages


@dataclass
class DecodedCaptions:
    """Generated token ids (``<eos>`` and after replaced by ``<pad>``) and their log-probabilities."""

    tokens: torch.Tensor  # (batch, max_generated)
    log_probs: torch.Tensor  # (batch,) sum of the chosen words' log-probabilities, <eos> included


@torch.no_grad()
def greedy_decode(decoder: nn.Module, features: EncodedImages, bos_id: int, eos_id: int,
                  max_length: int, pad_id: int = 0) -> DecodedCaptions:
    """Pick the most probable word at every step, until ``<eos>`` or ``max_length`` words."""
    batch = features.global_features.shape[0]
    device = features.global_features.device
    state = decoder.init_state(features)
    token = torch.full((batch,), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    log_probs = torch.zeros(batch, device=device)
    words = []
    for _ in range(max_length):
        logits, state = decoder.step(token, state, features)  # (batch, vocab_size)
        step_log_probs = torch.log_softmax(logits.float(), dim=-1)
        token_log_prob, token = step_log_probs.max(dim=-1)  # (batch,), (batch,)
        log_probs += token_log_prob.masked_fill(finished, 0.0)
        words.append(token.masked_fill(finished, pad_id))
        finished |= token == eos_id
        if finished.all():
            break
    tokens = torch.stack(words, dim=1) if words else torch.zeros(batch, 0, dtype=torch.long, device=device)
    return DecodedCaptions(tokens.masked_fill(tokens == eos_id, pad_id), log_probs)
