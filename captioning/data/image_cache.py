"""Resized-image cache: every image decoded and resized once, then memory-mapped by every epoch.

Decoding a JPEG costs far more than reading the same pixels from a memory-mapped array, and the
resize is deterministic, so ``write_image_cache`` stores exactly what the training transform would
compute: ``open_rgb`` (upright by the EXIF orientation, every mode made RGB), then ``Resize((s, s), antialias=True)`` on the PIL
image, as uint8 rows of ``.npy`` shards. ``ImageCache.tensor`` then applies ``ToTensor``'s own
steps, so a cached image is bit-identical to ``build_image_transform(s)(open_rgb(path)[0])``.

The cache is written and read by ``captioning.data.cache`` (shards, index, bad list, manifest
written last, staging that survives an interruption, the lock); this module says how one image
becomes its row (decoded and resized in worker processes) and adds two files::

    {s}px-{hash}/             one complete cache per key (orientation, image size, resize method,
                              library versions and every image's id, path, file size and mtime)
        shard-00000.npy ...   uint8 (rows, s, s, 3)
        conversions.json      {image_id: "L->RGB", ...} (images that were not RGB)
        images.json           the key's image list, to open the cache for a subset of its images
"""

import json
import multiprocessing
import os
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import PIL
import torch
import torchvision
from torchvision.transforms import Resize

from captioning.data.cache import (
    BAD_NAME,
    CacheKey,
    CacheResult,
    Computed,
    Extras,
    RowLayout,
    RowSource,
    ShardedCache,
    complete_manifest,
    read_or_failure,
    write_cache,
)
from captioning.data.datasets import CaptionedImage
from captioning.data.files import MANIFEST_NAME
from captioning.data.images import ORIENTATION, BadImage, open_rgb

FORMAT_VERSION = 1
# The key names the resize and the library versions: Pillow does the resampling (torchvision's
# Resize on a PIL image calls Image.resize with bilinear filtering, always antialiased), and a new
# version may round differently, which would break bit-identity with the live transform.
RESIZE_METHOD = "torchvision.transforms.Resize((s, s), antialias=True) on the PIL image (bilinear)"
CONVERSIONS_NAME, IMAGES_NAME = "conversions.json", "images.json"

T = TypeVar("T")
R = TypeVar("R")


class MissingImageCacheError(FileNotFoundError):
    """No complete cache for these images and this size; the message names the folder and what is there."""


@dataclass(frozen=True)
class ImageCacheReport:
    """What ``write_image_cache`` found or did; ``written`` is False when the cache was already complete."""

    directory: Path  # the complete cache folder, {size}px-{hash}
    key: str  # sha256 of the cache key
    image_size: int
    images: int
    cached: int
    bad: tuple[BadImage, ...]
    conversions: dict[int, str] = field(default_factory=dict)  # image_id -> "L->RGB", ...
    written: bool = True
    reused_shards: int = 0


# ---------------------------------------------------------------- key


def transform_parameters(image_size: int) -> dict[str, Any]:
    """What fixes an image's resized pixels: its orientation, its size, the resize and the libraries that do it.

    Both caches' keys hold these, so caches written before EXIF orientation was applied (their
    keys lack ``orientation``) are never read for upright pixels.
    """
    return {"image_size": image_size, "orientation": ORIENTATION, "resize": RESIZE_METHOD,
            "pillow": PIL.__version__, "torchvision": torchvision.__version__}


def _cache_key(images: Sequence[CaptionedImage], image_size: int) -> CacheKey:
    return CacheKey.of(images, {"format_version": FORMAT_VERSION, **transform_parameters(image_size)})


def cache_key(images: Sequence[CaptionedImage], image_size: int) -> str:
    """The sha256 naming the cache of ``images`` at ``image_size``; any file change gives a new one."""
    return _cache_key(images, image_size).digest


# ---------------------------------------------------------------- decoding


@cache
def _resize(image_size: int) -> Resize:
    return Resize((image_size, image_size), antialias=True)


def resized_pixels(path: str | os.PathLike, image_size: int) -> tuple[np.ndarray, str | None]:
    """uint8 (s, s, 3) pixels exactly as the training transform resizes them, and the RGB conversion."""
    image, info = open_rgb(path)
    return np.asarray(_resize(image_size)(image), dtype=np.uint8), info.conversion


def _decode(job: tuple[str, int]) -> Computed:
    """One image's row, in a worker process."""
    path, image_size = job
    decoded, failure = read_or_failure(resized_pixels, path, image_size)
    if decoded is None:
        return Computed(failure=failure)
    pixels, conversion = decoded
    return Computed(pixels, note=conversion)


@contextmanager
def image_mapper(workers: int) -> Iterator[Callable[[Callable[[T], R], Iterable[T]], Iterator[R]]]:
    """An ordered ``map`` over ``workers`` processes (0: this one), for decoding many images."""
    if workers <= 0:
        yield map
        return
    with multiprocessing.Pool(workers) as pool:
        yield lambda function, items: pool.imap(function, items, chunksize=8)


