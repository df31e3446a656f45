"""Image bytes -> decoded pixels: the one decoder rule of every reader of images.

The server (`serve.imaging`) and the dataset side (`data.datasets.decode_checked`: training, `train.eval`, export's
parity and calibration images, the served-path check, `serve.sample`) both open and load images here: the formats
opened, the structure checks on JPEG and PNG headers, the pixel limit (from the header, before any pixel is
decoded), PNG metadata bounds, EXIF orientation and exotic colour modes. So an image one reader refuses, every
reader refuses, and an image one decodes, every one decodes to the same pixels. What a refusal becomes is the
caller's: the server answers 400 or 413, a dataset counts the file as unreadable. Imports PIL: modules that must
load without the imaging extra import this one where they decode.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import zlib
from collections.abc import Iterator

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from models.oneline import first_line
from models.preprocessing import PNG_TEXT_BYTES, PNG_TEXT_CHUNK_BYTES, image_formats, plain_mode, upright

FORMATS = image_formats()  # the Pillow decoders every reader uses; anything else is never parsed
REASON_CHARS = 200  # how much of a decoder's own message a refusal quotes
MAX_HEADER_SEGMENTS = 1024  # JPEG marker segments / PNG chunks before the image data (real files: a few dozen)
MAX_JPEG_SCANS = 128  # a progressive JPEG has about 10; each scan walks the whole image again
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Chunks Pillow inflates (up to PNG_TEXT_CHUNK_BYTES each) while it opens or loads a PNG: text and colour profiles.
INFLATED_PNG_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")


class DecodeError(ValueError):
    """An image vitc does not decode: `reason` says why; `over_limit` when it has more pixels than allowed."""

    def __init__(self, reason: str, *, over_limit: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.over_limit = over_limit


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


def png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, data length) of each chunk header of a PNG body, in order, up to IEND or the data's end."""
    pos = 8
    while pos + 8 <= len(data):
        kind = data[pos + 4:pos + 8]
        length = int.from_bytes(data[pos:pos + 4], "big")
        yield kind, pos, length
        if kind == b"IEND":
            return
        pos += 12 + length


def check_structure(data: bytes) -> None:
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
                raise DecodeError(f"JPEG has more than {MAX_HEADER_SEGMENTS} marker segments before its image data; "
                                  "refused")
        if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:  # 0xFF in entropy-coded data is stuffed: no SOS
            raise DecodeError(f"JPEG has {scans} scans, more than {MAX_JPEG_SCANS}; refused")
    elif data[:8] == PNG_SIGNATURE:
        for chunks, (kind, _, _) in enumerate(png_chunks(data)):
            if kind in (b"IDAT", b"IEND"):
                break
            if chunks >= MAX_HEADER_SEGMENTS:
                raise DecodeError(f"PNG has more than {MAX_HEADER_SEGMENTS} chunks before its image data; refused")
        # The format allows one profile (Pillow inflates each it meets, before the image data or after it). Few
        # bodies hold the 4 letters twice, so only those are walked to the end.
        if data.count(b"iCCP") > 1 and (profiles := sum(kind == b"iCCP" for kind, _, _ in png_chunks(data))) > 1:
            raise DecodeError(f"PNG has {profiles} iCCP colour profile chunks, where the format allows one; refused")


def _png_fault(data: bytes) -> str | None:
    """What breaks a PNG's chunks up to its image data, which Pillow checks while it opens the file: a chunk cut off,
    a type that is not one, or a checksum that fails (libpng and browsers skip an optional chunk with a bad one;
    Pillow refuses the file, and so does vitc, naming the chunk). None when those chunks are sound."""
    for kind, pos, length in png_chunks(data):
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


def _unidentified(data: bytes) -> DecodeError:
    """Bytes no decoder took: a PNG says what breaks it; anything else is not an image vitc reads."""
    if data[:8] == PNG_SIGNATURE:
        if (fault := _png_fault(data)) is not None:
            return DecodeError(f"corrupt PNG: {fault}; re-save or re-export the image")
        try:  # sound chunks, yet refused (an unknown compression method, a bad header value): Pillow's reason
            PngImagePlugin.PngImageFile(io.BytesIO(data)).close()
            reason = "its header chunks cannot be parsed"
        except Exception as exc:
            reason = first_line(exc, REASON_CHARS)
        return DecodeError(f"corrupt PNG ({reason}); re-save or re-export the image")
    return DecodeError(f"not a recognised image; supported: {', '.join(FORMATS)}")


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
        raise _metadata_refusal(exc) or DecodeError(
            f"image data is truncated or corrupt ({first_line(exc, REASON_CHARS)})") from None
    img = upright(img)  # EXIF orientation
    try:
        return plain_mode(img)  # CMYK (Adobe inverted or not), YCbCr, HSV, ...
    except ValueError as exc:
        raise DecodeError(f"unsupported colour mode {img.mode} ({first_line(exc, REASON_CHARS)})") from None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Image bytes -> decoded pixels (`open_image` + `load_pixels` in one `pixel_limit`); DecodeError says why not."""
    with pixel_limit(max_pixels):
        return load_pixels(open_image(data, max_pixels=max_pixels))
