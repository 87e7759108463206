"""The shared cache writer: rows in id order, a row layout learned from the first readable image,
resuming an interrupted write, and writers that a lock which does not hold fails to keep apart."""

from collections.abc import Callable, Collection, Generator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest

from captioning.data import cache as cache_module
from captioning.data.cache import CacheKey, CacheResult, Computed, RowSource, ShardedCache, write_cache
from captioning.data.datasets import CaptionedImage
from captioning.data.images import BadImageError

ROW_SHAPE = (2, 3)


class _Rows(RowSource):
    """Image ``i``'s row holds ``i + offset``; ids in ``bad`` cannot be read; ``during`` runs before image ``at``."""

    label = "test cache"
    description = "test rows"

    def __init__(self, bad: Collection[int] = (), at: int | None = None,
                 during: Callable[[], object] = lambda: None, offset: float = 0) -> None:
        self.bad, self.at, self.during, self.offset = bad, at, during, offset
        self.computed: list[int] = []

    def rows(self, images: list[CaptionedImage]) -> Generator[Computed, None, None]:
        for image in images:
            if image.image_id == self.at:
                self.during()
            self.computed.append(image.image_id)
            if image.image_id in self.bad:
                yield Computed(failure=("unreadable", "broken"))
            else:
                yield Computed(np.full(ROW_SHAPE, image.image_id + self.offset, dtype=np.float16))


def _images(tmp_path: Path, count: int) -> list[CaptionedImage]:
    return [CaptionedImage(i, tmp_path / f"{i}.png", ()) for i in range(count)]


def _write(source: RowSource, images: list[CaptionedImage], folder: Path) -> CacheResult:
    key = CacheKey.of(images, {"format_version": 1})
    return write_cache(source, key, folder / key.folder_name("test"), shard_size=2, progress=False)


def _interrupt() -> None:
    raise KeyboardInterrupt


def test_rows_are_in_id_order_and_the_layout_comes_from_the_first_readable_image(tmp_path: Path) -> None:
    images = _images(tmp_path, 5)
    result = _write(_Rows(bad={0, 1, 3}), list(reversed(images)), tmp_path / "cache")  # shard 0: all bad
    cache = ShardedCache(result.directory, result.manifest)
    assert result.written and len(cache) == 2 and cache.verify() == []
    assert np.array_equal(cache.row(4), np.full(ROW_SHAPE, 4, dtype=np.float16))
    with pytest.raises(BadImageError, match="broken"):
        cache.row(0)
    assert np.load(result.directory / "shard-00000.npy").shape == (2, *ROW_SHAPE)
    assert result.manifest["counts"] == {"images": 5, "cached": 2, "bad": 3}
    assert not list((tmp_path / "cache").glob(".*.partial"))


def test_no_readable_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="none of the 3 images could be read"):
        _write(_Rows(bad={0, 1, 2}), _images(tmp_path, 3), tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]


def test_an_interrupted_write_keeps_its_finished_shards(tmp_path: Path) -> None:
    images = _images(tmp_path, 6)
    with pytest.raises(KeyboardInterrupt):
        _write(_Rows(at=3, during=_interrupt), images, tmp_path / "cache")
    rerun = _Rows(bad={2, 3, 4, 5})  # no readable image left: the layout comes from the kept shard
    result = _write(rerun, images, tmp_path / "cache")
    assert result.reused_shards == 1 and rerun.computed == [2, 3, 4, 5]
    cache = ShardedCache(result.directory, result.manifest)
    assert cache.verify() == [] and np.array_equal(cache.row(1), np.full(ROW_SHAPE, 1, dtype=np.float16))
    assert sorted(p.name for p in result.directory.iterdir()) == [
        "bad_images.json", "index.json", "manifest.json", "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]


def test_a_writer_whose_folder_another_claims_fails_and_never_swaps_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "locked", lambda lock_file: nullcontext())  # as if flock did not hold
    images, folder = _images(tmp_path, 6), tmp_path / "cache"
    second: list[CacheResult] = []
    first = _Rows(at=3, during=lambda: second.append(_write(_Rows(), images, folder)), offset=0.5)  # mid-shard 1
    with pytest.raises(FileNotFoundError):
        _write(first, images, folder)
    (result,) = second
    assert result.written and result.reused_shards == 1  # it took over the first writer's finished shard
    cache = ShardedCache(result.directory, result.manifest)
    assert cache.verify() == [] and np.array_equal(cache.row(3), np.full(ROW_SHAPE, 3, dtype=np.float16))
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == [result.directory.name]


def test_a_writer_keeps_a_cache_that_another_completed_before_its_swap(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    images, folder = _images(tmp_path, 4), tmp_path / "cache"
    other = tmp_path / "other"
    finished = _write(_Rows(), images, other)
    late = _Rows(at=3, during=lambda: finished.directory.rename(folder / finished.directory.name))
    result = _write(late, images, folder)
    assert not result.written and result.manifest == finished.manifest
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == [finished.directory.name]
