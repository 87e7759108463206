"""Resized-image cache: every image decoded and resized once, then memory-mapped by every epoch.

Decoding a JPEG costs far more than reading the same pixels from a memory-mapped array, and the
resize is deterministic, so ``write_image_cache`` stores exactly what the training transform would
compute: ``open_rgb`` (every mode made RGB), then ``Resize((s, s), antialias=True)`` on the PIL
image, as uint8 rows of ``.npy`` shards. ``ImageCache.tensor`` then applies ``ToTensor``'s own
steps, so a cached image is bit-identical to ``build_image_transform(s)(open_rgb(path)[0])``.

Layout of ``directory``::

    {s}px-{hash}/             one complete cache per key (image size, resize method, library
        manifest.json         versions and every image's id, path, file size and mtime); written last
        shard-00000.npy ...   uint8 (rows, s, s, 3); a bad image's row stays zero and is not indexed
        index.json            {image_id: [shard, row]}
        bad_images.json       [{image_id, path, reason, detail}]
        conversions.json      {image_id: "L->RGB", ...} (images that were not RGB)
        images.json           the key's image list, to open the cache for a subset of its images
    .{s}px-{hash}.partial/    staging: finished shards survive an interruption and a rerun keeps them
    .{s}px-{hash}.lock        held while writing, so concurrent writers (DDP ranks) wait, then reuse

A finished staging folder is renamed into place (``os.replace``), so a half-written cache is never
opened. Any change to the key gives a new folder; old ones are listed in the log, never deleted
(another run may still read them).
"""

