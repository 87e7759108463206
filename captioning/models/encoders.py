"""CNN image encoders: a classification backbone's convolutional stages, optionally pretrained.

Images arrive as ``[0, 1]`` RGB tensors; each encoder applies the normalisation its weights were
trained with, so data pipelines and caches stay model-agnostic.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from captioning.models.backbones import Backbone, build_backbone


@dataclass
class EncodedImages:
    """What the encoder gives the decoder: one vector per image and, optionally, a spatial grid.

    ``keys`` is decoder-side work that depends only on the image (attention's projection of the
    grid): ``decoder.prepare`` fills it once, so decoding steps and beams do not redo it.
    """

    global_features: torch.Tensor  # (batch, encoder_dim)
    grid_features: torch.Tensor | None  # (batch, grid_size * grid_size, encoder_dim)
    keys: torch.Tensor | None = None  # (batch, grid_size * grid_size, attention_dim)

    def select(self, index: torch.Tensor) -> "EncodedImages":
        """Rows ``index`` (e.g. one per caption, or one per beam)."""
        return EncodedImages(*(None if part is None else part[index]
                               for part in (self.global_features, self.grid_features, self.keys)))


class CNNEncoder(nn.Module):
    """A CNN backbone returning a global vector and an optional ``grid_size``² grid per image.

    ``trainable_stages``: ``None`` trains every stage (from scratch or fine-tuning all of it), ``0``
    freezes the whole backbone, ``N`` fine-tunes only its last N stages (e.g. ResNet's layer4).
    Frozen stages get no gradient and keep their BatchNorm statistics (they stay in eval mode).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        grid_size: int | None = None,
        weights: str | None = None,
        weights_path: str | Path | None = None,
        trainable_stages: int | None = None,
    ) -> None:
        super().__init__()
        built: Backbone = build_backbone(backbone, weights, weights_path)
        self.backbone_name = backbone
        self.stages = built.stages
        self.register_buffer("mean", torch.tensor(built.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(built.std).view(1, 3, 1, 1), persistent=False)
        self.grid_pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else None
        self.output_dim = built.output_dim
        num_stages = len(self.stages)
        if trainable_stages is not None and not 0 <= trainable_stages <= num_stages:
            raise ValueError(f"trainable_stages must be between 0 and {num_stages} for {backbone!r} "
                             f"(or null to train all), got {trainable_stages}")
        self.num_frozen = 0 if trainable_stages is None else num_stages - trainable_stages
        for stage in self.frozen_stages():
            stage.requires_grad_(False)
        self.train()

    def frozen_stages(self) -> list[nn.Module]:
        return list(self.stages)[:self.num_frozen]

    @property
    def frozen(self) -> bool:
        """True when no backbone parameter trains (its outputs can then be cached)."""
        return self.num_frozen == len(self.stages)

    def train(self, mode: bool = True) -> "CNNEncoder":
        super().train(mode)
        for stage in self.frozen_stages():
            stage.eval()  # frozen BatchNorm keeps its pretrained running statistics
        return self

    def forward(self, images: torch.Tensor) -> EncodedImages:
        feature_map = self.stages((images - self.mean) / self.std)  # (batch, encoder_dim, h, w)
        global_features = feature_map.mean(dim=(2, 3))  # (batch, encoder_dim)
        grid = None
        if self.grid_pool is not None:
            grid = self.grid_pool(feature_map).flatten(2).transpose(1, 2)  # (batch, k*k, encoder_dim)
        return EncodedImages(global_features, grid)

