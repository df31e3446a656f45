"""Image bytes -> decoded pixels: the one decoder rule of every reader of images.

The server (`serve.imaging`) and the dataset side (`data.datasets.decode_checked`: training, `train.eval`, export's
parity and calibration images, the served-path check, `serve.sample`) both open and load images here: the formats
opened, the structure checks on JPEG, PNG, TIFF, GIF and BMP headers, the pixel limit (from the header, before any
pixel is decoded), PNG metadata bounds, EXIF orientation and exotic colour modes. So an image one reader refuses, every
reader refuses, and an image one decodes, every one decodes to the same pixels. What a refusal becomes is the
caller's: the server answers 400 or 413, a dataset counts the file as unreadable. Imports PIL: modules that must
load without the imaging extra import this one where they decode.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import re
import struct
import zlib
from collections.abc import Iterator

from PIL import Image, ImageChops, ImageFile, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

from models.oneline import first_line
from models.preprocessing import PNG_TEXT_BYTES, PNG_TEXT_CHUNK_BYTES, image_formats, plain_mode, upright

FORMATS = image_formats()  # the Pillow decoders every reader uses; anything else is never parsed
REASON_CHARS = 200  # how much of a decoder's own message a refusal quotes
# JPEG marker segments / PNG chunks before the image data, entries of a TIFF directory (real files: a few dozen)
MAX_HEADER_SEGMENTS = 1024
MAX_JPEG_MARKERS = 4096  # all of a JPEG's markers up to EOI (real files: a few dozen; a progressive one ~30 more)
MAX_JPEG_SCANS = 128  # a progressive JPEG has about 10; each scan walks the whole image again
# Pillow joins a JPEG's EXIF APP1 segments into one block, copying all it has at each (250 of 64 KiB in a 16 MB file
# took 4.4 s); a real file has one (an MPO one a picture). 16 take 35 ms and hold 1 MiB.
MAX_JPEG_EXIF_SEGMENTS = 16
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Every chunk of a PNG is checked (whole, a valid type, its CRC) before Pillow reads any: about 0.5 us a chunk plus
# crc32 over the bytes (about 1 GB/s). Real files have one chunk per 8-64 KiB of image data (libpng, Pillow) and a
# few dozen others, so a PNG may have this many chunks and one more a KiB: a body of empty chunks, which would cost
# Pillow about 4 us each as it reads them, is refused after a walk bounded by its size (16 MiB: 33k chunks, 20 ms).
MAX_PNG_CHUNKS = 1 << 14
PNG_BYTES_PER_CHUNK = 1 << 10
# Chunks Pillow inflates (up to PNG_TEXT_CHUNK_BYTES each) while it opens or loads a PNG: text and colour profiles.
INFLATED_PNG_CHUNKS = (b"zTXt", b"iTXt", b"iCCP")
# An uncompressed TIFF is one Python tile per strip (or tile), made as Pillow opens it and decoded one by one: about
# 20 us and 300 bytes each (2,000,000 one-row strips in 16 MB: 40-70 s, 650 MB; libtiff, which decodes a compressed
# one, is faster but not free: 1,500,000 strips took 0.9 s, 50 MB). 32,768 strips (an image of that many rows, one a
# strip): 0.3-0.7 s, 10 MB.
MAX_TIFF_STRIPS = 1 << 15
# As it loads a TIFF, Pillow reads the EXIF, GPS and Interop directories it points to, each number in them a Python
# object (a RATIONAL about 9 us and 230 bytes: 2,000,000 of them in 16 MB took 17 s and 460 MB). Real ones hold a
# few dozen; this many take 0.1 s and 3 MB. To turn an image upright it re-writes its EXIF block (`check_exif`),
# every number in the first directory too (1,000,000 in an 8 MB PNG: 14-30 s, 375 MB): this many, 0.3-0.5 s (an
# AVIF, re-written as it opens too: 0.8 s) on a busy 2-core VM.
MAX_EXIF_NUMBERS = 1 << 14
# GIF reads before the first image, each a step in Python: an extension, each of its data sub-blocks, a stray byte
# (Pillow keeps an object per comment sub-block: 3,000,000 tiny comments in 15 MB took 9 s and 510 MB). A real GIF
# has a handful of extensions; this many sub-blocks hold 4 MiB of metadata (an ICC profile, XMP) and take 20 ms.
MAX_GIF_BLOCKS = 1 << 14
# Pillow's BMP RLE decoder is Python: a step for each two bytes of data (RLE8, 16 MB: 9 s); an RLE4 image also takes
# a step a pixel (340 KB of long runs made 40 M pixels in 7 s). The worst file these admit takes about 0.2-0.4 s
# (RLE8) or 0.4-0.6 s (RLE4).
MAX_BMP_RLE_BYTES = 1 << 20
MAX_BMP_RLE4_PIXELS = 1 << 20
# libavif finds each item of an AVIF by a search through those it has (100,000 items named in a 1 MB iloc box took
# 49 s). A grid image has an item a tile (this many: 64 x 64 tiles), a photo a few; this many named in the iloc box
# and as many others in the iinf box took 0.4 s. Also bounds the walk to an AVIF's Exif item (items named only in
# the ipma or iref box are not counted).
MAX_AVIF_ITEMS = 1 << 12


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


def jpeg_segments(data: bytes) -> Iterator[int]:
    """The marker of each segment of a JPEG body before its first scan, in order (fill bytes count as segments)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:
        marker = data[pos + 1]
        yield marker
        pos += 1 if marker == 0xFF else 2 if marker == 0x01 or 0xD0 <= marker <= 0xD9 else \
            2 + int.from_bytes(data[pos + 2:pos + 4], "big")


