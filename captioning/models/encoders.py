"""Image encoders: a classification backbone's convolutional stages (optionally pretrained), or none at
all for precomputed region features (``PrecomputedEncoder``).

Images arrive as ``[0, 1]`` RGB tensors; each CNN encoder applies the normalisation its weights were
trained with, so data pipelines and caches stay model-agnostic.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captioning.models.backbones import Backbone, build_backbone


@dataclass
class EncodedImages:
    """What the encoder gives the decoder: one vector per image and, optionally, a spatial grid or regions.

    Only the encoder's own outputs (what the feature cache stores); the decoder's per-image work
    lives in its ``PreparedImages`` (``captioning.models.decoders``). Precomputed region features
    vary in number per image: a batch pads them to its largest and ``mask`` says which are real.
    """

    global_features: torch.Tensor  # (batch, encoder_dim)
    grid_features: torch.Tensor | None  # (batch, num_regions, encoder_dim): a grid_size² grid, or regions
    mask: torch.Tensor | None = None  # (batch, num_regions) bool, True for real regions; None: every region is real

    def select(self, index: torch.Tensor | slice) -> "EncodedImages":
        """Rows ``index`` (e.g. one per caption)."""
        return EncodedImages(*(None if part is None else part[index]
                               for part in (self.global_features, self.grid_features, self.mask)))

    def rows(self) -> torch.Tensor:
        """The encoder outputs as one tensor, as the feature cache stores them: global row first, then the grid."""
        parts = [self.global_features.unsqueeze(1)]  # (batch, 1, encoder_dim)
        if self.grid_features is not None:
            parts.append(self.grid_features)  # (batch, k*k, encoder_dim)
        return torch.cat(parts, dim=1)  # (batch, 1 + k*k, encoder_dim)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, mask: torch.Tensor | None = None) -> "EncodedImages":
        """The inverse of ``rows``: (batch, 1 + num_regions, encoder_dim) -> global vectors and grid or regions
        (None if there are none); ``mask`` (batch, num_regions) marks the real regions of padded rows."""
        return cls(rows[:, 0], rows[:, 1:] if rows.shape[1] > 1 else None, mask)


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

    def feature_rows(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 1 + k*k, encoder_dim) outputs for the feature cache; images move to the encoder's device."""
        return self(images.to(self.mean.device)).rows()

    def cache_identity(self) -> dict[str, Any]:
        """Everything that fixes this encoder's outputs, for the feature cache's key: a weight change is a new key."""
        weights = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):  # BatchNorm statistics included
            weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {"class": type(self).__name__, "backbone": self.backbone_name,
                "grid_size": None if self.grid_pool is None else self.grid_pool.output_size,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
                "weights_sha256": weights.hexdigest()}

    def forward(self, images: torch.Tensor) -> EncodedImages:
        feature_map = self.stages((images - self.mean) / self.std)  # (batch, encoder_dim, h, w)
        global_features = feature_map.mean(dim=(2, 3))  # (batch, encoder_dim)
        grid = None
        if self.grid_pool is not None:
            grid = self.grid_pool(feature_map).flatten(2).transpose(1, 2)  # (batch, k*k, encoder_dim)
        return EncodedImages(global_features, grid)


class PrecomputedEncoder(nn.Module):
    """The encoder of a model trained on precomputed features (e.g. bottom-up detector regions): no weights.

    Its outputs are the features themselves, read from disk by the data side, so it is always
    frozen and has no pixels to encode; ``cache_identity`` names the feature size only, since the
    features' origin is the data's business (their files), not this module's.
    """

    frozen = True

    def __init__(self, feature_dim: int = 2048) -> None:
        super().__init__()
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
        self.output_dim = feature_dim

    def cache_identity(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "feature_dim": self.output_dim}

    def feature_rows(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    def forward(self, images: torch.Tensor) -> EncodedImages:
        raise ValueError(f"this model reads precomputed region features: it has no image encoder and cannot encode "
                         f"pixels (got images of shape {tuple(images.shape)}); give it the features "
                         f"({self.output_dim}-dimensional, as the data side reads them from disk) instead")
