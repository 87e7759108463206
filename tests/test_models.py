from urllib.error import URLError

import pytest
import skimage.data
import torch
import torchvision

from captioning.losses import masked_cross_entropy
from captioning.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    efficientnet_lite0_classifier,
    packaged_lite0_weights,
)
from captioning.models.decoders import ShowTellDecoder
from captioning.models.encoder_decoder import build_encoder_decoder, target_of
from captioning.models.encoders import CNNEncoder

CNN = target_of(CNNEncoder)
SHOW_TELL = target_of(ShowTellDecoder)

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


def test_encoder_returns_global_vector_and_grid_of_any_torchvision_backbone() -> None:
    images = torch.randn(2, 3, 64, 64)
    for backbone, dim in [("resnet18", 512), ("mobilenet_v3_small", 576)]:
        encoder = CNNEncoder(backbone, grid_size=3).eval()
        encoded = encoder(images)
        assert encoder.output_dim == dim
        assert encoded.global_features.shape == (2, dim) and encoded.grid_features.shape == (2, 9, dim)
        feature_map = encoder.stages((images - encoder.mean) / encoder.std)
        torch.testing.assert_close(encoded.global_features, feature_map.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="unknown backbone"):
        CNNEncoder("resnet_does_not_exist")


def test_a_few_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    captioner = build_encoder_decoder(VOCAB, {"_target_": CNN, "backbone": "resnet18"},
                                {"_target_": SHOW_TELL, "embed_dim": 16, "hidden_size": 32, "dropout": 0.0})
    images = torch.randn(4, 3, 32, 32)
    tokens, lengths = _captions([6, 4, 5, 6], torch.Generator().manual_seed(2))
    index = torch.arange(4)
    optimizer = torch.optim.Adam(captioner.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = masked_cross_entropy(captioner(images, tokens, lengths, index).logits, tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_frozen_encoder_gets_no_gradient_and_keeps_its_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    captioner = build_encoder_decoder(VOCAB, {"_target_": CNN, "backbone": "resnet18", "trainable_stages": 1},
                                {"_target_": SHOW_TELL, "embed_dim": 16, "hidden_size": 32})
    encoder = captioner.encoder
    frozen = {name: tensor.clone() for name, tensor in encoder.stages[:-1].state_dict().items()}
    assert all(not p.requires_grad for p in encoder.stages[:-1].parameters())
    assert all(p.requires_grad for p in encoder.stages[-1].parameters())
    captioner.train()
    assert not any(m.training for stage in list(encoder.stages)[:-1] for m in stage.modules())
    assert encoder.stages[-1].training
    optimizer = torch.optim.Adam([p for p in captioner.parameters() if p.requires_grad], lr=1e-2)
    tokens, lengths = _captions([6, 4], torch.Generator().manual_seed(2))
    for _ in range(3):
        loss = masked_cross_entropy(captioner(torch.randn(2, 3, 32, 32), tokens, lengths, torch.arange(2)).logits,
                                    tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(p.grad is None for p in encoder.stages[:-1].parameters())
    assert all(p.grad is not None for p in encoder.stages[-1].parameters())
    for name, tensor in encoder.stages[:-1].state_dict().items():
        assert torch.equal(tensor, frozen[name]), name  # weights and BatchNorm running statistics
    with pytest.raises(ValueError, match="trainable_stages must be between 0 and 5"):
        CNNEncoder("resnet18", trainable_stages=6)


def test_encoder_loads_a_local_weights_file_and_applies_its_normalisation(tmp_path) -> None:
    torch.manual_seed(0)
    classifier = torchvision.models.resnet18()
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    encoder = CNNEncoder("resnet18", weights_path=tmp_path / "resnet18.pth").eval()
    images = torch.rand(2, 3, 64, 64)
    normalised = torchvision.transforms.functional.normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    trunk = torch.nn.Sequential(*list(classifier.eval().children())[:-2])
    torch.testing.assert_close(encoder(images).global_features, trunk(normalised).mean(dim=(2, 3)))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        CNNEncoder("resnet18", weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="does not fit"):
        CNNEncoder("resnet34", weights_path=tmp_path / "resnet18.pth")


def test_named_torchvision_weights_offline_fail_at_once_saying_how_to_use_a_local_file(tmp_path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", no_network)
    with pytest.raises(RuntimeError, match="weights_path"):
        CNNEncoder("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET_NOPE'"):
        CNNEncoder("resnet18", weights="IMAGENET_NOPE")


IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_offline_efficientnet_lite0_recognises_a_cat_and_an_espresso() -> None:
    classifier = efficientnet_lite0_classifier(packaged_lite0_weights()).eval()
    encoder = CNNEncoder("efficientnet_lite0", weights="imagenet", trainable_stages=0)
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    predictions = {}
    for name in ("chelsea", "coffee"):
        pixels = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
        image = torchvision.transforms.functional.resize(pixels, [224, 224], antialias=True).unsqueeze(0)
        with torch.no_grad():
            features = encoder(image).global_features  # (1, 1280)
            predictions[name] = int(classifier.classifier(features).argmax())
            normalised = (image - 0.5) / 0.5  # TF-Lite's input scaling
            torch.testing.assert_close(classifier(normalised), classifier.classifier(features))
    assert predictions["chelsea"] in IMAGENET_CATS
    assert predictions["coffee"] == ESPRESSO


def test_im2txt_initialisation_draws_weights_uniformly_and_biases_the_forget_gate() -> None:
    decoder = ShowTellDecoder(vocab_size=30, encoder_dim=8, embed_dim=16, hidden_size=12, init_scale=0.08)
    weights = [p for name, p in decoder.named_parameters() if not name.rpartition(".")[2].startswith("bias")]
    assert all(p.abs().max() <= 0.08 for p in weights) and max(p.abs().max() for p in weights) > 0.07
    assert torch.equal(decoder.embedding.weight[0], torch.zeros(16))  # <pad> stays zero
    input_bias = decoder.rnn.bias_ih_l0  # gates: input, forget, cell, output
    assert torch.equal(input_bias[12:24], torch.ones(12)) and not input_bias[:12].any()
    assert not decoder.rnn.bias_hh_l0.any() and not decoder.output.projection.bias.any()
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        ShowTellDecoder(vocab_size=30, encoder_dim=8, init_scale=0.0)
