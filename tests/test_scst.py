"""Self-critical training: the policy gradient moves each sample's probability the way its advantage says."""

from collections.abc import Sequence

import numpy as np
import pytest
import torch

from captioning.decoding import GenerationSettings, SpecialTokens, generate
from captioning.models.encoders import EncodedImages
from captioning.scst import ScstSettings, mean_of_others, scst_step, self_critical_loss
from tests.test_decoding import BOS, EOS, PAD, make_decoder, make_features

VOCAB = 9
TOKENS = SpecialTokens(BOS, EOS, PAD)


def _captions(decoded) -> list[str]:
    return [" ".join(str(t) for t in row if t != PAD) for row in decoded.tokens.tolist()]


def _sequence_log_probs(decoder: torch.nn.Module, features: EncodedImages, sampled: torch.Tensor,
                        lengths: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log p of each sampled caption (its words, and <eos> when it ended with one): (rows,)."""
    rows = sampled.shape[0]
    words = (sampled != PAD).sum(dim=1)  # (rows,)
    tokens = torch.zeros(rows, sampled.shape[1] + 2, dtype=torch.long)
    tokens[:, 0] = BOS
    for row, (length, count) in enumerate(zip(lengths.tolist(), words.tolist())):
        tokens[row, 1:count + 1] = sampled[row, :count]
        if length > count:  # the sample ended with <eos> rather than at max_length
            tokens[row, count + 1] = EOS
    with torch.no_grad():
        logits = decoder(features, tokens, lengths + 1).logits  # (rows, steps, vocab)
    log_probs = torch.log_softmax(logits, dim=-1).gather(2, tokens[:, 1:].unsqueeze(2)).squeeze(2)
    mask = torch.arange(tokens.shape[1] - 1).unsqueeze(0) < lengths.unsqueeze(1)  # (rows, steps)
    return (log_probs * mask).sum(dim=1)


@pytest.mark.parametrize("kind", ["show_tell", "show_attend_tell"])
def test_one_step_raises_a_sample_above_the_baseline_and_lowers_one_below(kind: str) -> None:
    decoder = make_decoder(kind, VOCAB, seed=3)
    samples_per_image = 4
    features = make_features(1)
    rows = features.select(torch.zeros(samples_per_image, dtype=torch.long))  # one image, 4 samples
    sampling = GenerationSettings(strategy="sample", max_length=6)
    decoded = generate(decoder, rows, TOKENS, sampling, generator=torch.Generator().manual_seed(0),
                       differentiable=True)
    texts = _captions(decoded)
    assert len(set(texts)) > 1, "the draw must give different samples for this test to mean anything"
    best = texts[0]

    def reward(image_ids: Sequence[int], captions: Sequence[str]) -> np.ndarray:
        return np.array([1.0 if caption == best else 0.0 for caption in captions])

    settings = ScstSettings(samples=samples_per_image, baseline="mean", max_length=6)
    step = scst_step(decoded, None, [7], _captions, reward, settings)
    lengths = decoded.lengths.clone()
    before = _sequence_log_probs(decoder, rows, decoded.tokens, lengths)
    torch.optim.SGD(decoder.parameters(), lr=0.5).zero_grad()
    step.loss.backward()
    torch.optim.SGD(decoder.parameters(), lr=0.5).step()
    after = _sequence_log_probs(decoder, rows, decoded.tokens, lengths)
    below = next(row for row, text in enumerate(texts) if text != best)
    assert after[0] > before[0]  # rewarded above its baseline: more probable
    assert after[below] < before[below]  # below its baseline: less probable
    assert step.reward == pytest.approx(np.mean([1.0 if text == best else 0.0 for text in texts]))


def test_with_the_mean_baseline_identical_samples_give_no_gradient() -> None:
    decoder = make_decoder("show_attend_tell", VOCAB, seed=4)
    features = make_features(1)
    rows = features.select(torch.zeros(3, dtype=torch.long))
    decoded = generate(decoder, rows, TOKENS, GenerationSettings(strategy="greedy", max_length=6),
                       differentiable=True)  # three identical captions
    assert len(set(_captions(decoded))) == 1
    step = scst_step(decoded, None, [1], _captions, lambda ids, captions: np.full(len(captions), 0.75),
                     ScstSettings(samples=3, baseline="mean", max_length=6))
    step.loss.backward()
    assert step.advantage == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in decoder.parameters())
    assert any(p.grad is not None for p in decoder.parameters())  # the graph did reach the weights


def test_the_greedy_baseline_is_the_greedy_captions_reward_and_the_loss_counts_eos() -> None:
    rewards = {"3 4": 0.9, "5": 0.1, "3": 0.5}
    tokens = torch.tensor([[3, 4, PAD], [5, PAD, PAD]])  # two samples of one image, <eos> already replaced
    word_log_probs = torch.tensor([[-0.5, -1.0, -0.25], [-2.0, -0.125, 0.0]], requires_grad=True)
    lengths = torch.tensor([3, 2])  # words with <eos>
    samples = type("Decoded", (), {"tokens": tokens, "word_log_probs": word_log_probs, "lengths": lengths})()
    greedy = type("Decoded", (), {"tokens": torch.tensor([[3, PAD]])})()
    step = scst_step(samples, greedy, [11], _captions, lambda ids, captions: np.array([rewards[c] for c in captions]),
                     ScstSettings(samples=2, baseline="greedy", max_length=3))
    expected = -((0.9 - 0.5) * (-0.5 - 1.0 - 0.25) + (0.1 - 0.5) * (-2.0 - 0.125)) / 5  # 5 words, <eos> included
    assert step.loss.item() == pytest.approx(expected)
    assert step.baseline == pytest.approx(0.5) and step.sample_length == pytest.approx(2.5)


def test_mean_of_others_and_the_loss_mask() -> None:
    rewards = torch.tensor([[1.0, 2.0, 6.0]])
    assert mean_of_others(rewards).tolist() == [[4.0, 3.5, 1.5]]
    word_log_probs = torch.tensor([[-1.0, -2.0, -4.0]])
    # only the first 2 positions are words of the sample: the third must not count, nor its -4
    assert self_critical_loss(word_log_probs, torch.tensor([2]), torch.tensor([1.0])).item() == pytest.approx(1.5)


@pytest.mark.parametrize(("fields", "message"), [
    ({"baseline": "max"}, "model.scst.baseline must be one of ('mean', 'greedy'), got 'max'"),
    ({"samples": 1}, "model.scst.samples must be an integer >= 2 with the mean baseline, got 1"),
    ({"samples": 0, "baseline": "greedy"}, "model.scst.samples must be an integer >= 1 with the greedy baseline"),
    ({"max_length": 0}, "model.scst.max_length must be an integer >= 1, got 0"),
    ({"start_epoch": -1}, "model.scst.start_epoch must be an integer >= 0, got -1"),
])
def test_settings_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        ScstSettings(**fields)
    assert message in str(error.value)


def test_beam_search_is_not_differentiable() -> None:
    decoder = make_decoder("show_tell", VOCAB)
    with pytest.raises(ValueError, match="beam search is not differentiable"):
        generate(decoder, make_features(1), TOKENS, GenerationSettings(strategy="beam", beam_size=2),
                 differentiable=True)
    decoded = generate(decoder, make_features(2), TOKENS, GenerationSettings())
    assert not decoded.word_log_probs.requires_grad  # validation and the CLI record nothing for autograd
