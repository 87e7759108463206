import pytest
import torch

from captioning.decoding import greedy_decode
from captioning.losses import masked_cross_entropy
from captioning.models.captioner import build_captioner
from captioning.models.decoders import ShowTellDecoder
from captioning.models.encoders import CNNEncoder, EncodedImages

VOCAB = 12
BOS, EOS = 1, 2


def _captions(lengths: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random captions ``<bos> w... <eos>`` padded with 0; lengths count <bos> and <eos>."""
    tokens = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens[row, 0], tokens[row, length - 1] = BOS, EOS
        tokens[row, 1:length - 1] = torch.randint(4, VOCAB, (length - 2,), generator=generator)
    return tokens, torch.tensor(lengths)


def test_masked_loss_ignores_padding_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens, _ = _captions([5, 3, 4], generator)
    targets = tokens[:, 1:]
    logits = torch.randn(3, targets.shape[1], VOCAB, generator=generator)
    loss = masked_cross_entropy(logits, targets)
    scrambled = logits.clone()
    scrambled[targets == 0] = torch.randn(int((targets == 0).sum()), VOCAB, generator=generator) * 100
    assert torch.equal(masked_cross_entropy(scrambled, targets), loss)
    valid = targets != 0
    manual = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)[valid].mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("condition", ["input", "state", "every_step"])
def test_stepping_reproduces_the_teacher_forced_pass(cell: str, condition: str) -> None:
    """``step`` and ``forward`` are one model: feeding a caption word by word gives the same logits."""
    torch.manual_seed(0)
    decoder = ShowTellDecoder(VOCAB, encoder_dim=6, embed_dim=8, hidden_size=10, num_layers=2, cell=cell,
                              condition=condition).eval()
    features = EncodedImages(torch.randn(3, 6), None)
    tokens, lengths = _captions([6, 3, 5], torch.Generator().manual_seed(1))
    with torch.no_grad():
        teacher_forced = decoder(features, tokens, lengths)  # (3, 5, VOCAB)
        state = decoder.init_state(features)
        for t in range(tokens.shape[1] - 1):
            logits, state = decoder.step(tokens[:, t], state, features)
            for row, length in enumerate(lengths.tolist()):
                if t < length - 1:
                    torch.testing.assert_close(logits[row], teacher_forced[row, t])


def test_greedy_decoding_follows_the_argmax_and_stops_at_eos() -> None:
    torch.manual_seed(0)
    decoder = ShowTellDecoder(VOCAB, encoder_dim=6, embed_dim=8, hidden_size=10).eval()
    features = EncodedImages(torch.randn(4, 6), None)
    decoded = greedy_decode(decoder, features, BOS, EOS, max_length=7)
    for row in range(4):
        single = EncodedImages(features.global_features[row:row + 1], None)
        state, token, expected, log_prob = decoder.init_state(single), torch.tensor([BOS]), [], 0.0
        for _ in range(7):
            logits, state = decoder.step(token, state, single)
            log_probs = torch.log_softmax(logits, -1)
            token = log_probs.argmax(-1)
            log_prob += log_probs[0, token].item()
            if token.item() == EOS:
                break
            expected.append(token.item())
        got = decoded.tokens[row].tolist()
        assert got[:len(expected)] == expected and all(t == 0 for t in got[len(expected):])
        assert decoded.log_probs[row].item() == pytest.approx(log_prob, abs=1e-5)


def test_encoder_returns_global_vector_and_grid_of_any_torchvision_backbone() -> None:
    images = torch.randn(2, 3, 64, 64)
    for backbone, dim in [("resnet18", 512), ("mobilenet_v3_small", 576)]:
        encoder = CNNEncoder(backbone, grid_size=3).eval()
        encoded = encoder(images)
        assert encoder.output_dim == dim
        assert encoded.global_features.shape == (2, dim) and encoded.grid_features.shape == (2, 9, dim)
        feature_map = encoder.trunk(images)
        torch.testing.assert_close(encoded.global_features, feature_map.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="unknown torchvision backbone"):
        CNNEncoder("resnet_does_not_exist")


def test_a_few_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    captioner = build_captioner(VOCAB, {"backbone": "resnet18"},
                                {"type": "show_tell", "embed_dim": 16, "hidden_size": 32, "dropout": 0.0})
    images = torch.randn(4, 3, 32, 32)
    tokens, lengths = _captions([6, 4, 5, 6], torch.Generator().manual_seed(2))
    index = torch.arange(4)
    optimizer = torch.optim.Adam(captioner.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = masked_cross_entropy(captioner(images, tokens, lengths, index), tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