class _ResizedRows(RowSource):
    """The image cache's rows: every image decoded and resized, in ``workers`` processes (0: this one)."""

    label = "image cache"

    def __init__(self, image_size: int, workers: int, entries: list[list[Any]]) -> None:
        self.image_size, self.workers, self.entries = image_size, workers, entries
        self.description = f"caching images at {image_size}px"
        self.layout = RowLayout((image_size, image_size, 3), np.dtype(np.uint8))

    def rows(self, images: list[CaptionedImage]) -> Generator[Computed, None, None]:
        with image_mapper(self.workers) as mapper:
            yield from mapper(_decode, ((str(image.path), self.image_size) for image in images))

    def extras(self, notes: dict[str, str]) -> Extras:
        return Extras(files={CONVERSIONS_NAME: notes, IMAGES_NAME: self.entries}, counts={"converted": len(notes)})


def write_image_cache(images: Sequence[CaptionedImage], directory: str | os.PathLike, image_size: int,
                      shard_size: int = 4096, progress: bool = True, workers: int = 0) -> ImageCacheReport:
    """Cache ``images`` resized to ``image_size`` under ``directory``; nothing to do if already complete.

    Bad images (missing, unreadable, too large) are listed in the report and the cache, not cached.
    An interrupted run leaves its finished shards in its staging folder; a rerun keeps those whose
    bytes still hash as recorded and writes the rest. ``workers`` > 0 decodes in that many processes.
    """
    if image_size <= 0 or shard_size <= 0:
        raise ValueError(f"image_size and shard_size must be positive, got {image_size} and {shard_size}")
    key = _cache_key(images, image_size)
    target = Path(directory) / key.folder_name(f"{image_size}px")
    return _report(write_cache(_ResizedRows(image_size, workers, key.entries), key, target, shard_size, progress))


def _report(result: CacheResult) -> ImageCacheReport:
    folder, manifest = result.directory, result.manifest
    bad = tuple(BadImage(**entry) for entry in json.loads((folder / BAD_NAME).read_text()))
    conversions = {int(k): v for k, v in json.loads((folder / CONVERSIONS_NAME).read_text()).items()}
    counts = manifest["counts"]
    return ImageCacheReport(folder, manifest["key"], manifest["image_size"], counts["images"], counts["cached"],
                            bad, conversions, result.written, result.reused_shards)


# ---------------------------------------------------------------- reading


class ImageCache(ShardedCache):
    """A complete resized-image cache, read through memory maps."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        super().__init__(folder, manifest)
        self.image_size: int = manifest["image_size"]

    @classmethod
    def open(cls, directory: str | os.PathLike, image_size: int, images: Sequence[CaptionedImage]) -> "ImageCache":
        """The complete cache of ``images`` at ``image_size`` in ``directory``.

        Also accepted: a complete cache of a superset of ``images`` with every one of them unchanged
        (e.g. written by ``prepare`` for all splits, opened for one split). Raises
        ``MissingImageCacheError`` naming the folder and what it holds otherwise.
        """
        directory = Path(directory)
        key = _cache_key(images, image_size)
        exact = directory / key.folder_name(f"{image_size}px")
        manifest = complete_manifest(exact, FORMAT_VERSION, key.digest)
        if manifest is not None:
            return cls(exact, manifest)
        found = []
        for folder in sorted(directory.iterdir()) if directory.is_dir() else ():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            candidate = complete_manifest(folder, FORMAT_VERSION)
            if candidate is None:
                continue
            found.append(f"{folder.name} ({candidate['counts']['images']} images at {candidate['image_size']}px)")
            if all(candidate.get(name) == value for name, value in key.parameters.items()):
                cached = {entry[0]: entry for entry in json.loads((folder / IMAGES_NAME).read_text())}
                if all(cached.get(entry[0]) == entry for entry in key.entries):
                    return cls(folder, candidate)
        unfinished = sorted(p.name for p in directory.glob(f".{image_size}px-*.partial")) if directory.is_dir() else []
        raise MissingImageCacheError(
            f"no complete image cache of these {len(key.images)} images at {image_size}px in {directory} "
            f"(expected {exact.name}/{MANIFEST_NAME}); "
            + (f"it holds {', '.join(found)}, for other images, files or sizes; " if found
               else "it holds no complete cache; ")
            + (f"unfinished writes: {', '.join(unfinished)} (rerun to finish); " if unfinished else "")
            + "write it with write_image_cache(...) or "
              "`python -m captioning.data.prepare ... --output DIR --image-cache`")

    def pixels(self, image_id: int) -> np.ndarray:
        """uint8 (s, s, 3), a read-only view of the memory map; ``BadImageError`` for a bad image."""
        return self.row(image_id)

    def tensor(self, image_id: int) -> torch.Tensor:
        """float (3, s, s) in [0, 1], computed with ``ToTensor``'s own steps (hence bit-identical)."""
        pixels = torch.from_numpy(np.array(self.pixels(image_id)))  # copy: torch wants writable memory
        return pixels.permute(2, 0, 1).contiguous().to(dtype=torch.get_default_dtype()).div(255)
