"""JPEG structure checks: the segments Pillow parses one by one before the first scan, the scans libjpeg makes a pass
over the image for, and the EXIF APP1 segments Pillow joins one by one."""

from __future__ import annotations

import re
from collections.abc import Iterator

from PIL.JpegImagePlugin import MARKER

from models.imagecheck.common import MAX_HEADER_SEGMENTS, DecodeError

MAX_JPEG_MARKERS = 4096  # all of a JPEG's markers up to EOI (real files: a few dozen; a progressive one ~30 more)
MAX_JPEG_SCANS = 128  # a progressive JPEG has about 10; each scan walks the whole image again
# Pillow joins a JPEG's EXIF APP1 segments into one block, copying all it has at each (250 of 64 KiB in a 16 MB file
# took 4.4 s); a real file has one (an MPO one a picture). 16 take 35 ms and hold 1 MiB.
MAX_JPEG_EXIF_SEGMENTS = 16
# Pillow skips each byte between a JPEG's segments that is no marker (nor 0xFF fill) with a step in Python: 16 MB of
# zeros took 1.9 s, of 0xFF 0x00 pairs 6 s, and each decoded. A real file has none, or a few where a writer got a
# segment's length wrong (libjpeg warns of "extraneous bytes"); this many cost 10-30 ms (the walk here included).
MAX_JPEG_JUNK_BYTES = 1 << 16


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """Each step Pillow takes through a JPEG body before its first scan, in order, as (marker, junk): a segment's
    marker (0xFF for a fill byte, which is a step too) and 0 junk bytes, or 0 and the number of junk bytes it skips
    one by one next (a run of bytes other than 0xFF, found here at C speed, or a stuffed 0xFF 0x00). It stops where
    Pillow does: at the first scan (SOS), a marker Pillow does not know (it refuses the file), or the data's end."""
    pos, size = 2, len(data)
    while pos + 1 < size:
        if data[pos] != 0xFF:
            end = data.find(b"\xff", pos)
            end = size if end < 0 else end
            yield 0, end - pos
            pos = end
            continue
        marker, code = data[pos + 1], 0xFF00 | data[pos + 1]
        if marker == 0x00:
            yield 0, 2
            pos += 2
            continue
        if marker == 0xDA or (marker != 0xFF and code not in MARKER):
            return  # the first scan, or no marker Pillow knows (it refuses the file)
        yield marker, 0
        # A fill byte is one; a marker Pillow reads no length of (SOI, EOI, RSTn, JPGn) two; any other, its length
        # too (Pillow reads at least the two bytes of it).
        pos += 1 if marker == 0xFF else 2 if MARKER[code][2] is None else \
            2 + max(2, int.from_bytes(data[pos + 2:pos + 4], "big"))


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
    reads those before the first scan, past any junk between segments)."""
    count = 0
    for count, _ in enumerate(_EXIF_APP1.finditer(data), 1):
        if count > most:
            break
    return count


def check_jpeg(data: bytes) -> None:
    """Refuse a JPEG of more than MAX_HEADER_SEGMENTS segments or MAX_JPEG_JUNK_BYTES junk bytes before its first
    scan, MAX_JPEG_SCANS scans (or MAX_JPEG_MARKERS markers) or MAX_JPEG_EXIF_SEGMENTS EXIF segments."""
    segments = junk = 0
    for marker, skipped in jpeg_segments(data):
        segments, junk = segments + (marker != 0), junk + skipped
        if segments > MAX_HEADER_SEGMENTS:
            raise DecodeError(f"JPEG has more than {MAX_HEADER_SEGMENTS} marker segments before its image data; "
                              "refused")
        if junk > MAX_JPEG_JUNK_BYTES:
            raise DecodeError(f"JPEG has more than {MAX_JPEG_JUNK_BYTES} bytes of junk between its segments (Pillow "
                              "skips them one by one); re-save the image")
    if jpeg_scans(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise DecodeError(f"JPEG has more than {MAX_JPEG_SCANS} scans (or {MAX_JPEG_MARKERS} markers); refused")
    if jpeg_exif_segments(data, MAX_JPEG_EXIF_SEGMENTS) > MAX_JPEG_EXIF_SEGMENTS:
        raise DecodeError(f"JPEG's EXIF metadata lies in more than {MAX_JPEG_EXIF_SEGMENTS} APP1 segments (Pillow "
                          "joins them one by one); strip the image's metadata")
