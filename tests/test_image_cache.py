import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioning.data import image_cache
from captioning.data.datasets import CaptionedImage
from captioning.data.image_cache import ImageCache, MissingImageCacheError, cache_key, write_image_cache
from captioning.data.images import BadImageError, open_rgb
from captioning.data.transforms import build_image_transform

SIZE = 32


def _make_images(folder: Path) -> list[CaptionedImage]:
    """Every mode open_rgb converts, non-square sizes, and two bad files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(folder / "rgb.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (61, 40), dtype=np.uint8)).save(folder / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 50, 4), dtype=np.uint8), mode="CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65536, (40, 33)).astype(np.uint16)).save(folder / "deep.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)).save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (25, 30, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "exact.png")  # no resize
    data = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    names = ["rgb.jpg", "gray.jpg", "cmyk.jpg", "deep.png", "rgba.png", "palette.png", "exact.png",
             "missing.jpg", "truncated.jpg"]
    return [CaptionedImage(10 + i, folder / name, ("a caption",)) for i, name in enumerate(names)]


@pytest.fixture()
def images(tmp_path: Path) -> list[CaptionedImage]:
    return _make_images(tmp_path / "images")


def _by_name(images: list[CaptionedImage], name: str) -> CaptionedImage:
    return next(image for image in images if image.path.name == name)


def _good(images: list[CaptionedImage]) -> list[CaptionedImage]:
    return [i for i in images if i.path.name not in ("missing.jpg", "truncated.jpg")]


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


def _count_decodes(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[Path]:
    decoded: list[Path] = []
    original = image_cache.resized_pixels

    def counting(path: str, image_size: int) -> tuple[np.ndarray, str | None]:
        if fail_at is not None and len(decoded) == fail_at:
            raise RuntimeError("simulated interruption")
        decoded.append(Path(path))
        return original(path, image_size)

    monkeypatch.setattr(image_cache, "resized_pixels", counting)
    return decoded


@pytest.mark.parametrize("size", [SIZE, 17])
def test_cached_tensors_are_bit_identical_to_the_training_transform(images, tmp_path: Path, size: int) -> None:
    write_image_cache(images, tmp_path / "cache", size, progress=False)
    cache = ImageCache.open(tmp_path / "cache", size, images)
    transform = build_image_transform(size)
    good = _good(images)
    assert len(cache) == len(good)
    for image in good:
        expected = transform(open_rgb(image.path)[0])
        pixels = cache.pixels(image.image_id)
        assert pixels.dtype == np.uint8 and pixels.shape == (size, size, 3)
        assert not pixels.flags.writeable  # a read-only memory map
        actual = cache.tensor(image.image_id)
        assert actual.dtype == expected.dtype == torch.float32 and actual.shape == (3, size, size)
        assert torch.equal(actual, expected), image.path.name
        assert image.image_id in cache


def test_conversions_are_recorded(images, tmp_path: Path) -> None:
    report = write_image_cache(images, tmp_path / "cache", SIZE, progress=False)
    named = {_by_name(images, name).image_id: conversion for name, conversion in
             [("gray.jpg", "L->RGB"), ("cmyk.jpg", "CMYK->RGB"), ("deep.png", "I;16->RGB"),
              ("rgba.png", "RGBA->RGB"), ("palette.png", "P->RGB")]}
    assert report.conversions == named


def test_bad_images_are_listed_and_not_cached(images, tmp_path: Path) -> None:
    report = write_image_cache(images, tmp_path / "cache", SIZE, progress=False)
    bad = {b.path: b for b in report.bad}
    assert set(bad) == {str(_by_name(images, "missing.jpg").path), str(_by_name(images, "truncated.jpg").path)}
    assert bad[str(_by_name(images, "missing.jpg").path)].reason == "missing"
    assert bad[str(_by_name(images, "truncated.jpg").path)].reason == "unreadable"
    assert report.images == len(images) and report.cached == len(images) - 2
    cache = ImageCache.open(tmp_path / "cache", SIZE, images)
    truncated = _by_name(images, "truncated.jpg")
    assert truncated.image_id not in cache
    with pytest.raises(BadImageError) as caught:
        cache.pixels(truncated.image_id)
    assert caught.value.reason == "unreadable" and caught.value.path == truncated.path
    with pytest.raises(KeyError, match="999"):
        cache.pixels(999)


def test_a_second_write_does_nothing(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_image_cache(images, tmp_path / "cache", SIZE, progress=False)
    before = _files(tmp_path / "cache")
    decoded = _count_decodes(monkeypatch)
    second = write_image_cache(list(reversed(images)), tmp_path / "cache", SIZE, shard_size=3, progress=False)
    assert decoded == []
    assert first.written and not second.written
    assert (second.directory, second.key, second.cached, second.bad) == (first.directory, first.key, first.cached,
                                                                         first.bad)
    assert _files(tmp_path / "cache") == before


def test_an_interrupted_write_leaves_no_cache_and_a_rerun_finishes_it(
        images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    decoded = _count_decodes(monkeypatch, fail_at=5)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        write_image_cache(images, cache_dir, SIZE, shard_size=2, progress=False)
    assert len(decoded) == 5  # two shards of 2 finished, the third broke off
    complete = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert complete == []
    with pytest.raises(MissingImageCacheError, match="unfinished") as caught:
        ImageCache.open(cache_dir, SIZE, images)
    assert str(cache_dir) in str(caught.value)

    monkeypatch.undo()
    decoded = _count_decodes(monkeypatch)
    report = write_image_cache(images, cache_dir, SIZE, shard_size=2, progress=False)
    assert report.written and report.reused_shards == 2
    assert len(decoded) == len(images) - 4  # finished shards were kept, not decoded again
    assert not any(p.name.endswith(".partial") for p in cache_dir.iterdir())

    reference = write_image_cache(images, tmp_path / "reference", SIZE, progress=False)
    assert (report.key, report.cached, report.bad) == (reference.key, reference.cached, reference.bad)
    resumed = ImageCache.open(cache_dir, SIZE, images)
    fresh = ImageCache.open(tmp_path / "reference", SIZE, images)
    for image in _good(images):
        assert np.array_equal(resumed.pixels(image.image_id), fresh.pixels(image.image_id))
    assert resumed.verify() == []


def test_a_damaged_finished_shard_is_written_again(images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    _count_decodes(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError):
        write_image_cache(images, cache_dir, SIZE, shard_size=2, progress=False)
    (staging,) = cache_dir.glob(".*.partial")
    shard = staging / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    monkeypatch.undo()
    report = write_image_cache(images, cache_dir, SIZE, shard_size=2, progress=False)
    assert report.reused_shards == 0
    cache = ImageCache.open(cache_dir, SIZE, images)
    transform = build_image_transform(SIZE)
    for image in _good(images):
        assert torch.equal(cache.tensor(image.image_id), transform(open_rgb(image.path)[0]))


def test_a_leftover_staging_folder_of_another_write_is_replaced(images, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    name = f"{SIZE}px-{cache_key(images, SIZE)[:16]}"
    staging = cache_dir / f".{name}.partial"
    staging.mkdir(parents=True)
    (staging / "staging.json").write_text('{"key": "something else", "shard_size": 2}')
    (staging / "shard-00000.npy").write_bytes(b"half written")
    report = write_image_cache(images, cache_dir, SIZE, progress=False)
    assert report.directory == cache_dir / name and report.reused_shards == 0
    assert not staging.exists()
    assert ImageCache.open(cache_dir, SIZE, images).verify() == []


def test_a_new_size_or_a_changed_image_makes_a_new_cache(images, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = write_image_cache(images, cache_dir, SIZE, progress=False)
    assert cache_key(images, SIZE) == first.key != cache_key(images, SIZE + 1)
    with pytest.raises(MissingImageCacheError, match=f"at {SIZE + 1}px in {cache_dir}"):
        ImageCache.open(cache_dir, SIZE + 1, images)

    changed = _by_name(images, "rgb.jpg").path
    Image.new("RGB", (70, 45), (200, 10, 10)).save(changed, quality=90)
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    assert cache_key(images, SIZE) != first.key
    with pytest.raises(MissingImageCacheError, match="for other images, files or sizes"):
        ImageCache.open(cache_dir, SIZE, images)
    second = write_image_cache(images, cache_dir, SIZE, progress=False)
    assert second.written and second.directory != first.directory and first.directory.is_dir()
    cache = ImageCache.open(cache_dir, SIZE, images)
    image_id = _by_name(images, "rgb.jpg").image_id
    assert torch.equal(cache.tensor(image_id), build_image_transform(SIZE)(open_rgb(changed)[0]))

    (_by_name(images, "missing.jpg").path).write_bytes(changed.read_bytes())  # a missing file appears
    assert cache_key(images, SIZE) != second.key


def test_a_subset_of_the_cached_images_opens_the_cache(images, tmp_path: Path) -> None:
    write_image_cache(images, tmp_path / "cache", SIZE, progress=False)
    subset = images[2:5]
    cache = ImageCache.open(tmp_path / "cache", SIZE, subset)
    assert all(image.image_id in cache for image in subset)
    stranger = CaptionedImage(999, images[0].path.with_name("other.jpg"), ())
    with pytest.raises(MissingImageCacheError):
        ImageCache.open(tmp_path / "cache", SIZE, [*subset, stranger])
    with pytest.raises(MissingImageCacheError, match="holds no complete cache"):
        ImageCache.open(tmp_path / "nowhere", SIZE, subset)


def test_a_pickled_cache_reopens_its_memory_maps(images, tmp_path: Path) -> None:
    write_image_cache(images, tmp_path / "cache", SIZE, progress=False)
    cache = ImageCache.open(tmp_path / "cache", SIZE, images)
    image_id = images[0].image_id
    expected = cache.tensor(image_id)
    copy = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 20_000  # no shard contents travel to DataLoader workers
    assert torch.equal(copy.tensor(image_id), expected)


def test_worker_processes_write_the_same_cache(images, tmp_path: Path) -> None:
    serial = write_image_cache(images, tmp_path / "serial", SIZE, shard_size=4, progress=False)
    parallel = write_image_cache(images, tmp_path / "parallel", SIZE, shard_size=4, progress=False, workers=2)
    assert (parallel.key, parallel.cached, parallel.bad, parallel.conversions) == \
           (serial.key, serial.cached, serial.bad, serial.conversions)
    for name in ("shard-00000.npy", "shard-00001.npy", "shard-00002.npy", "index.json"):
        assert (serial.directory / name).read_bytes() == (parallel.directory / name).read_bytes()


def test_repeated_image_ids_are_refused(images, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeated"):
        write_image_cache([*images, images[0]], tmp_path / "cache", SIZE, progress=False)
