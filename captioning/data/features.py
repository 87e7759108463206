"""Feature cache: a frozen encoder's outputs computed once per image, then memory-mapped by every epoch.

A frozen CNN gives the same outputs for an image every epoch, and it costs far more than the
decoder, so ``write_feature_cache`` runs it once over every image and stores, per image, its
output rows (the global vector first, then the ``k*k`` grid cells, row-major) as float16 (or
float32) rows of ``.npy`` shards. Training then reads features instead of pixels.

The key covers everything that fixes the features: the encoder's identity (backbone, grid size,
input normalisation and the sha256 of every weight and buffer, from ``cache_identity()``), the
image size, its EXIF orientation, the resize and the libraries that do it, the stored dtype and
every image's id, path, size and mtime. Any change gives a new folder.

The cache is written and read by ``captioning.data.cache`` (shards, index, bad list, manifest
written last, staging that survives an interruption, the lock); this module says how a batch of
images becomes encoder rows (the encoder on its device, each batch checked to fit the stored
dtype)::

    {backbone}-{s}px-{hash}/     one complete cache per key
        shard-00000.npy ...      (rows, 1 + k*k, encoder_dim) in the stored dtype
"""

import os
import platform
import re
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioning.data.cache import CacheKey, Computed, Extras, RowSource, ShardedCache, read_or_failure, write_cache
from captioning.data.datasets import CaptionedImage
from captioning.data.image_cache import transform_parameters
from captioning.errors import check_choice

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32}


class FeatureEncoder(Protocol):
    """What the cache needs of an encoder (``CNNEncoder`` provides it; ``data`` does not import models)."""

    @property
    def frozen(self) -> bool:
        """True when no weight trains, so its outputs never change."""

    def feature_rows(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 3, s, s) pixels in [0, 1] -> (batch, rows, encoder_dim) outputs, on the encoder's device."""

    def cache_identity(self) -> dict[str, Any]:
        """JSON-able facts that fix its outputs, weights hash included."""

    def to(self, device: torch.device | str) -> Any:
        """Move its weights (``nn.Module.to``): it computes where the trainer will train."""


class FeatureCache(ShardedCache):
    """A complete feature cache, read through memory maps."""

    @property
    def identity(self) -> dict[str, Any]:
        """The identity of the encoder that computed these features."""
        return self.manifest["encoder"]

    def tensor(self, image_id: int) -> torch.Tensor:
        """(1 + k*k, encoder_dim) in the stored dtype; ``BadImageError`` for an image that could not be read."""
        return torch.from_numpy(np.array(self.row(image_id)))  # copy: torch wants writable memory


def write_feature_cache(encoder: FeatureEncoder, images: Sequence[CaptionedImage],
                        load_pixels: Callable[[CaptionedImage], torch.Tensor], directory: str | os.PathLike,
                        image_size: int, dtype: str = "float16", batch_size: int = 64, num_workers: int = 0,
                        shard_size: int = 4096, progress: bool = True) -> FeatureCache:
    """The feature cache of ``encoder`` over ``images`` under ``directory``, computed now unless complete.

    ``load_pixels`` gives an image's (3, s, s) pixels, as training would (decoded or from the image
    cache: both are bit-identical). The encoder runs wherever it is (move it to a GPU first to
    compute there), in ``batch_size`` images, with ``num_workers`` processes loading pixels.
    Images that fail to load are recorded, not cached: reading one raises its ``BadImageError``.
    """
    check_choice(dtype, tuple(DTYPES), "data.feature_cache_dtype")
    if not encoder.frozen:
        raise ValueError("only a frozen encoder's features can be cached (they change as it trains): set "
                         "model.encoder.trainable_stages=0, or turn the feature cache off")
    identity = encoder.cache_identity()
    parameters = {"format_version": FORMAT_VERSION, "encoder": identity, **transform_parameters(image_size),
                  "dtype": dtype}
    key = CacheKey.of(images, parameters)
    if not key.images:
        raise ValueError("no images to cache")
    backbone = str(identity.get("backbone", "encoder"))
    target = Path(directory) / key.folder_name(f"{re.sub(r'[^A-Za-z0-9_.]+', '_', backbone)}-{image_size}px")
    source = _EncodedRows(f"caching {backbone} features", encoder, load_pixels, image_size, dtype, batch_size,
                          num_workers)
    result = write_cache(source, key, target, shard_size, progress)
    return FeatureCache(result.directory, result.manifest)


