"""Opening image files safely: every mode made RGB, every failure a ``BadImageError`` naming the file.

Real datasets hold grayscale, CMYK, RGBA, palette and 16-bit images, truncated or zero-byte files,
text saved as ``.jpg`` and headers claiming billions of pixels. PIL raises a different exception
(or warns, or silently allocates) for each; training and the preparation report need one answer.
"""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL refuses images over twice its MAX_IMAGE_PIXELS (~179 Mpx) and warns above it; we refuse above it
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class BadImageError(ValueError):
    """An image file that cannot be used; ``reason`` is one of ``REASONS``."""

    REASONS = ("missing", "unreadable", "too_large")

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail


@dataclass(frozen=True)
class BadImage:
    """An image that could not be cached, and why (``reason`` is one of ``BadImageError.REASONS``)."""

    image_id: int
    path: str
    reason: str
    detail: str

    def error(self) -> BadImageError:
        return BadImageError(Path(self.path), self.reason, self.detail)


@dataclass(frozen=True)
class ImageInfo:
    """What opening a file found: its size, and the conversion to RGB it needed (None: already RGB)."""

    width: int
    height: int
    conversion: str | None  # e.g. "L->RGB", "CMYK->RGB", "RGBA->RGB", "P->RGB", "I;16->RGB"


def _check_header(image: Image.Image, path: Path) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise BadImageError(path, "too_large", f"{width}x{height} pixels is over the limit of {MAX_PIXELS} "
                                               "(a decompression bomb, or an image to downscale first)")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels from any PIL mode; 16-bit and float grayscale are scaled to 8 bits first."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn PIL's many failures while reading ``path`` into ``BadImageError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, "too_large", str(error)) from None
    except UnidentifiedImageError:
        kind = "an empty file" if path.stat().st_size == 0 else "not an image PIL can identify"
        raise BadImageError(path, "unreadable", kind) from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
        raise BadImageError(path, "unreadable", f"cannot decode: {error}") from None


def open_rgb(path: str | Path) -> tuple[Image.Image, ImageInfo]:
    """Decode ``path`` fully into an RGB image, or raise ``BadImageError`` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "missing", "file not found")
    with _reading(path), Image.open(path) as image:
        _check_header(image, path)
        image.load()
        mode = image.mode
        rgb = _to_rgb(image)
        if rgb is image:
            rgb = image.copy()
    return rgb, ImageInfo(rgb.width, rgb.height, None if mode == "RGB" else f"{mode}->RGB")


def probe_image(path: str | Path) -> None:
    """Check what the header tells without decoding: the file exists, is an image, is not too large.

    Cheap enough to run over a whole dataset before training; truncated data only shows when
    ``open_rgb`` decodes it.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError(path, "missing", "file not found")
    with _reading(path), Image.open(path) as image:
        _check_header(image, path)
