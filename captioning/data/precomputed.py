"""Precomputed region features (e.g. bottom-up attention), as the research codebases store them.

ruotianluo/ImageCaptioning.pytorch's ``cocobu_att`` holds one ``<image id>.npz`` per image with the
array ``feat`` of shape ``(regions, dim)`` (10-100 regions per image, dim 2048, float32,
``np.savez_compressed``); ``cocobu_fc`` optionally one ``<image id>.npy`` of shape ``(dim,)``.
Decompressing 113k archives costs an epoch minutes of CPU, so ``write_precomputed_cache`` converts
them once into the sharded cache of ``captioning.data.cache``: per image ``(1 + regions, dim)``
rows (the global vector: the fc file, or the mean of the regions; then the regions), end to end in
memory-mapped shards, so an epoch reads slices of a memory map::

    precomputed-{hash}/          one complete cache per key (both folders, every file's size and
                                 mtime, the stored dtype)
        shard-00000.npy ...      (the shard's images' 1 + regions rows, dim) in the stored dtype

Reading a file checks what the probe checks (``probe_feature_files``: the archive holds ``feat``,
2-D with at least one region; the fc vector is ``(dim,)``), and that its values are finite.
"""

import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO

import numpy as np
import torch

from captioning.data.cache import CacheKey, Computed, RowSource, ShardedCache, read_or_failure, write_cache
from captioning.data.datasets import CaptionedImage
from captioning.data.image_cache import image_mapper
from captioning.data.images import BadImageError
from captioning.errors import check_choice

FORMAT_VERSION = 1
ARRAY = "feat"  # the array name of the research codebases' .npz files
STORED = {"float16": np.float16, "float32": np.float32}
# images per shard: a shard's rows are held in memory while it is written (~100 MB at 50 x 2048 float16)
SHARD_SIZE = 512


def feature_paths(image_id: int, att_dir: Path, fc_dir: Path | None) -> tuple[Path, Path | None]:
    """The image's region file and its global-vector file (None without ``fc_dir``)."""
    return att_dir / f"{image_id}.npz", None if fc_dir is None else fc_dir / f"{image_id}.npy"


def _npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, without reading the data."""
    version = np.lib.format.read_magic(handle)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f".npy format version {version} is not supported")
    shape, _, dtype = read(handle)
    return shape, dtype


def _check_regions(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise BadImageError(path, "unreadable", f"'{ARRAY}' has shape {shape}, not (regions, dim) with at least "
                                                "one region")
    if not np.issubdtype(dtype, np.floating):
        raise BadImageError(path, "unreadable", f"'{ARRAY}' holds {dtype}, not floating-point features")


def _check_global(path: Path, shape: tuple[int, ...], dtype: np.dtype, dim: int) -> None:
    if shape != (dim,):
        raise BadImageError(path, "unreadable", f"the global vector has shape {shape}, but the image's regions "
                                                f"have {dim} features (expected ({dim},))")
    if not np.issubdtype(dtype, np.floating):
        raise BadImageError(path, "unreadable", f"holds {dtype}, not floating-point features")


def _missing(path: Path, setting: str) -> BadImageError:
    return BadImageError(path, "missing", f"feature file not found (data.precomputed.{setting})")


@contextmanager
def _archive_errors(att: Path) -> Iterator[None]:
    """Any failure to read the ``.npz`` ``att`` as a ``BadImageError`` naming it (``data.on_bad_image`` applies)."""
    try:
        yield
    except BadImageError:
        raise
    except zipfile.BadZipFile as error:
        raise BadImageError(att, "unreadable", f"not a readable .npz archive (numpy.savez): {error}") from None
    except (OSError, ValueError, EOFError, zlib.error) as error:
        raise _unreadable(att, error) from None


def _require_array(att: Path, names: list[str]) -> None:
    """The archive must hold ``ARRAY`` (``feat``, as the research codebases write it)."""
    if ARRAY not in names:
        raise BadImageError(att, "unreadable", f"holds no array '{ARRAY}' (it holds {', '.join(names) or 'nothing'})")


def _unreadable(path: Path, error: Exception) -> BadImageError:
    return BadImageError(path, "unreadable", f"cannot read: {type(error).__name__}: {error}")


def probe_feature_files(image_id: int, att_dir: Path, fc_dir: Path | None) -> None:
    """Check the image's files from their headers alone (no decompression of the data): both exist,
    the archive holds a 2-D floating ``feat``, the global vector is ``(dim,)``; else ``BadImageError``."""
    att, fc = feature_paths(image_id, att_dir, fc_dir)
    if not att.is_file():
        raise _missing(att, "att_dir")
    with _archive_errors(att), zipfile.ZipFile(att) as archive:
        _require_array(att, [name.removesuffix(".npy") for name in archive.namelist()])
        with archive.open(f"{ARRAY}.npy") as member:
            shape, dtype = _npy_header(member)
    _check_regions(att, shape, dtype)
    if fc is None:
        return
    if not fc.is_file():
        raise _missing(fc, "fc_dir")
    try:
        with fc.open("rb") as handle:
            fc_shape, fc_dtype = _npy_header(handle)
    except (OSError, ValueError, EOFError) as error:
        raise _unreadable(fc, error) from None
    _check_global(fc, fc_shape, fc_dtype, shape[1])


def read_feature_rows(image_id: int, att_dir: Path, fc_dir: Path | None) -> np.ndarray:
    """float32 ``(1 + regions, dim)``: the global vector (the fc file, or the mean of the regions), then the
    regions; ``BadImageError`` naming the file when it cannot be read or is malformed."""
    att, fc = feature_paths(image_id, att_dir, fc_dir)
    if not att.is_file():
        raise _missing(att, "att_dir")
    with _archive_errors(att), np.load(att, allow_pickle=False) as archive:
        _require_array(att, archive.files)
        regions = archive[ARRAY]
    _check_regions(att, regions.shape, regions.dtype)
    if fc is None:
        global_vector = regions.mean(axis=0, dtype=np.float64)
    else:
        if not fc.is_file():
            raise _missing(fc, "fc_dir")
        try:
            global_vector = np.load(fc, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise _unreadable(fc, error) from None
        _check_global(fc, global_vector.shape, global_vector.dtype, regions.shape[1])
    rows = np.concatenate([global_vector[None].astype(np.float32), regions.astype(np.float32)])
    if not np.isfinite(rows).all():
        where = att if np.isfinite(regions).all() else fc
        raise BadImageError(where, "unreadable", "holds NaN or infinite values")
    return rows


def _stat_digest(paths: Sequence[Path]) -> str:
    """sha256 of the files' names, sizes and mtimes (a missing file counts too): any change gives a new key."""
    entries = []
    for path in paths:
        try:
            stat = path.stat()
            entries.append([str(path), stat.st_size, stat.st_mtime_ns])
        except OSError:
            entries.append([str(path), None, None])
    return hashlib.sha256(json.dumps(entries, separators=(",", ":")).encode()).hexdigest()


