"""Image bytes -> model input, with the server's answers and budgets; decoding and preprocessing are shared.

How an image is opened and decoded (formats, structure checks, the pixel limit against decompression bombs, PNG
metadata bounds, EXIF orientation, exotic colour modes) is `models.decoding`, the rule the dataset readers apply too;
everything after decoding is `models.preprocessing`, the same code the export's parity check and training's
evaluation run. Here: a refusal as an HTTP status (400, or 413 for too many pixels), JPEG draft decoding of big
photos, the decode budget, and which bodies are cheap enough for the event loop.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image

from models import decoding
from models.decoding import FORMATS, pixel_limit, wide_colour_key
from models.imagecheck import check_structure
from models.imagecheck.common import DecodeError
from models.imagecheck.jpeg import jpeg_scans, jpeg_segments
from models.imagecheck.png import INFLATED_PNG_CHUNKS, PNG_SIGNATURE, png_chunks
from models.preprocessing import Preprocessing, copied_pixels, image_input
from serve.protocol import short_reason
from serve.workpool import Holder, PixelBudget

# The media types of an image body or part (the bytes decide the format, whichever is named): the registered types of
# the formats `models.decoding` opens and their common aliases, and application/octet-stream ("just bytes"). What the
# OpenAPI document declares for /v1, and what makes a multipart part without a filename a file (serve.routes.v1).
IMAGE_CONTENT_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/apng", "image/x-png", "image/webp", "image/gif",
    "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/tif", "image/x-tiff", "image/avif",
    "application/octet-stream",
})
# And application/x-www-form-urlencoded, which curl and many clients send for a raw body when told no type
# (`curl --data-binary @photo.jpg URL`): read as the bytes it is, though no form (the document says so in words).
CONTENT_TYPES = IMAGE_CONTENT_TYPES | {"application/x-www-form-urlencoded"}


class ImageError(ValueError):
    """An image the server refuses: `status` is 400 (undecodable) or 413 (too many pixels)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@contextlib.contextmanager
def _answered() -> Iterator[None]:
    """A `models.decoding` refusal as the server's answer: 413 for too many pixels, else 400, its reason kept."""
    try:
        yield
    except DecodeError as exc:
        raise ImageError(413 if exc.over_limit else 400, exc.reason) from None


# The bytes of decode memory a budget pixel stands for (the server sizes its memory and its answers with it:
# serve.server, serve.routes).
BUDGET_PIXEL_BYTES = 5
# libjpeg holds a progressive JPEG's DCT coefficients for the whole image until its last scan: 64 of 2 bytes for
# each 8 x 8 block of each component, at the component's own sampling (3 bytes a pixel at 4:2:0, 2 in grey, 6 at
# 4:4:4, 8 in CMYK), at the source's size whatever scale a draft decodes at.
_BLOCK_BYTES = 128
_TILE_WIDTH, _TILE_LENGTH, _BITS_PER_SAMPLE, _SAMPLES_PER_PIXEL = 322, 323, 258, 277


def decode_weight(img: Image.Image) -> int:
    """How many budget pixels (about 5 bytes each) one pixel of `img` costs to decode: its format's or mode's weight."""
    # The larger of the two weights. Peak decode memory is about 5 bytes per pixel (baseline JPEG, RGB PNG), 6 for
    # GIF; a progressive JPEG holds its coefficients too (7-10, 12 in CMYK; once drafted, `decode_cost` counts them
    # at the source's size instead), AVIF about 9, Pillow's WebP decoder about 16; RGBA, CMYK and a palette with
    # transparency about 9-10, grey with alpha 13. The region preprocessing copies out of a non-square image is
    # counted apart (`copied_pixels`).
    by_format = 1
    if img.format == "WEBP":
        by_format = 3
    elif img.format in ("JPEG", "MPO") and img.info.get("progressive"):
        by_format = 3 if img.mode == "CMYK" else 2
    elif img.format == "AVIF":
        by_format = 2
    # Modes that hold more per pixel while they are converted (measured peak bytes a pixel): grey or palette with
    # alpha 10-13, RGBA 8-9, a baseline CMYK JPEG 9. A tiny flat LA PNG is a cheap way to ask for a lot.
    # An RGB image with a transparent colour (a PNG colour key) is copied and masked: 9 bytes a pixel, as RGBA; a
    # 48-bit one is decoded twice (its samples' high and low bytes) and the key made an alpha channel: 3. A 16-bit
    # grey PNG (mode I;16, 2 bytes a pixel) widens to 32-bit samples before it becomes RGB: 6.4 bytes a pixel.
    by_mode = 3 if img.mode in ("LA", "La", "PA") or wide_colour_key(img) else 2 if (
        img.mode in ("RGBA", "RGBa", "CMYK", "F") or img.mode.startswith("I")
        or (img.mode in ("P", "RGB") and "transparency" in img.info)) else 1
    return max(by_format, by_mode)


