"""Feature cache: a frozen encoder's outputs computed once per image, then memory-mapped by every epoch.

A frozen CNN gives the same outputs for an image every epoch, and it costs far more than the
decoder, so ``write_feature_cache`` runs it once over every image and stores, per image, its
output rows (the global vector first, then the ``k*k`` grid cells, row-major) as float16 (or
float32) rows of ``.npy`` shards. Training then reads features instead of pixels.

The key covers everything that fixes the features: the encoder's identity (backbone, grid size,
input normalisation and the sha256 of every weight and buffer, from ``cache_identity()``), the
image size, the resize and the libraries that do it, the stored dtype and every image's id,
path, size and mtime. Any change gives a new folder.

Layout of ``directory``::

    {backbone}-{s}px-{hash}/     one complete cache per key
        manifest.json            the key's parameters, counts and every file's size and sha256; written last
        shard-00000.npy ...      (rows, 1 + k*k, encoder_dim); a bad image's row stays zero and is not indexed
        index.json               {image_id: [shard, row]}
        bad_images.json          [{image_id, path, reason, detail}]
    .{backbone}-{s}px-{hash}.partial-*/ staging, one per writer: renamed into place when complete, so a
                                        half-written cache is never opened; an interrupted one is discarded
    .{backbone}-{s}px-{hash}.lock       held while writing, so concurrent writers (DDP ranks) wait, then reuse
"""

import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioning.data.datasets import CaptionedImage
from captioning.data.files import (
    BAD_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    ShardedCache,
    complete_manifest,
    image_entries,
    key_digest,
    locked,
    mention_other_caches,
    replace_directory,
    sha256_file,
    write_json,
)
from captioning.data.image_cache import progress_bar, transform_parameters
from captioning.data.images import BadImage, BadImageError

log = logging.getLogger(__name__)

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
    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not encoder.frozen:
        raise ValueError("only a frozen encoder's features can be cached (they change as it trains): set "
                         "model.encoder.trainable_stages=0, or turn the feature cache off")
    identity = encoder.cache_identity()
    ordered, entries = image_entries(images)
    parameters = {"format_version": FORMAT_VERSION, "encoder": identity, **transform_parameters(image_size),
                  "dtype": dtype}
    digest = key_digest(parameters, entries)
    directory = Path(directory)
    name = re.sub(r"[^A-Za-z0-9_.]+", "_", str(identity.get("backbone", "encoder")))
    target = directory / f"{name}-{image_size}px-{digest[:16]}"
    manifest = complete_manifest(target, FORMAT_VERSION, digest)
    if manifest is None:
        directory.mkdir(parents=True, exist_ok=True)
        with locked(directory / f".{target.name}.lock"):
            manifest = complete_manifest(target, FORMAT_VERSION, digest)  # another rank may have finished it
            if manifest is None:
                manifest = _write(encoder, ordered, load_pixels, target, parameters, digest, batch_size,
                                  num_workers, shard_size, progress)
    else:
        log.info("feature cache %s is complete for these %d images: nothing to compute", target, len(ordered))
    return FeatureCache(target, manifest)


class _Pixels(Dataset[tuple[int, torch.Tensor | None, tuple[str, str] | None]]):
    """(position, pixels, None) per image, or (position, None, (reason, detail)) when it cannot be read."""

    def __init__(self, images: list[CaptionedImage], load_pixels: Callable[[CaptionedImage], torch.Tensor]) -> None:
        self.images = images
        self.load_pixels = load_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, tuple[str, str] | None]:
        try:
            return position, self.load_pixels(self.images[position]), None
        except BadImageError as error:  # exceptions cross worker processes badly: failures come back as data
            return position, None, (error.reason, error.detail)


def _collate_pixels(items: list[tuple[int, torch.Tensor | None, tuple[str, str] | None]]) -> list[Any]:
    """Keep the items as they are: the writer stacks the readable ones and records the others."""
    return items


