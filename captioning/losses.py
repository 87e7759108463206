"""Training losses."""

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over non-padding targets; padded positions never contribute.

    logits (num_captions, steps, vocab_size), targets (num_captions, steps).
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=pad_id, label_smoothing=label_smoothing)