# A marker: 0xFF (the last of any fill 0xFFs) and a byte that is not a stuffed 0x00, a restart marker RST0-7 or
# another fill; only markers end entropy-coded data, so a regex search skips it at C speed.
_JPEG_MARKER = re.compile(rb"\xff([^\x00\xd0-\xd7\xff])")  # no `\xff+`: quadratic on a run of 0xFF


def jpeg_scans(data: bytes, most: int, markers: int = MAX_JPEG_MARKERS) -> int:
    """The scans (SOS segments) of a JPEG's image, up to its EOI, counted to at most `most` + 1 (also for more than
    `markers` markers): data after the image (a phone's Motion Photo video, an MPO's second picture) is not
    the image's."""
    scans, pos = 0, 2
    for _ in range(markers):  # each marker is a step in Python: thousands of tiny segments count as too many
        if (found := _JPEG_MARKER.search(data, pos)) is None:
            break
        marker, pos = found.group(1)[0], found.end()
        if marker == 0xD9:  # EOI: the image ends here
            break
        if marker == 0xDA:
            scans += 1
            if scans > most:
                break
        if marker != 0x01:  # every marker but TEM has a length: skip its payload (a DHT's bytes are not markers)
            pos += int.from_bytes(data[pos:pos + 2], "big")
    else:
        return most + 1
    return scans


_EXIF_APP1 = re.compile(rb"\xff\xe1..Exif\x00\x00", re.DOTALL)  # an APP1 segment's marker, length and EXIF name


def jpeg_exif_segments(data: bytes, most: int) -> int:
    """The EXIF APP1 segments of a JPEG body, counted to at most `most` + 1: found anywhere, at C speed (Pillow
    reads those before the first scan; it skips bytes between segments that a walk would stop at)."""
    count = 0
    for count, _ in enumerate(_EXIF_APP1.finditer(data), 1):
        if count > most:
            break
    return count