import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import PIL
import torch
import torchvision
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torchvision.transforms import Resize

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
    read_json,
    replace_directory,
    sha256_file,
    write_json,
)
from captioning.data.images import BadImage, BadImageError, open_rgb

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The key names the resize and the library versions: Pillow does the resampling (torchvision's
# Resize on a PIL image calls Image.resize with bilinear filtering, always antialiased), and a new
# version may round differently, which would break bit-identity with the live transform.
RESIZE_METHOD = "torchvision.transforms.Resize((s, s), antialias=True) on the PIL image (bilinear)"
CONVERSIONS_NAME, IMAGES_NAME = "conversions.json", "images.json"
_STAGING_NAME = "staging.json"

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
    """What fixes an image's resized pixels: its size, the resize and the libraries that do it."""
    return {"image_size": image_size, "resize": RESIZE_METHOD, "pillow": PIL.__version__,
            "torchvision": torchvision.__version__}


@dataclass(frozen=True)
class _CacheKey:
    """Everything that names one cache: the images in id order, their entries, the parameters, the digest."""

    images: list[CaptionedImage]
    entries: list[list[Any]]
    parameters: dict[str, Any]
    digest: str


def _cache_key(images: Sequence[CaptionedImage], image_size: int) -> _CacheKey:
    ordered, entries = image_entries(images)
    parameters = {"format_version": FORMAT_VERSION, **transform_parameters(image_size)}
    return _CacheKey(ordered, entries, parameters, key_digest(parameters, entries))


def cache_key(images: Sequence[CaptionedImage], image_size: int) -> str:
    """The sha256 naming the cache of ``images`` at ``image_size``; any file change gives a new one."""
    return _cache_key(images, image_size).digest


def _folder_name(image_size: int, digest: str) -> str:
    return f"{image_size}px-{digest[:16]}"


# ---------------------------------------------------------------- decoding


@cache
def _resize(image_size: int) -> Resize:
    return Resize((image_size, image_size), antialias=True)


def resized_pixels(path: str | os.PathLike, image_size: int) -> tuple[np.ndarray, str | None]:
    """uint8 (s, s, 3) pixels exactly as the training transform resizes them, and the RGB conversion."""
    image, info = open_rgb(path)
    return np.asarray(_resize(image_size)(image), dtype=np.uint8), info.conversion


def _decode(job: tuple[int, str, int]) -> tuple[int, np.ndarray | None, str | None, tuple[str, str] | None]:
    """One image for a worker: exceptions do not cross processes well, so failures come back as data."""
    image_id, path, image_size = job
    try:
        pixels, conversion = resized_pixels(path, image_size)
    except BadImageError as error:
        return image_id, None, None, (error.reason, error.detail)
    return image_id, pixels, conversion, None


@contextmanager
def image_mapper(workers: int) -> Iterator[Callable[[Callable[[T], R], Iterable[T]], Iterator[R]]]:
    """An ordered ``map`` over ``workers`` processes (0: this one), for decoding many images."""
    if workers <= 0:
        yield map
        return
    with multiprocessing.Pool(workers) as pool:
        yield lambda function, items: pool.imap(function, items, chunksize=8)


def progress_bar(enabled: bool) -> Progress:
    """A rich progress bar on stderr, so that reports on stdout stay clean."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


# ---------------------------------------------------------------- files


# ---------------------------------------------------------------- writing


def write_image_cache(images: Sequence[CaptionedImage], directory: str | os.PathLike, image_size: int,
                      shard_size: int = 4096, progress: bool = True, workers: int = 0) -> ImageCacheReport:
    """Cache ``images`` resized to ``image_size`` under ``directory``; nothing to do if already complete.

    Bad images (missing, unreadable, too large) are listed in the report and the cache, not cached.
    An interrupted run leaves its finished shards in the staging folder; a rerun keeps those whose
    bytes still hash as recorded and writes the rest. ``workers`` > 0 decodes in that many processes.
    """
    if image_size <= 0 or shard_size <= 0:
        raise ValueError(f"image_size and shard_size must be positive, got {image_size} and {shard_size}")
    key = _cache_key(images, image_size)
    images, entries, parameters, digest = key.images, key.entries, key.parameters, key.digest
    directory = Path(directory)
    target = directory / _folder_name(image_size, digest)
    manifest = complete_manifest(target, FORMAT_VERSION, digest)
    if manifest is None:
        directory.mkdir(parents=True, exist_ok=True)
        with locked(directory / f".{target.name}.lock"):
            manifest = complete_manifest(target, FORMAT_VERSION, digest)  # another process may have finished it
            if manifest is None:
                return _write(images, entries, parameters, digest, target, shard_size, progress, workers)
    log.info("image cache %s is complete for these %d images: nothing to do", target, len(images))
    return _report(target, manifest, written=False)


def _write(images: list[CaptionedImage], entries: list[list[Any]], parameters: dict[str, Any], digest: str,
           target: Path, shard_size: int, progress: bool, workers: int) -> ImageCacheReport:
    if target.exists() and not (target / MANIFEST_NAME).exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} holds files but no {MANIFEST_NAME}, so it was not written by "
                              "write_image_cache; move it away (it is never deleted automatically)")
    staging = target.parent / f".{target.name}.partial"
    staging_record = {"key": digest, "shard_size": shard_size}
    if read_json(staging / _STAGING_NAME) != staging_record:
        if staging.exists():
            log.warning("discarding %s: it was left by a write of another key or shard size", staging)
            shutil.rmtree(staging)
        staging.mkdir()
        write_json(staging / _STAGING_NAME, staging_record)
    _check_disk_space(staging, len(images), parameters["image_size"])

    image_size = parameters["image_size"]
    chunks = [images[start:start + shard_size] for start in range(0, len(images), shard_size)]
    shards, reused = [], 0
    with progress_bar(progress) as bar, image_mapper(workers) as mapper:
        task = bar.add_task(f"caching images at {image_size}px", total=len(images))
        for number, chunk in enumerate(chunks):
            record = _finished_shard(staging, number, chunk)
            if record is not None:
                reused += 1
            else:
                record = _write_shard(staging, number, chunk, image_size, mapper, lambda: bar.advance(task))
            bar.update(task, completed=sum(len(c) for c in chunks[:number + 1]))
            shards.append(record)
    if reused:
        log.info("kept %d finished shard(s) of an interrupted write in %s", reused, staging)

    index = {str(image_id): [number, row] for number, record in enumerate(shards)
             for row, image_id in enumerate(record["image_ids"]) if image_id is not None}
    bad = [entry for record in shards for entry in record["bad"]]
    conversions = {key: value for record in shards for key, value in record["conversions"].items()}
    write_json(staging / INDEX_NAME, index)
    write_json(staging / BAD_NAME, bad)
    write_json(staging / CONVERSIONS_NAME, conversions)
    write_json(staging / IMAGES_NAME, entries)
    files = {f"shard-{n:05d}.npy": {"bytes": r["bytes"], "sha256": r["sha256"], "rows": len(r["image_ids"])}
             for n, r in enumerate(shards)}
    for name in (INDEX_NAME, BAD_NAME, CONVERSIONS_NAME, IMAGES_NAME):
        files[name] = {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
    manifest = {"format_version": FORMAT_VERSION, "key": digest, **parameters, "shard_size": shard_size,
                "counts": {"images": len(images), "cached": len(index), "bad": len(bad),
                           "converted": len(conversions)},
                "files": files}
    for number in range(len(shards)):
        (staging / f"shard-{number:05d}.json").unlink()
    (staging / _STAGING_NAME).unlink()
    write_json(staging / MANIFEST_NAME, manifest)  # last: its presence means complete
    replace_directory(staging, target)
    log.info("wrote image cache %s: %d images cached, %d bad, %d converted to RGB", target, len(index),
             len(bad), len(conversions))
    mention_other_caches(target, "image caches")
    return _report(target, manifest, written=True, reused_shards=reused)


def _write_shard(staging: Path, number: int, chunk: list[CaptionedImage], image_size: int,
                 mapper: Callable[..., Iterator[Any]], advance: Callable[[], None]) -> dict[str, Any]:
    """Decode one chunk into ``shard-N.npy``, then record it (``shard-N.json``) as finished."""
    partial = staging / f"shard-{number:05d}.npy.partial"
    pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                       shape=(len(chunk), image_size, image_size, 3))
    paths = {image.image_id: str(image.path) for image in chunk}
    image_ids: list[int | None] = []
    bad: list[dict[str, Any]] = []
    conversions: dict[str, str] = {}
    jobs = ((image.image_id, str(image.path), image_size) for image in chunk)
    for row, (image_id, resized, conversion, failure) in enumerate(mapper(_decode, jobs)):
        if failure is None:
            pixels[row] = resized
            image_ids.append(image_id)
            if conversion is not None:
                conversions[str(image_id)] = conversion
        else:
            image_ids.append(None)  # the row stays zero
            bad.append(asdict(BadImage(image_id, paths[image_id], *failure)))
        advance()
    pixels.flush()
    del pixels
    shard = staging / f"shard-{number:05d}.npy"
    os.replace(partial, shard)
    record = {"image_ids": image_ids, "bad": bad, "conversions": conversions,
              "bytes": shard.stat().st_size, "sha256": sha256_file(shard)}
    write_json(staging / f"shard-{number:05d}.json", record)
    return record


def _finished_shard(staging: Path, number: int, chunk: list[CaptionedImage]) -> dict[str, Any] | None:
    """The record of a shard an interrupted run finished, if it is for these images and still intact."""
    record = read_json(staging / f"shard-{number:05d}.json")
    shard = staging / f"shard-{number:05d}.npy"
    if not isinstance(record, dict) or not shard.is_file():
        return None
    bad_ids = {entry.get("image_id") for entry in record.get("bad", ())}
    listed = record.get("image_ids")
    wanted = [image.image_id for image in chunk]
    if not isinstance(listed, list) or len(listed) != len(wanted) or any(
            got != want and not (got is None and want in bad_ids) for got, want in zip(listed, wanted)):
        return None
    if shard.stat().st_size != record.get("bytes") or sha256_file(shard) != record.get("sha256"):
        return None
    return record


def _check_disk_space(staging: Path, count: int, image_size: int) -> None:
    """Fail before hours of decoding rather than at the last shard."""
    needed = count * image_size * image_size * 3
    present = sum(p.stat().st_size for p in staging.glob("shard-*.npy"))
    free = shutil.disk_usage(staging).free
    if needed - present > free:
        raise OSError(f"an image cache of {count} images at {image_size}px needs about "
                      f"{(needed - present) / 1e9:.1f} GB more in {staging.parent}, which has {free / 1e9:.1f} GB free")


def _report(folder: Path, manifest: dict[str, Any], written: bool, reused_shards: int = 0) -> ImageCacheReport:
    bad = tuple(BadImage(**entry) for entry in json.loads((folder / BAD_NAME).read_text()))
    conversions = {int(k): v for k, v in json.loads((folder / CONVERSIONS_NAME).read_text()).items()}
    counts = manifest["counts"]
    return ImageCacheReport(folder, manifest["key"], manifest["image_size"], counts["images"], counts["cached"],
                            bad, conversions, written, reused_shards)


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
        images, entries, parameters, digest = key.images, key.entries, key.parameters, key.digest
        exact = directory / _folder_name(image_size, digest)
        manifest = complete_manifest(exact, FORMAT_VERSION, digest)
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
            if all(candidate.get(name) == value for name, value in parameters.items()):
                cached = {entry[0]: entry for entry in json.loads((folder / IMAGES_NAME).read_text())}
                if all(cached.get(entry[0]) == entry for entry in entries):
                    return cls(folder, candidate)
        unfinished = sorted(p.name for p in directory.glob(f".{image_size}px-*.partial")) if directory.is_dir() else []
        raise MissingImageCacheError(
            f"no complete image cache of these {len(images)} images at {image_size}px in {directory} "
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
