"""Headers Pillow parses one step at a time in Python, bounded before it opens them (as JPEG scans and PNG chunks are):
a TIFF's strips or tiles and its directories (with the EXIF, GPS and Interop ones it reads as it loads), a GIF's
blocks before its first image, a BMP's RLE data, and the junk bytes between a JPEG's segments. A file past a bound is
refused by `check_structure` with one line naming the count and the limit: the server answers 400, training counts
the file as unreadable. The bounds are module constants, lowered here so that the hostile files stay small."""

from __future__ import annotations

import io
import struct

import fake_runtime
import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from data.datasets import decode_checked
from models.decoding import decode_image
from models.imagecheck import gif_bmp, jpeg, tiff
from models.imagecheck.common import DecodeError

LIMIT = 40_000_000
URL = "/v1/models/fake/classify"


# -- files ------------------------------------------------------------------------------------------------------------

def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _grey(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w), dtype=np.uint8), "L")


def _entry(order: str, big: bool, tag: int, typ: int, count: int, value: int) -> bytes:
    """One directory entry; a SHORT value sits in the first two bytes of the value field, as the format says."""
    field = "Q" if big else "I"
    raw = struct.pack(order + "H", value).ljust(8 if big else 4, b"\0") if typ == 3 else \
        struct.pack(order + field, value)
    return struct.pack(order + "HH" + field, tag, typ, count) + raw


def _tiff(rows: int, *, order: str = "<", big: bool = False, tiles: bool = False, extra: int = 0) -> bytes:
    """An uncompressed 8-bit grey TIFF of 1 x `rows` pixels, one row a strip (or a 1 x 1 tile a row): `rows` strips
    or tiles; `extra` repeated private tags make its directory longer."""
    offsets, counts, per = (324, 325, 322) if tiles else (273, 279, 278)
    field, count_size, entry_size = ("Q", 8, 20) if big else ("I", 2, 12)
    unit, wide = (16, 8) if big else (4, 4)
    n_entries = 9 + int(tiles) + extra
    pixels = (16 if big else 8) + count_size + entry_size * n_entries + wide
    table = pixels + rows
    entries = [_entry(order, big, 256, 4, 1, 1), _entry(order, big, 257, 4, 1, rows),
               _entry(order, big, 258, 3, 1, 8), _entry(order, big, 259, 3, 1, 1), _entry(order, big, 262, 3, 1, 1),
               _entry(order, big, 277, 3, 1, 1), _entry(order, big, per, 4, 1, 1),
               _entry(order, big, offsets, unit, rows, table),
               _entry(order, big, counts, unit, rows, table + wide * rows)]
    if tiles:
        entries.append(_entry(order, big, 323, 4, 1, 1))  # TileLength (322 TileWidth is `per`)
    entries = sorted(entries) + [_entry(order, big, 65000, 4, 1, 0)] * extra
    prefix = (b"II" if order == "<" else b"MM") + struct.pack(order + "H", 43 if big else 42)
    head = prefix + (struct.pack(order + "HHQQ", 8, 0, 16, n_entries) if big
                     else struct.pack(order + "IH", 8, n_entries))
    pix = bytes(range(rows)) if rows < 256 else _grey(rows, 1).tobytes()
    return (head + b"".join(entries) + bytes(wide) + pix + b"".join(struct.pack(order + field, pixels + i)
                                                                     for i in range(rows))
            + struct.pack(order + field, 1) * rows)


def _tiff_with_exif(numbers: int, *, pointers: tuple[int, ...] = (34665,), interop: bool = False) -> bytes:
    """A 1 x 1 TIFF whose `pointers` (Exif, GPS, Interop) all point at one directory holding `numbers` RATIONALs
    (and, with `interop`, an Interop pointer to itself)."""
    entries = [(256, 4, 1, 1), (257, 4, 1, 1), (258, 3, 1, 8), (262, 3, 1, 1), (273, 4, 1, 0), (278, 4, 1, 1),
               (279, 4, 1, 1)] + [(p, 4, 1, 0) for p in pointers]
    entries.sort()
    pixel = 8 + 2 + 12 * len(entries) + 4
    sub = pixel + 2  # a word boundary
    ifd = b"".join(_entry("<", False, t, ty, c, pixel if t == 273 else sub if t in pointers else v)
                   for t, ty, c, v in entries)
    own = [struct.pack("<HHII", 40965, 4, 1, sub)] if interop else []
    values = sub + 2 + 12 * (len(own) + 1) + 4
    sub_ifd = struct.pack("<H", len(own) + 1) + b"".join(own) + struct.pack("<HHII", 65000, 5, numbers, values) + \
        bytes(4)
    return b"II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + bytes(4) + b"\x80\0" + sub_ifd + \
        b"\1\0\0\0" * (2 * numbers)


