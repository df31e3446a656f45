"""Image bytes -> decoded pixels: the one decoder rule of every reader of images.

The server (`serve.imaging`) and the dataset side (`data.datasets.decode_checked`: training, `train.eval`, export's
parity and calibration images, the served-path check, `serve.sample`) both open and load images here: the formats
opened, the structure checks on JPEG, PNG, TIFF, GIF, BMP and AVIF headers and on EXIF blocks (`models.imagecheck`),
the pixel limit (from the header, before any pixel is decoded), PNG metadata bounds, EXIF orientation and exotic
colour modes. So an image one reader refuses, every reader refuses, and an image one decodes, every one decodes to
the same pixels. What a refusal becomes is the caller's: the server answers 400 or 413, a dataset counts the file as
unreadable. Imports PIL: modules that must load without the imaging extra import this one where they decode.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
from collections.abc import Iterator

from PIL import Image, ImageChops, ImageFile, UnidentifiedImageError

from models.imagecheck import check_exif, check_structure, signed_format
from models.imagecheck.common import DecodeError
from models.oneline import first_line
from models.preprocessing import PNG_TEXT_BYTES, PNG_TEXT_CHUNK_BYTES, image_formats, plain_mode, upright

FORMATS = image_formats()  # the Pillow decoders every reader uses; anything else is never parsed
REASON_CHARS = 200  # how much of a decoder's own message a refusal quotes


def _too_many(w: int, h: int, limit: int) -> DecodeError:
    return DecodeError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {limit}", over_limit=True)


class _OverLimit(Image.DecompressionBombError):
    """Pillow's bomb check, tripped inside `pixel_limit`: the size it was asked about and the limit in force."""

    def __init__(self, size: tuple[int, int], limit: int) -> None:
        super().__init__(f"image size {size[0]}x{size[1]} is over the limit of {limit} pixels")
        self.size = size
        self.limit = limit