def check_structure(data: bytes) -> None:
    """Refuse files built to make the decoder work far more than their pixels warrant: thousands of tiny JPEG header
    segments or PNG chunks (parsed one by one in Python), of progressive scans (each a pass over the image), of JPEG
    EXIF segments (joined one by one), of PNG colour profiles (each inflated, up to 1 MiB), of TIFF strips, tiles,
    directory entries or EXIF numbers, of GIF blocks before the first image, of AVIF items or EXIF numbers, or RLE
    BMP data (decoded in Python); and a PNG any chunk of which is cut off, has no valid type or fails its checksum
    (CRC), naming the chunk."""
    if data[:2] == b"\xff\xd8":
        for segments, _ in enumerate(jpeg_segments(data), 1):
            if segments > MAX_HEADER_SEGMENTS:
                raise DecodeError(f"JPEG has more than {MAX_HEADER_SEGMENTS} marker segments before its image data; "
                                  "refused")
        if jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
            raise DecodeError(f"JPEG has more than {MAX_JPEG_SCANS} scans (or {MAX_JPEG_MARKERS} markers); refused")
        if jpeg_exif_segments(data, MAX_JPEG_EXIF_SEGMENTS) > MAX_JPEG_EXIF_SEGMENTS:
            raise DecodeError(f"JPEG's EXIF metadata lies in more than {MAX_JPEG_EXIF_SEGMENTS} APP1 segments (Pillow "
                              "joins them one by one); strip the image's metadata")
    elif data[:8] == PNG_SIGNATURE:
        if (fault := _png_fault(data)) is not None:
            raise DecodeError(f"corrupt PNG: {fault}; re-save or re-export the image")
    elif data[:4] in TIFF_PREFIXES:
        _check_tiff(data)
    elif data[:6] in GIF_SIGNATURES:
        if gif_blocks(data, MAX_GIF_BLOCKS) > MAX_GIF_BLOCKS:
            raise DecodeError(f"GIF has more than {MAX_GIF_BLOCKS} extension blocks (or stray bytes) before its first "
                              "image, each read one by one; refused")
    elif data[:2] == b"BM":
        _check_rle_bmp(data)
    elif data[4:8] == b"ftyp" and data[8:12] in AVIF_BRANDS:
        _check_avif(data)


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


TIFF_PREFIXES = tuple(TiffImagePlugin.PREFIXES)  # what Pillow opens as a TIFF, BigTIFF included
STRIP_OFFSETS, TILE_OFFSETS = 273, 324
EXIF_IFD, GPS_IFD, INTEROP_IFD = 34665, 34853, 40965  # the directories Pillow reads as it loads a TIFF
# The types Pillow reads a Python number from for each value (a BYTE, ASCII or UNDEFINED tag it reads whole).
_TIFF_NUMBERS = frozenset({3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16})
_TIFF_WHOLE = {3: "H", 4: "L", 6: "b", 8: "h", 9: "l", 13: "L", 16: "Q"}  # types Pillow reads an offset from

_TiffEntry = tuple[int, int, int, bytes]  # tag, type, count, value (or offset) field


