"""Opening images safely: upright, every mode made RGB, every failure a ``BadImageError`` naming the image.

Real datasets hold grayscale, CMYK, RGBA, palette and 16-bit images, truncated or zero-byte files,
text saved as ``.jpg`` and headers claiming billions of pixels. PIL raises a different exception
(or warns, or silently allocates) for each; training and the preparation report need one answer.
Phone photos store their pixels as the sensor saw them plus an EXIF orientation tag; every image
is turned upright by that tag (``ORIENTATION``), so a model never trains on or captions a sideways
photo. Images given in memory (PIL images, arrays, tensors, encoded bytes) go through the same steps
as files (``load_image``), so a file and its pixels give the same tensor.
"""

import io
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from captioning.errors import InputError

# PIL refuses images over twice its MAX_IMAGE_PIXELS (~179 Mpx) and warns above it; we refuse above it
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# How pixels are oriented; part of the caches' keys, so caches of sideways pixels are never reused
ORIENTATION = "EXIF orientation applied (PIL.ImageOps.exif_transpose)"
# What ``load_image`` takes: a file path, an encoded image file's bytes, or pixels
ImageInput = str | Path | bytes | bytearray | memoryview | Image.Image | np.ndarray | torch.Tensor


class BadImageError(InputError):
    """An image file that cannot be used; ``reason`` is one of ``REASONS``. An input error: ``train.py``
    names it in one line with exit status 2, also when it is found mid-epoch."""

    REASONS = ("missing", "unreadable", "too_large")

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path, self.reason, self.detail = path, reason, detail

    def __reduce__(self) -> tuple[type["BadImageError"], tuple[Path, str, str]]:
        """Pickled whole: a DataLoader worker hands it to the main process as data (``checked_batch``)."""
        return BadImageError, (self.path, self.reason, self.detail)


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


def _check_regular_file(path: Path) -> None:
    """Raise ``BadImageError`` unless ``path`` (its link followed) is a regular file, before anything opens it:
    opening a FIFO named like an image would block the reader forever; a device or folder is no image."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise BadImageError(path, "missing", "file not found") from None
    except (OSError, ValueError) as error:  # no permission on a folder, a link loop, a NUL in the name
        reason = getattr(error, "strerror", None) or error
        raise BadImageError(path, "unreadable", f"cannot look at it: {reason}") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "not a file")
        raise BadImageError(path, "unreadable", f"{kind}, not a regular file: never opened")


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


def _upright_rgb(image: Image.Image) -> tuple[Image.Image, ImageInfo]:
    """A loaded image turned upright by its EXIF orientation and made RGB (a new image: ``image`` is untouched)."""
    mode = image.mode
    upright = ImageOps.exif_transpose(image)  # a copy, also when there is no orientation tag
    rgb = _to_rgb(upright)
    return rgb, ImageInfo(rgb.width, rgb.height, None if mode == "RGB" else f"{mode}->RGB")


@contextmanager
def _reading(path: Path, size: int | None = None) -> Iterator[None]:
    """Turn PIL's many failures while reading ``path`` (a file, or ``size`` bytes in memory) into ``BadImageError``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadImageError(path, "too_large", str(error)) from None
    except UnidentifiedImageError:
        empty = (path.stat().st_size if size is None else size) == 0
        kind = "an empty file" if empty else "not an image PIL can identify"
        raise BadImageError(path, "unreadable", kind) from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
        raise BadImageError(path, "unreadable", f"cannot decode: {error}") from None


def open_rgb(path: str | Path) -> tuple[Image.Image, ImageInfo]:
    """Decode ``path`` fully into an upright RGB image, or raise ``BadImageError`` saying why not."""
    path = Path(path)
    _check_regular_file(path)
    with _reading(path), Image.open(path) as image:
        _check_header(image, path)
        image.load()
        return _upright_rgb(image)


