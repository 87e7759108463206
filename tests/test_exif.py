"""EXIF orientation: a phone photo stored sideways with an orientation tag is read upright everywhere.

Each test stores the same pixel array twice: once as a file whose orientation tag says how to turn
it, and once turned upright by hand (by the EXIF specification, not by PIL's table) with no tag.
Both must give the same tensors in training (decoded and cached) and the same captions.
"""

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.caption import Captioner
from captioning.data import image_cache
from captioning.data.datasets import CaptionedImage
from captioning.data.image_cache import ImageCache, cache_key, write_image_cache
from captioning.data.images import load_image, open_rgb
from captioning.data.sources import DecodedPixels
from tests.test_api import untrained_captioner

SIZE = 32
ORIENTATION_TAG = 0x0112

# EXIF orientation -> how the stored pixels (rows, columns, channels) are shown upright
UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    1: lambda stored: stored,
    2: lambda stored: stored[:, ::-1],  # mirrored left-right
    3: lambda stored: stored[::-1, ::-1],  # turned 180 degrees
    4: lambda stored: stored[::-1],  # mirrored top-bottom
    5: lambda stored: stored.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda stored: np.rot90(stored, k=-1),  # turned 90 degrees clockwise to show
    7: lambda stored: stored[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda stored: np.rot90(stored, k=1),  # turned 90 degrees counter-clockwise to show
}


def _stored_pixels() -> np.ndarray:
    """A non-square image with structure, so any wrong turn or mirror changes the resized pixels."""
    rows, columns = np.mgrid[0:40, 0:56]
    pixels = np.stack([rows * 6, columns * 4, (rows * columns) % 256], axis=-1)  # (40, 56, 3)
    return pixels.astype(np.uint8)


def _with_orientation(pixels: np.ndarray, orientation: int, image_format: str) -> bytes:
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    image.save(buffer, image_format, exif=exif, **({"quality": 95} if image_format == "JPEG" else {}))
    return buffer.getvalue()


def _pair(folder: Path, orientation: int, image_format: str) -> tuple[Path, Path]:
    """(tagged file, upright file): the tagged file's stored pixels turned upright by hand, saved losslessly."""
    tagged = folder / f"tagged-{orientation}.{image_format.lower()}"
    tagged.write_bytes(_with_orientation(_stored_pixels(), orientation, image_format))
    with Image.open(tagged) as image:
        assert image.getexif()[ORIENTATION_TAG] == orientation
        stored = np.asarray(image.convert("RGB"))  # the decoded pixels as stored, before any turn
    upright = folder / f"upright-{orientation}.png"
    Image.fromarray(np.ascontiguousarray(UPRIGHT[orientation](stored))).save(upright)
    return tagged, upright


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_tagged_file_gives_the_tensors_of_its_upright_pixels(tmp_path: Path, orientation: int,
                                                                image_format: str) -> None:
    tagged, upright = _pair(tmp_path, orientation, image_format)
    assert np.array_equal(np.asarray(open_rgb(tagged)[0]), np.asarray(open_rgb(upright)[0]))
    images = [CaptionedImage(1, tagged, ("a",)), CaptionedImage(2, upright, ("a",))]

    decoded = DecodedPixels(SIZE)  # the training data path without a cache
    assert decoded(images[0]).equal(decoded(images[1]))

    write_image_cache(images, tmp_path / "cache", SIZE, progress=False)
    cache = ImageCache.open(tmp_path / "cache", SIZE, images)
    assert cache.tensor(1).equal(cache.tensor(2)) and cache.tensor(1).equal(decoded(images[0]))

    # an image in memory still carrying its tag (a PIL image, an upload's bytes) is turned upright too
    with Image.open(tagged) as image:
        assert np.array_equal(np.asarray(load_image(image, "<image 0>")), np.asarray(open_rgb(upright)[0]))
    assert np.array_equal(np.asarray(load_image(tagged.read_bytes(), "<image 0>")), np.asarray(open_rgb(upright)[0]))


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return untrained_captioner()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_tagged_photo_gets_the_caption_of_its_upright_pixels(captioner: Captioner, tmp_path: Path,
                                                                orientation: int) -> None:
    tagged, upright = _pair(tmp_path, orientation, "JPEG")
    from_tag, from_upright, from_bytes = captioner.caption([tagged, upright, tagged.read_bytes()])
    assert (from_tag.caption, from_tag.log_prob) == (from_upright.caption, from_upright.log_prob)
    assert (from_bytes.caption, from_bytes.log_prob) == (from_upright.caption, from_upright.log_prob)
    # and not by chance: the stored pixels, shown sideways, score otherwise
    with Image.open(tagged) as image:
        sideways = np.asarray(image.convert("RGB"))
    assert captioner.caption([sideways])[0].log_prob != from_upright.log_prob


def test_the_orientation_is_part_of_both_caches_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache written before orientation was applied has another key, so it is never read for upright pixels."""
    tagged, _ = _pair(tmp_path, 6, "PNG")
    images = [CaptionedImage(1, tagged, ("a",))]
    key = cache_key(images, SIZE)
    monkeypatch.setattr(image_cache, "ORIENTATION", "stored pixels as they are")
    assert cache_key(images, SIZE) != key
    assert image_cache.transform_parameters(SIZE)["orientation"] == "stored pixels as they are"  # features' key too
