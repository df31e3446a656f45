"""One image decoder rule for the server and the dataset side (training, train.eval, export parity and calibration,
serve.sample): an image the server refuses is unreadable to a dataset too, with the same reason, and an image both
read decodes to the same pixels and the same model input on both."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.datasets import UnreadableImage, decode_checked, load_dataset
from models.decoding import decode_image
from models.imagecheck.common import MAX_HEADER_SEGMENTS, DecodeError
from models.imagecheck.jpeg import MAX_JPEG_SCANS, jpeg_scans
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS, PNG_TEXT_BYTES, Preprocessing, preprocess
from serve.imaging import ImageError, load_pixels, open_image, pixel_limit, prepare

LIMIT = DEFAULT_MAX_IMAGE_PIXELS  # the server's default and the dataset readers' bound
SPECS = (Preprocessing(resize=40, crop=32), Preprocessing(resize=40, crop=32, mean=(0.3,) * 3, std=(0.2,) * 3,
                                                           mode="L"))


def _photo(w: int = 64, h: int = 48) -> Image.Image:
    """A smooth colour picture with some noise (JPEG-friendly, not flat)."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 8, (h, w))
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + noise], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _served_pixels(data: bytes) -> Image.Image:
    """What the server decodes (prepare's `open_image` + `load_pixels`, in its `pixel_limit`), JPEG draft off."""
    with pixel_limit(LIMIT):
        return load_pixels(open_image(data, max_pixels=LIMIT))


# -- ordinary images: the same pixels on both sides -----------------------------------------------------------------

ORDINARY = {
    "rgb.png": lambda: _encode(_photo(), "PNG"),
    "grey.png": lambda: _encode(_photo().convert("L"), "PNG"),
    "palette.png": lambda: _encode(_photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
    "palette-transparent.png": lambda: _encode(_photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=32),
                                               "PNG", transparency=3),
    "baseline.jpg": lambda: _encode(_photo(), "JPEG", quality=90),
    "progressive.jpg": lambda: _encode(_photo(), "JPEG", quality=90, progressive=True),
    "lossy.webp": lambda: _encode(_photo(), "WEBP", quality=80),
    "lossless.webp": lambda: _encode(_photo(), "WEBP", lossless=True),
    "palette.gif": lambda: _encode(_photo().convert("P", palette=Image.Palette.ADAPTIVE), "GIF"),
    "grey.gif": lambda: _encode(_photo().convert("L"), "GIF", transparency=7),
    "rgb.bmp": lambda: _encode(_photo(), "BMP"),
    "cmyk.tif": lambda: _encode(_photo().convert("CMYK"), "TIFF"),
}


@pytest.mark.parametrize("name", sorted(ORDINARY))
def test_an_ordinary_image_decodes_to_the_same_pixels_on_both_sides(name, tmp_path):
    data = ORDINARY[name]()
    path = tmp_path / name
    path.write_bytes(data)
    read, served = decode_checked(path), _served_pixels(data)
    assert read is not None, name
    assert (read.mode, read.size) == (served.mode, served.size)
    assert np.array_equal(np.asarray(read), np.asarray(served))
    for spec in SPECS:  # and the model input training's evaluation makes is the one the server makes
        assert np.array_equal(preprocess([read], spec), prepare(data, spec, max_pixels=LIMIT, jpeg_draft=False))


# -- images the server refuses: unreadable to the dataset side too, for the same reason ------------------------------

def _png_two_profiles() -> bytes:
    png = _encode(_photo(8, 8), "PNG")
    profile = _chunk(b"iCCP", b"x\0\0" + zlib.compress(b"\0" * 128))
    return png[:33] + profile + profile + png[33:]


def _jpeg_with_scans(scans: int) -> bytes:
    """A valid progressive JPEG whose last scan is repeated until it has `scans` scans."""
    data = _encode(_photo(), "JPEG", quality=90, progressive=True)
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def _jpeg_with_segments(segments: int) -> bytes:
    jpeg = _encode(_photo(), "JPEG")
    return jpeg[:2] + b"\xff\xfe\x00\x02" * segments + jpeg[2:]  # empty comments


def _png_with_chunks(chunks: int) -> bytes:
    png = _encode(_photo(), "PNG")
    return png[:33] + _chunk(b"zzZz", b"") * chunks + png[33:]  # an ancillary type nobody reads


def _png_with_text(mebibytes: int) -> bytes:
    png = _encode(_photo(8, 8), "PNG")
    text = b"".join(_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"\0" * (1 << 20), 9)) for i in range(mebibytes))
    return png[:33] + text + png[33:]


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels and holds almost none (refused from its header)."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", zlib.compress(b"\0" * (w + 1))) + _chunk(b"IEND", b"")