def decode_rgb(data: bytes | bytearray | memoryview, name: str) -> tuple[Image.Image, ImageInfo]:
    """``open_rgb`` for an image file's bytes held in memory (an upload, say); errors name it ``name``."""
    path = Path(name)
    with _reading(path, len(data)), Image.open(io.BytesIO(data)) as image:
        _check_header(image, path)
        image.load()
        return _upright_rgb(image)


def pil_rgb(image: Image.Image, name: str) -> Image.Image:
    """An in-memory PIL image as ``open_rgb`` would have made it from its file: upright (by the EXIF
    orientation it still carries, if any) and RGB."""
    path = Path(name)
    with _reading(path, size=1):  # already identified: only its (lazy) decoding can fail; no file to look at
        _check_header(image, path)
        image.load()
        return _upright_rgb(image)[0]


def array_rgb(pixels: np.ndarray | torch.Tensor, name: str) -> Image.Image:
    """Pixels as an RGB image: numpy (H, W, 3) or (H, W) uint8, or torch (3, H, W) or (1, H, W), uint8 in
    0..255 or floating point in [0, 1] (``ToTensor``'s output; rounded to 8 bits, as files are)."""
    path = Path(name)
    if isinstance(pixels, torch.Tensor):
        if pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
            raise BadImageError(path, "unreadable", f"a tensor image must be (3, H, W) or (1, H, W), got "
                                                    f"{tuple(pixels.shape)}")
        if pixels.numel() == 0:  # before min()/max(), which raise on an empty tensor
            raise BadImageError(path, "unreadable", f"a tensor image of shape {tuple(pixels.shape)} holds no pixels")
        if pixels.is_floating_point():
            if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
                raise BadImageError(path, "unreadable", "a floating-point tensor image must hold values in [0, 1] "
                                                        "(ToTensor's range); give uint8 for values in 0..255")
            pixels = (pixels.detach().float() * 255).round().to(torch.uint8)
        pixels = pixels.detach().cpu().permute(1, 2, 0).numpy()  # (H, W, C)
        if pixels.dtype != np.uint8:
            raise BadImageError(path, "unreadable", f"a tensor image must be uint8 or floating point, got {pixels.dtype}")
        if pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
    if pixels.dtype != np.uint8:
        raise BadImageError(path, "unreadable", f"an array image must be uint8 (0..255), got {pixels.dtype}: convert "
                                                "it, e.g. (array * 255).round().astype(np.uint8) for values in [0, 1]")
    if pixels.ndim != 2 and (pixels.ndim != 3 or pixels.shape[2] != 3):
        raise BadImageError(path, "unreadable", f"an array image must be (H, W, 3) RGB or (H, W) grayscale, got "
                                                f"{pixels.shape}")
    if pixels.size == 0:
        raise BadImageError(path, "unreadable", f"an array image of shape {pixels.shape} holds no pixels")
    image = Image.fromarray(np.ascontiguousarray(pixels))
    _check_header(image, path)
    return image.convert("RGB")


def load_image(item: ImageInput, name: str) -> Image.Image:
    """An upright RGB image from any ``ImageInput``; ``BadImageError`` naming ``name`` (a path: the path)
    when it cannot be used, ``TypeError`` for another type."""
    if isinstance(item, (str, Path)):
        return open_rgb(item)[0]
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_rgb(item, name)[0]
    if isinstance(item, Image.Image):
        return pil_rgb(item, name)
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return array_rgb(item, name)
    raise TypeError(f"{name}: cannot caption a {type(item).__module__}.{type(item).__qualname__}; give a file "
                    "path, an image file's bytes, a PIL image, a numpy array or a torch tensor")


def probe_image(path: str | Path) -> None:
    """Check what the header tells without decoding: the file exists, is an image, is not too large.

    Cheap enough to run over a whole dataset before training; truncated data only shows when
    ``open_rgb`` decodes it.
    """
    path = Path(path)
    _check_regular_file(path)
    with _reading(path), Image.open(path) as image:
        _check_header(image, path)
