"""Soft attention over the encoder's grid (Show, Attend and Tell, Xu et al., 2015) and its context encoder."""

import torch
from torch import nn


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

    def forward(self, grid: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (batch, encoder_dim) and weights (batch, num_pixels), which sum to 1 per row."""
        query = self.query_projection(hidden).unsqueeze(1)  # (batch, 1, attention_dim)
        scores = self.score(torch.tanh(keys + query)).squeeze(2)  # (batch, num_pixels)
        weights = torch.softmax(scores, dim=1)  # (batch, num_pixels)
        context = torch.bmm(weights.unsqueeze(1), grid).squeeze(1)  # (batch, encoder_dim)
        return context, weights


class BidirectionalContext(nn.Module):
    """A bidirectional RNN over the grid cells in raster order, so each cell sees the whole image.

    Output: (batch, num_pixels, 2 * hidden_size), the annotation vectors attention reads.
    """

    def __init__(self, encoder_dim: int, hidden_size: int, cell: str = "gru") -> None:
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}.get(cell)
        if rnn is None:
            raise ValueError(f"context encoder cell must be gru or lstm, got {cell!r}")
        self.rnn = rnn(encoder_dim, hidden_size, batch_first=True, bidirectional=True)
        self.output_dim = 2 * hidden_size

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        annotations, _ = self.rnn(grid)  # (batch, num_pixels, 2 * hidden_size)
        return annotations
