"""Recurrent caption decoders behind one step interface.

Every decoder offers ``init_state(features)``, ``step(tokens, state, features) -> (logits, state)``
and a teacher-forced ``forward`` over whole captions, so each decoding strategy is written once.
A state is a tuple of tensors shaped ``(num_layers, batch, hidden_size)``: ``(h,)`` or ``(h, c)``.
"""

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from captioning.models.encoders import EncodedImages

State = tuple[torch.Tensor, ...]

RNN_CELLS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


CONDITIONS = ("input", "state", "every_step")


class ShowTellDecoder(nn.Module):
    """Show and Tell (Vinyals et al., 2015): an RNN conditioned on the global image vector.

    ``condition="input"`` feeds the projected image as the first input (the NIC paper);
    ``condition="state"`` maps it to the initial hidden (and cell) state instead;
    ``condition="every_step"`` concatenates it to every word embedding (LRCN, Donahue et al.,
    2015), which gives an encoder trained from scratch a gradient at every word.
    """

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 256,
        hidden_size: int = 512,
        num_layers: int = 1,
        dropout: float = 0.3,
        cell: str = "lstm",
        condition: str = "input",
    ) -> None:
        super().__init__()
        if cell not in RNN_CELLS:
            raise ValueError(f"decoder cell must be one of {sorted(RNN_CELLS)}, got {cell!r}")
        if condition not in CONDITIONS:
            raise ValueError(f"decoder condition must be one of {CONDITIONS}, got {condition!r}")
        self.cell, self.condition = cell, condition
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        extra = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        rnn_input = 2 * embed_dim if condition == "every_step" else embed_dim
        self.rnn = RNN_CELLS[cell](rnn_input, hidden_size, num_layers, batch_first=True,
                                   dropout=dropout if num_layers > 1 else 0.0, **extra)
        state_parts = 2 if cell == "lstm" else 1
        projected = state_parts * num_layers * hidden_size if condition == "state" else embed_dim
        self.image_projection = nn.Linear(encoder_dim, projected)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, vocab_size)

    def init_state(self, features: EncodedImages) -> State:
        """The state from which the first word (after ``<bos>``) is predicted."""
        batch = features.global_features.shape[0]
        if self.condition == "every_step":
            zeros = features.global_features.new_zeros(self.num_layers, batch, self.hidden_size)
            return (zeros, zeros) if self.cell == "lstm" else (zeros,)
        image = self.image_projection(features.global_features)  # (batch, projected)
        if self.condition == "input":
            _, state = self._run(self.dropout(image).unsqueeze(1), None)
            return state
        parts = torch.tanh(image).view(batch, -1, self.num_layers, self.hidden_size)
        return tuple(p.transpose(0, 1).contiguous() for p in parts.unbind(1))  # each (layers, batch, hidden)

    def step(self, tokens: torch.Tensor, state: State, features: EncodedImages) -> tuple[torch.Tensor, State]:
        """One word for every row: tokens (batch,) -> logits (batch, vocab_size)."""
        embedded = self._inputs(tokens.unsqueeze(1), features)  # (batch, 1, rnn_input)
        output, state = self._run(embedded, state)  # (batch, 1, hidden_size)
        return self.output(self.dropout(output.squeeze(1))), state

    def forward(self, features: EncodedImages, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits (batch, max_len - 1, vocab) predicting ``tokens[:, 1:]``.

        Packed sequences keep the RNN off the padding; padded positions' logits are zeros-in,
        garbage-out and must be masked by the loss.
        """
        inputs = self._inputs(tokens[:, :-1], features)  # (batch, max_len - 1, rnn_input)
        steps = lengths - 1
        if self.condition == "input":
            image = self.dropout(self.image_projection(features.global_features)).unsqueeze(1)
            inputs, steps, state = torch.cat([image, inputs], dim=1), lengths, None
        else:
            state = self.init_state(features)
        packed = pack_padded_sequence(inputs, steps.cpu(), batch_first=True, enforce_sorted=False)
        output, _ = self._run(packed, state)
        hidden, _ = pad_packed_sequence(output, batch_first=True, total_length=inputs.shape[1])
        if self.condition == "input":
            hidden = hidden[:, 1:]  # the step that read the image predicts nothing
        return self.output(self.dropout(hidden))  # (batch, max_len - 1, vocab_size)

    def _inputs(self, tokens: torch.Tensor, features: EncodedImages) -> torch.Tensor:
        """Word embeddings (batch, steps, embed_dim), with the image beside each one for "every_step"."""
        embedded = self.embedding(tokens)
        if self.condition == "every_step":
            image = self.image_projection(features.global_features)  # (batch, embed_dim)
            embedded = torch.cat([embedded, image.unsqueeze(1).expand_as(embedded)], dim=-1)
        return self.dropout(embedded)

    def _run(self, inputs: torch.Tensor | PackedSequence, state: State | None
             ) -> tuple[torch.Tensor | PackedSequence, State]:
        """Call the torch RNN with our tuple state convention."""
        if state is not None and self.cell != "lstm":
            state = state[0]
        output, new_state = self.rnn(inputs, state)
        return output, (new_state if self.cell == "lstm" else (new_state,))
