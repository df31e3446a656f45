"""An image's EXIF block is bounded as a TIFF's EXIF directories are: turning a PNG, WebP, JPEG or AVIF upright,
Pillow re-writes its EXIF block (`Exif.tobytes`), making a Python object of every number in its first directory and
in the Exif, GPS and Interop ones (an 8 MB PNG eXIf chunk of 1,000,000 RATIONALs took 14 s and 360 MB), and it does
the same inside `Image.open` for an AVIF whose own orientation (irot/imir) differs from its EXIF's. A block of more
than MAX_EXIF_NUMBERS numbers is refused with one line, whatever its orientation (for an AVIF before Pillow opens
it): the server answers 400, training counts the file as unreadable. The bound is lowered here so that the hostile
files stay small; ordinary oriented photos still come out upright."""

from __future__ import annotations

import io
import struct
import zlib

import fake_runtime
import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError, features
from test_decode_structure_bounds import _dataset_skips, _refused

from models.decoding import decode_image
from models.imagecheck import avif as avif_check
from models.imagecheck import check_structure, jpeg, tiff
from models.imagecheck.common import DecodeError

LIMIT = 40_000_000
URL = "/v1/models/fake/classify"
BOUND = 100  # MAX_EXIF_NUMBERS, lowered
EXIF_IFD, GPS_IFD, INTEROP_IFD = 34665, 34853, 40965
avif = pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF codec")


@pytest.fixture
def bound(monkeypatch):
    monkeypatch.setattr(tiff, "MAX_EXIF_NUMBERS", BOUND)


# -- files ------------------------------------------------------------------------------------------------------------

def _exif(numbers: int, orientation: int = 6, *, sub: int = 0, pointers: tuple[int, ...] = (EXIF_IFD,),
          interop: bool = False) -> bytes:
    """An EXIF block (a little-endian TIFF): a first directory of the Orientation and, with `numbers`, one tag of that
    many RATIONALs; with `sub`, each of `pointers` (LONGs) points at one directory of `sub` RATIONALs and, with
    `interop`, an Interop pointer to itself. Numbers: 1 + `numbers` (+ one a pointer) in the first directory."""
    entries = [(274, 3, 1, orientation)] + ([(65000, 5, numbers, None)] if numbers else [])
    entries += [(p, 4, 1, "sub") for p in pointers] if sub else []
    entries.sort()
    first_data = 8 + 2 + 12 * len(entries) + 4
    sub_at = first_data + 8 * numbers
    own = [(INTEROP_IFD, 4, 1, sub_at)] if interop else []
    sub_data = sub_at + 2 + 12 * (len(own) + 1) + 4

    def field(typ: int, value: int | str | None) -> bytes:
        if value is None:
            return struct.pack("<I", first_data)
        return struct.pack("<I", sub_at) if value == "sub" else struct.pack("<HH", value, 0) if typ == 3 else \
            struct.pack("<I", value)

    head = b"II*\0" + struct.pack("<IH", 8, len(entries))
    first = b"".join(struct.pack("<HHI", t, ty, c) + field(ty, v) for t, ty, c, v in entries) + bytes(4)
    block = head + first + b"\1\0\0\0\2\0\0\0" * numbers
    if sub:
        block += (struct.pack("<H", len(own) + 1) + b"".join(struct.pack("<HHII", *e) for e in own)
                  + struct.pack("<HHII", 65001, 5, sub, sub_data) + bytes(4) + b"\3\0\0\0\4\0\0\0" * sub)
    return block


def _photo(w: int = 24, h: int = 16) -> Image.Image:
    """An RGB picture with no symmetry: each of the eight stored forms differs."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([10 * x + 5, 15 * y + 20, 250 - 5 * x - 7 * y], -1).astype(np.uint8))


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_exif_after_pixels(block: bytes) -> bytes:
    """A PNG whose eXIf chunk follows its image data: Pillow reads it only as it loads the pixels."""
    png = _encode(_photo(), "PNG")
    end = png.rindex(b"IEND") - 4
    return png[:end] + _chunk(b"eXIf", block) + png[end:]


def _raw_profile(block: bytes) -> str:
    """ImageMagick's "Raw profile type exif" text: a name, the length, the block in hex."""
    data = b"Exif\0\0" + block
    return f"\nexif\n{len(data):8}\n{data.hex()}\n"


