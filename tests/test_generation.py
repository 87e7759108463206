"""One generation path: ``GenerationSettings`` checks its fields, ``generate`` dispatches to the strategies."""

import pytest
import torch

from captioning.decoding import GenerationSettings, SpecialTokens, beam_search, generate, greedy_decode, sample_decode
from captioning.models.decoders import PreparedImages, ShowTellDecoder
from captioning.models.encoder_decoder import target_of
from captioning.models.encoders import CNNEncoder, EncodedImages
from captioning.module import CaptioningLitModule
from tests.test_decoding import BOS, EOS, PAD, make_decoder, make_features

CNN = target_of(CNNEncoder)
SHOW_TELL = target_of(ShowTellDecoder)

TOKENS = SpecialTokens(BOS, EOS, PAD)


@pytest.mark.parametrize(("fields", "message"), [
    ({"strategy": "nucleus"}, "strategy must be one of ('greedy', 'beam', 'sample'), got 'nucleus'"),
    ({"strategy": "beam", "beam_size": 0}, "beam_size must be an integer >= 1, got 0"),
    ({"beam_size": 3}, "beam_size=3 needs strategy='beam' (strategy is 'greedy')"),
    ({"strategy": "beam", "beam_size": 2, "n_best": 3}, "n_best must be an integer between 1 and beam_size=2, got 3"),
    ({"n_best": 0}, "n_best must be an integer between 1 and beam_size=1, got 0"),
    ({"max_length": 0}, "max_length must be an integer >= 1, got 0"),
    ({"max_length": 5, "min_length": 6}, "min_length must be an integer between 0 and max_length=5, got 6"),
    ({"min_length": -1}, "min_length must be an integer between 0 and max_length=20, got -1"),
    ({"max_length": 2.5}, "max_length must be an integer >= 1, got 2.5"),
    ({"length_penalty": float("nan")}, "length_penalty must be a finite number, got nan"),
    ({"strategy": "sample", "temperature": 0.0}, "temperature must be > 0, got 0.0"),
    ({"strategy": "sample", "top_k": -1}, "top_k must be an integer >= 0, got -1"),
    ({"temperature": 0.5}, "temperature and top_k apply to strategy='sample' only"),
    ({"strategy": "sample", "block_trigrams": True}, "block_trigrams works with strategy 'greedy' or 'beam'"),
])
def test_settings_name_the_field_and_its_valid_range(fields: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        GenerationSettings(**fields)
    assert message in str(error.value)


def test_settings_defaults_and_the_training_hyperparameters_they_come_from() -> None:
    assert GenerationSettings() == GenerationSettings("greedy", beam_size=1, n_best=1, max_length=20, min_length=1,
                                                      length_penalty=0.0, block_trigrams=False, allow_unk=False)
    assert GenerationSettings.from_hparams({}) == GenerationSettings()  # a checkpoint older than these settings
    hparams = {"beam_size": 3, "max_decode_length": 24, "length_penalty": 0.7, "block_trigrams": True,
               "allow_unk": True, "vocab": ["<pad>"]}
    assert GenerationSettings.from_hparams(hparams) == GenerationSettings(
        "beam", beam_size=3, max_length=24, length_penalty=0.7, block_trigrams=True, allow_unk=True)
    # an override of None keeps the run's value; a beam of 1 decodes greedily
    assert GenerationSettings.from_hparams(hparams, beam_size=1, max_length=None, n_best=None) == GenerationSettings(
        "greedy", max_length=24, length_penalty=0.7, block_trigrams=True, allow_unk=True)
    with pytest.raises(TypeError, match="unknown generation settings \\['beam'\\]"):
        GenerationSettings.from_hparams(hparams, beam=4)


def test_the_module_builds_its_settings_from_its_hyperparameters_once() -> None:
    module = CaptioningLitModule(["<pad>", "<bos>", "<eos>", "<unk>", "a"], {"_target_": CNN, "backbone": "resnet18"},
                              {"_target_": SHOW_TELL, "embed_dim": 8, "hidden_size": 8}, max_decode_length=9,
                              beam_size=2, length_penalty=0.5)
    assert module.generation == GenerationSettings("beam", beam_size=2, max_length=9, length_penalty=0.5)
    with pytest.raises(ValueError, match="beam_size must be an integer >= 1, got 0"):
        CaptioningLitModule(["<pad>", "<bos>", "<eos>", "<unk>"], {"_target_": CNN, "backbone": "resnet18"}, {"_target_": SHOW_TELL},
                         beam_size=0)


def test_generate_runs_the_strategy_the_settings_name() -> None:
    decoder = make_decoder("show_attend_tell", 8, seed=3).eval()
    features = decoder.prepare(make_features(6, seed=4))

    def same(a, b) -> bool:
        return torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)

    greedy = GenerationSettings(max_length=6)
    assert same(generate(decoder, features, TOKENS, greedy),
                greedy_decode(decoder, features, BOS, EOS, 6, PAD, min_length=1))
    beam = GenerationSettings("beam", beam_size=3, n_best=2, max_length=6, length_penalty=0.7)
    assert same(generate(decoder, features, TOKENS, beam),
                beam_search(decoder, features, BOS, EOS, 6, 3, PAD, min_length=1, length_penalty=0.7, n_best=2))
    blocked = GenerationSettings(max_length=6, block_trigrams=True)  # greedy with blocking: a beam of 1
    assert same(generate(decoder, features, TOKENS, blocked),
                beam_search(decoder, features, BOS, EOS, 6, 1, PAD, min_length=1, block_trigrams=True))
    sample = GenerationSettings("sample", max_length=6, temperature=2.0, top_k=3)
    assert same(generate(decoder, features, TOKENS, sample, torch.Generator().manual_seed(5)),
                sample_decode(decoder, features, BOS, EOS, 6, PAD, 1, 2.0, 3, torch.Generator().manual_seed(5)))
    # call the word greedy decoding likes most <unk>: it is never generated unless allow_unk
    unk = generate(decoder, features, TOKENS, greedy).tokens.flatten().mode().values.item()
    with_unk = SpecialTokens(BOS, EOS, PAD, unk)
    assert not (generate(decoder, features, with_unk, greedy).tokens == unk).any()
    assert same(generate(decoder, features, with_unk, GenerationSettings(max_length=6, allow_unk=True)),
                generate(decoder, features, TOKENS, greedy))


class EagerToEndDecoder(torch.nn.Module):
    """Always finds ``<eos>`` the most probable word, then word 3."""

    def prepare(self, features: EncodedImages) -> PreparedImages:
        return PreparedImages(features.global_features)

    def init_state(self, features: PreparedImages) -> tuple[torch.Tensor]:
        return (torch.zeros(1, features.global_features.shape[0], 1),)  # (layers, rows, hidden)

    def step(self, token: torch.Tensor, state: tuple[torch.Tensor], features: PreparedImages
             ) -> tuple[torch.Tensor, tuple[torch.Tensor], None]:
        logits = torch.zeros(token.shape[0], 6)  # (rows, vocab_size)
        logits[:, EOS], logits[:, 3] = 5.0, 4.0
        return logits, state, None


def test_min_length_one_by_default_never_gives_an_empty_caption() -> None:
    features = make_features(4)
    assert not greedy_decode(EagerToEndDecoder(), features, BOS, EOS, max_length=5).tokens.any()  # min_length 0
    for settings in (GenerationSettings(max_length=5), GenerationSettings("beam", beam_size=3, max_length=5)):
        assert generate(EagerToEndDecoder(), features, TOKENS, settings).tokens.tolist() == [[3, PAD]] * 4
