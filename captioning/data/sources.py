"""Image sources: what the model consumes per image, read from image files or from a cache.

A source probes each image's files cheaply before training (the corpus leaves out or stops at bad
ones), is prepared once for a run's images (a cache is written if absent, then opened), then
called per image by the datasets. ``DecodedPixels`` decodes files; ``CachedPixels`` reads the
resized-image cache (bit-identical pixels); ``EncoderFeatures`` reads a frozen encoder's outputs
from the feature cache, so the model skips its encoder; ``PrecomputedFeatures`` reads region
features a detector computed elsewhere (no image file is needed). Each source says what
identifies what it serves (``identity``): the features' encoder, which the model compares with its own.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from captioning.data.datasets import CaptionedImage
from captioning.data.features import FeatureCache, FeatureEncoder, write_feature_cache
from captioning.data.image_cache import ImageCache, MissingImageCacheError, write_image_cache
from captioning.data.images import BadImage, open_rgb, probe_image
from captioning.data.precomputed import PrecomputedCache, probe_feature_files, write_precomputed_cache
from captioning.data.transforms import build_image_transform

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """Gives each image's tensor: pixels (3, s, s) or encoder features (1 + k*k or 1 + regions, encoder_dim)."""

    image_size: int

    def probe(self, image: CaptionedImage) -> None:
        """Check cheaply (headers, no decoding) that the files this source reads for ``image`` are usable;
        ``BadImageError`` naming the file and what is wrong otherwise."""

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

    def probe(self, image: CaptionedImage) -> None:
        probe_image(image.path)

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

    def probe(self, image: CaptionedImage) -> None:
        probe_image(image.path)

    def prepare(self, images: Sequence[CaptionedImage], device: torch.device) -> Mapping[int, BadImage]:
        try:  # a complete cache of these images or of more (``prepare --image-cache`` of every split at once)
            self.cache = ImageCache.open(self.directory, self.image_size, images)
        except MissingImageCacheError:
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

    ``encoder`` (with the weights the run will use) runs on the device ``prepare`` is given over
    ``pixels`` (decoded or from the image cache: the same values), in batches of ``batch_size``
    images; once the cache is complete the source lets go of it (DataLoader workers copy the source).
    """

    def __init__(self, pixels: DecodedPixels | CachedPixels, encoder: FeatureEncoder, directory: str | os.PathLike,
                 dtype: str = "float16", batch_size: int = 64, num_workers: int = 0) -> None:
        self.pixels = pixels
        self.image_size = pixels.image_size
        self.encoder: FeatureEncoder | None = encoder
        self.directory = Path(directory)
        self.dtype = dtype
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache: FeatureCache | None = None

    def probe(self, image: CaptionedImage) -> None:
        self.pixels.probe(image)

    def prepare(self, images: Sequence[CaptionedImage], device: torch.device) -> Mapping[int, BadImage]:
        if self.encoder is None:
            raise RuntimeError("EncoderFeatures.prepare() runs once: its encoder was released after computing")
        bad = dict(self.pixels.prepare(images, device))
        encoder, self.encoder = self.encoder, None
        encoder.to(device)
        try:
            self.cache = write_feature_cache(encoder, images, self.pixels, self.directory, self.image_size,
                                             self.dtype, batch_size=self.batch_size, num_workers=self.num_workers)
        finally:
            encoder.to("cpu")
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


class PrecomputedFeatures:
    """Region features computed elsewhere (e.g. bottom-up attention), one ``<image id>.npz`` per image in
    ``att_dir`` (array ``feat``: (regions, dim)) and optionally one ``<image id>.npy`` (dim,) in ``fc_dir``.

    ``prepare`` converts them once (``workers`` processes) into a memory-mapped cache under
    ``directory`` as ``dtype``, so an epoch reads memory maps instead of decompressing archives.
    ``image_size`` is only reported (no pixels are read).
    """

    def __init__(self, att_dir: str | os.PathLike, fc_dir: str | os.PathLike | None, directory: str | os.PathLike,
                 dtype: str = "float16", workers: int = 0, image_size: int = 224) -> None:
        self.att_dir = Path(att_dir)
        self.fc_dir = None if fc_dir is None else Path(fc_dir)
        self.directory = Path(directory)
        self.dtype = dtype
        self.workers = workers
        self.image_size = image_size
        self.cache: PrecomputedCache | None = None

    def probe(self, image: CaptionedImage) -> None:
        probe_feature_files(image.image_id, self.att_dir, self.fc_dir)

    def prepare(self, images: Sequence[CaptionedImage], device: torch.device) -> Mapping[int, BadImage]:
        self.cache = write_precomputed_cache(images, self.att_dir, self.fc_dir, self.directory, self.dtype,
                                             self.workers)
        return self.cache.bad

    def __call__(self, image: CaptionedImage) -> torch.Tensor:
        """(1 + regions, dim): the global vector (the fc file, or the mean of the regions), then the regions."""
        if self.cache is None:
            raise RuntimeError("PrecomputedFeatures.prepare() must run before images are read")
        return self.cache.tensor(image.image_id)

    @property
    def identity(self) -> dict[str, Any]:
        """What ``PrecomputedEncoder.cache_identity()`` returns for features of this width."""
        if self.cache is None:
            raise RuntimeError("PrecomputedFeatures.prepare() must run before its identity is known")
        return {"class": "PrecomputedEncoder", "feature_dim": self.cache.feature_dim}