class _Pixels(Dataset[tuple[int, torch.Tensor | None, tuple[str, str] | None]]):
    """(position, pixels, None) per image, or (position, None, (reason, detail)) when it cannot be read."""

    def __init__(self, images: list[CaptionedImage], load_pixels: Callable[[CaptionedImage], torch.Tensor]) -> None:
        self.images = images
        self.load_pixels = load_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        return position, *read_or_failure(self.load_pixels, self.images[position])


def _collate_pixels(items: list[tuple[int, torch.Tensor | None, tuple[str, str] | None]]) -> list[Any]:
    """Keep the items as they are: the readable ones are encoded together, the others recorded."""
    return items


class _EncodedRows(RowSource):
    """The feature cache's rows: pixels loaded by ``num_workers`` processes, encoded in batches."""

    label = "feature cache"

    def __init__(self, description: str, encoder: FeatureEncoder,
                 load_pixels: Callable[[CaptionedImage], torch.Tensor], image_size: int, dtype: str, batch_size: int,
                 num_workers: int) -> None:
        self.description = description
        self.encoder, self.load_pixels, self.image_size, self.dtype = encoder, load_pixels, image_size, dtype
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device = "none"  # where the encoder ran, for the manifest

    def rows(self, images: list[CaptionedImage]) -> Generator[Computed, None, None]:
        loader = DataLoader(_Pixels(images, self.load_pixels), batch_size=self.batch_size,
                            num_workers=self.num_workers, collate_fn=_collate_pixels)
        for items in loader:
            good = [(position, pixels) for position, pixels, failure in items if failure is None]
            encoded = iter(self._encode([pixels for _, pixels in good], images[good[0][0]]) if good else ())
            for _, _, failure in items:
                yield Computed(failure=failure) if failure is not None else Computed(next(encoded))

    @torch.inference_mode()
    def _encode(self, pixels: list[torch.Tensor], first: CaptionedImage) -> np.ndarray:
        """(batch, 1 + k*k, dim) rows in the stored dtype, refused when not finite or beyond its range."""
        batch = torch.stack(pixels)  # (batch, 3, s, s)
        if tuple(batch.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"load_pixels gives {tuple(batch.shape[1:])} tensors, but the cache is keyed "
                             f"for {self.image_size} px images: pass the loader's own size")
        rows = self.encoder.feature_rows(batch)
        self.device = str(rows.device)
        stored = rows.to(dtype=DTYPES[self.dtype], device="cpu")
        if not stored.isfinite().all():
            raise ValueError(_not_finite(rows, self.dtype, first))
        return stored.numpy()

    def extras(self, notes: dict[str, str]) -> Extras:
        return Extras(fields={"computed_with": {"torch": torch.__version__, "device": self.device,
                                                "machine": platform.machine()}})


def _not_finite(rows: torch.Tensor, dtype: str, first: CaptionedImage) -> str:
    """Why a batch of features cannot be stored: NaN/inf from the encoder, or values beyond the dtype's range."""
    where = f"the batch starting with image {first.image_id} ({first.path})"
    if not rows.isfinite().all():
        return (f"the encoder gave non-finite (NaN or inf) features for {where}: check its weights "
                "(model.encoder.weights / weights_path) before caching them")
    return (f"the encoder's features for {where} reach {rows.abs().max().item():.3g}, beyond {dtype}'s range "
            f"(a randomly initialised CNN in eval mode does this): set data.feature_cache_dtype=float32")
