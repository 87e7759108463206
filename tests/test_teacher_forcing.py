"""Teacher forcing with the work that does not depend on the recurrent state hoisted out of the time loop
gives the numbers of the plain formulation: every word through ``nn.LSTMCell`` and the output layer
inside the loop, into a zero-filled (batch, steps, vocab_size) buffer."""

import copy
from unittest.mock import patch

import pytest
import torch

from captioning.losses import caption_negative_log_likelihood, doubly_stochastic_penalty, masked_cross_entropy
from captioning.models import packed_linear
from captioning.models.attention import AdditiveAttention, _SigmoidScores
from captioning.models.decoders import DecoderOutput, ShowAttendTellDecoder, UpDownDecoder
from captioning.models.encoders import EncodedImages
from captioning.models.time_batched import TimeBatchedLinear
from captioning.scheduled_sampling import scheduled_sampling_forward

VOCAB, ENCODER_DIM, PIXELS = 40, 12, 9
LENGTHS = [7, 3, 9, 2, 9, 5]  # <bos> and <eos> included; a one-word caption and two of the longest


def captions(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, :length] = torch.randint(3, VOCAB, (length,), generator=generator)
        tokens[row, 0], tokens[row, length - 1] = 1, 2
    return tokens, torch.tensor(lengths)


