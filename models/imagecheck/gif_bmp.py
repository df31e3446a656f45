"""GIF and BMP structure checks: what Pillow reads one step at a time in Python, a GIF's blocks before its first image
and an RLE-compressed BMP's data."""

from __future__ import annotations

from models.imagecheck.common import DecodeError

# GIF reads before the first image, each a step in Python: an extension, each of its data sub-blocks, a stray byte
# (Pillow keeps an object per comment sub-block: 3,000,000 tiny comments in 15 MB took 9 s and 510 MB). A real GIF
# has a handful of extensions; this many sub-blocks hold 4 MiB of metadata (an ICC profile, XMP) and take 20 ms.
MAX_GIF_BLOCKS = 1 << 14
# Pillow's BMP RLE decoder is Python: a step for each two bytes of data (RLE8, 16 MB: 9 s); an RLE4 image also takes
# a step a pixel (340 KB of long runs made 40 M pixels in 7 s). The worst file these admit takes about 0.2-0.4 s
# (RLE8) or 0.4-0.6 s (RLE4).
MAX_BMP_RLE_BYTES = 1 << 20
MAX_BMP_RLE4_PIXELS = 1 << 20

GIF_SIGNATURES = (b"GIF87a", b"GIF89a")


def gif_blocks(data: bytes, most: int) -> int:
    """The reads Pillow makes one by one (in Python) before a GIF's first image, counted to at most `most` + 1: each
    stray byte, each extension and each of its data sub-blocks, as Pillow reads them (past a non-comment extension's
    first sub-block, and a NETSCAPE one's second, it reads on to an empty one, even when one of those was empty)."""
    flags = data[10] if len(data) > 12 else 0
    pos, reads, size = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0), 0, len(data)
    while pos < size and reads <= most and data[pos] not in b",;":
        reads += 1
        if data[pos] != 0x21:  # a stray byte: Pillow skips it and reads the next
            pos += 1
            continue
        label, first = data[pos + 1:pos + 2], pos + 2
        length = data[first] if first < size else 0
        pos, reads = first + 1 + length, reads + 1
        if label == b"\xfe" and not length:
            continue  # an empty comment: Pillow reads nothing more of it
        if label == b"\xff" and length >= 11 and data[first + 1:first + 12] == b"NETSCAPE2.0":
            pos, reads = pos + 1 + (data[pos] if pos < size else 0), reads + 1  # the loop count, read on its own
        pos, reads = _gif_sub_blocks(data, pos, reads, most)
    return reads


def _gif_sub_blocks(data: bytes, pos: int, reads: int, most: int) -> tuple[int, int]:
    """Past the data sub-blocks at `pos` up to an empty one (or the data's end), each a read: (position, reads)."""
    size = len(data)
    while pos < size and reads <= most:
        length = data[pos]
        pos, reads = pos + 1 + length, reads + 1
        if not length:
            break
    return pos, reads


def check_gif(data: bytes) -> None:
    """Refuse a GIF of more than MAX_GIF_BLOCKS reads (blocks, sub-blocks, stray bytes) before its first image."""
    if gif_blocks(data, MAX_GIF_BLOCKS) > MAX_GIF_BLOCKS:
        raise DecodeError(f"GIF has more than {MAX_GIF_BLOCKS} extension blocks (or stray bytes) before its first "
                          "image, each read one by one; refused")


def check_rle_bmp(data: bytes) -> None:
    """Refuse an RLE8 or RLE4 BMP (decoded in Python) of more than MAX_BMP_RLE_BYTES of data, or an RLE4 one (pixel
    by pixel) of more than MAX_BMP_RLE4_PIXELS pixels."""
    if len(data) < 34 or int.from_bytes(data[14:18], "little") not in (40, 52, 56, 64, 108, 124):
        return  # an OS/2 header (never compressed) or one Pillow refuses
    compression = int.from_bytes(data[30:34], "little")
    if compression not in (1, 2):
        return
    offset = int.from_bytes(data[10:14], "little")  # where Pillow starts, or later (0: after the palette)
    if (size := len(data) - min(offset, len(data))) > MAX_BMP_RLE_BYTES:
        raise DecodeError(f"RLE-compressed BMP holds {size} bytes of image data, more than the limit of "
                          f"{MAX_BMP_RLE_BYTES} (Pillow decodes it in Python); re-save it uncompressed or as PNG")
    width, height = int.from_bytes(data[18:22], "little"), int.from_bytes(data[22:26], "little")
    if data[25] == 0xFF:  # a top-down image, as Pillow tells one
        height = 2**32 - height
    if compression == 2 and width * height > MAX_BMP_RLE4_PIXELS:
        raise DecodeError(f"RLE4-compressed BMP of {width * height} pixels, more than the limit of "
                          f"{MAX_BMP_RLE4_PIXELS} (Pillow decodes it pixel by pixel in Python); re-save it "
                          "uncompressed or as PNG")
