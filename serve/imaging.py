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
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from models.preprocessing import (
    PNG_TEXT_BYTES,
    PNG_TEXT_CHUNK_BYTES,
    Preprocessing,
    copied_pixels,
    image_formats,
    image_input,
    plain_mode,
    upright,
)
from serve.protocol import short_reason
from serve.workpool import Holder, PixelBudget

FORMATS = image_formats()  # the Pillow decoders the server accepts; anything else is never parsed
# The media types of an image body or part (the bytes decide the format, whichever is named): the registered types of
# the formats above and their common aliases, and the types of "just bytes": application/octet-stream, and
# application/x-www-form-urlencoded, which curl and many clients send for a raw body when told no type
# (`curl --data-binary @photo.jpg URL`).
CONTENT_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/apng", "image/x-png", "image/webp", "image/gif",
    "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/tif", "image/x-tiff", "image/avif",
    "application/octet-stream", "application/x-www-form-urlencoded",
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
    # An RGB image with a transparent colour (a PNG colour key) is copied and masked: 9 bytes a pixel, as RGBA.
    by_mode = 3 if img.mode in ("LA", "La", "PA") else 2 if (
        img.mode in ("RGBA", "RGBa", "CMYK") or (img.mode in ("P", "RGB") and "transparency" in img.info)) else 1
    return max(by_format, by_mode)

MAX_HEADER_SEGMENTS = 1024  # JPEG marker segments / PNG chunks before the image data (real files: a few dozen)
MAX_JPEG_SCANS = 128  # a progressive JPEG has about 10; each scan walks the whole image again


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks Pillow inflates (up to PNG_TEXT_CHUNK_BYTES each) while it opens or loads a PNG: text and colour profiles.
_INFLATED_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, data length) of each chunk header of a PNG body, in order, up to IEND or the data's end."""
    pos = 8
    while pos + 8 <= len(data):
        kind = data[pos + 4:pos + 8]
        length = int.from_bytes(data[pos:pos + 4], "big")
        yield kind, pos, length
        if kind == b"IEND":
            return
        pos += 12 + length


def _check_structure(data: bytes) -> None:
    """Refuse JPEG and PNG files built to make the decoder work far more than their pixels warrant: thousands of
    tiny header segments (parsed one by one in Python), of progressive scans (each a pass over the image), or of
    PNG colour profiles (each inflated, up to 1 MiB)."""
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
    elif data[:8] == _PNG_SIGNATURE:
        for chunks, (kind, _, _) in enumerate(_png_chunks(data)):
            if kind in (b"IDAT", b"IEND"):
                break
            if chunks >= MAX_HEADER_SEGMENTS:
                raise ImageError(400, f"PNG has more than {MAX_HEADER_SEGMENTS} chunks before its image data; "
                                      "refused")
        # The format allows one profile (Pillow inflates each it meets, before the image data or after it). Few
        # bodies hold the 4 letters twice, so only those are walked to the end.
        if data.count(b"iCCP") > 1 and (profiles := sum(kind == b"iCCP" for kind, _, _ in _png_chunks(data))) > 1:
            raise ImageError(400, f"PNG has {profiles} iCCP colour profile chunks, where the format allows one; "
                                  "refused")


def _png_fault(data: bytes) -> str | None:
    """What breaks a PNG's chunks up to its image data, which Pillow checks while it opens the file: a chunk cut off,
    a type that is not one, or a checksum that fails (libpng and browsers skip an optional chunk with a bad one;
    Pillow refuses the file, and so does vitc, naming the chunk). None when those chunks are sound."""
    for kind, pos, length in _png_chunks(data):
        name = kind.decode("latin-1")
        if not (kind.isascii() and kind.isalpha()):
            return f"the chunk at byte {pos} has no valid type ({name!r})"
        if kind in (b"IDAT", b"IEND"):
            return None
        end = pos + 8 + length
        if end + 4 > len(data):
            return f"it is cut off in its {name!r} chunk (truncated)"
        if zlib.crc32(data[pos + 4:end]) != int.from_bytes(data[end:end + 4], "big"):
            return f"its {name!r} chunk fails its checksum (CRC)"
    return "it ends before its image data (truncated)"


def _unidentified(data: bytes) -> ImageError:
    """A body no decoder took: a PNG says what breaks it; anything else is not an image the server reads."""
    if data[:8] == _PNG_SIGNATURE:
        if (fault := _png_fault(data)) is not None:
            return ImageError(400, f"corrupt PNG: {fault}; re-save or re-export the image")
        try:  # sound chunks, yet refused (an unknown compression method, a bad header value): Pillow's reason
            PngImagePlugin.PngImageFile(io.BytesIO(data)).close()
            reason = "its header chunks cannot be parsed"
        except Exception as exc:
            reason = short_reason(exc)
        return ImageError(400, f"corrupt PNG ({reason}); re-save or re-export the image")
    return ImageError(400, f"not a recognised image; supported: {', '.join(FORMATS)}")


def _metadata_refusal(exc: Exception) -> ImageError | None:
    """Pillow's refusal of a PNG whose metadata inflates past vitc's bounds (models.preprocessing), said plainly."""
    said = str(exc)
    if isinstance(exc, ValueError) and "MAX_TEXT_MEMORY" in said:
        return ImageError(400, f"PNG text metadata (tEXt/zTXt/iTXt chunks) holds more than {PNG_TEXT_BYTES >> 20} MiB, "
                               "the most vitc reads (it uses none): strip the image's metadata")
    if isinstance(exc, ValueError) and "MAX_TEXT_CHUNK" in said:
        return ImageError(400, "a PNG metadata chunk (zTXt/iTXt text or an iCCP colour profile) inflates to more "
                               f"than {PNG_TEXT_CHUNK_BYTES >> 20} MiB, the most vitc reads (it uses none): "
                               "strip the image's metadata")
    return None


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
        raise _unidentified(data) from None
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise many types on hostile headers; none may become a 500
        raise _metadata_refusal(exc) or ImageError(
            400, f"cannot decode image ({short_reason(exc)}); supported: {', '.join(FORMATS)}") from None
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
    how many pixels it holds: a small body can still declare a huge image). A PNG with compressed metadata is not:
    each text chunk or colour profile may inflate a thousandfold (up to 1 MiB, about 2 ms), wherever it lies."""
    if len(data) > CHEAP_BYTES:
        return False
    try:
        _check_structure(data)
        if data[:8] == _PNG_SIGNATURE and any(kind in _INFLATED_CHUNKS for kind, _, _ in _png_chunks(data)):
            return False
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
    except Exception as exc:  # truncated, corrupt, a decoder tripping over hostile data; a PNG's text after its pixels
        raise _metadata_refusal(exc) or ImageError(
            400, f"image data is truncated or corrupt ({short_reason(exc)})") from None
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