def _png_text(key: str, value: str, *, zip: bool) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(key, value, zip=zip)
    return _encode(_photo(), "PNG", pnginfo=info)


def _jpeg_split(block: bytes, parts: int) -> bytes:
    """A JPEG whose EXIF block lies in `parts` APP1 segments: Pillow joins them into one (so one is not bounded by
    a segment's 64 KiB)."""
    jpeg = _encode(_photo(), "JPEG", quality=95)
    step = -(-len(block) // parts)
    app1 = b""
    for i in range(0, len(block), step):
        payload = b"Exif\0\0" + block[i:i + step]
        app1 += b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + app1 + jpeg[2:]


CONTAINERS = {  # name -> (EXIF block -> image file)
    "png eXIf": lambda block: _encode(_photo(), "PNG", exif=block),
    "png eXIf after the pixels": _png_exif_after_pixels,
    "png zTXt raw profile": lambda block: _png_text("Raw profile type exif", _raw_profile(block), zip=True),
    "png tEXt exif": lambda block: _png_text("exif", block.decode("latin-1"), zip=False),
    "webp": lambda block: _encode(_photo(), "WEBP", lossless=True, exif=b"Exif\0\0" + block),
    "jpeg": lambda block: _encode(_photo(), "JPEG", quality=95, exif=b"Exif\0\0" + block),
    "jpeg in 3 APP1 segments": lambda block: _jpeg_split(block, 3),
}


# -- AVIF, laid out as other writers may ------------------------------------------------------------------------------

def _boxes(data: bytes, start: int, end: int) -> list[tuple[bytes, bytes]]:
    """(type, payload) of the plain 32-bit-sized boxes between `start` and `end` (what Pillow writes)."""
    out = []
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        out.append((kind, data[start + 8:start + size]))
        start += size
    return out


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _avif(block: bytes, orientation: int = 1, img: Image.Image | None = None) -> bytes:
    """An AVIF of `img` whose EXIF is `block` (Pillow stores the orientation as irot/imir, the rest in an Exif item)."""
    exif = Image.Exif()
    exif.load(b"Exif\0\0" + block)
    exif[274] = orientation
    return _encode(img or _photo(), "AVIF", exif=exif, quality=100)


def _more_ipma(iprp: bytes, n: int) -> bytes:
    """An item properties box (iprp) whose association box (ipma, version 0) names `n` more items, of no property."""
    (_, ipco), (_, ipma) = _boxes(iprp, 0, len(iprp))
    count = struct.unpack_from(">I", ipma, 4)[0] + n
    more = b"".join(struct.pack(">HB", item, 0) for item in range(200, 200 + n))  # after Pillow's IDs, increasing
    return _box(b"ipco", ipco) + _box(b"ipma", ipma[:4] + struct.pack(">I", count) + ipma[8:] + more)


def _more_iref(iref: bytes, n: int) -> bytes:
    """An item reference box (iref, version 0) that names `n` more items: one cdsc box from one of them to the
    others."""
    return iref + _box(b"cdsc", struct.pack(">HH", 300, n - 1) + b"".join(
        struct.pack(">H", item) for item in range(301, 300 + n))) if n else iref


def _relaid(data: bytes, *, pieces: int = 1, idat: bool = False, whole: bool = False, extra: int = 0,
            boxes: int = 0, ipma: int = 0, iref: int = 0) -> bytes:
    """The same AVIF with its Exif item in `pieces` extents (with `whole`, each all of it, one after another) and,
    with `idat`, in the meta box's idat (iloc version 1, construction method 1); with `extra` more items (of no
    data) named in its iloc and iinf boxes, `ipma` others in its ipma box and `iref` others in its iref box, and
    `boxes` empty free boxes before its meta box. The other items' file offsets move with what precedes them."""
    (_, ftyp), (_, meta), (_, mdat) = _boxes(data, 0, len(data))
    children = _boxes(meta, 4, len(meta))
    infos = dict(children)[b"iinf"]
    exif_id = next(struct.unpack_from(">H", p, 4)[0] for _, p in _boxes(infos, 6, len(infos)) if p[8:12] == b"Exif")
    iloc = dict(children)[b"iloc"]
    assert iloc[:6] == b"\0\0\0\0\x44\x00", "Pillow's iloc: version 0, 4-byte offsets and lengths, no base offset"
    items = {}
    for i in range(struct.unpack_from(">H", iloc, 6)[0]):  # one extent each, as Pillow writes them
        item, _, _, offset, length = struct.unpack_from(">HHHII", iloc, 8 + 14 * i)
        items[item] = (offset, length)
    offset, length = items[exif_id]
    payload = data[offset:offset + length]
    cuts = [length * k // pieces for k in range(pieces + 1)]
    spans = [(0, length)] * pieces if whole else [(cuts[k], cuts[k + 1] - cuts[k]) for k in range(pieces)]

    more = range(100, 100 + extra)
    infe = infos[:4] + struct.pack(">H", struct.unpack_from(">H", infos, 4)[0] + extra) + infos[6:] + b"".join(
        _box(b"infe", struct.pack(">B3xHH4s", 2, item, 0, b"mime") + b"\0\0") for item in more)

    def meta_box(moved: int) -> bytes:
        iloc = struct.pack(">B3xBBH", 1, 0x44, 0x00, len(items) + extra)  # 4-byte offsets and lengths, no base
        iloc += b"".join(struct.pack(">HHHH", item, 0, 0, 0) for item in more)  # no extents
        for item, (at, size) in items.items():
            if item == exif_id:
                base = 0 if idat else at + moved
                iloc += struct.pack(">HHHH", item, int(idat), 0, pieces) + b"".join(
                    struct.pack(">II", base + start, size) for start, size in spans)
            else:
                iloc += struct.pack(">HHHHII", item, 0, 0, 1, at + moved, size)
        relaid = {b"iloc": iloc, b"iinf": infe, b"iprp": _more_ipma(dict(children)[b"iprp"], ipma),
                  b"iref": _more_iref(dict(children)[b"iref"], iref)}
        kids = b"".join(_box(kind, relaid.get(kind, p)) for kind, p in children)
        return _box(b"meta", meta[:4] + kids + (_box(b"idat", payload) if idat else b""))

    moved = len(meta_box(0)) - (8 + len(meta)) + 8 * boxes
    return _box(b"ftyp", ftyp) + _box(b"free", b"") * boxes + meta_box(moved) + _box(b"mdat", mdat)


# -- the shared decode rule -------------------------------------------------------------------------------------------

# _refused and _dataset_skips: test_decode_structure_bounds's, the one decode rule both files check.


@pytest.mark.parametrize("container", list(CONTAINERS))
def test_an_exif_block_of_more_numbers_than_the_bound_is_refused(container, bound, tmp_path):
    """Wherever Pillow finds the EXIF block (a PNG's eXIf chunk before or after its pixels, its hex "Raw profile type
    exif" or raw "exif" text, a WebP's EXIF chunk, a JPEG's APP1 segments joined), its numbers are counted."""
    make = CONTAINERS[container]
    assert decode_image(make(_exif(BOUND - 1)), max_pixels=LIMIT).size == (16, 24)  # 100 numbers: turned upright
    data = make(_exif(BOUND))
    fmt = Image.open(io.BytesIO(data)).format
    assert _refused(data, "101 numbers") == (
        f"{fmt} image's EXIF metadata holds 101 numbers, more than the limit of 100; strip the image's metadata")
    _dataset_skips(data, tmp_path)


def test_the_bound_holds_whatever_the_orientation(bound):
    """Pillow re-writes the block only to turn the image, but one rule for every reader and every file: the block's
    size decides, as it does for a TIFF."""
    for orientation in (1, 6):
        _refused(CONTAINERS["png eXIf"](_exif(BOUND, orientation)), "101 numbers")
    assert decode_image(CONTAINERS["png eXIf"](_exif(BOUND - 1, 1)), max_pixels=LIMIT).size == (24, 16)


def test_each_directory_is_counted_each_time_pillow_reads_it(bound):
    """Re-writing a block, Pillow reads the Exif and GPS directories its first one points to, and the Interop one the
    Exif directory points to: one directory pointed to as all three is read three times."""
    png = CONTAINERS["png eXIf"]
    three = (EXIF_IFD, GPS_IFD)
    # the first directory: the Orientation and 2 pointers; the shared one: 32 numbers (one its Interop pointer), x 3
    assert decode_image(png(_exif(0, sub=31, pointers=three, interop=True)), max_pixels=LIMIT).size == (16, 24)
    _refused(png(_exif(0, sub=32, pointers=three, interop=True)), "102 numbers")  # 3 + 33 x 3
    # the Interop directory is read where the Exif directory names it (a TIFF's, where its first directory does)
    assert decode_image(png(_exif(0, sub=48, interop=True)), max_pixels=LIMIT).size == (16, 24)  # 2 + 49 x 2
    _refused(png(_exif(0, sub=49, interop=True)), "102 numbers")


def test_a_directory_named_twice_or_too_long_is_refused_naming_the_exif_block(bound, monkeypatch):
    png = CONTAINERS["png eXIf"]
    twice = _exif(0, sub=1, pointers=(EXIF_IFD, EXIF_IFD))
    assert _refused(png(twice), "more than once") == (
        "PNG image's EXIF metadata names its EXIF, GPS or Interop directory more than once; refused")
    monkeypatch.setattr(tiff, "MAX_HEADER_SEGMENTS", 3)
    many = _exif(1, sub=1, pointers=(EXIF_IFD, GPS_IFD))  # 4 entries in the first directory
    assert _refused(png(many), "4 entries") == (
        "PNG image's EXIF metadata has a directory of 4 entries, more than the limit of 3; refused")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own word on these
def test_a_broken_exif_block_costs_nothing_and_the_image_still_decodes(bound):
    """What Pillow cannot read as a TIFF it reads no number of: the image is decoded as it is."""
    for block in (b"", b"II*\0", b"not a tiff at all", b"MM\0*\0\0\0\x08\0\0", b"II*\0\xff\xff\xff\x7f",
                  _exif(BOUND)[:6]):
        assert decode_image(CONTAINERS["webp"](block), max_pixels=LIMIT).size == (24, 16)


def test_a_jpeg_exif_block_in_more_app1_segments_than_the_bound_is_refused(monkeypatch, tmp_path):
    """Pillow joins a JPEG's EXIF APP1 segments into one block, copying all it has at each (250 segments of 64 KiB,
    16 MB, took 4.4 s whatever they held): they are counted before it opens the file."""
    monkeypatch.setattr(jpeg, "MAX_JPEG_EXIF_SEGMENTS", 3)
    assert decode_image(_jpeg_split(_exif(20), 3), max_pixels=LIMIT).size == (16, 24)
    data = _jpeg_split(_exif(20), 4)
    with pytest.raises(DecodeError) as exc:
        check_structure(data)
    assert exc.value.reason == ("JPEG's EXIF metadata lies in more than 3 APP1 segments (Pillow joins them one by "
                                "one); strip the image's metadata")
    _refused(data, "APP1 segments")
    _dataset_skips(data, tmp_path)


@avif
def test_an_avif_exif_item_of_too_many_numbers_is_refused_before_pillow_opens_it(bound, tmp_path):
    """Pillow re-writes an AVIF's EXIF inside `Image.open` when the file's irot/imir orientation differs from the
    EXIF's (every file Pillow writes with one): the Exif item is found and counted before that, however it is laid
    out (one extent or several, in the file or in the meta box's idat)."""
    # Pillow writes the Orientation as irot (and puts it back as it opens the file): the items hold 99 and 101
    fine, hostile = _avif(_exif(BOUND - 1), 6), _avif(_exif(BOUND + 1), 6)
    for layout in ({}, {"pieces": 3}, {"idat": True}, {"pieces": 2, "idat": True}):
        good = _relaid(fine, **layout) if layout else fine
        with Image.open(io.BytesIO(good)) as opened:  # libavif reads this layout: Pillow sees the whole block
            assert len(opened.getexif()[65000]) == BOUND - 1, layout
        check_structure(good)
        assert decode_image(good, max_pixels=LIMIT).size == (16, 24), layout
        bad = _relaid(hostile, **layout) if layout else hostile
        with pytest.raises(DecodeError) as exc:
            check_structure(bad)  # before Image.open
        assert exc.value.reason.startswith("AVIF image's EXIF metadata holds 101 numbers"), (layout, exc.value.reason)
        _refused(bad, "101 numbers")
    _dataset_skips(hostile, tmp_path)


@avif
def test_an_avif_of_more_items_or_boxes_than_the_bounds_is_refused(monkeypatch):
    """libavif finds each item by a search through those it has (100,000 items named in a 1 MB iloc box took 49 s),
    and the walk to the Exif item goes box by box: both are bounded."""
    monkeypatch.setattr(avif_check, "MAX_AVIF_ITEMS", 8)
    data = _avif(_exif(5), 6)  # two items: the picture and its Exif
    assert decode_image(_relaid(data, extra=6), max_pixels=LIMIT).size == (16, 24)
    assert _refused(_relaid(data, extra=7), "AVIF") == (
        "AVIF has more than 8 items (libavif finds each by a search through the others); refused")
    monkeypatch.setattr(avif_check, "MAX_HEADER_SEGMENTS", 10)
    assert decode_image(_relaid(data, boxes=7), max_pixels=LIMIT).size == (16, 24)  # ftyp, 7 free, meta, mdat
    assert _refused(_relaid(data, boxes=8), "AVIF") == "AVIF has more than 10 boxes; refused"


@avif
@pytest.mark.parametrize("box", ["ipma", "iref"])
def test_an_avif_naming_more_items_in_its_ipma_or_iref_box_than_the_bound_is_refused(box, monkeypatch, tmp_path):
    """libavif makes an item of each ID its item property association (ipma) or reference (iref) box names too,
    each found by the same search (20,000 ipma entries in a 100 KB file took 1 s; 20,000 dimg references as long):
    each box's IDs are counted as iloc's and iinf's are, before Pillow opens the file."""
    monkeypatch.setattr(avif_check, "MAX_AVIF_ITEMS", 8)
    data = _avif(_exif(5), 6)  # Pillow's ipma names one item (the picture), its iref two (the Exif describes it)
    fits = _relaid(data, **{box: 7 if box == "ipma" else 6})
    with Image.open(io.BytesIO(fits)) as opened:  # libavif reads the extra IDs: the file is whole
        assert opened.size == (24, 16)
    assert decode_image(fits, max_pixels=LIMIT).size == (16, 24)
    hostile = _relaid(data, **{box: 8 if box == "ipma" else 7})
    with pytest.raises(DecodeError) as exc:
        check_structure(hostile)  # before Image.open
    assert exc.value.reason == "AVIF has more than 8 items (libavif finds each by a search through the others); refused"
    _refused(hostile, "more than 8 items")
    _dataset_skips(hostile, tmp_path)


@avif
def test_an_avif_exif_item_in_too_many_pieces_or_larger_than_the_file_is_refused(monkeypatch):
    """libavif joins an item's extents, which may overlap: more than the file holds it refuses, and so does the
    check (which would otherwise join them itself); a real Exif item is one extent."""
    data = _avif(_exif(5), 6)
    monkeypatch.setattr(avif_check, "MAX_HEADER_SEGMENTS", 10)
    assert decode_image(_relaid(data, pieces=10), max_pixels=LIMIT).size == (16, 24)
    assert _refused(_relaid(data, pieces=11), "AVIF") == "AVIF's Exif item lies in more than 10 pieces; refused"
    assert decode_image(_relaid(data, pieces=2, whole=True), max_pixels=LIMIT).size == (16, 24)  # read twice over
    too_big = _relaid(data, pieces=10, whole=True)
    assert "more than the file's" in _refused(too_big, "AVIF's Exif items span")
    with pytest.raises(UnidentifiedImageError):  # libavif refuses it too
        Image.open(io.BytesIO(too_big))


# -- ordinary photos --------------------------------------------------------------------------------------------------

def _camera_exif(orientation: int) -> Image.Exif:
    """What a camera writes: a few dozen numbers, text, Exif and GPS directories."""
    exif = Image.Exif()
    exif.load(b"Exif\0\0" + _exif(40, orientation, sub=20, pointers=(EXIF_IFD, GPS_IFD)))
    exif[271], exif[272] = "Camera maker", "Model 7"
    exif[0x011A], exif[0x011B], exif[0x0128] = 72.0, 72.0, 2
    return exif


# How a camera stores the upright picture under each orientation (the inverse of what the orientation says to do).
_STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
          5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
          8: Image.Transpose.ROTATE_270}

ORIENTED = {  # format -> (file of `stored` with `exif`, whether the pixels survive exactly)
    "PNG": (lambda img, exif: _encode(img, "PNG", exif=exif), True),
    "WEBP": (lambda img, exif: _encode(img, "WEBP", lossless=True, exif=exif), True),
    "TIFF": (lambda img, exif: _encode(img, "TIFF", exif=exif), True),
    "JPEG": (lambda img, exif: _encode(img, "JPEG", quality=95, exif=exif), False),
    "AVIF": (lambda img, exif: _encode(img, "AVIF", quality=100, exif=exif), False),
}


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("fmt", list(ORIENTED))
def test_an_oriented_photo_with_a_camera_exif_block_still_comes_out_upright(fmt, orientation):
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("this Pillow has no AVIF codec")
    make, exact = ORIENTED[fmt]
    upright = _photo()
    stored = upright.transpose(_STORE[orientation])
    data = make(stored, _camera_exif(orientation))
    decoded = decode_image(data, max_pixels=LIMIT)
    assert decoded.size == upright.size
    with Image.open(io.BytesIO(data)) as opened:  # Pillow's own turn of the same file: the same pixels
        assert np.array_equal(np.asarray(decoded), np.asarray(ImageOps.exif_transpose(opened).convert("RGB")))
    if exact:
        assert np.array_equal(np.asarray(decoded), np.asarray(upright))
    else:  # lossy: near the upright picture, far from any other of the eight forms
        err = np.abs(np.asarray(decoded, np.int16) - np.asarray(upright, np.int16)).mean()
        assert err < 6, err



# -- over HTTP: the real app, a test-double model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("exif") / "fake")
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False)
        with TestClient(create_app(settings)) as c:
            yield c