def _tiff_directory(data: bytes, offset: int, endian: str, big: bool, what: str = "TIFF") -> list[_TiffEntry]:
    """The entries of the TIFF directory at `offset` as Pillow reads them (those the data holds); a DecodeError for
    more than MAX_HEADER_SEGMENTS of them, which Pillow reads one by one in Python, several times over."""
    count_code, entry = ("Q", "HHQ8s") if big else ("H", "HHL4s")
    start = offset + struct.calcsize(endian + count_code)
    if offset < 0 or start > len(data):
        return []  # Pillow finds no directory: it says so
    (count,) = struct.unpack_from(endian + count_code, data, offset)
    if count > MAX_HEADER_SEGMENTS:
        raise DecodeError(f"{what} has a directory of {count} entries, more than the limit of {MAX_HEADER_SEGMENTS}; "
                          "refused")
    size = struct.calcsize(endian + entry)
    end = start + min(count, (len(data) - start) // size) * size
    return list(struct.iter_unpack(endian + entry, data[start:end]))


def _tiff_pointer(data: bytes, entries: list[_TiffEntry], tag: int, endian: str, what: str = "TIFF") -> int | None:
    """Where the directory that `tag` points to starts, read as Pillow reads it (one whole number); None when the
    tag is absent or is not such a number. A tag given twice is refused: which one Pillow takes depends on details
    of the others (their types, sizes and places) that no real file exercises."""
    found = [(kind, count, value) for t, kind, count, value in entries if t == tag]
    if len(found) > 1:
        raise DecodeError(f"{what} names its EXIF, GPS or Interop directory more than once; refused")
    if not found or found[0][1] != 1 or (code := _TIFF_WHOLE.get(found[0][0])) is None:
        return None
    raw, size = found[0][2], struct.calcsize(endian + code)
    if size > len(raw):  # a LONG8 in a classic TIFF lies where its field points
        at = struct.unpack(endian + "L", raw)[0]
        raw = data[at:at + size]
    return struct.unpack_from(endian + code, raw)[0] if len(raw) >= size else None


def _numbers(entries: list[_TiffEntry]) -> int:
    """The values of a directory's entries that Pillow makes a Python number of, each."""
    return sum(count for _, kind, count, _ in entries if kind in _TIFF_NUMBERS)


def _exif_numbers(data: bytes, first: list[_TiffEntry], endian: str, big: bool, what: str = "TIFF", *,
                  rewrite: bool = False) -> int:
    """The numbers Pillow makes objects of as it reads the EXIF, GPS and Interop directories that a TIFF's (or an
    EXIF block's) first directory points to, each directory counted each time Pillow reads it. Loading a TIFF, it
    reads the Interop one when the first directory names the tag too; re-writing an EXIF block (`rewrite`:
    `Exif.tobytes`), when the Exif directory names it."""
    exif_at = _tiff_pointer(data, first, EXIF_IFD, endian, what)
    exif = _tiff_directory(data, exif_at, endian, big, what) if exif_at is not None else []
    read = [exif_at, _tiff_pointer(data, first, GPS_IFD, endian, what)]
    if any(tag == INTEROP_IFD for tag, _, _, _ in (exif if rewrite else first)):
        read.append(_tiff_pointer(data, exif, INTEROP_IFD, endian, what))
    return sum(_numbers(exif if at == exif_at else _tiff_directory(data, at, endian, big, what))
               for at in read if at is not None)


def _tiff_first(data: bytes, what: str = "TIFF") -> tuple[list[_TiffEntry], str, bool] | None:
    """A TIFF's first directory, its byte order and whether it is a BigTIFF, as Pillow reads them; None when the
    data is too short to hold a header."""
    endian = ">" if data[:2] == b"MM" else "<"
    big = data[2] == 43  # as Pillow tells BigTIFF (a big-endian one, "MM\0+", it reads as a classic TIFF)
    if len(data) < (16 if big else 8):
        return None  # Pillow says it is truncated
    at = struct.unpack_from(endian + ("Q" if big else "L"), data, 8 if big else 4)[0]
    return _tiff_directory(data, at, endian, big, what), endian, big


def _check_tiff(data: bytes) -> None:
    """Refuse a TIFF whose first directory (the image Pillow decodes; later ones it reads only when asked to) has
    more than MAX_HEADER_SEGMENTS entries or more than MAX_TIFF_STRIPS strips or tiles, or whose EXIF, GPS and
    Interop directories hold more than MAX_EXIF_NUMBERS numbers, each read one by one in Python."""
    if (head := _tiff_first(data)) is None:
        return
    first, endian, big = head
    for tag, _, count, _ in first:
        if tag in (STRIP_OFFSETS, TILE_OFFSETS) and count > MAX_TIFF_STRIPS:
            unit, advice = ("strips", "more rows per strip") if tag == STRIP_OFFSETS else ("tiles", "larger tiles")
            raise DecodeError(f"TIFF image is stored in {count} {unit}, more than the limit of {MAX_TIFF_STRIPS} "
                              f"(each is read one by one); re-save it with {advice}")
    if (numbers := _exif_numbers(data, first, endian, big)) > MAX_EXIF_NUMBERS:
        raise DecodeError(f"TIFF's EXIF, GPS and Interop directories hold {numbers} numbers, more than the limit of "
                          f"{MAX_EXIF_NUMBERS}; strip the image's metadata")


_EXIF_HEADER = re.compile(rb"^(Exif\x00\x00){1,2}")  # what Pillow strips from an EXIF block before its TIFF


def check_exif(block: bytes, fmt: str) -> None:
    """Refuse an `fmt` image whose EXIF block holds more than MAX_EXIF_NUMBERS numbers (or a directory of more than
    MAX_HEADER_SEGMENTS entries): Pillow makes a Python object of each number in its first directory and in the
    Exif, GPS and Interop ones as it re-writes the block to turn the image upright (and inside `Image.open`, for an
    AVIF whose own orientation differs from its EXIF's). A block Pillow cannot read as a TIFF costs nothing."""
    tiff, what = _EXIF_HEADER.sub(b"", block), f"{fmt} image's EXIF metadata"
    if tiff[:4] not in TIFF_PREFIXES or (head := _tiff_first(tiff, what)) is None:
        return
    first, endian, big = head
    if (numbers := _numbers(first) + _exif_numbers(tiff, first, endian, big, what, rewrite=True)) > MAX_EXIF_NUMBERS:
        raise DecodeError(f"{what} holds {numbers} numbers, more than the limit of {MAX_EXIF_NUMBERS}; strip the "
                          "image's metadata")


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


AVIF_BRANDS = (b"avif", b"avis", b"mif1", b"msf1")  # the major brands (in the ftyp box) Pillow opens as AVIF
_BOX_HEAD = struct.Struct(">I4s")  # an ISO-BMFF box's size and type
_ITEMS = "items (libavif finds each by a search through the others)"


def _boxes(data: bytes, start: int, end: int, most: int, what: str) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, end) of each ISO-BMFF box from `start` to `end`, as far as their sizes hold (a box that
    runs past `end` is cut there); a DecodeError past `most` of them (`what` names them)."""
    for _ in range(most + 1):
        if start + 8 > end:
            return
        size, kind = _BOX_HEAD.unpack_from(data, start)
        head = 8
        if size == 1 and start + 16 <= end:  # a 64-bit size follows the type
            size, head = int.from_bytes(data[start + 8:start + 16], "big"), 16
        elif size == 0:  # the box runs to the end
            size = end - start
        if size < head:
            return  # a broken box: libavif refuses the file
        yield kind, start + head, min(start + size, end)
        start += size
    raise DecodeError(f"AVIF has more than {most} {what}; refused")


def _field(data: bytes, pos: int, size: int) -> int:
    """A big-endian unsigned number of `size` bytes (0 to 8) at `pos` (0 where the data runs out)."""
    return int.from_bytes(data[pos:pos + size], "big")


def _avif_exif_items(data: bytes, start: int, end: int) -> set[int]:
    """The IDs of the Exif items an AVIF's item information box (iinf, from `start` to `end`) names."""
    found = set()
    first = start + (6 if data[start:start + 1] == b"\0" else 8)  # version 0: a 16-bit entry count, else 32
    for kind, at, stop in _boxes(data, first, end, MAX_AVIF_ITEMS, _ITEMS):
        version = data[at:at + 1]
        id_size = 2 if version == b"\2" else 4
        if kind == b"infe" and version in (b"\2", b"\3") and stop >= at + 10 + id_size:
            if data[at + 6 + id_size:at + 10 + id_size] == b"Exif":  # after the ID and the protection index
                found.add(_field(data, at + 4, id_size))
    return found


