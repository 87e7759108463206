"""The one writer and reader of the caches of per-image rows (resized pixels, encoder features).

The caches store one row per image in memory-mapped ``.npy`` shards, in image-id order, under a
folder named by a key; a kind of cache only says how images become rows (``RowSource``). A ragged
kind (precomputed region features: a different number of regions per image) stores its images'
rows end to end instead, each image a slice of its shard. Layout of a cache's ``directory``::

    {prefix}-{hash}/              one complete cache per key: its parameters and every image's id,
                                  path, size and mtime (any change gives a new folder)
        manifest.json             parameters, counts and every file's size and sha256; written last,
                                  so its presence means complete
        shard-00000.npy ...       (rows, *row shape); a bad image's row stays zero and is not indexed
                                  ragged: (its images' rows end to end, *row shape[1:]); a bad image has none
        index.json                {image_id: [shard, row]}; ragged: {image_id: [shard, start, stop]}
        bad_images.json           [{image_id, path, reason, detail}]
        ...                       the JSON files the kind adds (``Extras.files``)
    .{prefix}-{hash}.*.partial/   staging: one writer's own folder, swapped into place when complete
    .{prefix}-{hash}.lock         held while writing, so concurrent writers (DDP ranks) wait, then reuse

Staging: a writer fills a folder of its own, shard by shard, and records each finished shard
(``shard-N.json``: its images, bad ones and hash), so an interrupted write loses at most one shard
of decoding or encoding. Under the lock it first claims what an interrupted write left, by renaming
that folder to its own name: finished shards whose bytes still hash as recorded are kept. Renaming
rather than sharing one fixed folder keeps writers apart even where the lock does not hold (flock
on some network file systems): a writer whose folder another one claimed fails on its next step
instead of mixing files with it (a shard is filled under a new file name, so rows it still writes
reach no file of the other's), each writer swaps in only its own folder, and only after checking
again that no complete cache has appeared; so a half-written folder is never swapped into place.
Old keys' folders are listed in the log, never deleted (another run may still read them).
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from itertools import chain, islice, pairwise
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from captioning.data.datasets import CaptionedImage
from captioning.data.files import (MANIFEST_NAME, locked, read_json_or_none, remove_leftovers, replace_directory,
                                  sha256_file, write_json)
from captioning.data.images import BadImage, BadImageError
from captioning.progress import progress_bar

log = logging.getLogger(__name__)

INDEX_NAME, BAD_NAME = "index.json", "bad_images.json"
_STAGING_NAME = "staging.json"

R = TypeVar("R")


# ---------------------------------------------------------------- key


@dataclass(frozen=True)
class CacheKey:
    """Everything that names one cache: the images in id order, their entries, the parameters, the digest."""

    images: list[CaptionedImage]
    entries: list[list[Any]]  # [image_id, absolute path, size, mtime_ns] per image
    parameters: dict[str, Any]  # with the cache's "format_version"
    digest: str

    @classmethod
    def of(cls, images: Sequence[CaptionedImage], parameters: dict[str, Any]) -> "CacheKey":
        """The key of ``images`` (in any order; repeated ids are refused) for ``parameters``."""
        ordered = sorted(images, key=lambda image: image.image_id)  # the layout must not depend on the order
        repeated = sorted({a.image_id for a, b in pairwise(ordered) if a.image_id == b.image_id})
        if repeated:
            raise ValueError(f"image ids must be unique to be cached; repeated: {repeated[:10]}"
                             f"{' ...' if len(repeated) > 10 else ''}")
        entries = [_image_entry(image) for image in ordered]
        text = json.dumps({"parameters": parameters, "images": entries}, sort_keys=True, separators=(",", ":"))
        return cls(ordered, entries, parameters, hashlib.sha256(text.encode()).hexdigest())

    @property
    def format_version(self) -> int:
        return self.parameters["format_version"]

    def folder_name(self, prefix: str) -> str:
        return f"{prefix}-{self.digest[:16]}"


def _image_entry(image: CaptionedImage) -> list[Any]:
    """A missing file has None for its size and mtime, so adding it later changes the key."""
    path = Path(image.path).absolute()
    try:
        stat = path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size = mtime = None
    return [image.image_id, str(path), size, mtime]


def complete_manifest(folder: Path, format_version: int, digest: str | None = None) -> dict[str, Any] | None:
    """The manifest of a complete cache in ``folder`` (of ``format_version``, for ``digest`` if given), else None.

    Checks that every listed file exists with its recorded size; contents are rehashed only on
    request (re-reading gigabytes on every start would cost more than the cache saves).
    """
    manifest = read_json_or_none(folder / MANIFEST_NAME)
    if not isinstance(manifest, dict) or manifest.get("format_version") != format_version:
        return None
    if digest is not None and manifest.get("key") != digest:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for name, record in files.items():
        try:
            if (folder / name).stat().st_size != record["bytes"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return manifest


def mention_other_caches(target: Path, kind: str) -> None:
    """Log the other complete caches beside ``target``: old keys are listed, never deleted (a run may read them)."""
    others = [p for p in target.parent.iterdir() if p.is_dir() and p != target and not p.name.startswith(".")
              and (p / MANIFEST_NAME).exists()]
    if others:
        sizes = ", ".join(f"{p.name} ({sum(f.stat().st_size for f in p.iterdir()) / 1e9:.2f} GB)" for p in others)
        log.info("other %s in %s (older keys; delete them when nothing reads them): %s", kind, target.parent, sizes)


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}.npy"


# ---------------------------------------------------------------- what a kind of cache says


@dataclass(frozen=True)
class Computed:
    """One image's result: its row, or why it could not be read; ``note`` is a fact the kind keeps."""

    row: np.ndarray | None = None
    failure: tuple[str, str] | None = None  # (reason, detail) of its BadImageError
    note: str | None = None  # e.g. the image cache's RGB conversion, "L->RGB"