HOSTILE = {  # name -> (EXIF block -> file, content type)
    "exif.png": (CONTAINERS["png eXIf"], "image/png"),
    "exif.webp": (CONTAINERS["webp"], "image/webp"),
    "exif.jpg": (CONTAINERS["jpeg in 3 APP1 segments"], "image/jpeg"),
}
if features.check("avif"):
    HOSTILE["exif.avif"] = (lambda block: _avif(block, 6), "image/avif")


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_server_answers_400_naming_the_bound_and_classifies_a_file_at_it(name, client, bound):
    make, media = HOSTILE[name]
    data = make(_exif(BOUND))
    for sent in ({"content": data, "headers": {"content-type": media}}, {"files": {"file": (name, data, media)}}):
        r = client.post(URL, **sent)
        assert r.status_code == 400, r.text
        assert "101 numbers" in r.json()["error"], r.json()
    r = client.post(URL, content=make(_exif(BOUND - 1)), headers={"content-type": media})
    assert r.status_code == 200, r.text


def test_the_readme_states_the_bounds_the_code_applies():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| an image's EXIF block"))
    stated = (f"{tiff.MAX_EXIF_NUMBERS:,}; {jpeg.MAX_JPEG_EXIF_SEGMENTS:,}; "
              f"{avif_check.MAX_AVIF_ITEMS:,}")
    assert f"| {stated} | fixed | 400 |" in row, row