GIF_HEAD = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
GIF_FRAME = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"


def _gif(before: bytes, after: bytes = b"") -> bytes:
    """A 1 x 1 GIF with `before` its first image and `after` it."""
    return GIF_HEAD + before + GIF_FRAME + after + b"\x3b"


def _comments(n: int) -> bytes:
    return b"\x21\xfe\x01A\x00" * n  # each a one-byte comment: Pillow keeps a Python object per block


def _bmp_rle(w: int, h: int, body: bytes, *, rle4: bool = False) -> bytes:
    """A w x h BMP with a grey palette whose pixel data is `body`, RLE8 (or RLE4) compressed."""
    colours = 16 if rle4 else 256
    palette = b"".join(bytes([i * 255 // (colours - 1)] * 3 + [0]) for i in range(colours))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 4 if rle4 else 8, 2 if rle4 else 1, len(body), 2835, 2835,
                       colours, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def _rle8_runs(w: int, h: int) -> bytes:
    """RLE8 data of w x h where every pixel is a run of its own: two bytes a pixel, the most work a byte."""
    return (b"\x01\x07" * w + b"\0\0") * h + b"\0\1"


def _rle4_long_runs(w: int, h: int) -> bytes:
    """RLE4 data of w x h in runs of 255 pixels: little data, and Pillow's Python loop goes pixel by pixel."""
    return (b"\xff\x12" * (w // 255) + bytes([w % 255, 0x34]) + b"\0\0") * h + b"\0\1"


def _jpeg_junk(*junk: bytes) -> bytes:
    """A 24 x 16 JPEG with each of `junk` after one of its first segments (APP0, then the tables that follow it),
    where Pillow and libjpeg skip it to the next marker."""
    photo = _encode(_grey(24, 16).convert("RGB"), "JPEG", quality=90)
    out, pos = photo[:2], 2
    for piece in junk:
        end = pos + 2 + int.from_bytes(photo[pos + 2:pos + 4], "big")
        out, pos = out + photo[pos:end] + piece, end
    return out + photo[pos:]


# -- the shared decode rule -------------------------------------------------------------------------------------------

def _refused(data: bytes, words: str) -> str:
    """The reason `decode_image` refuses `data` with, one line holding `words`; the dataset side skips it too."""
    with pytest.raises(DecodeError) as exc:
        decode_image(data, max_pixels=LIMIT)
    reason = exc.value.reason
    assert words in reason and "\n" not in reason and not exc.value.over_limit, reason
    return reason


def _dataset_skips(data: bytes, tmp_path) -> None:
    path = tmp_path / "hostile"
    path.write_bytes(data)
    assert decode_checked(path) is None


def _big_endian_bigtiff_as_pillow_reads_it(rows: int) -> bytes:
    """A big-endian TIFF marked BigTIFF ("MM\\0+"): Pillow looks for BigTIFF's 43 in byte 2, where a big-endian file
    has 0, so it reads the file as a classic TIFF (and a real big-endian BigTIFF not at all); so must the check."""
    data = _tiff(rows, order=">")
    return data[:2] + b"\0+" + data[4:]


TIFFS = {"II*": lambda rows: _tiff(rows), "MM*": lambda rows: _tiff(rows, order=">"),
         "II+ (BigTIFF)": lambda rows: _tiff(rows, big=True),
         "MM+ (read as MM*)": _big_endian_bigtiff_as_pillow_reads_it}


@pytest.mark.parametrize("kind", list(TIFFS))
def test_a_tiff_of_more_strips_than_the_bound_is_refused_naming_them(kind, monkeypatch, tmp_path):
    monkeypatch.setattr(tiff, "MAX_TIFF_STRIPS", 40)
    assert decode_image(TIFFS[kind](40), max_pixels=LIMIT).size == (1, 40)  # at the edge
    data = TIFFS[kind](41)
    assert _refused(data, "41 strips") == ("TIFF image is stored in 41 strips, more than the limit of 40 (each is "
                                           "read one by one); re-save it with more rows per strip")
    _dataset_skips(data, tmp_path)


def test_a_tiff_of_more_tiles_than_the_bound_is_refused_naming_them(monkeypatch):
    monkeypatch.setattr(tiff, "MAX_TIFF_STRIPS", 40)
    assert decode_image(_tiff(40, tiles=True), max_pixels=LIMIT).size == (1, 40)
    assert "41 tiles, more than the limit of 40" in _refused(_tiff(41, tiles=True), "41 tiles")


@pytest.mark.parametrize("big", [False, True], ids=["tiff", "bigtiff"])
def test_a_tiff_directory_of_more_entries_than_the_bound_is_refused(big, monkeypatch):
    monkeypatch.setattr(tiff, "MAX_HEADER_SEGMENTS", 30)
    assert decode_image(_tiff(2, big=big, extra=30 - 9), max_pixels=LIMIT).size == (1, 2)
    assert _refused(_tiff(2, big=big, extra=30 - 8), "31 entries") == (
        "TIFF has a directory of 31 entries, more than the limit of 30; refused")


def test_a_tiffs_exif_directories_of_too_many_numbers_are_refused(monkeypatch, tmp_path):
    """Pillow reads the Exif, GPS and Interop directories as it loads a TIFF, each number a Python object (a
    RATIONAL about 9 us and 230 bytes): 2,000,000 of them in 16 MB took 17 s and 460 MB."""
    monkeypatch.setattr(tiff, "MAX_EXIF_NUMBERS", 100)
    assert decode_image(_tiff_with_exif(100), max_pixels=LIMIT).size == (1, 1)
    data = _tiff_with_exif(101)
    assert _refused(data, "101 numbers") == ("TIFF's EXIF, GPS and Interop directories hold 101 numbers, more than "
                                             "the limit of 100; strip the image's metadata")
    _dataset_skips(data, tmp_path)
    # one directory that is the Exif, GPS and Interop one is read three times: counted each time (with its pointer)
    three = (34665, 34853, 40965)
    assert decode_image(_tiff_with_exif(32, pointers=three, interop=True), max_pixels=LIMIT).size == (1, 1)
    assert "hold 102 numbers" in _refused(_tiff_with_exif(33, pointers=three, interop=True), "numbers")
    twice = _tiff_with_exif(1, pointers=(34665, 34665))  # which one Pillow follows depends on the other tags
    assert _refused(twice, "more than once") == ("TIFF names its EXIF, GPS or Interop directory more than once; "
                                                 "refused")


def test_a_real_tiff_of_ten_thousand_one_row_strips_still_decodes(monkeypatch):
    """What a scanner writes: the default bound leaves room for one row a strip up to 32,768 rows, uncompressed
    (Pillow reads each strip in Python) or not."""
    monkeypatch.setattr(TiffImagePlugin, "WRITE_LIBTIFF", True)  # libtiff writes the strips asked for, uncompressed too
    img = _grey(3, 10_000)
    data = _encode(img, "TIFF", strip_size=3)
    with Image.open(io.BytesIO(data)) as opened:
        assert len(opened.tag_v2[273]) == 10_000
    decoded = decode_image(data, max_pixels=LIMIT)
    assert np.array_equal(np.asarray(decoded), np.asarray(img))
    lzw = _encode(img, "TIFF", compression="tiff_lzw", strip_size=3)
    assert np.array_equal(np.asarray(decode_image(lzw, max_pixels=LIMIT)), np.asarray(img))


def test_ordinary_tiffs_gifs_and_bmps_still_decode():
    img = _grey(64, 48)
    rgb = Image.merge("RGB", (img, img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), img))
    sixteen = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    frames = [img.point(lambda v, i=i: (v + 9 * i) % 256) for i in range(20)]
    files = {
        "rgb.tif": (_encode(rgb, "TIFF"), rgb),
        "lzw16.tif": (_encode(sixteen, "TIFF", compression="tiff_lzw"), sixteen),
        "exif-gps.tif": (_encode(rgb, "TIFF", tiffinfo=_exif_and_gps()), rgb),
        "animated.gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0, comment=b"hi"),
                         frames[0]),  # the first frame
        "rgb.bmp": (_encode(rgb, "BMP"), rgb),
        "small-rle8.bmp": (_bmp_rle(64, 48, _rle8_runs(64, 48)), Image.new("L", (64, 48), 7)),
    }
    for name, (data, expected) in files.items():
        decoded = decode_image(data, max_pixels=LIMIT)
        assert np.array_equal(np.asarray(decoded), np.asarray(expected)), name


def _exif_and_gps() -> TiffImagePlugin.ImageFileDirectory_v2:
    """A camera's Exif and GPS directories, as Pillow writes them into a TIFF (5 numbers)."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[34665] = {33434: 0.01, 37386: 4.5}  # ExposureTime, FocalLength
    info[34853] = {1: "N", 2: (1.0, 2.0, 3.0)}  # GPSLatitudeRef, GPSLatitude
    return info


def test_a_gif_of_more_blocks_before_its_first_image_than_the_bound_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(gif_bmp, "MAX_GIF_BLOCKS", 60)
    assert decode_image(_gif(_comments(20)), max_pixels=LIMIT).size == (1, 1)  # 3 reads each: 60
    data = _gif(_comments(21))
    assert _refused(data, "GIF") == ("GIF has more than 60 extension blocks (or stray bytes) before its first image, "
                                     "each read one by one; refused")
    _dataset_skips(data, tmp_path)
    one_comment = b"\x21\xfe" + b"\x01A" * 100 + b"\x00"  # one comment of 100 one-byte sub-blocks
    _refused(_gif(one_comment), "more than 60 extension blocks")
    _refused(_gif(b"\0" * 100), "stray bytes")  # Pillow skips bytes that start no block, one at a time


def test_gif_blocks_after_the_first_image_are_not_read_and_not_counted(monkeypatch):
    """Pillow reads a GIF's later frames only when asked to (n_frames is lazy): they cost nothing here."""
    monkeypatch.setattr(gif_bmp, "MAX_GIF_BLOCKS", 60)
    assert decode_image(_gif(b"", _comments(10_000)), max_pixels=LIMIT).size == (1, 1)


def test_a_gif_extension_that_runs_past_its_end_is_counted_as_pillow_reads_it(monkeypatch):
    """A NETSCAPE block with no loop sub-block: Pillow reads on past its end, into what follows, and so does the
    count (a walk that stopped at the terminator would see one small extension and then the image)."""
    monkeypatch.setattr(gif_bmp, "MAX_GIF_BLOCKS", 60)
    netscape = b"\x21\xff\x0bNETSCAPE2.0\x00"  # its terminator is read as the loop sub-block
    run_on = b"\x2c" + bytes(44) + b"\x01A" * 100 + b"\x00"  # Pillow: sub-blocks of 44, then 1 byte each; a walk
    _refused(_gif(netscape + run_on), "more than 60 extension blocks")  # that stops at the end sees an image (0x2c)


def test_an_rle_bmp_of_more_data_than_the_bound_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(gif_bmp, "MAX_BMP_RLE_BYTES", 1000)
    body = _rle8_runs(99, 5)  # 5 * 200 + 2 bytes
    assert decode_image(_bmp_rle(99, 5, body[:-2]), max_pixels=LIMIT).size == (99, 5)  # 1000 bytes, no end mark
    data = _bmp_rle(99, 5, body)
    assert _refused(data, "1002 bytes") == ("RLE-compressed BMP holds 1002 bytes of image data, more than the limit "
                                            "of 1000 (Pillow decodes it in Python); re-save it uncompressed or as PNG")
    _dataset_skips(data, tmp_path)


def test_an_rle4_bmp_of_more_pixels_than_the_bound_is_refused(monkeypatch):
    """RLE4 is decoded pixel by pixel in Python: 340 KB of long runs made 40 M pixels in 7 s."""
    monkeypatch.setattr(gif_bmp, "MAX_BMP_RLE4_PIXELS", 600 * 10)
    assert decode_image(_bmp_rle(600, 10, _rle4_long_runs(600, 10), rle4=True), max_pixels=LIMIT).size == (600, 10)
    assert _refused(_bmp_rle(600, 11, _rle4_long_runs(600, 11), rle4=True), "6600 pixels") == (
        "RLE4-compressed BMP of 6600 pixels, more than the limit of 6000 (Pillow decodes it pixel by pixel in Python); "
        "re-save it uncompressed or as PNG")


JUNK = {"zeros": b"\0", "stuffed 0xFF 0x00 pairs": b"\xff\0", "text": b"junk"}


@pytest.mark.parametrize("kind", list(JUNK))
def test_a_jpeg_of_more_junk_between_its_segments_than_the_bound_is_refused(kind, monkeypatch, tmp_path):
    """Pillow skips each byte between a JPEG's segments that is no marker with a step in Python (4 MB of zeros took
    0.56 s, 16 MB 1.9 s, 16 MB of 0xFF 0x00 pairs 6 s, and each decoded): the bytes are counted before it opens the
    file, wherever they lie before the first scan."""
    monkeypatch.setattr(jpeg, "MAX_JPEG_JUNK_BYTES", 100)
    unit = JUNK[kind]
    clean = np.asarray(decode_image(_jpeg_junk(), max_pixels=LIMIT))
    fits = _jpeg_junk(unit * (60 // len(unit)), unit * (40 // len(unit)))  # 100 bytes, in two places
    assert np.array_equal(np.asarray(decode_image(fits, max_pixels=LIMIT)), clean)  # libjpeg skips them too
    data = _jpeg_junk(unit * (60 // len(unit)), unit * (40 // len(unit)) + b"\0")
    assert _refused(data, "junk") == ("JPEG has more than 100 bytes of junk between its segments (Pillow skips them "
                                      "one by one); re-save the image")
    _dataset_skips(data, tmp_path)


@pytest.mark.parametrize("after", ["fill bytes", "segments"])
def test_segments_after_junk_are_counted_as_pillow_reads_them(after, monkeypatch):
    """Past junk, Pillow reads on to the next marker: the segments and 0xFF fill bytes there are as many steps in
    Python as any (the walk used to stop at the junk and count none of them)."""
    monkeypatch.setattr(jpeg, "MAX_HEADER_SEGMENTS", 30)
    unit = b"\xff" if after == "fill bytes" else b"\xff\xfe\x00\x02"  # fill before the next marker, or comments
    # the photo has 8 segments before its scan (APP0, two DQT, SOF0, four DHT)
    assert decode_image(_jpeg_junk(b"\0" + unit * 22), max_pixels=LIMIT).size == (24, 16)
    assert _refused(_jpeg_junk(b"\0" + unit * 23), "marker segments") == (
        "JPEG has more than 30 marker segments before its image data; refused")


# -- over HTTP: the real app, a test-double model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("bounds") / "fake")
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False)
        with TestClient(create_app(settings)) as c:
            yield c


# name -> (the module and constant lowered, its value, the file past it, the content type, words of the reason)
HOSTILE = {
    "strips.tif": (tiff, "MAX_TIFF_STRIPS", 40, lambda: _tiff(41), "image/tiff", "41 strips"),
    "bigtiff.tif": (tiff, "MAX_TIFF_STRIPS", 40, lambda: _tiff(41, big=True), "image/tiff", "41 strips"),
    "exif.tif": (tiff, "MAX_EXIF_NUMBERS", 100, lambda: _tiff_with_exif(101), "image/tiff", "101 numbers"),
    "comments.gif": (gif_bmp, "MAX_GIF_BLOCKS", 60, lambda: _gif(_comments(21)), "image/gif", "extension blocks"),
    "junk.jpg": (jpeg, "MAX_JPEG_JUNK_BYTES", 100, lambda: _jpeg_junk(bytes(101)), "image/jpeg",
                 "bytes of junk"),
    "rle8.bmp": (gif_bmp, "MAX_BMP_RLE_BYTES", 1000, lambda: _bmp_rle(99, 5, _rle8_runs(99, 5)), "image/bmp",
                 "1002 bytes"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_server_answers_400_naming_the_bound(name, client, monkeypatch):
    module, constant, value, make, media, words = HOSTILE[name]
    monkeypatch.setattr(module, constant, value)
    data = make()
    for sent in ({"content": data, "headers": {"content-type": media}}, {"files": {"file": (name, data, media)}}):
        r = client.post(URL, **sent)
        assert r.status_code == 400, r.text  # as a JPEG of too many scans or a PNG of too many chunks
        assert words in r.json()["error"], r.json()


def test_the_server_still_classifies_files_at_the_bounds(client, monkeypatch):
    for module, constant, value in ((tiff, "MAX_TIFF_STRIPS", 40), (gif_bmp, "MAX_GIF_BLOCKS", 60),
                                    (gif_bmp, "MAX_BMP_RLE_BYTES", 1002)):
        monkeypatch.setattr(module, constant, value)
    for data in (_tiff(40), _gif(_comments(20)), _bmp_rle(99, 5, _rle8_runs(99, 5))):
        r = client.post(URL, content=data, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text


def test_the_readme_states_the_bounds_the_code_applies():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| what Pillow parses one step at a time"))
    stated = (f"{tiff.MAX_TIFF_STRIPS:,}; {tiff.MAX_EXIF_NUMBERS:,}; {gif_bmp.MAX_GIF_BLOCKS:,}; "
              f"{gif_bmp.MAX_BMP_RLE_BYTES >> 20} MiB and {gif_bmp.MAX_BMP_RLE4_PIXELS:,} pixels; "
              f"{jpeg.MAX_JPEG_JUNK_BYTES:,}")
    assert f"| {stated} | fixed | 400 |" in row, row
