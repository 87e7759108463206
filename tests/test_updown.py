"""Up-Down decoder, region masks (images with different numbers of regions) and the precomputed-features encoder.

The Up-Down decoder's step interface (stepping = teacher forcing, overfitting, beam search = exhaustive
search, batching) is covered by ``tests/test_decoding.py``'s ``DECODERS`` list.
"""

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from captioning.config import check_config
from captioning.decoding import GenerationSettings, SpecialTokens, beam_search, generate, greedy_decode
from captioning.losses import doubly_stochastic_penalty
from captioning.models.decoders import UpDownDecoder
from captioning.models.encoder_decoder import build_encoder_decoder, target_of
from captioning.models.encoders import EncodedImages, PrecomputedEncoder
from captioning.scheduled_sampling import scheduled_sampling_forward
from tests.conftest import PROJECT_ROOT
from tests.test_decoding import BOS, ENCODER_DIM, EOS, make_decoder, random_captions

ATTENTION_DECODERS = [
    ("show_attend_tell", {"cell": "lstm"}),
    ("show_attend_tell", {"cell": "gru", "context_encoder": "birnn"}),
    ("show_attend_tell", {"cell": "rnn", "gate": False, "num_layers": 2, "context_encoder": "birnn"}),
    ("updown", {"tie_embeddings": False}),
]
IDS = [f"{kind}-{'-'.join(str(v) for v in options.values())}" for kind, options in ATTENTION_DECODERS]
FEW, MANY = 3, 100


def few_and_many(seed: int = 0) -> tuple[EncodedImages, EncodedImages]:
    """An image with ``FEW`` regions alone, and the same image in a batch after one with ``MANY`` regions:
    its padding holds large random garbage and its mask is False there."""
    generator = torch.Generator().manual_seed(seed)
    regions = torch.randn(FEW, ENCODER_DIM, generator=generator)  # (num_regions, encoder_dim)
    other = torch.randn(MANY, ENCODER_DIM, generator=generator)
    garbage = 100 * torch.randn(MANY - FEW, ENCODER_DIM, generator=generator)
    alone = EncodedImages(regions.mean(dim=0, keepdim=True), regions.unsqueeze(0))
    grid = torch.stack([other, torch.cat([regions, garbage])])  # (2, MANY, encoder_dim): the few-region image second
    mask = torch.ones(2, MANY, dtype=torch.bool)
    mask[1, FEW:] = False
    return alone, EncodedImages(torch.stack([other.mean(dim=0), regions.mean(dim=0)]), grid, mask)


@pytest.mark.parametrize(("kind", "options"), ATTENTION_DECODERS, ids=IDS)
def test_an_image_gives_the_same_logits_alone_and_beside_a_hundred_region_image(kind: str, options: dict) -> None:
    decoder = make_decoder(kind, 12, **options).eval()
    alone, batch = few_and_many()
    tokens, lengths = random_captions([6, 4, 5, 7], 12)  # three captions of the few-region image, one of the other
    with torch.no_grad():
        own = decoder(alone.select(torch.zeros(3, dtype=torch.long)), tokens[:3], lengths[:3])
        shared = decoder(batch.select(torch.tensor([1, 1, 1, 0])), tokens, lengths)
        all_real = EncodedImages(alone.global_features, alone.grid_features, torch.ones(1, FEW, dtype=torch.bool))
        full_mask = decoder(all_real.select(torch.zeros(3, dtype=torch.long)), tokens[:3], lengths[:3])
    torch.testing.assert_close(shared.logits[:3], own.logits)
    torch.testing.assert_close(shared.attention[:3, :, :FEW], own.attention)
    assert not shared.attention[:3, :, FEW:].any()  # exactly zero weight on every padded region
    assert torch.equal(shared.mask, batch.mask[[1, 1, 1, 0]]) and own.mask is None
    torch.testing.assert_close(full_mask.logits, own.logits)


@pytest.mark.parametrize(("kind", "options"), ATTENTION_DECODERS, ids=IDS)
def test_an_image_gets_the_same_greedy_and_beam_captions_alone_and_beside_a_hundred_region_image(
        kind: str, options: dict) -> None:
    decoder = make_decoder(kind, 12, seed=3, **options).eval()
    alone, batch = few_and_many(seed=4)
    own, shared = decoder.prepare(alone), decoder.prepare(batch)
    assert torch.equal(shared.select(torch.tensor([1])).mask, batch.mask[1:])
    greedy_own = greedy_decode(decoder, own, BOS, EOS, max_length=8)
    greedy_shared = greedy_decode(decoder, shared, BOS, EOS, max_length=8)
    width = greedy_own.tokens.shape[1]
    assert torch.equal(greedy_shared.tokens[1, :width], greedy_own.tokens[0])
    assert not greedy_shared.tokens[1, width:].any()
    torch.testing.assert_close(greedy_shared.log_probs[1:], greedy_own.log_probs)
    assert not greedy_shared.attention[1, :, FEW:].any()
    beam_own = beam_search(decoder, own, BOS, EOS, max_length=6, beam_size=3, n_best=2, length_penalty=0.7)
    beam_shared = beam_search(decoder, shared, BOS, EOS, max_length=6, beam_size=3, n_best=2, length_penalty=0.7)
    width = beam_own.tokens.shape[1]
    assert torch.equal(beam_shared.tokens[2:, :width], beam_own.tokens)
    assert not beam_shared.tokens[2:, width:].any()
    torch.testing.assert_close(beam_shared.log_probs[2:], beam_own.log_probs)
    torch.testing.assert_close(beam_shared.attention[2:, :width, :FEW], beam_own.attention)
    assert not beam_shared.attention[2:, :, FEW:].any()


