"""Training losses."""

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over non-padding targets; padded positions are not even computed.

    logits (num_captions, steps, vocab_size), targets (num_captions, steps).
    """
    real = targets != pad_id  # (num_captions, steps)
    return F.cross_entropy(logits[real].float(), targets[real], label_smoothing=label_smoothing)  # (words, vocab)


def doubly_stochastic_penalty(attention: torch.Tensor) -> torch.Tensor:
    """Show, Attend and Tell's eq. 14: push every grid cell's attention, summed over a caption's
    words, towards 1, so that the caption looks at the whole image.

    attention (num_captions, steps, num_pixels), zeros at padded steps -> mean over captions and pixels.
    """
    return ((1.0 - attention.sum(dim=1)) ** 2).mean()