def _read(job: tuple[int, str, str | None, str]) -> Computed:
    """One image's rows in the stored dtype, in a worker process; a value beyond the dtype's range stops
    the write (a setting to change, not a file to skip)."""
    image_id, att_dir, fc_dir, dtype = job
    folders = Path(att_dir), None if fc_dir is None else Path(fc_dir)
    rows, failure = read_or_failure(read_feature_rows, image_id, *folders)
    if rows is None:
        return Computed(failure=failure)
    stored = rows.astype(STORED[dtype])
    if not np.isfinite(stored).all():
        raise ValueError(f"the features of image {image_id} ({feature_paths(image_id, *folders)[0]}) reach "
                         f"{np.abs(rows).max():.3g}, beyond {dtype}'s range: set data.feature_cache_dtype=float32")
    return Computed(stored)


class _FeatureFileRows(RowSource):
    """The precomputed cache's rows: every image's feature files read by ``workers`` processes (0: this one)."""

    label = "precomputed feature cache"
    description = "converting precomputed features"
    ragged = True

    def __init__(self, att_dir: Path, fc_dir: Path | None, dtype: str, workers: int) -> None:
        self.att_dir, self.fc_dir, self.dtype, self.workers = att_dir, fc_dir, dtype, workers

    def rows(self, images: list[CaptionedImage]) -> Generator[Computed, None, None]:
        fc_dir = None if self.fc_dir is None else str(self.fc_dir)
        with image_mapper(self.workers) as mapper:
            yield from mapper(_read, ((image.image_id, str(self.att_dir), fc_dir, self.dtype) for image in images))


class PrecomputedCache(ShardedCache):
    """A complete precomputed feature cache, read through memory maps."""

    @property
    def feature_dim(self) -> int:
        """Features per region (a complete cache holds at least one readable image)."""
        return int(self.row(next(iter(self._index))).shape[1])

    def tensor(self, image_id: int) -> torch.Tensor:
        """(1 + regions, dim) in the stored dtype; ``BadImageError`` for an image whose files were bad."""
        return torch.from_numpy(np.array(self.row(image_id)))  # copy: torch wants writable memory


def write_precomputed_cache(images: Sequence[CaptionedImage], att_dir: str | os.PathLike,
                            fc_dir: str | os.PathLike | None, directory: str | os.PathLike, dtype: str = "float16",
                            workers: int = 0, progress: bool = True) -> PrecomputedCache:
    """The cache of ``images``' feature files under ``directory``, converted now unless complete.

    Images whose files cannot be read are recorded, not cached: reading one raises its
    ``BadImageError`` (naming the feature file).
    """
    check_choice(dtype, tuple(STORED), "data.feature_cache_dtype")
    att_dir = Path(att_dir).absolute()
    fc_dir = None if fc_dir is None else Path(fc_dir).absolute()
    located = [replace(image, path=feature_paths(image.image_id, att_dir, fc_dir)[0]) for image in images]
    if not located:
        raise ValueError("no images to cache")
    fc_files = [] if fc_dir is None else [feature_paths(i.image_id, att_dir, fc_dir)[1] for i in located]
    parameters = {"format_version": FORMAT_VERSION, "array": ARRAY, "fc_dir": None if fc_dir is None else str(fc_dir),
                  "fc_files": _stat_digest(sorted(fc_files)), "dtype": dtype}
    key = CacheKey.of(located, parameters)
    target = Path(directory) / key.folder_name("precomputed")
    result = write_cache(_FeatureFileRows(att_dir, fc_dir, dtype, workers), key, target, SHARD_SIZE, progress)
    return PrecomputedCache(result.directory, result.manifest)
