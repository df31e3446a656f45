"""AVIF structure checks: a bounded walk of its ISO-BMFF boxes to the items libavif searches one by one, and its Exif
item, whose numbers Pillow may re-write inside `Image.open`."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from models.imagecheck.common import MAX_HEADER_SEGMENTS, DecodeError
from models.imagecheck.tiff import check_exif

# libavif finds each item of an AVIF by a search through those it has, for each ID its iloc, iinf, ipma (property
# associations) and iref (references) boxes name (100,000 items named in a 1 MB iloc box took 49 s; 20,000 in an
# ipma box or as dimg references, 1 s). A grid image has an item a tile (this many: 64 x 64 tiles), a photo a few;
# each of those boxes may name this many (4 x 4,096 IDs, none named twice: 0.4-0.8 s). Also bounds the walk to
# an AVIF's Exif item.
MAX_AVIF_ITEMS = 1 << 12
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


def _ipma_items(data: bytes, start: int, end: int) -> int:
    """The entries (an item ID each) of the item property association boxes (ipma) in an item properties box (iprp,
    from `start` to `end`), as their counts say: libavif reads them all, one item lookup each."""
    return sum(_field(data, at + 4, 4) for kind, at, _ in _boxes(data, start, end, MAX_HEADER_SEGMENTS, "boxes")
               if kind == b"ipma")


def _iref_items(data: bytes, start: int, end: int) -> int:
    """The item IDs an item reference box (iref, from `start` to `end`) names: each reference box's `from` ID and its
    `to` IDs (0 for a version libavif skips); a DecodeError past MAX_AVIF_ITEMS reference boxes."""
    version = data[start] if start < end else 0
    if version > 1:
        return 0
    id_size = 4 if version else 2
    return sum(1 + _field(data, at + id_size, 2) for _, at, _ in _boxes(data, start + 4, end, MAX_AVIF_ITEMS, _ITEMS))


def _check_items(data: bytes, boxes: dict[bytes, tuple[int, int]]) -> None:
    """Refuse an AVIF whose ipma or iref boxes name more than MAX_AVIF_ITEMS items (iloc's and iinf's are counted as
    they are walked): libavif searches its items for each ID they name."""
    ipma = _ipma_items(data, *boxes[b"iprp"]) if b"iprp" in boxes else 0
    iref = _iref_items(data, *boxes[b"iref"]) if b"iref" in boxes else 0
    if max(ipma, iref) > MAX_AVIF_ITEMS:
        raise DecodeError(f"AVIF has more than {MAX_AVIF_ITEMS} {_ITEMS}; refused")


def check_avif(data: bytes) -> None:
    """Refuse an AVIF whose iloc, iinf, ipma or iref box names more than MAX_AVIF_ITEMS items, or whose Exif item
    (found as libavif finds it: named in the meta box's iinf, its extents in iloc joined, from the file or the meta
    box's idat) fails `check_exif`: Pillow re-writes the EXIF inside `Image.open` when the file's irot/imir
    orientation differs from the EXIF's. Exif items larger than the file together (extents may overlap) are refused
    too."""
    top = {kind: (at, end) for kind, at, end in _boxes(data, 0, len(data), MAX_HEADER_SEGMENTS, "boxes")}
    if b"meta" not in top:
        return
    at, end = top[b"meta"]
    boxes = {kind: (start, stop) for kind, start, stop in _boxes(data, at + 4, end, MAX_HEADER_SEGMENTS, "boxes")}
    _check_items(data, boxes)
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