REFUSED = {  # name -> (bytes, the server's status, words of the reason)
    "two-profiles.png": (_png_two_profiles, 400, "2 iCCP colour profile chunks"),
    "many-scans.jpg": (lambda: _jpeg_with_scans(MAX_JPEG_SCANS + 1), 400, f"more than {MAX_JPEG_SCANS} scans"),
    "many-segments.jpg": (lambda: _jpeg_with_segments(MAX_HEADER_SEGMENTS + 1), 400, "marker segments"),
    "many-chunks.png": (lambda: _png_with_chunks(MAX_HEADER_SEGMENTS + 1), 400, "chunks before its image data"),
    "much-text.png": (lambda: _png_with_text(PNG_TEXT_BYTES // (1 << 20) + 2), 400, "PNG text metadata"),
    "bad-crc.png": (lambda: _encode(_photo(), "PNG")[:29] + b"\0\0\0\0" + _encode(_photo(), "PNG")[33:], 400,
                    "fails its checksum"),
    "too-big.png": (lambda: _png_header_only(8000, 5001), 413, "more than the limit of 40000000"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_an_image_the_server_refuses_is_unreadable_to_the_dataset_side_too(name, tmp_path):
    make, status, words = REFUSED[name]
    data = make()
    with pytest.raises(ImageError) as served:
        prepare(data, SPECS[0], max_pixels=LIMIT)
    assert served.value.status == status and words in served.value.reason, served.value.reason
    with pytest.raises(DecodeError) as shared:  # the rule both sides call, word for word
        decode_image(data, max_pixels=LIMIT)
    assert shared.value.reason == served.value.reason
    path = tmp_path / name
    path.write_bytes(data)
    assert decode_checked(path) is None


def test_a_folder_skips_and_counts_what_the_server_refuses(tmp_path):
    cls = tmp_path / "ds" / "val" / "cat"
    cls.mkdir(parents=True)
    (cls / "a-ok.png").write_bytes(ORDINARY["rgb.png"]())
    (cls / "b-two-profiles.png").write_bytes(_png_two_profiles())
    (cls / "c-many-scans.jpg").write_bytes(_jpeg_with_scans(MAX_JPEG_SCANS + 1))
    (cls / "d-ok.jpg").write_bytes(ORDINARY["baseline.jpg"]())
    val = load_dataset(tmp_path / "ds", "val")
    chosen = val.readable_subset(len(val))
    assert [p.name for p in chosen.images.paths] == ["a-ok.png", "d-ok.jpg"]
    assert [p.name for p in chosen.skipped] == ["b-two-profiles.png", "c-many-scans.jpg"]
    assert chosen.note() == ", 2 unreadable files skipped"
    with pytest.raises(UnreadableImage, match="corrupt or unreadable image: .*b-two-profiles.png"):
        val.image(1)


def test_a_file_that_cannot_be_read_is_unreadable_not_an_error(tmp_path):
    assert decode_checked(tmp_path / "gone.png") is None
    assert decode_checked(Path(tmp_path)) is None  # a directory
    (tmp_path / "empty.png").write_bytes(b"")
    assert decode_checked(tmp_path / "empty.png") is None


def test_a_dataset_file_over_the_size_bound_is_unreadable_without_being_read_whole(tmp_path, monkeypatch):
    """decode_checked reads at most MAX_IMAGE_FILE_BYTES + 1 bytes of a file: a huge file named .jpg is skipped."""
    from data import datasets

    path = tmp_path / "big.png"
    Image.new("RGB", (8, 8)).save(path)
    assert datasets.decode_checked(path) is not None
    monkeypatch.setattr(datasets, "MAX_IMAGE_FILE_BYTES", path.stat().st_size - 1)
    assert datasets.decode_checked(path) is None


def test_data_after_a_jpegs_end_is_not_counted_as_its_scans(tmp_path):
    """A phone's Motion Photo appends a video after the JPEG's EOI: its bytes (0xFF 0xDA pairs among them) were
    counted as scans, refusing an 8 MB photo as 'JPEG has 153 scans' on every path."""
    photo = _encode(_photo(), "JPEG", quality=90, progressive=True)
    video = b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda\x00\x04\x00\x00" * (2 * MAX_JPEG_SCANS) + bytes(4096)
    motion = photo + video
    path = tmp_path / "motion.jpg"
    path.write_bytes(motion)
    assert np.array_equal(np.asarray(_served_pixels(motion)), np.asarray(_served_pixels(photo)))
    assert np.array_equal(np.asarray(decode_checked(path)), np.asarray(_served_pixels(photo)))
    # An EXIF thumbnail (a whole JPEG inside APP1, before the image's scans) is skipped by its length too.
    thumb = _encode(_photo(16, 12), "JPEG")
    app1 = b"Exif\x00\x00" + thumb
    with_thumb = photo[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + photo[2:]
    assert _served_pixels(with_thumb).size == _photo().size


def test_thousands_of_segments_between_scans_are_refused_after_a_bounded_walk():
    """Tiny segments after the first scan cost a Python step each: the walk stops at MAX_JPEG_MARKERS."""
    photo = _encode(_photo(), "JPEG", quality=90, progressive=True)
    first = photo.index(b"\xff\xda", photo.index(b"\xff\xda") + 2)  # the second scan
    padded = photo[:first] + b"\xff\xfe\x00\x02" * 5000 + photo[first:]
    with pytest.raises(DecodeError, match="scans \\(or 4096 markers\\); refused"):
        decode_image(padded, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)


@pytest.mark.timeout(60)  # linear: milliseconds; the quadratic pattern took 1.9 s for 20 KB, hours for this
def test_a_run_of_fill_bytes_is_walked_in_linear_time():
    """`\\xff+` before the marker byte made the scan walk quadratic in a run of 0xFF: a 30 KB body held the event
    loop (the cheap check) for 9 s."""
    photo = _encode(_photo(), "JPEG", quality=90)
    body = photo[:-2] + b"\xff" * 300_000 + photo[-2:]
    assert jpeg_scans(body, MAX_JPEG_SCANS) == 1
