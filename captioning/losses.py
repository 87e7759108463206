"""Training losses."""

import torch
import torch.nn.functional as F


def _real_word_logits(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(words, vocab_size) float logits of the real words, from padded logits (num_captions, steps, vocab_size)
    or from logits that hold only the real words already (``DecoderOutput.word_logits``)."""
    if logits.dim() == 3:
        logits = logits[real]
    elif logits.shape[0] != int(real.sum()):
        raise ValueError(f"{logits.shape[0]} rows of word logits for {int(real.sum())} real target words: the "
                         "targets' padding must match the caption lengths the decoder was given")
    return logits.float()


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0,
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over non-padding targets; padded positions are not even computed.

    logits (num_captions, steps, vocab_size) or the real words' only (words, vocab_size), targets
    (num_captions, steps).
    """
    real = targets != pad_id  # (num_captions, steps)
    return F.cross_entropy(_real_word_logits(logits, real), targets[real], label_smoothing=label_smoothing)


def caption_negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each caption's summed negative log-likelihood (float64) and its number of real words.

    Sums, not means, so that a corpus loss (sum over captions / words over captions) is the same for
    any batching and any number of processes. logits (num_captions, steps, vocab_size) or the real
    words' only (words, vocab_size), targets (num_captions, steps) -> two (num_captions,) tensors.
    """
    real = targets != pad_id  # (num_captions, steps)
    word_nll = F.cross_entropy(_real_word_logits(logits, real), targets[real], reduction="none")  # (words,)
    caption_of_word = real.nonzero()[:, 0]  # (words,)
    nll = torch.zeros(targets.shape[0], dtype=torch.float64, device=targets.device)
    return nll.index_add_(0, caption_of_word, word_nll.double()), real.sum(dim=1)


def doubly_stochastic_penalty(attention: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Show, Attend and Tell's eq. 14: push every grid cell's attention, summed over a caption's
    words, towards 1, so that the caption looks at the whole image.

    attention (num_captions, steps, num_pixels), zeros at padded steps -> mean over captions of the
    mean over their pixels. ``mask`` (num_captions, num_pixels), True for real regions: padded ones
    (never attended, so they would each add 1) are left out and each caption's mean is over its
    real regions; without a mask every pixel is real (the same mean, computed as it always was).
    """
    missing = (1.0 - attention.sum(dim=1)) ** 2  # (num_captions, num_pixels)
    if mask is None:
        return missing.mean()
    return (missing.masked_fill(~mask, 0.0).sum(dim=1) / mask.sum(dim=1)).mean()
