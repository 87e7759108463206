"""Soft attention over a grid or regions (Show, Attend and Tell, Xu et al., 2015) and its context encoder."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention: weights over grid cells from the decoder's hidden state.

    The grid's projection does not depend on the step, so it is computed once per image
    (``project``) and passed to every step as ``keys``.
    """

    def __init__(self, encoder_dim: int, hidden_size: int, attention_dim: int) -> None:
        super().__init__()
        self.key_projection = nn.Linear(encoder_dim, attention_dim)
        self.query_projection = nn.Linear(hidden_size, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, grid: torch.Tensor) -> torch.Tensor:
        """(batch, num_pixels, encoder_dim) -> keys (batch, num_pixels, attention_dim)."""
        return self.key_projection(grid)

    def forward(self, grid: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (batch, encoder_dim) and weights (batch, num_pixels), which sum to 1 per row.

        ``mask`` (batch, num_pixels), True for real regions: padded ones score -inf, so their weight
        is exactly 0 and the real ones' softmax is the one they would have alone.
        """
        return self.attend(grid, keys, self.query_projection(hidden), mask)

    def attend(self, grid: torch.Tensor, keys: torch.Tensor, query: torch.Tensor,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` from the projected query (batch, attention_dim), for decoders that compute it
        in one product with other projections of the same hidden state."""
        # w·tanh(z) + b computed as 2w·sigmoid(2z) + (b - Σw): the same function, but torch's CPU sigmoid
        # costs a fraction of its tanh, and this (batch, num_pixels, attention_dim) is the step's largest tensor
        squashed = (keys + query.unsqueeze(1)).mul_(2).sigmoid_()  # (batch, num_pixels, attention_dim)
        weight, bias = self.score.weight, self.score.bias  # (1, attention_dim), (1,)
        scores = F.linear(squashed, 2 * weight, bias - weight.sum(dim=1)).squeeze(2)  # (batch, num_pixels)
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf)
        weights = torch.softmax(scores, dim=1)  # (batch, num_pixels)
        context = torch.bmm(weights.unsqueeze(1), grid).squeeze(1)  # (batch, encoder_dim)
        return context, weights


class BidirectionalContext(nn.Module):
    """A bidirectional RNN over the grid cells in raster order, so each cell sees the whole image.

    Output: (batch, num_pixels, 2 * hidden_size), the annotation vectors attention reads. With a
    ``mask`` each row runs as a packed sequence over its real regions only (they must come first),
    so the backward direction starts at the last real region, not in the padding, and padded
    positions come out as zeros.
    """

    def __init__(self, encoder_dim: int, hidden_size: int, cell: str = "gru") -> None:
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}.get(cell)
        if rnn is None:
            raise ValueError(f"context encoder cell must be gru or lstm, got {cell!r}")
        self.rnn = rnn(encoder_dim, hidden_size, batch_first=True, bidirectional=True)
        self.output_dim = 2 * hidden_size

    def forward(self, grid: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            annotations, _ = self.rnn(grid)  # (batch, num_pixels, 2 * hidden_size)
            return annotations
        lengths = mask.sum(dim=1)  # (batch,)
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths.unsqueeze(1)):
            raise ValueError("the bidirectional context encoder needs each image's real regions first and its "
                             "padding after them (a mask that is True, then False, along each row)")
        packed = pack_padded_sequence(grid, lengths.cpu(), batch_first=True, enforce_sorted=False)
        annotations, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=grid.shape[1])
        return annotations  # (batch, num_pixels, 2 * hidden_size), zeros at padded regions