def read_or_failure(read: Callable[..., R], *args: Any) -> tuple[R | None, tuple[str, str] | None]:
    """``(read(*args), None)``, or ``(None, (reason, detail))`` for a ``BadImageError``.

    Exceptions cross worker processes badly (a ``BadImageError`` does not unpickle), so failures
    come back as data.
    """
    try:
        return read(*args), None
    except BadImageError as error:
        return None, (error.reason, error.detail)


@dataclass(frozen=True)
class RowLayout:
    """The shape and dtype of one image's row; ``ragged``: ``shape[0]`` varies by image (``shape`` is then
    a typical image's, which sizes the disk-space check)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    ragged: bool = False

    @property
    def bytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


@dataclass(frozen=True)
class Extras:
    """What a kind adds to its cache: JSON files, counts and manifest fields."""

    files: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)


class RowSource(ABC):
    """One kind of cache: how its images become rows, and what it adds to the folder."""

    label: str  # e.g. "image cache", in messages
    description: str  # the progress bar's
    layout: RowLayout | None = None  # None: learned from the first readable image (or a kept shard)
    ragged: bool = False  # True: images have different numbers of rows (shape[0]); their rows go end to end

    @abstractmethod
    def rows(self, images: list[CaptionedImage]) -> Generator[Computed, None, None]:
        """One result per image, in order; closed when the write stops early (its workers then stop)."""

    def extras(self, notes: dict[str, str]) -> Extras:
        """Called when every row is written, with the notes by image id (as a string)."""
        return Extras()


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class CacheResult:
    """A complete cache folder and its manifest; ``written`` is False when it was complete already."""

    directory: Path
    manifest: dict[str, Any]
    written: bool
    reused_shards: int = 0


def write_cache(source: RowSource, key: CacheKey, target: Path, shard_size: int, progress: bool) -> CacheResult:
    """The complete cache ``target`` of ``key``, written now by ``source`` unless already complete."""
    manifest = complete_manifest(target, key.format_version, key.digest)
    if manifest is None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with locked(target.parent / f".{target.name}.lock"):
            manifest = complete_manifest(target, key.format_version, key.digest)  # another writer may have finished
            if manifest is None:
                return _write(source, key, target, shard_size, progress)
    log.info("%s %s is complete for these %d images: nothing to do", source.label, target, len(key.images))
    return CacheResult(target, manifest, written=False)


def _write(source: RowSource, key: CacheKey, target: Path, shard_size: int, progress: bool) -> CacheResult:
    if target.exists() and not (target / MANIFEST_NAME).exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} holds files but no {MANIFEST_NAME}, so it is no {source.label} this "
                              "program wrote; move it away (it is never deleted automatically)")
    staging = _claim_staging(target, {"key": key.digest, "shard_size": shard_size})
    chunks = [key.images[start:start + shard_size] for start in range(0, len(key.images), shard_size)]
    records = [_finished_shard(staging, number, chunk) for number, chunk in enumerate(chunks)]
    pending = [number for number, record in enumerate(records) if record is None]
    reused = len(chunks) - len(pending)
    if reused:
        log.info("kept %d finished shard(s) of an interrupted write in %s", reused, staging)
    with progress_bar(progress) as bar, closing(source.rows([i for n in pending for i in chunks[n]])) as computed:
        task = bar.add_task(source.description, total=len(key.images))
        bar.update(task, completed=len(key.images) - sum(len(chunks[number]) for number in pending))
        if pending:
            layout, results = _layout(source, staging, records, computed, key)
            _check_disk_space(staging, source.label, sum(len(chunks[n]) for n in pending), layout)
            for number in pending:
                records[number] = _write_shard(staging, number, chunks[number], layout, results,
                                               lambda: bar.advance(task))
    return _finish(source, key, target, staging, [r for r in records if r is not None], shard_size, reused)


def _claim_staging(target: Path, record: dict[str, Any]) -> Path:
    """A new staging folder of this writer's own, holding what an interrupted write of the same key left.

    Leftovers of another key or shard size are discarded; with the lock held, no writer owns them. So
    is what a writer killed while swapping its cache into place left (``replace_directory``'s stale copy).
    """
    remove_leftovers(target.parent, [f".{target.name}.stale-*"])
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    claimed = False
    for leftover in sorted(target.parent.glob(f".{target.name}.*partial")):
        if leftover == staging:
            continue
        if not claimed and read_json_or_none(leftover / _STAGING_NAME) == record:
            try:
                os.replace(leftover, staging)  # atomic: of two writers claiming it, one gets it
                claimed = True
            except FileNotFoundError:
                pass  # another writer claimed it first
            continue
        log.warning("discarding %s: it was left by a write of another key or shard size", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if claimed:
        for unfinished in staging.glob("*.partial"):  # the interrupted shard: started again from its first row
            unfinished.unlink()
    else:
        write_json(staging / _STAGING_NAME, record)
    return staging


def _finished_shard(staging: Path, number: int, chunk: list[CaptionedImage]) -> dict[str, Any] | None:
    """The record of a shard an interrupted write finished, if it is for these images and still intact."""
    record = read_json_or_none(staging / f"shard-{number:05d}.json")
    shard = staging / _shard_name(number)
    if not isinstance(record, dict) or not shard.is_file() or not isinstance(record.get("bad"), list) \
            or not isinstance(record.get("notes"), dict):
        return None
    bad_ids = {entry.get("image_id") for entry in record["bad"]}
    listed = record.get("image_ids")
    wanted = [image.image_id for image in chunk]
    if not isinstance(listed, list) or len(listed) != len(wanted) or any(
            got != want and not (got is None and want in bad_ids) for got, want in zip(listed, wanted)):
        return None
    if shard.stat().st_size != record.get("bytes") or sha256_file(shard) != record.get("sha256"):
        return None
    return record


def _layout(source: RowSource, staging: Path, records: list[dict[str, Any] | None], results: Iterator[Computed],
            key: CacheKey) -> tuple[RowLayout, Iterator[Computed]]:
    """The row layout: the source's, a kept shard's, or the first readable image's (results are then replayed)."""
    if source.layout is not None:
        return source.layout, results
    kept = next((number for number, record in enumerate(records) if record is not None), None)
    if kept is not None:
        shard = np.load(staging / _shard_name(kept), mmap_mode="r")
        if source.ragged:
            per_image = max(1, shard.shape[0] // max(1, len(records[kept]["image_ids"])))
            return RowLayout((per_image, *shard.shape[1:]), shard.dtype, ragged=True), results
        return RowLayout(shard.shape[1:], shard.dtype), results
    seen = []
    for result in results:  # bad images carry no row: holding them back costs nothing
        seen.append(result)
        if result.row is not None:
            return RowLayout(result.row.shape, result.row.dtype, source.ragged), chain(seen, results)
    detail = next(result.failure[1] for result in seen if result.failure is not None)
    raise ValueError(f"none of the {len(key.images)} images could be read, so the {source.label} would be empty; "
                     f"e.g. {key.images[0].path}: {detail}")


def _check_disk_space(staging: Path, label: str, count: int, layout: RowLayout) -> None:
    """Fail before hours of decoding or encoding rather than at the last shard."""
    needed = count * layout.bytes
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise OSError(f"the {label} needs about {needed / 1e9:.1f} GB more for {count} images in {staging.parent}, "
                      f"which has {free / 1e9:.1f} GB free")


def _write_shard(staging: Path, number: int, chunk: list[CaptionedImage], layout: RowLayout,
                 results: Iterator[Computed], advance: Callable[[], None]) -> dict[str, Any]:
    """Fill ``shard-N.npy`` from the chunk's results, then record it (``shard-N.json``) as finished.

    The rows go to a file of a new name first: a file another writer still maps (if it lost this
    folder to this one) is never opened again, so its late writes cannot reach this cache.
    """
    handle, name = tempfile.mkstemp(prefix=f"{_shard_name(number)}.", suffix=".partial", dir=staging)
    os.close(handle)
    partial = Path(name)
    image_ids: list[int | None] = []
    bad: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    kept: list[np.ndarray] = []  # ragged: the chunk's rows, written once their total is known
    offsets = [0]  # ragged: image i's rows are shard[offsets[i]:offsets[i + 1]]
    rows = None if layout.ragged else np.lib.format.open_memmap(partial, mode="w+", dtype=layout.dtype,
                                                                 shape=(len(chunk), *layout.shape))
    for position, (image, result) in enumerate(zip(chunk, islice(results, len(chunk)), strict=True)):
        if result.failure is None:
            if rows is not None:
                rows[position] = result.row
            elif result.row.shape[1:] != layout.shape[1:] or result.row.dtype != layout.dtype:
                raise ValueError(f"image {image.image_id} ({image.path}) gives {result.row.dtype} rows of shape "
                                 f"{result.row.shape[1:]}, the others {layout.dtype} {layout.shape[1:]}")
            else:
                kept.append(result.row)
                offsets.append(offsets[-1] + len(result.row))
            image_ids.append(image.image_id)
            if result.note is not None:
                notes[str(image.image_id)] = result.note
        else:
            image_ids.append(None)  # the row stays zero (ragged: it has none)
            offsets.append(offsets[-1])
            bad.append(asdict(BadImage(image.image_id, str(image.path), *result.failure)))
        advance()
    if rows is None:
        rows = np.lib.format.open_memmap(partial, mode="w+", dtype=layout.dtype,
                                         shape=(offsets[-1], *layout.shape[1:]))
        start = 0
        for row in kept:  # bad images have no rows, so the kept ones follow each other
            rows[start:start + len(row)] = row
            start += len(row)
    rows.flush()
    del rows
    shard = staging / _shard_name(number)
    os.replace(partial, shard)
    record = {"image_ids": image_ids, "bad": bad, "notes": notes, "bytes": shard.stat().st_size,
              "sha256": sha256_file(shard)}
    if layout.ragged:
        record["offsets"] = offsets
    write_json(staging / f"shard-{number:05d}.json", record)
    return record


def _finish(source: RowSource, key: CacheKey, target: Path, staging: Path, records: list[dict[str, Any]],
            shard_size: int, reused: int) -> CacheResult:
    """Index, bad list and the kind's files, the manifest last, then the swap into place."""
    index = {str(image_id): [number, record["offsets"][row], record["offsets"][row + 1]] if source.ragged
             else [number, row]
             for number, record in enumerate(records) for row, image_id in enumerate(record["image_ids"])
             if image_id is not None}
    bad = [entry for record in records for entry in record["bad"]]
    extras = source.extras({image_id: note for record in records for image_id, note in record["notes"].items()})
    files = {_shard_name(number): {"bytes": record["bytes"], "sha256": record["sha256"],
                                   "rows": len(record["image_ids"])} for number, record in enumerate(records)}
    for name, data in {INDEX_NAME: index, BAD_NAME: bad, **extras.files}.items():
        write_json(staging / name, data)
        files[name] = {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
    for path in staging.iterdir():  # shard records, the staging record, anything a displaced writer left
        if path.name not in files:
            path.unlink()
    counts = {"images": len(key.images), "cached": len(index), "bad": len(bad), **extras.counts}
    manifest = {**key.parameters, "key": key.digest, "shard_size": shard_size, "counts": counts, **extras.fields,
                "files": files}
    write_json(staging / MANIFEST_NAME, manifest)  # last: its presence means complete
    finished = complete_manifest(target, key.format_version, key.digest)
    if finished is not None:  # another writer got there first (the lock did not hold): keep its cache
        shutil.rmtree(staging)
        return CacheResult(target, finished, written=False)
    replace_directory(staging, target)
    log.info("wrote %s %s: %s, %.2f GB", source.label, target,
             ", ".join(f"{count} {name}" for name, count in counts.items()),
             sum(record["bytes"] for record in files.values()) / 1e9)
    mention_other_caches(target, f"{source.label}s")
    return CacheResult(target, manifest, written=True, reused_shards=reused)


# ---------------------------------------------------------------- reading


class ShardedCache:
    """A complete cache folder, one row per image in ``shard-N.npy`` files read through memory maps.

    ``index.json`` maps each cached image id to ``[shard, row]``; ``bad_images.json`` lists the
    images that could not be read, whose lookups raise their ``BadImageError``. Shards open on
    first use, and again after pickling (DataLoader workers).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.directory = folder
        self.manifest = manifest
        index = json.loads((folder / INDEX_NAME).read_text())
        # (shard, row), or ragged (shard, start, stop)
        self._index = {int(k): tuple(location) for k, location in index.items()}
        self.bad = {entry["image_id"]: BadImage(**entry) for entry in json.loads((folder / BAD_NAME).read_text())}
        self._shards: dict[int, np.ndarray] = {}

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def row(self, image_id: int) -> np.ndarray:
        """The image's row (ragged: its rows), a read-only view of the memory map; ``BadImageError`` for a
        bad image."""
        location = self._index.get(image_id)
        if location is None:
            if image_id in self.bad:
                raise self.bad[image_id].error()
            raise KeyError(f"image id {image_id} is not in the cache {self.directory}")
        shard, *rows = location
        if shard not in self._shards:
            self._shards[shard] = np.load(self.directory / _shard_name(shard), mmap_mode="r")
        return self._shards[shard][rows[0]] if len(rows) == 1 else self._shards[shard][rows[0]:rows[1]]

    def tensor(self, image_id: int) -> torch.Tensor:
        """What training reads for the image (pixels or features); each cache says how."""
        raise NotImplementedError

    def verify(self) -> list[str]:
        """Rehash every file against the manifest; returns the problems (none: intact)."""
        problems = []
        for name, record in self.manifest["files"].items():
            path = self.directory / name
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif sha256_file(path) != record["sha256"]:
                problems.append(f"{path}: contents changed since the cache was written")
        return problems

    def __getstate__(self) -> dict[str, Any]:
        # a pickled memmap is a full in-memory copy: DataLoader workers reopen the maps instead
        return {**self.__dict__, "_shards": {}}
