"""Writing generated data safely: a lock between processes, an atomic folder swap, file hashes,
and the manifests and keys of the caches.

The shapes generator, the resized-image cache and the feature cache all write a folder in a
staging place, add a manifest last and rename the folder into place, so a reader never sees a
half-written one; both caches are then read the same way (``ShardedCache``).
"""

import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioning.data.datasets import CaptionedImage
from captioning.data.images import BadImage

log = logging.getLogger(__name__)

MANIFEST_NAME, INDEX_NAME, BAD_NAME = "manifest.json", "index.json", "bad_images.json"
_HASH_CHUNK = 1 << 22


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file``; other processes (e.g. DDP ranks) wait for it."""
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def replace_directory(source: Path, target: Path) -> None:
    """Move ``source`` to ``target``, removing a stale generated ``target`` first."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(source, target)


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in chunks (cache shards can be larger than one wants in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write then rename, so a reader sees the old file or the whole new one.

    Strict JSON only: a NaN or an infinity (which ``json`` would write as the non-JSON ``NaN``) is
    refused with a ``ValueError`` naming the file, and nothing is written.
    """
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except ValueError:
        where = _nonfinite_entry(data)
        raise ValueError(f"{path} is not written: {where or 'a value'} is not a finite number, which strict JSON "
                         "cannot hold (a diverged run, e.g. a learning rate too high, produces such numbers)") from None
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def _nonfinite_entry(data: Any, where: str = "") -> str | None:
    """Where the first NaN/infinity of ``data`` is, e.g. ``['val/loss'] (nan)``; None if none."""
    if isinstance(data, float) and not math.isfinite(data):
        return f"{where or 'the value'} ({data})"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list | tuple) else ()
    for key, value in items:
        found = _nonfinite_entry(value, f"{where}[{key!r}]")
        if found:
            return found
    return None


def read_json(path: Path) -> Any:
    """The file's JSON, or None when it is missing or not JSON (a cache then counts as absent)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def complete_manifest(folder: Path, format_version: int, digest: str | None = None) -> dict[str, Any] | None:
    """The manifest of a complete cache in ``folder`` (of ``format_version``, for ``digest`` if given), else None.

    Checks that every listed file exists with its recorded size; contents are rehashed only on
    request (re-reading gigabytes on every start would cost more than the cache saves).
    """
    manifest = read_json(folder / MANIFEST_NAME)
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


def image_entries(images: Sequence[CaptionedImage]) -> tuple[list[CaptionedImage], list[list[Any]]]:
    """The images in id order (a cache's layout must not depend on the caller's order) and their entries.

    An entry is ``[image_id, absolute path, size, mtime_ns]``; a missing file has None, so adding it
    later changes the key. Repeated ids are refused.
    """
    ordered = sorted(images, key=lambda image: image.image_id)
    repeated = sorted({a.image_id for a, b in pairwise(ordered) if a.image_id == b.image_id})
    if repeated:
        raise ValueError(f"image ids must be unique to be cached; repeated: {repeated[:10]}"
                         f"{' ...' if len(repeated) > 10 else ''}")
    return ordered, [_image_entry(image) for image in ordered]


def _image_entry(image: CaptionedImage) -> list[Any]:
    path = Path(image.path).absolute()
    try:
        stat = path.stat()
        size, mtime = stat.st_size, stat.st_mtime_ns
    except OSError:
        size = mtime = None
    return [image.image_id, str(path), size, mtime]


def key_digest(parameters: dict[str, Any], entries: list[list[Any]]) -> str:
    """The sha256 naming a cache: its parameters and its image entries, as canonical JSON."""
    text = json.dumps({"parameters": parameters, "images": entries}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def mention_other_caches(target: Path, kind: str) -> None:
    """Log the other complete caches beside ``target``: old keys are listed, never deleted (a run may read them)."""
    others = [p for p in target.parent.iterdir() if p.is_dir() and p != target and not p.name.startswith(".")
              and (p / MANIFEST_NAME).exists()]
    if others:
        sizes = ", ".join(f"{p.name} ({sum(f.stat().st_size for f in p.iterdir()) / 1e9:.2f} GB)" for p in others)
        log.info("other %s in %s (older keys; delete them when nothing reads them): %s", kind, target.parent, sizes)


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
        self._index = {int(k): (shard, row) for k, (shard, row) in index.items()}
        self.bad = {entry["image_id"]: BadImage(**entry) for entry in json.loads((folder / BAD_NAME).read_text())}
        self._shards: dict[int, np.ndarray] = {}

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def image_ids(self) -> list[int]:
        return sorted(self._index)

    def row(self, image_id: int) -> np.ndarray:
        """The image's row, a read-only view of the memory map; ``BadImageError`` for a bad image."""
        location = self._index.get(image_id)
        if location is None:
            if image_id in self.bad:
                raise self.bad[image_id].error()
            raise KeyError(f"image id {image_id} is not in the cache {self.directory}")
        shard, row = location
        if shard not in self._shards:
            self._shards[shard] = np.load(self.directory / f"shard-{shard:05d}.npy", mmap_mode="r")
        return self._shards[shard][row]

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
