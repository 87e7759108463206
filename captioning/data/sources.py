"""Image sources: what the model consumes per image, read from image files or from a cache.

A source is prepared once for a run's images (a cache is written if absent, then opened), then
called per image by the datasets. ``DecodedPixels`` decodes files; ``CachedPixels`` reads the
resized-image cache (bit-identical pixels); ``EncoderFeatures`` reads a frozen encoder's outputs
from the feature cache, so the model skips its encoder. Each source says what identifies what it
serves (``identity``): the features' encoder, which the model compares with its own.
"""

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from captioning.data.datasets import CaptionedImage
from captioning.data.features import FeatureCache, FeatureEncoder, write_feature_cache
from captioning.data.image_cache import ImageCache, write_image_cache
from captioning.data.images import BadImage, open_rgb
from captioning.data.transforms import build_image_transform

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """Gives each image's tensor: pixels (3, s, s) or encoder features (1 + k*k, encoder_dim)."""

    image_size: int

    def prepare(self, images: Sequence[CaptionedImage], device: torch.device) -> Mapping[int, BadImage]:
        """Make ``images`` readable (write or open a cache; ``device`` computes features); returns the
        images whose data failed while doing so (their header was sound), by id."""

    def __call__(self, image: CaptionedImage) -> torch.Tensor:
        """The image's tensor; ``BadImageError`` when it cannot be read."""

    @property
    def identity(self) -> dict[str, Any] | None:
        """What must match the model for it to consume this source's tensors (None: pixels fit any model)."""


class DecodedPixels:
    """Pixels decoded from each image's file and resized (picklable for DataLoader workers)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self.transform = build_image_transform(image_size)

    def prepare(self, images: Sequence[CaptionedImage], device: torch.device) -> Mapping[int, BadImage]:
        return {}

    def __call__(self, image: CaptionedImage) -> torch.Tensor:
        return self.transform(open_rgb(image.path)[0])

    @property
    def identity(self) -> None:
        return None


class CachedPixels:
    """Resized pixels from the image cache under ``directory`` (written on first use by ``workers`` processes)."""

    def __init__(self, image_size: int, directory: str | os.PathLike, workers: int = 0) -> None:
        self.image_size = image_size
        self.directory = Path(directory)
        self.workers = workers
        self.cache: ImageCache | None = None

    def prepare(self, images: Sequence[CaptionedImage], device: torch.device) -> Mapping[int, BadImage]:
        write_image_cache(images, self.directory, self.image_size, progress=True, workers=self.workers)
        self.cache = ImageCache.open(self.directory, self.image_size, images)
        return self.cache.bad

    def __call__(self, image: CaptionedImage) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("CachedPixels.prepare() must run before images are read")
        return self.cache.tensor(image.image_id)

    @property
    def identity(self) -> None:
        return None


class EncoderFeatures:
    """A frozen encoder's outputs from the feature cache under ``directory``, computed on first use.

    ``encoder`` builds the encoder (with the weights the run will use, e.g. a checkpoint's); it runs
    on the device ``prepare`` is given over ``pixels`` (decoded or from the image cache: the same
    values), in batches of ``batch_size`` images, and is dropped once the cache is complete.
    """

    def __init__(self, pixels: DecodedPixels | CachedPixels, encoder: Callable[[], FeatureEncoder],
                 directory: str | os.PathLike, dtype: str = "float16", batch_size: int = 64,
                 num_workers: int = 0) -> None:
        self.pixels = pixels
        self.image_size = pixels.image_size
        self.encoder = encoder
        self.directory = Path(directory)
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache: FeatureCache | None = None

    def prepare(self, images: Sequence[CaptionedImage], device: torch.device) -> Mapping[int, BadImage]:
        bad = dict(self.pixels.prepare(images, device))
        encoder = self.encoder()
        encoder.to(device)
        self.cache = write_feature_cache(encoder, images, self.pixels, self.directory, self.image_size, self.dtype,
                                         batch_size=self.batch_size, num_workers=self.num_workers)
        return bad | self.cache.bad

    def __call__(self, image: CaptionedImage) -> torch.Tensor:
        if self.cache is None:
            raise RuntimeError("EncoderFeatures.prepare() must run before images are read")
        return self.cache.tensor(image.image_id)

    @property
    def identity(self) -> dict[str, Any] | None:
        """The identity of the encoder that computed the features (``CNNEncoder.cache_identity()``)."""
        if self.cache is None:
            raise RuntimeError("EncoderFeatures.prepare() must run before its identity is known")
        return self.cache.identity
