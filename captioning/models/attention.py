"""Soft attention over a grid or regions (Show, Attend and Tell, Xu et al., 2015) and its context encoder."""

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from captioning.models.packed_linear import linear, recording_graph


SCORE_CHUNK_ELEMENTS = 1 << 19  # 2 MB of float32 per chunk of attention scores: within the cores' L2 caches


class AdditiveAttention(nn.Module):
    """Additive (Bahdanau) attention: weights over grid cells from the decoder's hidden state.

    The grid's projection does not depend on the step, so it is computed once per image
    (``project``) and passed to every step as ``keys``.

    Scores are w·tanh(W_k v + W_q h) + b, computed as 2w·sigmoid(2 W_k v + 2 W_q h) + (b - Σw): the
    same function, but torch's CPU sigmoid costs a fraction of its tanh on a step's largest tensor.
    So ``keys`` and the query (``project_query``) come doubled: 2(W_k v + b_k) and 2(W_q h + b_q).
    """

    def __init__(self, encoder_dim: int, hidden_size: int, attention_dim: int) -> None:
        super().__init__()
        self.key_projection = nn.Linear(encoder_dim, attention_dim)
        self.query_projection = nn.Linear(hidden_size, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, grid: torch.Tensor) -> torch.Tensor:
        """(batch, num_pixels, encoder_dim) -> keys (batch, num_pixels, attention_dim), doubled."""
        return linear(grid, 2 * self.key_projection.weight, 2 * self.key_projection.bias)

    def query_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The doubled query projection's weight (attention_dim, hidden_size) and bias, for decoders that
        compute it in one product with other projections of the same hidden state."""
        return 2 * self.query_projection.weight, 2 * self.query_projection.bias

    def project_query(self, hidden: torch.Tensor) -> torch.Tensor:
        """(batch, hidden_size) -> the query (batch, attention_dim), doubled."""
        return F.linear(hidden, *self.query_weights())

    def forward(self, grid: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (batch, encoder_dim) and weights (batch, num_pixels), which sum to 1 per row.

        ``mask`` (batch, num_pixels), True for real regions: padded ones score -inf, so their weight
        is exactly 0 and the real ones' softmax is the one they would have alone.
        """
        return self.attend(grid, keys, self.project_query(hidden), mask)

    def attend(self, grid: torch.Tensor, keys: torch.Tensor, query: torch.Tensor,
               mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` from the doubled query (batch, attention_dim) (``query_weights``)."""
        scores = self._scores(keys, query)  # (batch, num_pixels)
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf)
        weights = torch.softmax(scores, dim=1)  # (batch, num_pixels)
        context = torch.bmm(weights.unsqueeze(1), grid).squeeze(1)  # (batch, encoder_dim)
        return context, weights

    def _scores(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """2w·sigmoid(keys + query) + (b - Σw) (the class's note), (batch, num_pixels).

        Without autograd on a CPU (decoding), keys + query is made a few rows at a time in one small
        buffer that stays in the CPU's caches: a beam search's hundreds of rows would otherwise allocate
        and stream tens of MB per step.
        """
        weight, bias = 2 * self.score.weight[0], self.score.bias - self.score.weight.sum()  # (attention_dim,), (1,)
        rows, pixels, attention_dim = keys.shape
        chunk = max(1, SCORE_CHUNK_ELEMENTS // (pixels * attention_dim))
        if keys.device.type != "cpu" or recording_graph():
            return torch.matmul((keys + query.unsqueeze(1)).sigmoid_(), weight) + bias
        if torch.is_grad_enabled():
            return _SigmoidScores.apply(keys, query, weight) + bias
        scores = keys.new_empty(rows, pixels)
        buffer = keys.new_empty(chunk, pixels, attention_dim)
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            squashed = torch.add(keys[start:stop], query[start:stop].unsqueeze(1), out=buffer[:stop - start])
            torch.matmul(squashed.sigmoid_(), weight, out=scores[start:stop])
        return scores.add_(bias)


class _SigmoidScores(torch.autograd.Function):
    """``w·sigmoid(keys + query)`` (rows, num_pixels) with a backward that makes no tensor of the keys' size
    beyond the one forward saves: the derivative is formed in that tensor, in place. Autograd's own
    backward of the same expression makes three (the outer product of the scores' gradient and ``w``,
    the sigmoid's gradient, the broadcast's), each a fresh allocation on a CPU."""

    @staticmethod
    def forward(ctx: Any, keys: torch.Tensor, query: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        squashed = torch.add(keys, query.unsqueeze(1)).sigmoid_()  # (rows, num_pixels, attention_dim)
        ctx.save_for_backward(squashed, weight)
        return torch.matmul(squashed, weight)  # (rows, num_pixels)

    @staticmethod
    @once_differentiable  # the saved tensor becomes the gradient: no second backward through it
    def backward(ctx: Any, grad_scores: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        squashed, weight = ctx.saved_tensors
        grad_scores = grad_scores.to(squashed.dtype)  # under autocast the two may differ
        grad_weight = None
        if ctx.needs_input_grad[2]:  # before the squashed values are overwritten below; a batch of row products
            grad_weight = torch.bmm(grad_scores.unsqueeze(1), squashed).sum(dim=(0, 1))  # (attention_dim,)
        # grad_scores * sigmoid', in place: (rows, num_pixels, attention_dim)
        grad_sum = torch.ops.aten.sigmoid_backward.grad_input(
            grad_scores.unsqueeze(2).expand_as(squashed), squashed, grad_input=squashed)
        grad_query = grad_sum.sum(dim=1).mul_(weight) if ctx.needs_input_grad[1] else None  # (rows, attention_dim)
        grad_keys = grad_sum.mul_(weight) if ctx.needs_input_grad[0] else None
        return grad_keys, grad_query, grad_weight


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
