"""CNN image encoders built from torchvision classification backbones."""

from dataclasses import dataclass

import torch
import torchvision
from torch import nn


@dataclass
class EncodedImages:
    """What the encoder gives the decoder: one vector per image and, optionally, a spatial grid."""

    global_features: torch.Tensor  # (batch, encoder_dim)
    grid_features: torch.Tensor | None  # (batch, grid_size * grid_size, encoder_dim)

    def select(self, index: torch.Tensor) -> "EncodedImages":
        """Rows ``index`` (e.g. one per caption, or one per beam)."""
        grid = self.grid_features[index] if self.grid_features is not None else None
        return EncodedImages(self.global_features[index], grid)


def _trunk(name: str) -> nn.Module:
    """The convolutional part of a torchvision classifier, without its pooling and classifier head."""
    try:
        model = torchvision.models.get_model(name, weights=None)
    except ValueError:
        raise ValueError(f"unknown torchvision backbone {name!r}; choose one of "
                         f"torchvision.models.list_models(torchvision.models), e.g. resnet18") from None
    if hasattr(model, "features"):  # mobilenet, efficientnet, convnext, vgg, densenet, ...
        return model.features
    children = list(model.children())
    if isinstance(children[-1], nn.Linear) and isinstance(children[-2], nn.AdaptiveAvgPool2d):  # resnet, regnet
        return nn.Sequential(*children[:-2])
    raise ValueError(f"backbone {name!r} has no recognised convolutional trunk")


class CNNEncoder(nn.Module):
    """A torchvision backbone returning a global vector and an optional ``grid_size``² grid per image."""

    def __init__(self, backbone: str = "resnet18", grid_size: int | None = None) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.trunk = _trunk(backbone)
        self.grid_pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else None
        with torch.no_grad():
            was_training = self.trunk.training
            self.output_dim = int(self.trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
            self.trunk.train(was_training)

    def forward(self, images: torch.Tensor) -> EncodedImages:
        feature_map = self.trunk(images)  # (batch, encoder_dim, h, w)
        global_features = feature_map.mean(dim=(2, 3))  # (batch, encoder_dim)
        grid = None
        if self.grid_pool is not None:
            grid = self.grid_pool(feature_map).flatten(2).transpose(1, 2)  # (batch, k*k, encoder_dim)
        return EncodedImages(global_features, grid)
