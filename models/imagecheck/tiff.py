"""TIFF directories as Pillow reads them, counted before it does: a TIFF's strips, tiles and first-directory entries,
its tiles' size, and the numbers in the EXIF, GPS and Interop directories of a TIFF or of any image's EXIF block
(`check_exif`)."""

from __future__ import annotations

import re
import struct

from PIL import TiffImagePlugin

from models.imagecheck.common import MAX_HEADER_SEGMENTS, DecodeError

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
# libtiff decodes a tiled TIFF a whole tile at a time into one buffer (TileWidth x TileLength x bytes a pixel),
# whatever the image's size: a 64 x 64 image may declare 16384 x 16384 tiles, 800 MB for one decode of a 783 KB file,
# past the pixel limit and the decode budget, which count the image. A tile may hold as many pixels as its image, or
# this many (1024 x 1024, 3-8 MB) for a small image: writers' tiles are multiples of 16, typically 256 or 512 a side,
# and an image smaller than one tile is legal. Strips need no bound: libtiff clamps a strip's rows to the image's.
MAX_TIFF_TILE_PIXELS = 1 << 20

TIFF_PREFIXES = tuple(TiffImagePlugin.PREFIXES)  # what Pillow opens as a TIFF, BigTIFF included
STRIP_OFFSETS, TILE_OFFSETS = 273, 324
IMAGE_WIDTH, IMAGE_LENGTH, TILE_WIDTH, TILE_LENGTH = 256, 257, 322, 323
EXIF_IFD, GPS_IFD, INTEROP_IFD = 34665, 34853, 40965  # the directories Pillow reads as it loads a TIFF
# The types Pillow reads a Python number from for each value (a BYTE, ASCII or UNDEFINED tag it reads whole).
_TIFF_NUMBERS = frozenset({3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16})
_TIFF_WHOLE = {3: "H", 4: "L", 6: "b", 8: "h", 9: "l", 13: "L", 16: "Q"}  # types Pillow reads an offset from
# The types libtiff reads a size from (ImageWidth, TileWidth, ...): any whole number, signed or not.
_TIFF_SIZE = {1: "B", 3: "H", 4: "L", 6: "b", 8: "h", 9: "l", 13: "L", 16: "Q", 17: "q", 18: "Q"}

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
    if not found or found[0][1] != 1:
        return None
    return _first_number(data, found[0], endian, _TIFF_WHOLE)


def _first_number(data: bytes, entry: tuple[int, int, bytes], endian: str, codes: dict[int, str]) -> int | None:
    """The first value of an entry (type, count, value field), read as one of `codes`; None for a type not among
    them or a value the data does not hold."""
    kind, count, field = entry
    if (code := codes.get(kind)) is None or count < 1:
        return None
    size = struct.calcsize(endian + code)
    if count * size > len(field):  # the values lie where the field points (a LONG8 in a classic TIFF, say)
        at = struct.unpack(endian + ("Q" if len(field) == 8 else "L"), field)[0]
        field = data[at:at + size]
    return struct.unpack_from(endian + code, field)[0] if len(field) >= size else None


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


def _sizes(data: bytes, first: list[_TiffEntry], endian: str) -> dict[int, int]:
    """The image's and its tiles' width and length as libtiff reads them from the first directory (those given as
    a whole number). Each given twice is refused: libtiff takes the first and Pillow the last, so the two would
    disagree on the image they decode."""
    sizes: dict[int, int] = {}
    for tag, kind, count, field in first:
        if tag not in (IMAGE_WIDTH, IMAGE_LENGTH, TILE_WIDTH, TILE_LENGTH):
            continue
        if tag in sizes:
            raise DecodeError("TIFF names its image or tile width or length more than once; refused")
        if (value := _first_number(data, (kind, count, field), endian, _TIFF_SIZE)) is not None:
            sizes[tag] = value
    return sizes


def _check_tiles(sizes: dict[int, int]) -> None:
    """Refuse tiles of more pixels than both their image and MAX_TIFF_TILE_PIXELS: libtiff decodes each whole."""
    w, h = sizes.get(IMAGE_WIDTH, 0), sizes.get(IMAGE_LENGTH, 0)
    tile_w, tile_l = sizes.get(TILE_WIDTH, 0), sizes.get(TILE_LENGTH, 0)
    if min(tile_w, tile_l) <= 0:  # untiled, or a tile size libtiff refuses itself
        return
    pixels = max(w, 0) * max(h, 0)
    if tile_w * tile_l > max(pixels, MAX_TIFF_TILE_PIXELS):
        raise DecodeError(f"TIFF image of {w}x{h} pixels is stored in tiles of {tile_w}x{tile_l} pixels ("
                          f"{tile_w * tile_l} a tile, each decoded whole), more than the image's {pixels} and the "
                          f"limit of {MAX_TIFF_TILE_PIXELS}; re-save it with smaller tiles")


def check_tiff(data: bytes) -> None:
    """Refuse a TIFF whose first directory (the image Pillow decodes; later ones it reads only when asked to) has
    more than MAX_HEADER_SEGMENTS entries or more than MAX_TIFF_STRIPS strips or tiles, tiles of more pixels than
    both the image and MAX_TIFF_TILE_PIXELS (each decoded whole into one buffer), or whose EXIF, GPS and Interop
    directories hold more than MAX_EXIF_NUMBERS numbers, each read one by one in Python."""
    if (head := _tiff_first(data)) is None:
        return
    first, endian, big = head
    for tag, _, count, _ in first:
        if tag in (STRIP_OFFSETS, TILE_OFFSETS) and count > MAX_TIFF_STRIPS:
            unit, advice = ("strips", "more rows per strip") if tag == STRIP_OFFSETS else ("tiles", "larger tiles")
            raise DecodeError(f"TIFF image is stored in {count} {unit}, more than the limit of {MAX_TIFF_STRIPS} "
                              f"(each is read one by one); re-save it with {advice}")
    _check_tiles(_sizes(data, first, endian))
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
