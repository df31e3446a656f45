"""PNG structure checks: every chunk whole, of a valid type and sound (CRC), and no more of them than the file's size
warrants; at most one colour profile."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from models.imagecheck.common import MAX_HEADER_SEGMENTS, DecodeError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Every chunk of a PNG is checked (whole, a valid type, its CRC) before Pillow reads any: about 0.5 us a chunk plus
# crc32 over the bytes (about 1 GB/s). Real files have one chunk per 8-64 KiB of image data (libpng, Pillow) and a
# few dozen others, so a PNG may have this many chunks and one more a KiB: a body of empty chunks, which would cost
# Pillow about 4 us each as it reads them, is refused after a walk bounded by its size (16 MiB: 33k chunks, 20 ms).
MAX_PNG_CHUNKS = 1 << 14
PNG_BYTES_PER_CHUNK = 1 << 10
# Chunks Pillow inflates (up to PNG_TEXT_CHUNK_BYTES each) while it opens or loads a PNG: text and colour profiles.
INFLATED_PNG_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")

_CHUNK_HEAD = struct.Struct(">I4s")  # a PNG chunk's length and type
_CRC = struct.Struct(">I")


def png_chunks(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, data length) of each chunk header of a PNG body, in order, up to IEND or the data's end."""
    pos = 8
    while pos + 8 <= len(data):
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        yield kind, pos, length
        if kind == b"IEND":
            return
        pos += 12 + length


def check_png(data: bytes) -> None:
    """Refuse a PNG whose chunks `_png_fault` finds broken (naming the chunk), or built to overwork the decoder."""
    if (fault := _png_fault(data)) is not None:
        raise DecodeError(f"corrupt PNG: {fault}; re-save or re-export the image")


def _png_fault(data: bytes) -> str | None:
    """What breaks a PNG's chunks, wherever they lie (before the image data, in it, after it, IEND): a chunk cut off,
    a type that is not one, a checksum that fails (libpng and browsers skip an optional chunk with a bad one; Pillow
    checks only those before the image data; vitc refuses a bad one anywhere, naming the chunk), and chunks built to
    overwork the decoder (a DecodeError). None when the chunks are sound.

    A file that ends right after a whole chunk (no IEND) is left to Pillow: it decodes the image if the data is all
    there, else says it is truncated."""
    view, size = memoryview(data), len(data)
    limit = MAX_PNG_CHUNKS + size // PNG_BYTES_PER_CHUNK
    pos, index, image_data, profiles, kind = 8, 0, False, 0, b""
    while pos + 8 <= size:
        length, kind = _CHUNK_HEAD.unpack_from(data, pos)
        name = kind.decode("latin-1")
        if not (kind.isascii() and kind.isalpha()):
            return f"the chunk at byte {pos} has no valid type ({name!r})"
        end = pos + 8 + length
        if end + 4 > size:
            return f"it is cut off in its {name!r} chunk (truncated)"
        if zlib.crc32(view[pos + 4:end]) != _CRC.unpack_from(data, end)[0]:
            return f"its {name!r} chunk fails its checksum (CRC)"
        image_data = image_data or kind == b"IDAT"
        if not image_data and index >= MAX_HEADER_SEGMENTS and kind != b"IEND":
            raise DecodeError(f"PNG has more than {MAX_HEADER_SEGMENTS} chunks before its image data; refused")
        index += 1
        if index > limit:
            raise DecodeError(f"PNG has more than {limit} chunks, more than a file of {size} bytes holds "
                              f"({MAX_PNG_CHUNKS} plus one per KiB); refused")
        profiles += kind == b"iCCP"
        if kind == b"IEND":
            break
        pos = end + 4
    else:
        if not image_data:
            return "it ends before its image data (truncated)"
        if pos < size:  # a few bytes, not a whole chunk header
            return f"it is cut off after its {kind.decode('latin-1')!r} chunk (truncated)"
    if profiles > 1:  # the format allows one; Pillow inflates each it meets, before the image data or after it
        raise DecodeError(f"PNG has {profiles} iCCP colour profile chunks, where the format allows one; refused")
    return None