@torch.inference_mode()
def _write(encoder: FeatureEncoder, images: list[CaptionedImage], load_pixels: Callable[[CaptionedImage], torch.Tensor],
           target: Path, parameters: dict[str, Any], digest: str, batch_size: int, num_workers: int,
           shard_size: int, progress: bool) -> dict[str, Any]:
    if target.exists() and not (target / MANIFEST_NAME).exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} holds files but no {MANIFEST_NAME}, so it was not written by "
                              "write_feature_cache; move it away (it is never deleted automatically)")
    for leftover in target.parent.glob(f".{target.name}.partial-*"):  # the lock is held: no writer owns them
        log.warning("discarding %s, left by an interrupted write", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    # a folder of its own: should the lock not hold (some network file systems), writers never share one
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    dtype = DTYPES[parameters["dtype"]]
    loader = DataLoader(_Pixels(images, load_pixels), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate_pixels)
    shards: list[np.ndarray] = []
    index: dict[str, list[int]] = {}
    bad: list[dict[str, Any]] = []
    device = "none"
    with progress_bar(progress) as bar:
        task = bar.add_task(f"caching {parameters['encoder'].get('backbone', 'encoder')} features", total=len(images))
        for items in loader:
            good = [(position, pixels) for position, pixels, failure in items if failure is None]
            bad += [asdict(BadImage(images[p].image_id, str(images[p].path), *failure))
                    for p, _, failure in items if failure is not None]
            if good:
                pixels = torch.stack([pixels for _, pixels in good])  # (batch, 3, s, s)
                if tuple(pixels.shape[1:]) != (3, parameters["image_size"], parameters["image_size"]):
                    raise ValueError(f"load_pixels gives {tuple(pixels.shape[1:])} tensors, but the cache is keyed "
                                     f"for {parameters['image_size']} px images: pass the loader's own size")
                rows = encoder.feature_rows(pixels)  # (batch, 1 + k*k, dim)
                device = str(rows.device)
                stored = rows.to(dtype=dtype, device="cpu")
                if not stored.isfinite().all():
                    raise ValueError(_not_finite(rows, stored, parameters["dtype"], images[good[0][0]]))
                rows = stored.numpy()
                if not shards:
                    shards = _open_shards(staging, len(images), shard_size, rows.shape[1:], rows.dtype)
                for (position, _), features in zip(good, rows):
                    shards[position // shard_size][position % shard_size] = features
                    index[str(images[position].image_id)] = [position // shard_size, position % shard_size]
            bar.advance(task, len(items))
    if not index:
        raise ValueError(f"none of the {len(images)} images could be read, so there are no features to cache; "
                         f"e.g. {bad[0]['path']}: {bad[0]['detail']}" if bad else "no images to cache")
    for shard in shards:
        shard.flush()
    shards.clear()
    write_json(staging / INDEX_NAME, index)
    write_json(staging / BAD_NAME, bad)
    files = {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
             for path in sorted(staging.iterdir())}
    manifest = {**parameters, "key": digest, "shard_size": shard_size,
                "counts": {"images": len(images), "cached": len(index), "bad": len(bad)},
                "computed_with": {"torch": torch.__version__, "device": device,
                                  "machine": platform.machine()},
                "files": files}
    write_json(staging / MANIFEST_NAME, manifest)  # last: its presence means complete
    finished = complete_manifest(target, FORMAT_VERSION, digest)
    if finished is not None:  # another writer got there first: keep its cache, drop this copy
        shutil.rmtree(staging)
        return finished
    replace_directory(staging, target)
    log.info("wrote feature cache %s: %d images, %d bad, %.2f GB", target, len(index), len(bad),
             sum(record["bytes"] for record in files.values()) / 1e9)
    mention_other_caches(target, "feature caches")
    return manifest


def _not_finite(rows: torch.Tensor, stored: torch.Tensor, dtype: str, first: CaptionedImage) -> str:
    """Why a batch of features cannot be stored: NaN/inf from the encoder, or values beyond the dtype's range."""
    where = f"the batch starting with image {first.image_id} ({first.path})"
    if not rows.isfinite().all():
        return (f"the encoder gave non-finite (NaN or inf) features for {where}: check its weights "
                "(model.encoder.weights / weights_path) before caching them")
    return (f"the encoder's features for {where} reach {rows.abs().max().item():.3g}, beyond {dtype}'s range "
            f"(a randomly initialised CNN in eval mode does this): set data.feature_cache_dtype=float32")


def _open_shards(staging: Path, count: int, shard_size: int, row_shape: tuple[int, ...],
                 dtype: np.dtype) -> list[np.ndarray]:
    """Zeroed memory-mapped shards for ``count`` images, after checking the disk can hold them."""
    needed = count * int(np.prod(row_shape)) * dtype.itemsize
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise OSError(f"a feature cache of {count} images needs about {needed / 1e9:.1f} GB in {staging.parent}, "
                      f"which has {free / 1e9:.1f} GB free")
    return [np.lib.format.open_memmap(staging / f"shard-{number:05d}.npy", mode="w+", dtype=dtype,
                                      shape=(min(shard_size, count - start), *row_shape))
            for number, start in enumerate(range(0, count, shard_size))]