@pytest.mark.parametrize(("kind", "options"), ATTENTION_DECODERS, ids=IDS)
def test_the_attention_penalty_ignores_padded_regions(kind: str, options: dict) -> None:
    decoder = make_decoder(kind, 12, **options).eval()
    alone, batch = few_and_many()
    tokens, lengths = random_captions([6, 4, 5, 7], 12)
    with torch.no_grad():
        own = decoder(alone.select(torch.zeros(3, dtype=torch.long)), tokens[:3], lengths[:3])
        shared = decoder(batch.select(torch.tensor([1, 1, 1, 0])), tokens, lengths)
        sampled = scheduled_sampling_forward(decoder, batch.select(torch.tensor([1, 1, 1, 0])), tokens, lengths,
                                             probability=0.0)
    expected = doubly_stochastic_penalty(own.attention)
    torch.testing.assert_close(doubly_stochastic_penalty(shared.attention[:3], shared.mask[:3]), expected)
    torch.testing.assert_close(doubly_stochastic_penalty(sampled.attention[:3], sampled.mask[:3]), expected)


def test_the_penalty_is_each_captions_mean_over_its_real_regions() -> None:
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 5, 4, generator=generator)  # (captions, steps, regions)
    assert torch.equal(doubly_stochastic_penalty(attention), ((1.0 - attention.sum(dim=1)) ** 2).mean())  # as before
    mask = torch.arange(4) < torch.tensor([[4], [2], [3]])  # 4, 2 and 3 real regions
    attention = attention * mask.unsqueeze(1)  # padded regions are never attended
    missing = (1.0 - attention.sum(dim=1)) ** 2  # (captions, regions)
    expected = torch.stack([missing[0].mean(), missing[1, :2].mean(), missing[2, :3].mean()]).mean()
    torch.testing.assert_close(doubly_stochastic_penalty(attention, mask), expected)
    more_padding = torch.cat([attention, torch.zeros(3, 5, 6)], dim=2)
    more_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(doubly_stochastic_penalty(more_padding, more_mask), expected)


def test_masks_the_decoders_cannot_honour_are_refused() -> None:
    _, batch = few_and_many()
    holes = batch.mask.clone()
    holes[1, FEW + 1] = True  # a real region after padding
    with pytest.raises(ValueError, match="real regions first"):
        make_decoder("show_attend_tell", 12, context_encoder="birnn").prepare(
            EncodedImages(batch.global_features, batch.grid_features, holes))
    empty = batch.mask.clone()
    empty[1] = False
    for kind in ("show_attend_tell", "updown"):
        with pytest.raises(ValueError, match="at least one real region"):
            make_decoder(kind, 12).prepare(EncodedImages(batch.global_features, batch.grid_features, empty))
        with pytest.raises(ValueError, match="bool tensor"):
            make_decoder(kind, 12).prepare(EncodedImages(batch.global_features, batch.grid_features,
                                                         batch.mask.long()))