def features(rows: int, masked: bool, seed: int = 1) -> EncodedImages:
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(rows, PIXELS, ENCODER_DIM, generator=generator, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.arange(PIXELS) < torch.tensor([PIXELS, 4, 7, PIXELS, 1, 5])[:rows].unsqueeze(1)
    return EncodedImages(grid.mean(dim=1), grid, mask)


def plain_attention(attention: AdditiveAttention, grid: torch.Tensor, hidden: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Show, Attend and Tell's soft attention as written: softmax(w·tanh(W_k v + W_h h) + b)."""
    keys = attention.key_projection(grid)  # (batch, num_pixels, attention_dim)
    scores = attention.score(torch.tanh(keys + attention.query_projection(hidden).unsqueeze(1))).squeeze(2)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    weights = torch.softmax(scores, dim=1)  # (batch, num_pixels)
    return torch.bmm(weights.unsqueeze(1), grid).squeeze(1), weights


def reference_forward(decoder: ShowAttendTellDecoder, encoded: EncodedImages, tokens: torch.Tensor,
                      lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM layer, the plain way: per step attention (with tanh), gate, ``nn.LSTMCell`` on ``[embedding; context]``,
    dropout and the output layer, written into zero buffers in the captions' order."""
    prepared = decoder.prepare(encoded)
    steps = lengths - 1
    order = torch.argsort(steps, descending=True, stable=True)  # ties as the decoder orders them (dropout masks)
    prepared, sorted_tokens = prepared.select(order), tokens[order]
    hidden, cell = (part[0] for part in decoder.init_state(prepared))
    logits = torch.zeros(*tokens[:, 1:].shape, VOCAB, dtype=torch.float64)
    attention = torch.zeros(*tokens[:, 1:].shape, PIXELS, dtype=torch.float64)
    for t in range(tokens.shape[1] - 1):
        active = int((steps > t).sum())
        rows = prepared.select(slice(0, active))
        hidden, cell = hidden[:active], cell[:active]
        context, weights = plain_attention(decoder.attention, rows.annotations, hidden, rows.mask)
        if decoder.gate is not None:
            context = torch.sigmoid(decoder.gate(hidden)) * context
        layer_input = torch.cat([decoder.embedding(sorted_tokens[:active, t]), context], dim=1)
        hidden, cell = decoder.cells[0](layer_input, (hidden, cell))
        logits[:active, t] = decoder.output(decoder.dropout(hidden))
        attention[:active, t] = weights
    restore = torch.argsort(order)
    return logits[restore], attention[restore]


def loss_and_grads(module: torch.nn.Module, compute: callable) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks for both formulations
    loss = compute()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same(first: tuple[torch.Tensor, dict], second: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(first[0], second[0], rtol=0, atol=1e-6)
    assert first[1].keys() == second[1].keys()
    for name in first[1]:
        torch.testing.assert_close(first[1][name], second[1][name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [{}, {"gate": False}, {"tie_embeddings": True},
                                     {"context_encoder": "birnn"}], ids=["gate", "no-gate", "tied", "birnn"])
@pytest.mark.parametrize("masked", [False, True], ids=["grid", "regions"])
def test_hoisted_lstm_pass_equals_the_plain_formulation_in_loss_and_gradients(options: dict, masked: bool) -> None:
    """Losses and every parameter's gradient to 1e-6, dropout on (the same random masks)."""
    torch.manual_seed(0)
    decoder = ShowAttendTellDecoder(VOCAB, ENCODER_DIM, embed_dim=10, hidden_size=16, attention_dim=8,
                                    context_hidden_size=6, dropout=0.5, **options).double().train()
    tokens, lengths = captions(LENGTHS)
    encoded, targets = features(len(LENGTHS), masked), tokens[:, 1:]

    def hoisted() -> torch.Tensor:
        output = decoder(encoded, tokens, lengths)
        assert output.word_logits.shape == (int((lengths - 1).sum()), VOCAB)  # no row for padding
        return masked_cross_entropy(output.word_logits, targets) + doubly_stochastic_penalty(output.attention,
                                                                                                output.mask)

    def plain() -> torch.Tensor:
        logits, attention = reference_forward(decoder, encoded, tokens, lengths)
        return masked_cross_entropy(logits, targets) + doubly_stochastic_penalty(attention, encoded.mask)

    assert_same(loss_and_grads(decoder, hoisted), loss_and_grads(decoder, plain))


SIZES = {"embed_dim": 10, "hidden_size": 16, "attention_dim": 8, "dropout": 0.0}


@pytest.mark.parametrize("decoder", [
    ShowAttendTellDecoder(VOCAB, ENCODER_DIM, cell="gru", **SIZES),
    ShowAttendTellDecoder(VOCAB, ENCODER_DIM, num_layers=2, **SIZES),
    ShowAttendTellDecoder(VOCAB, ENCODER_DIM, **SIZES),
    UpDownDecoder(VOCAB, ENCODER_DIM, **SIZES),
], ids=["gru", "two-layer-lstm", "lstm", "updown"])
def test_every_attention_decoder_equals_stepping_through_its_own_step(decoder: torch.nn.Module) -> None:
    """With the output layer after the loop, teacher forcing still equals ``step`` word by word (scheduled
    sampling that never samples; it steps finished captions too, so its dropout masks differ: no dropout)."""
    decoder.double().train()
    tokens, lengths = captions(LENGTHS)
    encoded, targets = features(len(LENGTHS), masked=True), tokens[:, 1:]

    def loss(output: DecoderOutput) -> torch.Tensor:
        nll, words = caption_negative_log_likelihood(output.word_logits, targets)
        return nll.sum() / words.sum() + doubly_stochastic_penalty(output.attention, output.mask)

    stepped = lambda: loss(scheduled_sampling_forward(decoder, encoded, tokens, lengths, 0.0))  # noqa: E731
    assert_same(loss_and_grads(decoder, lambda: loss(decoder(encoded, tokens, lengths))),
                loss_and_grads(decoder, stepped))


def test_padded_logits_put_each_word_where_its_target_is() -> None:
    decoder = ShowAttendTellDecoder(VOCAB, ENCODER_DIM, **SIZES).double().eval()
    tokens, lengths = captions(LENGTHS)
    encoded = features(len(LENGTHS), masked=False)
    output = decoder(encoded, tokens, lengths)
    padded = output.logits  # (batch, steps, vocab_size)
    assert torch.equal(output.real, tokens[:, 1:] != 0)
    assert torch.equal(padded[output.real], output.word_logits)
    assert not padded[~output.real].any()
    with pytest.raises(ValueError, match="rows of word logits"):
        masked_cross_entropy(output.word_logits[1:], tokens[:, 1:])


def test_time_batched_linear_gives_autograds_gradients() -> None:
    """The weight gradient formed once over all steps equals autograd's per-step sum; input gradients flow."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(5, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, generator=generator, requires_grad=True)
    start = torch.randn(3, 4, dtype=torch.float64, generator=generator, requires_grad=True)

    def run(linear: callable) -> list[torch.Tensor]:
        x, total = start, 0.0
        for rows in (3, 3, 2, 1):  # a recurrence whose batch shrinks
            x = torch.tanh(linear(x[:rows]))[:, :4]
            total = total + (x ** 2).sum()
        return torch.autograd.grad(total, [weight, bias, start])

    expected = run(lambda x: torch.nn.functional.linear(x, weight, bias))
    batched = TimeBatchedLinear(weight, bias)
    for got, want in zip(run(batched), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_attention_with_sigmoid_equals_tanh_attention_in_float32() -> None:
    """The sigmoid form of the attention scores is the tanh form to float32 rounding."""
    torch.manual_seed(0)
    attention = AdditiveAttention(32, 24, 40)
    grid, hidden = torch.randn(5, 11, 32), torch.randn(5, 24)
    mask = torch.arange(11) < torch.tensor([11, 3, 7, 1, 11]).unsqueeze(1)
    keys = attention.project(grid)
    for got, want in zip(attention(grid, keys, hidden, mask), plain_attention(attention, grid, hidden, mask)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("needs", [(True, True, True), (False, True, True), (True, False, False)],
                         ids=["all", "frozen-keys", "keys-only"])
def test_sigmoid_scores_backward_equals_autograds(needs: tuple[bool, bool, bool]) -> None:
    """The in-place backward of the attention scores gives autograd's gradients of the same expression."""
    generator = torch.Generator().manual_seed(5)
    keys, query, weight = (torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_(need)
                           for shape, need in zip([(4, 9, 6), (4, 6), (6,)], needs))
    grad_scores = torch.randn(4, 9, dtype=torch.float64, generator=generator)
    wanted = [tensor for tensor in (keys, query, weight) if tensor.requires_grad]
    plain = torch.matmul(torch.sigmoid(keys + query.unsqueeze(1)), weight)
    expected = torch.autograd.grad(plain, wanted, grad_scores)
    fused = _SigmoidScores.apply(keys, query, weight)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-12)
    for got, want in zip(torch.autograd.grad(fused, wanted, grad_scores), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_sigmoid_scores_backward_under_cpu_autocast_with_mixed_dtypes() -> None:
    """float32 keys (prepared outside autocast) with a bfloat16 query: autograd's gradients to bf16 rounding."""
    generator = torch.Generator().manual_seed(6)
    keys, hidden, weight = (torch.randn(*shape, generator=generator, requires_grad=True)
                            for shape in [(3, 5, 4), (3, 4), (4,)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        query = torch.nn.functional.linear(hidden, torch.eye(4))  # bfloat16 under autocast
        fused = _SigmoidScores.apply(keys, query, weight)
        plain = torch.matmul(torch.sigmoid(keys + query.unsqueeze(1)), weight)
    got = torch.autograd.grad(fused.float().sum(), [keys, hidden, weight], retain_graph=True)
    for mine, autograds in zip(got, torch.autograd.grad(plain.float().sum(), [keys, hidden, weight]), strict=True):
        assert mine.dtype == autograds.dtype == torch.float32
        torch.testing.assert_close(mine, autograds, rtol=2e-2, atol=2e-2)


def test_float32_pass_on_the_fast_cpu_path_equals_the_plain_formulation_in_float64() -> None:
    """float32 teacher forcing (oneDNN's per-step products where torch has them, the in-place attention
    backward) against the plain formulation in float64: the same loss and gradients to float32 rounding."""
    torch.manual_seed(0)
    fast = ShowAttendTellDecoder(VOCAB, 64, embed_dim=32, hidden_size=48, attention_dim=40, dropout=0.5).train()
    plain = copy.deepcopy(fast).double()
    tokens, lengths = captions(LENGTHS)
    targets = tokens[:, 1:]
    grid = torch.randn(len(LENGTHS), PIXELS, 64, dtype=torch.float64)
    encoded = EncodedImages(grid.mean(dim=1), grid)

    def hoisted() -> torch.Tensor:
        single = EncodedImages(encoded.global_features.float(), encoded.grid_features.float())
        output = fast(single, tokens, lengths)
        return masked_cross_entropy(output.word_logits, targets) + doubly_stochastic_penalty(output.attention, None)

    def reference() -> torch.Tensor:
        logits, attention = reference_forward(plain, encoded, tokens, lengths)
        return masked_cross_entropy(logits, targets) + doubly_stochastic_penalty(attention, None)

    with patch.object(packed_linear.PackedLinear, "__call__", autospec=True,
                      side_effect=packed_linear.PackedLinear.__call__) as products:
        loss, grads = loss_and_grads(fast, hoisted)
    assert products.call_count > 0  # the per-step products, forward and backward
    if torch.backends.mkldnn.is_available():  # each through oneDNN's packed weight
        assert all(call.args[0]._packed is not None for call in products.call_args_list)
    want_loss, want_grads = loss_and_grads(plain, reference)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), want_grads[name], rtol=1e-4, atol=2e-6, msg=name)


@pytest.mark.parametrize("decoder", [
    ShowAttendTellDecoder(VOCAB, ENCODER_DIM, **SIZES),
    ShowAttendTellDecoder(VOCAB, ENCODER_DIM, cell="gru", **SIZES),
    UpDownDecoder(VOCAB, ENCODER_DIM, **SIZES),
], ids=["lstm", "gru", "updown"])
def test_captions_given_longest_first_or_in_any_order_give_the_same_outputs(decoder: torch.nn.Module) -> None:
    """The data module's batches come longest first (no reordering); any other order is sorted first."""
    decoder.double().eval()
    tokens, lengths = captions(LENGTHS)
    encoded = features(len(LENGTHS), masked=True)
    shuffled = decoder(encoded, tokens, lengths)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_output = decoder(encoded.select(order), tokens[order], lengths[order])
    torch.testing.assert_close(sorted_output.word_logits, shuffled.logits[order][shuffled.real[order]],
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(sorted_output.attention, shuffled.attention[order], rtol=0, atol=1e-12)
    assert torch.equal(sorted_output.mask, encoded.mask[order]) and torch.equal(shuffled.mask, encoded.mask)
