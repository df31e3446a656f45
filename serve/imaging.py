"""Image bytes -> model input, with the server's guards; the resize/crop/normalise is the shared contract.

The decoding concerns live here (formats allowed, pixel limit against decompression bombs, JPEG draft
decoding of big photos, EXIF orientation, exotic colour modes); everything after decoding is
`models.preprocessing`, the same code the export's parity check and training's evaluation run.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.preprocessing import Preprocessing, copied_pixels, image_formats, image_input, plain_mode, upright
from serve.protocol import short_reason
from serve.workpool import Holder, PixelBudget

FORMATS = image_formats()  # the Pillow decoders the server accepts; anything else is never parsed
CONTENT_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/webp", "image/gif", "image/bmp",
    "image/x-ms-bmp", "image/tiff", "image/avif", "application/octet-stream",
})


class ImageError(ValueError):
    """An image the server refuses: `status` is 400 (undecodable) or 413 (too many pixels)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _too_many(w: int, h: int, limit: int) -> ImageError:
    return ImageError(413, f"image is {w}x{h} = {w * h} pixels, more than the limit of {limit}")


class _OverLimit(Image.DecompressionBombError):
    """Pillow's bomb check, tripped inside `pixel_limit`: the size it was asked about and the limit in force."""

    def __init__(self, size: tuple[int, int], limit: int) -> None:
        super().__init__(f"image size {size[0]}x{size[1]} is over the limit of {limit} pixels")
        self.size = size
        self.limit = limit


# Pillow checks every size it is about to allocate (on open, in TIFF/GIF loads, in crops) against its own global
# MAX_IMAGE_PIXELS, twice which is an error (179 M pixels): a --max-image-pixels above that would be capped there,
# and its refusal would blame our limit. Inside `pixel_limit` that check applies the server's limit instead; in
# every other thread and code path (dataset readers, user code) it is Pillow's own, unchanged.
_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("vitc_pixel_limit", default=None)
_pillow_bomb_check = getattr(Image._decompression_bomb_check, "__wrapped__", Image._decompression_bomb_check)


def _bomb_check(size: tuple[int, int], *, error_only: bool = False) -> None:
    limit = _LIMIT.get()
    if limit is None:
        _pillow_bomb_check(size, error_only=error_only)
    elif max(1, size[0]) * max(1, size[1]) > limit:
        raise _OverLimit(size, limit)