def _lstm_cell(cell: torch.nn.LSTMCell, inputs: torch.Tensor, hidden: torch.Tensor, memory: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """An LSTM cell written out (torch's gate order: input, forget, cell, output)."""
    gates = F.linear(inputs, cell.weight_ih, cell.bias_ih) + F.linear(hidden, cell.weight_hh, cell.bias_hh)
    input_gate, forget_gate, candidate, output_gate = gates.chunk(4, dim=1)
    memory = torch.sigmoid(forget_gate) * memory + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(memory), memory


def test_an_updown_step_follows_the_papers_equations() -> None:
    """Anderson et al. (2018), section 3.2, on a padded batch: v̄ is the mean of the real regions."""
    decoder = UpDownDecoder(12, ENCODER_DIM, embed_dim=5, hidden_size=7, attention_dim=4, dropout=0.0).eval()
    _, batch = few_and_many()
    prepared = decoder.prepare(batch)
    regions = batch.grid_features  # (2, MANY, encoder_dim)
    mean = torch.stack([regions[0].mean(dim=0), regions[1, :FEW].mean(dim=0)])  # v̄
    torch.testing.assert_close(prepared.global_features, mean)
    assert all(torch.equal(part, torch.zeros(2, 2, 7)) for part in decoder.init_state(prepared))
    generator = torch.Generator().manual_seed(1)
    hidden, memory = torch.randn(2, 2, 7, generator=generator), torch.randn(2, 2, 7, generator=generator)
    words = torch.tensor([3, 5])
    with torch.no_grad():
        h1, c1 = _lstm_cell(decoder.attention_lstm, torch.cat([hidden[1], mean, decoder.embedding(words)], dim=1),
                            hidden[0], memory[0])
        attention = decoder.attention
        scores = attention.score(torch.tanh(attention.key_projection(regions)
                                            + attention.query_projection(h1).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(scores.masked_fill(~batch.mask, -torch.inf), dim=1)  # (2, MANY)
        attended = (alpha.unsqueeze(2) * regions.masked_fill(~batch.mask.unsqueeze(2), 0.0)).sum(dim=1)  # v̂
        h2, c2 = _lstm_cell(decoder.language_lstm, torch.cat([attended, h1], dim=1), hidden[1], memory[1])
        logits, (new_hidden, new_memory), weights = decoder.step(words, (hidden, memory), prepared)
    torch.testing.assert_close(weights, alpha)
    torch.testing.assert_close(new_hidden, torch.stack([h1, h2]))
    torch.testing.assert_close(new_memory, torch.stack([c1, c2]))
    torch.testing.assert_close(logits, decoder.output.projection(h2))


def test_updown_samples_differentiably_for_self_critical_training() -> None:
    decoder = make_decoder("updown", 12, seed=2).train()
    _, batch = few_and_many()
    settings = GenerationSettings(strategy="sample", max_length=6)
    decoded = generate(decoder, batch, SpecialTokens(BOS, EOS), settings, torch.Generator().manual_seed(0),
                       differentiable=True)
    assert not decoded.attention[1, :, FEW:].any()
    decoded.word_log_probs.sum().backward()
    for module in (decoder.attention_lstm, decoder.attention, decoder.language_lstm, decoder.output):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_a_precomputed_features_model_reads_padded_rows_with_their_mask() -> None:
    net = build_encoder_decoder(12, {"_target_": target_of(PrecomputedEncoder), "feature_dim": ENCODER_DIM},
                                {"_target_": target_of(UpDownDecoder), "embed_dim": 8, "hidden_size": 16,
                                 "attention_dim": 8, "dropout": 0.0}).eval()
    encoder = net.encoder
    assert encoder.frozen and not list(encoder.parameters()) and encoder.output_dim == ENCODER_DIM
    assert encoder.cache_identity() == {"class": "PrecomputedEncoder", "feature_dim": ENCODER_DIM}
    with pytest.raises(ValueError, match="this model reads precomputed region features"):
        net.encode(torch.zeros(1, 3, 32, 32))
    alone, batch = few_and_many()
    assert torch.equal(EncodedImages.from_rows(batch.rows(), batch.mask).mask, batch.mask)
    shared = net.encode_cached(batch.rows().half(), batch.mask)  # (2, 1 + MANY, dim) float16, as from disk
    own = net.encode_cached(alone.rows().half())
    assert shared.annotations.dtype == torch.float32 and torch.equal(shared.mask, batch.mask)
    greedy_own = greedy_decode(net.decoder, own, BOS, EOS, max_length=8)
    greedy_shared = greedy_decode(net.decoder, shared, BOS, EOS, max_length=8)
    width = greedy_own.tokens.shape[1]
    assert torch.equal(greedy_shared.tokens[1, :width], greedy_own.tokens[0])


def test_the_updown_and_precomputed_configs_compose_and_build() -> None:
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["model=show_tell", "model/decoder=updown", "model/encoder=precomputed",
                                          "data.precomputed={att_dir: feats}"])
    check_config(cfg)
    decoder = OmegaConf.to_container(cfg.model.decoder, resolve=True)
    assert {key: decoder[key] for key in ("embed_dim", "hidden_size", "attention_dim", "dropout")} == {
        "embed_dim": 1000, "hidden_size": 1000, "attention_dim": 512, "dropout": 0.5}
    net = build_encoder_decoder(20, OmegaConf.to_container(cfg.model.encoder, resolve=True), decoder)
    assert isinstance(net.decoder, UpDownDecoder) and net.encoder.output_dim == 2048
    assert net.decoder.attention_lstm.input_size == 1000 + 2048 + 1000  # [h_language; v̄; word]
    assert net.decoder.language_lstm.input_size == 2048 + 1000  # [v̂; h_attention]
