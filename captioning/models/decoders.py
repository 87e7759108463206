"""Recurrent caption decoders behind one step interface, ``CaptionDecoder``.

Every decoder offers

- ``prepare(features) -> PreparedImages``: per-image work done once (a context encoder, attention
  keys); ``init_state`` and ``step`` take what it returns;
- ``init_state(prepared)``: the state from which the first word (after ``<bos>``) is predicted;
- ``step(tokens, state, prepared) -> (logits, state, attention or None)``: one word per row;
- ``forward(features, tokens, lengths) -> DecoderOutput``: teacher forcing over whole captions;

so each decoding strategy is written once. A state is a tuple of tensors shaped
``(num_layers, batch, hidden_size)``: ``(h,)`` or ``(h, c)``; strategies reorder it along dim 1.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from captioning.errors import check_choice
from captioning.models.attention import AdditiveAttention, BidirectionalContext
from captioning.models.encoders import EncodedImages
from captioning.models.packed_linear import linear
from captioning.models.time_batched import SharedRows, TimeBatchedLinear

State = tuple[torch.Tensor, ...]

RNN_LAYERS: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
RNN_CELLS: dict[str, type[nn.RNNCellBase]] = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}

CELLS = tuple(RNN_CELLS)
CONDITIONS = ("input", "state", "every_step")


@dataclass
class PreparedImages:
    """The decoder's per-image inputs, computed once by ``prepare`` and shared by every step and beam.

    Separate from the encoder's ``EncodedImages`` because it depends on the decoder's weights
    (a BiGRU over the grid, attention's projection), so it is neither cached nor produced by the encoder.
    """

    global_features: torch.Tensor  # (batch, encoder_dim): the image vector the decoder reads
    annotations: torch.Tensor | None = None  # (batch, num_pixels, annotation_dim): the grid, or its BiGRU encoding
    keys: torch.Tensor | None = None  # (batch, num_pixels, attention_dim): attention's projection of the annotations
    mask: torch.Tensor | None = None  # (batch, num_pixels) bool, True for real regions; None: every one is real

    def select(self, index: torch.Tensor | slice) -> "PreparedImages":
        """Rows ``index`` (e.g. one per caption, or one per beam)."""
        return PreparedImages(*(None if part is None else part[index]
                                for part in (self.global_features, self.annotations, self.keys, self.mask)))


class DecoderOutput(NamedTuple):
    """Teacher-forced outputs; rows and steps follow the input captions.

    Only real words have logits: row r of ``word_logits`` predicts the r-th word of ``real`` in
    row-major order (the target ``tokens[:, 1:][real]``), so no (batch, steps, vocab_size) buffer
    is filled with zeros for padding (``logits`` builds one on demand). Attention weights at padded
    steps are zeros, so sums over steps are sums over words. Padded regions get zero weight at every
    step; ``mask`` says which they are (the attention penalty skips them).
    """

    word_logits: torch.Tensor  # (words, vocab_size), predicting tokens[:, 1:][real]
    real: torch.Tensor  # (batch, max_len - 1) bool, True where tokens[:, 1:] is a word, not padding
    attention: torch.Tensor | None  # (batch, max_len - 1, num_pixels) for attention decoders
    mask: torch.Tensor | None = None  # (batch, num_pixels) bool, True for real regions; None: every one is real

    @property
    def logits(self) -> torch.Tensor:
        """(batch, max_len - 1, vocab_size) with zeros at padded positions, for inspection; losses read
        ``word_logits``."""
        padded = self.word_logits.new_zeros(*self.real.shape, self.word_logits.shape[1])
        padded[self.real] = self.word_logits
        return padded


class CaptionDecoder(Protocol):
    """The step interface every decoder offers; decoding strategies and scheduled sampling use only this."""

    def prepare(self, features: EncodedImages | PreparedImages) -> PreparedImages:
        """Per-image work, done once; already prepared images come back as they are."""

    def init_state(self, features: PreparedImages) -> State:
        """The state that predicts the first word (after ``<bos>``)."""

    def step(self, tokens: torch.Tensor, state: State, features: PreparedImages
             ) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        """tokens (batch,) -> logits (batch, vocab_size), the new state, attention (batch, num_pixels) or None."""

    def forward(self, features: EncodedImages | PreparedImages, tokens: torch.Tensor,
                lengths: torch.Tensor) -> DecoderOutput:
        """Teacher-forced logits for ``tokens[:, 1:]``."""


def _state_size(cell: str, num_layers: int, hidden_size: int) -> int:
    """How many numbers make a whole state of ``cell``: h (and c for an LSTM) of every layer."""
    return (2 if cell == "lstm" else 1) * num_layers * hidden_size


def _split_state(flat: torch.Tensor, num_layers: int, hidden_size: int) -> State:
    """(batch, ``_state_size``) -> the state, each part (num_layers, batch, hidden_size)."""
    parts = flat.view(flat.shape[0], -1, num_layers, hidden_size)
    return tuple(p.transpose(0, 1).contiguous() for p in parts.unbind(1))


def uniform_init_(module: nn.Module, scale: float | None) -> None:
    """im2txt's initialisation: weights uniform in [-scale, scale], biases 0, LSTM forget gates biased
    by +1 (TensorFlow's ``BasicLSTMCell`` adds it); None keeps torch's defaults."""
    if scale is None:
        return
    if scale <= 0:
        raise ValueError(f"decoder init_scale must be > 0 (or null for torch's defaults), got {scale}")
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.rpartition(".")[2].startswith("bias"):
                parameter.zero_()
            else:
                parameter.uniform_(-scale, scale)
        for child in module.modules():
            if isinstance(child, nn.Embedding) and child.padding_idx is not None:
                child.weight[child.padding_idx].zero_()
            if isinstance(child, nn.LSTM | nn.LSTMCell):
                for name, parameter in child.named_parameters():
                    if name.startswith("bias_ih"):  # gates in torch's order: input, forget, cell, output
                        parameter[child.hidden_size:2 * child.hidden_size] = 1.0


def _regions(features: EncodedImages, decoder: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grid or regions an attention decoder reads, padded ones zeroed (so no garbage reaches a sum),
    and their mask, checked."""
    if features.grid_features is None:
        raise ValueError(f"the {decoder} needs grid features: set model.encoder.grid_size (e.g. 14), or give it "
                         "region features")
    regions, mask = features.grid_features, features.mask  # (batch, num_regions, encoder_dim), (batch, num_regions)
    if mask is None:
        return regions, None
    if mask.dtype != torch.bool or mask.shape != regions.shape[:2]:
        raise ValueError(f"the region mask must be a bool tensor shaped (batch, num_regions) = "
                         f"{tuple(regions.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    if not mask.any(dim=1).all():
        raise ValueError("every image needs at least one real region: a row of the region mask is all False")
    return regions.masked_fill(~mask.unsqueeze(2), 0.0), mask


def _mean_region(regions: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(batch, num_regions, dim) -> (batch, dim): the mean over each image's real regions only."""
    if mask is None:
        return regions.mean(dim=1)
    real = mask.unsqueeze(2)  # (batch, num_regions, 1)
    return regions.masked_fill(~real, 0.0).sum(dim=1) / real.sum(dim=1).to(regions.dtype)


class WordOutput(nn.Module):
    """Hidden state -> word logits, optionally tied to the input embedding (Press & Wolf, 2017).

    Tying shares the (vocab_size, embed_dim) matrix; a projection maps hidden_size to embed_dim.
    """

    def __init__(self, embedding: nn.Embedding, hidden_size: int, tie_embeddings: bool) -> None:
        super().__init__()
        vocab_size, embed_dim = embedding.weight.shape
        self.embedding = embedding if tie_embeddings else None
        if tie_embeddings:
            self.projection = nn.Linear(hidden_size, embed_dim)
            self.bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.projection = nn.Linear(hidden_size, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        projected = linear(hidden, self.projection.weight, self.projection.bias)
        if self.embedding is None:
            return projected
        return linear(projected, self.embedding.weight, self.bias)


class ShowTellDecoder(nn.Module):
    """Show and Tell (Vinyals et al., 2015): an RNN conditioned on the global image vector.

    ``condition="input"`` feeds the projected image as the first input (the NIC paper);
    ``condition="state"`` maps it to the initial hidden (and cell) state instead;
    ``condition="every_step"`` concatenates it to every word embedding (LRCN, Donahue et al.,
    2015), which gives an encoder trained from scratch a gradient at every word.
    Teacher forcing runs the whole caption through one packed cuDNN-able RNN call.
    ``init_scale`` draws every weight uniformly from [-init_scale, init_scale] (``uniform_init_``;
    im2txt uses 0.08).
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
        tie_embeddings: bool = False,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_choice(cell, CELLS, "decoder cell")
        check_choice(condition, CONDITIONS, "decoder condition")
        self.cell, self.condition = cell, condition
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        extra = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        rnn_input = 2 * embed_dim if condition == "every_step" else embed_dim
        self.rnn = RNN_LAYERS[cell](rnn_input, hidden_size, num_layers, batch_first=True,
                                    dropout=dropout if num_layers > 1 else 0.0, **extra)
        projected = _state_size(cell, num_layers, hidden_size) if condition == "state" else embed_dim
        self.image_projection = nn.Linear(encoder_dim, projected)
        self.dropout = nn.Dropout(dropout)
        self.output = WordOutput(self.embedding, hidden_size, tie_embeddings)
        uniform_init_(self, init_scale)

    def prepare(self, features: EncodedImages | PreparedImages) -> PreparedImages:
        """The global vector is all this decoder reads."""
        if isinstance(features, PreparedImages):
            return features
        return PreparedImages(features.global_features)

    def init_state(self, features: PreparedImages) -> State:
        batch = features.global_features.shape[0]
        if self.condition == "every_step":
            zeros = features.global_features.new_zeros(self.num_layers, batch, self.hidden_size)
            return (zeros, zeros) if self.cell == "lstm" else (zeros,)
        image = self.image_projection(features.global_features)  # (batch, projected)
        if self.condition == "input":
            _, state = self._run(self.dropout(image).unsqueeze(1), None)
            return state
        return _split_state(torch.tanh(image), self.num_layers, self.hidden_size)

    def step(self, tokens: torch.Tensor, state: State, features: PreparedImages
             ) -> tuple[torch.Tensor, State, None]:
        """tokens (batch,) -> logits (batch, vocab_size)."""
        embedded = self._inputs(tokens.unsqueeze(1), features)  # (batch, 1, rnn_input)
        output, state = self._run(embedded, state)  # (batch, 1, hidden_size)
        return self.output(self.dropout(output.squeeze(1))), state, None

    def forward(self, features: EncodedImages | PreparedImages, tokens: torch.Tensor,
                lengths: torch.Tensor) -> DecoderOutput:
        """Packed sequences keep the RNN off the padding."""
        features = self.prepare(features)
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
        real = torch.arange(hidden.shape[1], device=lengths.device) < (lengths - 1).unsqueeze(1)  # (batch, steps)
        return DecoderOutput(self.output(self.dropout(hidden[real])), real, None)  # (words, vocab_size)

    def _inputs(self, tokens: torch.Tensor, features: PreparedImages) -> torch.Tensor:
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


Recurrence = Callable[[torch.Tensor, State, PreparedImages], tuple[torch.Tensor, State, torch.Tensor]]


def _longest_first(lengths: torch.Tensor) -> torch.Tensor | None:
    """The captions' order by decreasing length, or None when they come in it already."""
    if bool((lengths[:-1] >= lengths[1:]).all()):
        return None
    return torch.argsort(lengths, descending=True, stable=True)


class _StepwiseAttentionDecoder(nn.Module):
    """An attention decoder whose teacher forcing steps word by word through the same recurrence as ``step``.

    Captions are sorted by length (unless they come sorted) and the active batch shrinks as captions
    end, so no step computes on padding. What does not depend on the recurrent state runs outside the
    loop, once over all words: the word inputs before it, the output layer after it. Subclasses
    define ``embedding``, ``output``, ``_prepare_regions``, ``init_state`` and ``_step_hidden``,
    ``(embedded words, state, prepared) -> (top hidden state after dropout, new state, attention
    weights)``, which ``step`` runs; teacher forcing runs what ``_teacher_forcing`` builds, by
    default the same.
    """

    embedding: nn.Embedding
    output: WordOutput
    decoder_name: str  # for the messages about its input

    def _step_hidden(self, embedded: torch.Tensor, state: State, features: PreparedImages
                     ) -> tuple[torch.Tensor, State, torch.Tensor]:
        raise NotImplementedError

    def _teacher_forcing(self, words: torch.Tensor) -> tuple[torch.Tensor, Recurrence]:
        """Built once per teacher-forced pass: what the recurrence reads of each word (words,) -> (words, ...),
        computed for all words at once, and the recurrence; by default the embeddings and ``_step_hidden``."""
        return self.embedding(words), self._step_hidden

    def step(self, tokens: torch.Tensor, state: State, features: PreparedImages
             ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """tokens (batch,) -> logits (batch, vocab_size), the new state, attention weights (batch, num_pixels)."""
        hidden, state, weights = self._step_hidden(self.embedding(tokens), state, features)
        return self.output(hidden), state, weights

    def prepare(self, features: EncodedImages | PreparedImages) -> PreparedImages:
        """The decoder's per-image work on the grid or regions (and their mask), done once per image."""
        if isinstance(features, PreparedImages):
            return features
        regions, mask = _regions(features, self.decoder_name)  # (batch, num_regions, encoder_dim)
        return self._prepare_regions(features, regions, mask)

    def _prepare_regions(self, features: EncodedImages, regions: torch.Tensor,
                         mask: torch.Tensor | None) -> PreparedImages:
        raise NotImplementedError

    def forward(self, features: EncodedImages | PreparedImages, tokens: torch.Tensor,
                lengths: torch.Tensor) -> DecoderOutput:
        max_steps = tokens.shape[1] - 1
        positions = torch.arange(max_steps, device=lengths.device)
        real = positions < (lengths - 1).unsqueeze(1)  # (batch, max_steps) in the captions' order
        order = _longest_first(lengths)  # None: they already are (the data module's batches)
        # sorted before the per-image work, so the keys are computed in the order the steps read them
        sorted_features = self.prepare(features if order is None else features.select(order))
        sorted_real, sorted_tokens = (real, tokens) if order is None else (real[order], tokens[order])
        active_per_step = sorted_real.sum(dim=0)  # (max_steps,): the running captions, a prefix of the sorted ones
        # every word's input at once, step-major: step t's rows are its running captions, longest first
        word_inputs, recurrence = self._teacher_forcing(sorted_tokens[:, :max_steps].t()[sorted_real.t()])
        word_inputs = SharedRows(word_inputs)  # (words, ...)
        state = self.init_state(sorted_features)
        # the running captions' rows of every per-image tensor, gradients summed in place across steps
        shared = [None if part is None else SharedRows(part) for part in (
            sorted_features.global_features, sorted_features.annotations, sorted_features.keys)]
        hiddens: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        start = 0
        for active in active_per_step.tolist():
            if active == 0:
                break
            state = tuple(part[:, :active] for part in state)
            running = PreparedImages(*(None if part is None else part(0, active) for part in shared),
                                     None if sorted_features.mask is None else sorted_features.mask[:active])
            hidden, state, weights = recurrence(word_inputs(start, start + active), state, running)
            hiddens.append(hidden)  # (active, hidden_size), after dropout
            attentions.append(weights)  # (active, num_pixels)
            start += active
        # the words in the captions' order, and where each one is in the step-major lists
        caption, step = real.nonzero(as_tuple=True)  # (words,) each
        sorted_row = caption if order is None else torch.argsort(order)[caption]
        index = (torch.cumsum(active_per_step, 0) - active_per_step)[step] + sorted_row
        annotations = sorted_features.annotations  # (batch, num_pixels, annotation_dim)
        if not hiddens:
            hiddens = [annotations.new_zeros(0, self.output.projection.in_features)]
            attentions = [annotations.new_zeros(0, annotations.shape[1])]
        word_logits = self.output(torch.cat(hiddens)[index])  # (words, vocab_size): one large product
        attention = annotations.new_zeros(*real.shape, annotations.shape[1]).index_put(
            (caption, step), torch.cat(attentions)[index])  # (batch, max_steps, num_pixels), zeros at padding
        return DecoderOutput(word_logits, real, attention, features.mask)  # the mask in the captions' order


class ShowAttendTellDecoder(_StepwiseAttentionDecoder):
    """Show, Attend and Tell (Xu et al., 2015): soft attention over the grid at every word.

    Each step attends with the top layer's previous hidden state, optionally gates the context
    with ``sigmoid(f_beta(h))`` (the paper's section 4.2.1), and feeds ``[word embedding; context]``
    to a stack of RNN cells whose first state comes from the mean grid vector. An optional
    bidirectional RNN (``context_encoder="birnn"``) turns the grid into annotations first.
    With a region mask, padded regions get zero attention and the first state comes from the mean
    of the real ones only. Teacher forcing: ``_StepwiseAttentionDecoder``. ``init_scale``: as in
    ``ShowTellDecoder``.
    """

    decoder_name = "attention decoder"

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 256,
        hidden_size: int = 512,
        attention_dim: int = 256,
        num_layers: int = 1,
        dropout: float = 0.5,
        cell: str = "lstm",
        gate: bool = True,
        context_encoder: str | None = None,
        context_hidden_size: int = 256,
        tie_embeddings: bool = False,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        check_choice(cell, CELLS, "decoder cell")
        if context_encoder not in (None, "birnn"):
            raise ValueError(f"context_encoder must be null or 'birnn', got {context_encoder!r}")
        self.cell, self.num_layers, self.hidden_size, self.embed_dim = cell, num_layers, hidden_size, embed_dim
        self.context = BidirectionalContext(encoder_dim, context_hidden_size) if context_encoder else None
        annotation_dim = self.context.output_dim if self.context else encoder_dim
        self.attention = AdditiveAttention(annotation_dim, hidden_size, attention_dim)
        self.gate = nn.Linear(hidden_size, annotation_dim) if gate else None
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        extra = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        self.cells = nn.ModuleList(
            RNN_CELLS[cell](embed_dim + annotation_dim if layer == 0 else hidden_size, hidden_size, **extra)
            for layer in range(num_layers))
        self.init_projection = nn.Linear(annotation_dim, _state_size(cell, num_layers, hidden_size))
        self.dropout = nn.Dropout(dropout)
        self.output = WordOutput(self.embedding, hidden_size, tie_embeddings)
        uniform_init_(self, init_scale)

    def _prepare_regions(self, features: EncodedImages, annotations: torch.Tensor,
                         mask: torch.Tensor | None) -> PreparedImages:
        """The annotations (the grid, or its BiRNN encoding) and their attention keys."""
        if self.context is not None:
            annotations = self.context(annotations, mask)  # (batch, num_pixels, annotation_dim)
        return PreparedImages(features.global_features, annotations, self.attention.project(annotations), mask)

    def init_state(self, features: PreparedImages) -> State:
        mean_annotation = _mean_region(features.annotations, features.mask)  # (batch, annotation_dim)
        return _split_state(self.init_projection(mean_annotation), self.num_layers, self.hidden_size)

    @property
    def _single_lstm(self) -> bool:
        """One LSTM layer: in teacher forcing its gates are computed from their parts (``_lstm_step``), the
        word's part once for all words, and the products with the previous hidden state in one."""
        return self.cell == "lstm" and self.num_layers == 1

    def _teacher_forcing(self, words: torch.Tensor) -> tuple[torch.Tensor, Recurrence]:
        """For one LSTM layer: the embedding's share of its gates (with their input bias) for all words at once,
        the previous hidden state's three products (query, gate, recurrent) as one, and the weight gradients
        of those and of the context's product once per pass."""
        embedded = self.embedding(words)  # (words, embed_dim)
        if not self._single_lstm:
            return embedded, self._step_hidden
        cell = self.cells[0]
        # one view per share of the input weight: autograd joins their gradients in one copy
        from_word, from_context_weight = cell.weight_ih.split(
            [self.embed_dim, cell.weight_ih.shape[1] - self.embed_dim], dim=1)
        word_gates = F.linear(embedded, from_word, cell.bias_ih)  # (words, 4 * hidden_size)
        # (weight, bias) of the query (doubled, as attention reads it), the gate and the recurrent product
        gate = [(self.gate.weight, self.gate.bias)] if self.gate is not None else []
        parts = [self.attention.query_weights(), *gate, (cell.weight_hh, cell.bias_hh)]
        sizes = [weight.shape[0] for weight, _ in parts]
        from_hidden = TimeBatchedLinear(torch.cat([weight for weight, _ in parts]),
                                        torch.cat([bias for _, bias in parts]))
        from_context = TimeBatchedLinear(from_context_weight)  # (4 * hidden_size, annotation_dim)

        def project_hidden(hidden: torch.Tensor) -> list[torch.Tensor]:
            return list(from_hidden(hidden).split(sizes, dim=1))

        def lstm_step(word_gates: torch.Tensor, state: State, features: PreparedImages
                      ) -> tuple[torch.Tensor, State, torch.Tensor]:
            return self._lstm_step(word_gates, state, features, project_hidden, from_context)
        return word_gates, lstm_step

    def _lstm_step(self, word_gates: torch.Tensor, state: State, features: PreparedImages,
                   project_hidden: Callable[[torch.Tensor], list[torch.Tensor]],
                   from_context: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, State, torch.Tensor]:
        """``_step_hidden`` for one LSTM layer, its gates summed from their parts: the word's (precomputed),
        the context's and the previous hidden state's, as ``nn.LSTMCell`` computes them."""
        hidden, cell = state[0][0], state[1][0]  # (batch, hidden_size) each
        query, *gate, hidden_gates = project_hidden(hidden)  # (batch, attention_dim), [(batch, annotation_dim)], ...
        context, weights = self.attention.attend(features.annotations, features.keys, query, features.mask)
        if gate:
            context = torch.sigmoid(gate[0]) * context  # (batch, annotation_dim)
        gates = word_gates + from_context(context) + hidden_gates  # (batch, 4 * hidden_size)
        input_gate, forget_gate, cell_gate, output_gate = gates.chunk(4, dim=1)  # torch's order
        cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(cell_gate)
        hidden = torch.sigmoid(output_gate) * torch.tanh(cell)  # (batch, hidden_size)
        return self.dropout(hidden), (hidden.unsqueeze(0), cell.unsqueeze(0)), weights

    def _step_hidden(self, embedded: torch.Tensor, state: State, features: PreparedImages
                     ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """One step of any stack of cells: attend with the top layer's hidden state, gate, run the cells."""
        hidden = state[0]  # (layers, batch, hidden_size)
        context, weights = self.attention(features.annotations, features.keys, hidden[-1], features.mask)
        if self.gate is not None:
            context = torch.sigmoid(self.gate(hidden[-1])) * context  # (batch, annotation_dim)
        layer_input = torch.cat([embedded, context], dim=1)  # (batch, embed_dim + annotation_dim)
        new_parts: list[list[torch.Tensor]] = [[] for _ in state]
        for layer, cell in enumerate(self.cells):
            if self.cell == "lstm":
                layer_state = cell(layer_input, (state[0][layer], state[1][layer]))
            else:
                layer_state = (cell(layer_input, state[0][layer]),)
            for part, value in zip(new_parts, layer_state):
                part.append(value)
            layer_input = self.dropout(layer_state[0])
        new_state = tuple(torch.stack(part) for part in new_parts)
        return layer_input, new_state, weights


class UpDownDecoder(_StepwiseAttentionDecoder):
    """Bottom-Up and Top-Down attention (Anderson et al., 2018, section 3.2): two LSTMs per word.

    With v_i the image's regions, v̄ their mean (over real regions only) and w_t the input word:

    - attention (top-down) LSTM: h1_t = LSTM1([h2_{t-1}; v̄; W_e w_t], h1_{t-1})
    - attention over the regions with h1_t: a_{i,t} = w_a^T tanh(W_va v_i + W_ha h1_t),
      α_t = softmax(a_t) (padded regions excluded), v̂_t = Σ_i α_{i,t} v_i
    - language LSTM: h2_t = LSTM2([v̂_t; h1_t], h2_{t-1})
    - words: softmax(W_p h2_t + b_p)

    Both states start at zero; the state is ``(h, c)``, each ``(2, batch, hidden_size)``: the
    attention LSTM's, then the language LSTM's. Dropout (rate ``dropout``) sits where
    ruotianluo/ImageCaptioning.pytorch's captioning/models/AttModel.py applies ``drop_prob_lm``
    (0.5 for its COCO recipe): on the word embedding (``AttModel.embed``), on the region features
    and on their mean (``att_embed``/``fc_embed``; so the attended feature v̂_t is built from
    dropped-out regions), and on h2_t before the output layer (``UpDownCore``); not on h1_t going
    into the language LSTM (``UpDownCore`` leaves that dropout out). Unlike AttModel, the regions
    enter the equations as the paper writes them, without its extra Linear+ReLU embedding, and
    the embedding has no ReLU. ``init_scale``: as in ``ShowTellDecoder``.
    """

    decoder_name = "Up-Down decoder"

    def __init__(
        self,
        vocab_size: int,
        encoder_dim: int,
        embed_dim: int = 1000,
        hidden_size: int = 1000,
        attention_dim: int = 512,
        dropout: float = 0.5,
        tie_embeddings: bool = False,
        init_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.attention_lstm = nn.LSTMCell(hidden_size + encoder_dim + embed_dim, hidden_size)
        self.attention = AdditiveAttention(encoder_dim, hidden_size, attention_dim)
        self.language_lstm = nn.LSTMCell(encoder_dim + hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.output = WordOutput(self.embedding, hidden_size, tie_embeddings)
        uniform_init_(self, init_scale)

    def _prepare_regions(self, features: EncodedImages, regions: torch.Tensor,
                         mask: torch.Tensor | None) -> PreparedImages:
        """v̄ (as ``global_features``), the regions and their attention keys."""
        mean = self.dropout(_mean_region(regions, mask))  # (batch, encoder_dim)
        regions = self.dropout(regions)  # padded regions stay 0
        return PreparedImages(mean, regions, self.attention.project(regions), mask)

    def init_state(self, features: PreparedImages) -> State:
        zeros = features.global_features.new_zeros(2, features.global_features.shape[0], self.hidden_size)
        return zeros, zeros

    def _step_hidden(self, embedded: torch.Tensor, state: State, features: PreparedImages
                     ) -> tuple[torch.Tensor, State, torch.Tensor]:
        """The attention LSTM, attention over the regions, the language LSTM; h2_t after dropout."""
        hidden, cell = state  # (2, batch, hidden_size) each: attention LSTM, language LSTM
        words = self.dropout(embedded)  # (batch, embed_dim): dropped step by step, as the random stream always was
        attention_input = torch.cat([hidden[1], features.global_features, words], dim=1)
        h_attention, c_attention = self.attention_lstm(attention_input, (hidden[0], cell[0]))  # (batch, hidden_size)
        attended, weights = self.attention(features.annotations, features.keys, h_attention, features.mask)
        language_input = torch.cat([attended, h_attention], dim=1)  # (batch, encoder_dim + hidden_size)
        h_language, c_language = self.language_lstm(language_input, (hidden[1], cell[1]))
        new_state = (torch.stack([h_attention, h_language]), torch.stack([c_attention, c_language]))
        return self.dropout(h_language), new_state, weights