_bomb_check.__wrapped__ = _pillow_bomb_check  # a re-import wraps Pillow's function, never this one
Image._decompression_bomb_check = _bomb_check


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Within it (this thread or task only), Pillow's own bomb check refuses more than `max_pixels` pixels, no
    more and no less, raising an error that `open_image` and `load_pixels` turn into a 413 naming the size."""
    token = _LIMIT.set(max_pixels)
    try:
        yield
    finally:
        _LIMIT.reset(token)


def decode_weight(img: Image.Image) -> int:
    """How many budget pixels (about 5 bytes each) one pixel of `img` costs to decode: the larger of its format's
    and its mode's weight. Peak decode memory is about 5 bytes per pixel (baseline JPEG, RGB PNG), 6 for GIF; a
    progressive JPEG holds its coefficients too (7-10, 12 in CMYK), AVIF about 9, Pillow's WebP decoder about 16;
    RGBA, CMYK and a palette with transparency about 9-10, grey with alpha 13. The region preprocessing copies out
    of a non-square image is counted apart (`copied_pixels`)."""
    by_format = 1
    if img.format == "WEBP":
        by_format = 3
    elif img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        by_format = 3 if img.mode == "CMYK" else 2
    elif img.format == "AVIF":
        by_format = 2
    # Modes that hold more per pixel while they are converted (measured peak bytes a pixel): grey or palette with
    # alpha 10-13, RGBA 8-9, a baseline CMYK JPEG 9. A tiny flat LA PNG is a cheap way to ask for a lot.
    by_mode = 3 if img.mode in ("LA", "La", "PA") else 2 if (
        img.mode in ("RGBA", "RGBa", "CMYK") or (img.mode == "P" and "transparency" in img.info)) else 1
    return max(by_format, by_mode)

MAX_HEADER_SEGMENTS = 1024  # JPEG marker segments / PNG chunks before the image data (real files: a few dozen)
MAX_JPEG_SCANS = 128  # a progressive JPEG has about 10; each scan walks the whole image again


def _check_structure(data: bytes) -> None:
    """Refuse JPEG and PNG files built to make the decoder work far more than their pixels warrant: thousands of
    tiny header segments (parsed one by one in Python) or of progressive scans (each a pass over the image)."""
    if data[:2] == b"\xff\xd8":
        pos, segments = 2, 0
        while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:  # up to the first scan
            marker = data[pos + 1]
            pos += 1 if marker == 0xFF else 2 if marker == 0x01 or 0xD0 <= marker <= 0xD9 else \
                2 + int.from_bytes(data[pos + 2:pos + 4], "big")
            segments += 1
            if segments > MAX_HEADER_SEGMENTS:
                raise ImageError(400, f"JPEG has more than {MAX_HEADER_SEGMENTS} marker segments before its image "
                                      "data; refused")
        if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:  # 0xFF in entropy-coded data is stuffed: no SOS
            raise ImageError(400, f"JPEG has {scans} scans, more than {MAX_JPEG_SCANS}; refused")
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        pos, chunks = 8, 0
        while pos + 8 <= len(data) and data[pos + 4:pos + 8] not in (b"IDAT", b"IEND"):
            pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
            chunks += 1
            if chunks > MAX_HEADER_SEGMENTS:
                raise ImageError(400, f"PNG has more than {MAX_HEADER_SEGMENTS} chunks before its image data; "
                                      "refused")


def open_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Parse the image header (no pixel decoded yet) and refuse what is not a servable image or too big."""
    if not data:
        raise ImageError(400, "empty image")
    _check_structure(data)
    try:
        with pixel_limit(max_pixels):  # Pillow checks the header's size against our limit before allocating
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except _OverLimit as exc:
        raise _too_many(*exc.size, exc.limit) from None
    except UnidentifiedImageError:
        raise ImageError(400, f"not a recognised image; supported: {', '.join(FORMATS)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise many types on hostile headers; none may become a 500
        raise ImageError(400, f"cannot decode image ({short_reason(exc)}); supported: {', '.join(FORMATS)}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(400, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise _too_many(w, h, max_pixels)
    if draft_size and img.format in ("JPEG", "MPO"):
        # Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding, never below the resize target.
        img.draft(None, (draft_size, draft_size))
    return img


CHEAP_PIXELS = 1 << 20  # decoding and preprocessing this many pixels takes about a millisecond or two
# Parsing a header costs up to ~0.2 ms per KiB of hostile segments: the event loop parses only bodies this small.
CHEAP_BYTES = 64 << 10


def cheap(data: bytes) -> bool:
    """Whether an image is small enough to decode on the event loop when nothing else waits (its header says
    how many pixels it holds: a small body can still declare a huge image)."""
    if len(data) > CHEAP_BYTES:
        return False
    try:
        _check_structure(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data), formats=FORMATS).size
    except Exception:  # undecodable: the pool's decode says why
        return False
    return 0 < w * h <= CHEAP_PIXELS


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode an opened image; EXIF orientation applied, exotic colour modes brought to RGB. Call it inside the
    `pixel_limit` the image was opened with (a TIFF, a GIF frame are checked again as they load)."""
    try:
        img.load()
    except _OverLimit as exc:  # a GIF frame that grows the canvas past the limit
        raise _too_many(*exc.size, exc.limit) from None
    except MemoryError:
        raise
    except Exception as exc:  # truncated, corrupt, or a decoder tripping over hostile data
        raise ImageError(400, f"image data is truncated or corrupt ({short_reason(exc)})") from None
    img = upright(img)  # EXIF orientation, exactly as training and evaluation decode
    try:
        return plain_mode(img)  # CMYK (Adobe inverted or not), YCbCr, HSV, ...
    except ValueError as exc:
        raise ImageError(400, f"unsupported colour mode {img.mode} ({short_reason(exc)})") from None


def decode(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Decode image bytes, refusing bombs before any pixel is decoded; EXIF orientation applied."""
    with pixel_limit(max_pixels):
        return load_pixels(open_image(data, max_pixels=max_pixels, draft_size=draft_size))


def prepare(data: bytes, spec: Preprocessing, *, max_pixels: int, jpeg_draft: bool = True,
            budget: PixelBudget | None = None, holder: Holder | None = None) -> np.ndarray:
    """Image bytes -> (1, 3, crop, crop) float32, preprocessed exactly as recorded in the bundle.

    The image's pixels (after JPEG draft scaling) are reserved from `budget` before they are decoded and held
    until the model input is made; preprocessing reads only the crop's footprint, so its cost is bounded too.
    `holder` is the budget the request's other images hold meanwhile (PixelBudget.reserve).
    """
    with pixel_limit(max_pixels):
        img = open_image(data, max_pixels=max_pixels, draft_size=spec.resize if jpeg_draft else None)
        w, h = img.size  # after draft()
        # Capped at the whole budget: an image that fits the per-image limit always decodes once nothing else
        # does. A photo that is not square also pays for its centre region, which preprocessing copies (4 bytes a
        # pixel).
        cost = w * h * decode_weight(img) + copied_pixels(w, h, spec)
        with budget.reserve(min(cost, budget.pixels), holder) if budget is not None else contextlib.nullcontext():
            try:
                return _model_input(img, spec)
            finally:
                img.close()  # its pixels are freed before the reservation ends (and memory is given back)


def _model_input(img: Image.Image, spec: Preprocessing) -> np.ndarray:
    img = load_pixels(img)
    try:
        return image_input(img, spec)
    except MemoryError:
        raise
    except Exception as exc:  # a mode or layout the conversion does not take
        raise ImageError(400, f"cannot convert a {img.mode} image ({short_reason(exc)})") from None