def _avif_extents(data: bytes, start: int, end: int, items: set[int]) -> dict[int, tuple[int, list[tuple[int, int]]]]:
    """Where the item location box (iloc, from `start` to `end`) puts each of `items`: its construction method (0:
    in the file, 1: in the meta box's idat) and its extents (offset, length), read as ISO/IEC 14496-12 lays them out.
    Every other item is skipped in one step. A DecodeError for more than MAX_AVIF_ITEMS items, or for more than
    MAX_HEADER_SEGMENTS extents of `items` (a real Exif item has one)."""
    version = data[start] if start + 8 <= end else 3
    sizes, id_size = _field(data, start + 4, 2), 4 if version == 2 else 2
    offset_size, length_size, base_size = sizes >> 12, sizes >> 8 & 15, sizes >> 4 & 15
    index_size = sizes & 15 if version else 0
    if version > 2 or not {offset_size, length_size, base_size, index_size} <= {0, 4, 8}:
        return {}  # libavif refuses the file
    count, pos = _field(data, start + 6, id_size), start + 6 + id_size
    if count > MAX_AVIF_ITEMS:
        raise DecodeError(f"AVIF has more than {MAX_AVIF_ITEMS} {_ITEMS}; refused")
    found: dict[int, tuple[int, list[tuple[int, int]]]] = {}
    extent_size, pieces = index_size + offset_size + length_size, 0
    for _ in range(count):
        item, method = _field(data, pos, id_size), _field(data, pos + id_size, 2) & 15 if version else 0
        pos += id_size + (2 if version else 0) + 2  # the ID, the construction method, the data reference
        base, extents = _field(data, pos, base_size), _field(data, pos + base_size, 2)
        pos += base_size + 2
        if item in items:
            if (pieces := pieces + extents) > MAX_HEADER_SEGMENTS:
                raise DecodeError(f"AVIF's Exif item lies in more than {MAX_HEADER_SEGMENTS} pieces; refused")
            found[item] = (method, [(base + _field(data, at + index_size, offset_size),
                                     _field(data, at + index_size + offset_size, length_size))
                                    for at in range(pos, min(pos + extents * extent_size, end), extent_size or 1)])
        pos += extents * extent_size
        if pos > end:
            break
    return found