# Pillow checks every size it is about to allocate (on open, in TIFF/GIF loads, in crops) against its own global
# MAX_IMAGE_PIXELS, twice which is an error (179 M pixels): a --max-image-pixels above that would be capped there,
# and its refusal would blame our limit. Inside `pixel_limit` that check applies vitc's limit instead; in every
# other thread and code path (user code, images vitc makes itself) it is Pillow's own, unchanged.
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
    more and no less, raising an error that `open_image` and `load_pixels` turn into a DecodeError naming the size."""
    token = _LIMIT.set(max_pixels)
    try:
        yield
    finally:
        _LIMIT.reset(token)


def exif_block(img: Image.Image) -> bytes | None:
    """The EXIF block Pillow reads an opened image's orientation from (`Image.getexif`): its "exif" info, or a PNG's
    hex "Raw profile type exif" text; None when there is none it can read (a TIFF's directories are the file's)."""
    block = img.info.get("exif")
    if block is None and isinstance(raw := img.info.get("Raw profile type exif"), str):
        try:
            block = bytes.fromhex("".join(raw.split("\n")[3:]))
        except ValueError:  # Pillow fails on it too, and reads no number
            return None
    return block if isinstance(block, bytes) else None


def _unidentified(data: bytes) -> DecodeError:
    """Bytes no decoder took: bytes that begin with a format's signature are a corrupt (or truncated) file of that
    format, and say what breaks it (Pillow's own reason, from that format's decoder alone; a PNG's chunks are sound:
    `check_structure` came first); anything else is not an image vitc reads."""
    if (fmt := signed_format(data)) not in FORMATS:
        return DecodeError(f"not a recognised image; supported: {', '.join(FORMATS)}")
    try:  # the format's opener alone: Image.open drops each opener's reason and says only "cannot identify"
        Image.OPEN[fmt][0](io.BytesIO(data)).close()
        reason = "its header chunks cannot be parsed" if fmt == "PNG" else "its header cannot be parsed"
    except MemoryError:
        raise
    except Exception as exc:
        reason = first_line(exc, REASON_CHARS)
    what = "corrupt PNG" if fmt == "PNG" else f"corrupt or truncated {fmt}"  # a cut PNG is refused before
    return DecodeError(f"{what} ({reason}); re-save or re-export the image")


def _metadata_refusal(exc: Exception) -> DecodeError | None:
    """Pillow's refusal of a PNG whose metadata inflates past vitc's bounds (models.preprocessing), said plainly."""
    said = str(exc)
    if isinstance(exc, ValueError) and "MAX_TEXT_MEMORY" in said:
        return DecodeError(f"PNG text metadata (tEXt/zTXt/iTXt chunks) holds more than {PNG_TEXT_BYTES >> 20} MiB, "
                           "the most vitc reads (it uses none): strip the image's metadata")
    if isinstance(exc, ValueError) and "MAX_TEXT_CHUNK" in said:
        return DecodeError("a PNG metadata chunk (zTXt/iTXt text or an iCCP colour profile) inflates to more than "
                           f"{PNG_TEXT_CHUNK_BYTES >> 20} MiB, the most vitc reads (it uses none): strip the image's "
                           "metadata")
    return None


def open_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """Parse the image header (no pixel decoded yet); DecodeError for what is not a readable image or too big."""
    if not data:
        raise DecodeError("empty image")
    check_structure(data)
    try:
        with pixel_limit(max_pixels):  # Pillow checks the header's size against our limit before allocating
            img = Image.open(io.BytesIO(data), formats=FORMATS)
    except _OverLimit as exc:
        raise _too_many(*exc.size, exc.limit) from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise many types on hostile headers; each is a refusal, never a crash
        raise _metadata_refusal(exc) or DecodeError(
            f"cannot decode image ({first_line(exc, REASON_CHARS)}); supported: {', '.join(FORMATS)}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise DecodeError(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise _too_many(w, h, max_pixels)
    if draft_size and img.format in ("JPEG", "MPO"):
        # Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding, never below the resize target.
        img.draft(None, (draft_size, draft_size))
    return img


# Pillow's rawmodes (the tile's) of the PNGs whose colour key it leaves in the file's own terms. A 2- or 4-bit grey
# PNG (optipng and oxipng write them) is decoded to 8 bits (x 85, x 17) but its key is not; a 48-bit RGB PNG is decoded
# to its samples' high bytes, and its key is 16-bit.
_GREY_KEY_SCALE = {"L;2": 85, "L;4": 17}
_WIDE_RGB = "RGB;16B"
_LOW_BYTES = "RGB;16L"  # the same 48 bits a pixel (so the same PNG filters), each sample's other byte
_NONZERO = bytes([0] + [255] * 255)  # a lookup table: 0 stays 0, anything else 255


def _png_rawmode(img: Image.Image) -> str | None:
    """The rawmode Pillow decodes an opened, not yet loaded, PNG with; None for any other image."""
    if img.format != "PNG" or not getattr(img, "tile", None):
        return None
    rawmode = img.tile[0][3]
    return rawmode if isinstance(rawmode, str) else None


def wide_colour_key(img: Image.Image) -> bool:
    """Whether `load_pixels` decodes `img` twice: a 48-bit RGB PNG with a colour key, matched at full depth."""
    key = img.info.get("transparency")
    return isinstance(key, tuple) and len(key) == 3 and _png_rawmode(img) == _WIDE_RGB


def _scale_grey_key(img: Image.Image) -> None:
    """A 2- or 4-bit grey PNG's colour key, in the 8-bit terms Pillow decodes its pixels to (before `load`). A key
    beyond the bit depth, which no encoder writes, marks no pixel (as an 8-bit key above 255 does)."""
    scale, key = _GREY_KEY_SCALE.get(_png_rawmode(img) or ""), img.info.get("transparency")
    if scale is not None and type(key) is int:
        if key * scale <= 255:
            img.info["transparency"] = key * scale
        else:
            del img.info["transparency"]


def _low_bytes(img: Image.Image) -> Image.Image:
    """A 48-bit RGB PNG (opened, not loaded) decoded a second time, to the low byte of each sample where Pillow
    keeps the high one: the same bytes read with the little-endian rawmode (which takes the other byte)."""
    fp = img.fp
    here = fp.tell()
    try:
        fp.seek(0)
        twin = Image.open(io.BytesIO(fp.read()), formats=["PNG"])
    finally:
        fp.seek(here)
    twin.tile = [ImageFile._Tile(tile[0], tile[1], tile[2], _LOW_BYTES) for tile in twin.tile]  # plain tuples too
    twin.load()
    return twin


def _wide_key_alpha(img: Image.Image, low: Image.Image) -> Image.Image:
    """A 48-bit RGB PNG's colour key as an alpha channel ("L"): 0 where all 16 bits of each sample match it, 255
    elsewhere (`img` holds the high bytes, `low` the low ones); made a band of rows at a time (temporaries stay ~1 M
    pixels)."""
    key = img.info["transparency"]
    high_misses = [0 if i == k >> 8 else 255 for k in key for i in range(256)]  # per channel: 0 where it matches
    low_misses = [0 if i == k & 0xFF else 255 for k in key for i in range(256)]
    w, h = img.size
    alpha = Image.new("L", (w, h))
    rows = max(1, (1 << 20) // w)
    for y in range(0, h, rows):
        box = (0, y, w, min(h, y + rows))
        misses = ImageChops.lighter(img.crop(box).point(high_misses), low.crop(box).point(low_misses))
        # Grey is 0 only where all three channels are (each is 0 or 255): there every sample matches the key.
        alpha.paste(misses.convert("L").point(_NONZERO), box)
    return alpha


def load_pixels(img: Image.Image) -> Image.Image:
    """Decode an opened image; EXIF orientation applied, exotic colour modes brought to RGB, a PNG colour key in the
    terms of the decoded pixels (a 48-bit one as an alpha channel). Call it inside the `pixel_limit` the image was
    opened with (a TIFF, a GIF frame are checked again as they load)."""
    try:
        _scale_grey_key(img)
        low = _low_bytes(img) if wide_colour_key(img) else None
        img.load()
        if low is not None:  # the key becomes what it means, an alpha channel: `to_mode` composites it onto black
            alpha = _wide_key_alpha(img, low)
            del low, img.info["transparency"]
            img.putalpha(alpha)
    except _OverLimit as exc:  # a GIF frame that grows the canvas past the limit
        raise _too_many(*exc.size, exc.limit) from None
    except MemoryError:
        raise
    except Exception as exc:  # truncated, corrupt, a decoder tripping over hostile data; a PNG's text after its pixels
        raise _metadata_refusal(exc) or DecodeError(
            f"image data is truncated or corrupt ({first_line(exc, REASON_CHARS)})") from None
    if (block := exif_block(img)) is not None:  # whole now: a PNG's eXIf chunk may follow its pixels
        check_exif(block, img.format or "image")
    img = upright(img)  # EXIF orientation
    try:
        return plain_mode(img)  # CMYK (Adobe inverted or not), YCbCr, HSV, ...
    except ValueError as exc:
        raise DecodeError(f"unsupported colour mode {img.mode} ({first_line(exc, REASON_CHARS)})") from None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Image bytes -> decoded pixels (`open_image` + `load_pixels` in one `pixel_limit`); DecodeError says why not."""
    with pixel_limit(max_pixels):
        return load_pixels(open_image(data, max_pixels=max_pixels))