def decode_cost(img: Image.Image) -> int:
    """Budget pixels an opened image holds as it decodes: its pixels (after JPEG draft) at `decode_weight`; a drafted
    progressive JPEG's coefficients at its source's size; a tiled TIFF's tile buffer."""
    w, h = img.size
    cost = w * h * decode_weight(img)
    scale = _draft_scale(img)
    if scale > 1 and img.info.get("progressive"):
        # decode_weight's share for the coefficients (1 of a progressive pixel's 2 or 3) is for an undrafted image:
        # a drafted one holds them at the source's size, scale x scale times the pixels it decodes to.
        cost += _coefficient_pixels(img, w * scale, h * scale) - w * h
    return cost + _tile_pixels(img)


def _draft_scale(img: Image.Image) -> int:
    """The scale (1, 2, 4 or 8) libjpeg decodes a JPEG at after `Image.draft`; 1 for anything else."""
    config = getattr(img, "decoderconfig", ()) if img.format in ("JPEG", "MPO") else ()
    return config[0] if config and isinstance(config[0], int) and config[0] > 1 else 1


def _coefficient_pixels(img: Image.Image, w: int, h: int) -> int:
    """Budget pixels of a progressive JPEG's coefficient buffer at w x h (its source's size), from the sampling of
    each component in its frame header (`layer`: id, horizontal and vertical sampling, table)."""
    layers = [(max(1, hs), max(1, vs)) for _, hs, vs, _ in getattr(img, "layer", ())] or [(1, 1)] * 3
    h_max, v_max = max(hs for hs, _ in layers), max(vs for _, vs in layers)
    blocks = sum(-(-w * hs // (8 * h_max)) * -(-h * vs // (8 * v_max)) for hs, vs in layers)
    return -(-blocks * _BLOCK_BYTES // BUDGET_PIXEL_BYTES)


def _tile_pixels(img: Image.Image) -> int:
    """Budget pixels of the buffer libtiff decodes a tiled TIFF's tiles into, a whole tile at a time (bounded by
    `check_tiff`); 0 for any other image."""
    tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
    if tags is None:
        return 0
    bits = tags.get(_BITS_PER_SAMPLE, 1)
    sizes = (tags.get(_TILE_WIDTH), tags.get(_TILE_LENGTH), tags.get(_SAMPLES_PER_PIXEL, 1),
             max(bits) if isinstance(bits, tuple) and bits else bits)
    if not all(isinstance(n, int) and n > 0 for n in sizes):
        return 0
    tile_w, tile_l, samples, bits = sizes
    return -(-tile_w * tile_l * samples * bits // (8 * BUDGET_PIXEL_BYTES))


def open_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Parse the image header (no pixel decoded yet) by `models.decoding.open_image`; ImageError refuses it."""
    with _answered():
        return decoding.open_image(data, max_pixels=max_pixels, draft_size=draft_size)


# What the event loop decodes itself (a lone request; `cheap`): work bounded by a small constant, about 2 ms at most.
# Decoding and preprocessing a PNG of 362 x 362 (RGBA) takes about 2 ms; one of 1024 x 1024, which a flat image packs
# into 5 KB, took 10-19 ms.
CHEAP_PIXELS = 1 << 17
# Parsing a header costs up to ~0.2 ms per KiB of hostile segments: the event loop parses only bodies this small.
CHEAP_BYTES = 64 << 10
# Pillow reads each JPEG segment before the image data and each PNG chunk (before the image data, in it and after it:
# 5,000 empty chunks after IDAT cost 12 ms) in Python. Real small files have a dozen or two.
CHEAP_SEGMENTS = 64
# Each scan of a progressive JPEG is a pass over the whole image (128 scans of 1 M pixels: 73 ms); libjpeg writes 10.
CHEAP_JPEG_SCANS = 24
# Formats whose header Pillow parses in bounded work here: a GIF's extension blocks and a TIFF's tags are read one
# by one in Python (a 60 KB TIFF of 5,000 tags: 16 ms to open, 35 ms to decode), and AVIF decoding is slow.
_CHEAP_FORMATS = tuple(f for f in FORMATS if f in ("JPEG", "MPO", "PNG", "WEBP"))


def cheap(data: bytes) -> bool:
    """Whether an image is small enough to decode on the event loop when nothing else waits."""
    # Cheap: a JPEG, PNG or WebP body of at most CHEAP_BYTES whose header says it holds at most CHEAP_PIXELS pixels
    # (a small body can declare a huge image), with few segments or chunks and few scans. A PNG with compressed
    # metadata is not: each text chunk or colour profile may inflate a thousandfold (up to 1 MiB, about 2 ms),
    # wherever it lies. This check itself reads at most CHEAP_SEGMENTS segments or chunks before anything else
    # looks at the body.
    if len(data) > CHEAP_BYTES:
        return False
    if data[:2] == b"\xff\xd8":
        if (_more_than(CHEAP_SEGMENTS, jpeg_segments(data))
                or jpeg_scans(data, CHEAP_JPEG_SCANS, 2 * CHEAP_SEGMENTS) > CHEAP_JPEG_SCANS):
            return False
    elif data[:8] == PNG_SIGNATURE:
        chunks = list(itertools.islice(png_chunks(data), CHEAP_SEGMENTS + 1))
        if len(chunks) > CHEAP_SEGMENTS or any(kind in INFLATED_PNG_CHUNKS for kind, _, _ in chunks):
            return False
    elif not (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return False
    try:
        check_structure(data)  # bounded now: few segments or chunks, a body of at most CHEAP_BYTES
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w, h = Image.open(io.BytesIO(data), formats=_CHEAP_FORMATS).size
    except Exception:  # undecodable: the pool's decode says why
        return False
    return 0 < w * h <= CHEAP_PIXELS


def _more_than(n: int, items: Iterator[object]) -> bool:
    """Whether `items` has more than `n` items, reading at most n + 1 of them."""
    return next(itertools.islice(items, n, None), None) is not None


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode an opened image by `models.decoding.load_pixels`; ImageError refuses it. Call it inside the
    `pixel_limit` the image was opened with (a TIFF, a GIF frame are checked again as they load)."""
    with _answered():
        return decoding.load_pixels(img)


def prepare(data: bytes, spec: Preprocessing, *, max_pixels: int, jpeg_draft: bool = True,
            budget: PixelBudget | None = None, holder: Holder | None = None) -> np.ndarray:
    """Image bytes -> (1, 3, crop, crop) float32, preprocessed exactly as recorded in the bundle."""
    # The image's pixels (after JPEG draft scaling; `decode_cost`) are reserved from `budget` before they are decoded
    # and held until the model input is made; preprocessing reads only the crop's footprint, so its cost is bounded
    # too.
    # `holder` is the budget the request's other images hold meanwhile (PixelBudget.reserve).
    with pixel_limit(max_pixels):
        img = open_image(data, max_pixels=max_pixels, draft_size=spec.resize if jpeg_draft else None)
        w, h = img.size  # after draft()
        # Capped at the whole budget: an image that fits the per-image limit always decodes once nothing else
        # does. A photo that is not square also pays for its centre region, which preprocessing copies (4 bytes a
        # pixel).
        cost = decode_cost(img) + copied_pixels(w, h, spec)
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