def _check_avif(data: bytes) -> None:
    """Refuse an AVIF whose iloc or iinf box names more than MAX_AVIF_ITEMS items, or whose Exif item (found as
    libavif finds it: named in the meta box's iinf, its extents in iloc joined, from the file or the meta box's
    idat) fails `check_exif`: Pillow re-writes the EXIF inside `Image.open` when the file's irot/imir orientation
    differs from the EXIF's. Exif items larger than the file together (extents may overlap) are refused too."""
    top = {kind: (at, end) for kind, at, end in _boxes(data, 0, len(data), MAX_HEADER_SEGMENTS, "boxes")}
    if b"meta" not in top:
        return
    at, end = top[b"meta"]
    boxes = {kind: (start, stop) for kind, start, stop in _boxes(data, at + 4, end, MAX_HEADER_SEGMENTS, "boxes")}
    items = _avif_exif_items(data, *boxes[b"iinf"]) if b"iinf" in boxes else set()
    located = _avif_extents(data, *boxes[b"iloc"], items) if b"iloc" in boxes else {}
    if (size := sum(length for _, extents in located.values() for _, length in extents)) > len(data):
        raise DecodeError(f"AVIF's Exif items span {size} bytes, more than the file's {len(data)}; refused")
    idat = data[slice(*boxes.get(b"idat", (0, 0)))]
    for method, extents in located.values():
        if method > 1:
            continue  # a construction method libavif lacks: it refuses the file
        source = idat if method else data
        payload = b"".join(source[start:start + length] for start, length in extents)
        check_exif(payload[4:], "AVIF")  # after the offset of the TIFF header in it (ISO/IEC 23008-12, A.2.1)


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


def _check_rle_bmp(data: bytes) -> None:
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


def _unidentified(data: bytes) -> DecodeError:
    """Bytes no decoder took: a PNG says what breaks it (its chunks are sound: `check_structure` came first);
    anything else is not an image vitc reads."""
    if data[:8] == PNG_SIGNATURE:
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
