"""Image bytes -> model input, with the server's guards; the resize/crop/normalise is the shared contract.

The decoding concerns live here (formats allowed, pixel limit against decompression bombs, JPEG draft
decoding of big photos, EXIF orientation, exotic colour modes); everything after decoding is
`models.preprocessing`, the same code the export's parity check and training's evaluation run.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.preprocessing import Preprocessing, image_input
from serve.workpool import PixelBudget

# Pillow decoders the server accepts (those this Pillow build has); anything else is never parsed.
Image.init()
FORMATS = tuple(f for f in ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN)
CONTENT_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/gif", "image/bmp",
    "image/x-ms-bmp", "image/tiff", "image/avif", "application/octet-stream",
})
# Modes `models.preprocessing.to_mode` converts itself; others are brought to RGB here first.
_NATIVE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


class ImageError(ValueError):
    """An image the server refuses: `status` is 400 (undecodable) or 413 (too many pixels)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def open_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Parse the image header (no pixel decoded yet) and refuse what is not a servable image or too big."""
    if not data:
        raise ImageError(400, "empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:  # Pillow's own backstop (twice its limit), far above ours by default
        raise ImageError(413, f"image has more pixels than the limit of {max_pixels}") from None
    except UnidentifiedImageError:
        raise ImageError(400, f"not a recognised image; supported: {', '.join(FORMATS)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise many types on hostile headers; none may become a 500
        raise ImageError(400, f"cannot decode image ({_short(exc)}); supported: {', '.join(FORMATS)}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(400, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(413, f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    if draft_size and img.format in ("JPEG", "MPO"):
        # Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding, never below the resize target.
        img.draft(None, (draft_size, draft_size))
    return img


CHEAP_PIXELS = 1 << 20  # decoding and preprocessing this many pixels takes about a millisecond or two
CHEAP_BYTES = 1 << 20


def cheap(data: bytes) -> bool:
    """Whether an image is small enough to decode on the event loop when nothing else waits (its header says
    how many pixels it holds: a small body can still declare a huge image)."""
    if len(data) > CHEAP_BYTES:
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data), formats=FORMATS).size
    except Exception:  # undecodable: the pool's decode says why
        return False
    return 0 < w * h <= CHEAP_PIXELS


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode an opened image; EXIF orientation applied, exotic colour modes brought to RGB."""
    try:
        img.load()
    except MemoryError:
        raise
    except Exception as exc:  # truncated, corrupt, or a decoder tripping over hostile data
        raise ImageError(400, f"image data is truncated or corrupt ({_short(exc)})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not cost the image; orientation stays as stored
        pass
    if img.mode not in _NATIVE_MODES:
        try:
            img = img.convert("RGB")  # CMYK (Adobe inverted or not), YCbCr, HSV, ...
        except ValueError as exc:
            raise ImageError(400, f"unsupported colour mode {img.mode} ({_short(exc)})") from None
    return img


def decode(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes, refusing bombs before any pixel is decoded; EXIF orientation applied."""
    return load_pixels(open_image(data, max_pixels=max_pixels, draft_size=draft_size))


def prepare(data: bytes, spec: Preprocessing, *, max_pixels: int, jpeg_draft: bool = True,
            budget: PixelBudget | None = None) -> np.ndarray:
    """Image bytes -> (1, 3, crop, crop) float32, preprocessed exactly as recorded in the bundle.

    The image's pixels (after JPEG draft scaling) are reserved from `budget` before they are decoded and held
    until the model input is made; preprocessing reads only the crop's footprint, so its cost is bounded too.
    """
    img = open_image(data, max_pixels=max_pixels, draft_size=spec.resize if jpeg_draft else None)
    w, h = img.size  # after draft()
    with budget.reserve(w * h) if budget is not None else contextlib.nullcontext():
        img = load_pixels(img)
        try:
            return image_input(img, spec)
        except MemoryError:
            raise
        except Exception as exc:  # a mode or layout the conversion does not take
            raise ImageError(400, f"cannot convert a {img.mode} image ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
