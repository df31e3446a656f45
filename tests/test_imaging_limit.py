"""`--max-image-pixels` above Pillow's own bomb bound (2 x Image.MAX_IMAGE_PIXELS, about 179 M pixels) is the limit
that applies: an image under it is decoded, one over it gets a 413 naming its size and the limit. Pillow's bound
stays as it was everywhere else (other threads, the dataset readers). Every image here declares its size in a
header and carries almost no data: nothing is decoded, and no page of the declared pixels is ever touched."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import fake_runtime
import pytest
from PIL import Image

from models.preprocessing import Preprocessing
from serve.imaging import ImageError, open_image, prepare

SPEC = Preprocessing(resize=37, crop=32)
SIDE = 14_200  # 201,640,000 pixels: above Pillow's error bound (178,956,970), below the limit the tests set
ABOVE_PILLOW = 2 * Image.MAX_IMAGE_PIXELS


def grey_png(w: int, h: int) -> bytes:
    """A grey PNG that declares w x h pixels and holds the first row of them, then ends (truncated)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    z = zlib.compressobj()
    first_row = z.compress(b"\0" * (w + 1)) + z.flush(zlib.Z_SYNC_FLUSH)  # an unfinished stream, no IEND
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", first_row)


def grey_tiff(w: int, h: int) -> bytes:
    """An uncompressed grey TIFF that declares w x h pixels in one strip and holds 16 bytes of it. Pillow checks a
    TIFF's size again when it loads (not only when it opens)."""
    tags = [(256, 4, w), (257, 4, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 4, h), (279, 4, w * h)]
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags)) + b"".join(  # tag, type (3 SHORT, 4 LONG), count 1, value
        struct.pack("<HHII", tag, typ, 1, data_at if tag == 273 else value) if typ == 4
        else struct.pack("<HHIHH", tag, typ, 1, value, 0) for tag, typ, value in tags) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x80" * 16


def test_pillows_bound_is_above_the_test_images():
    """The premise: these images are over Pillow's own error bound, so Pillow alone refuses them."""
    assert SIDE * SIDE > ABOVE_PILLOW
    for data in (grey_png(SIDE, SIDE), grey_tiff(SIDE, SIDE)):
        with pytest.raises(Image.DecompressionBombError):
            Image.open(io.BytesIO(data))


@pytest.mark.parametrize("make", [grey_png, grey_tiff])
def test_a_limit_above_pillows_bound_lets_a_bigger_image_through(make):
    """With a limit of 300 M, a 201.6 M pixel image was refused (413 "image has more pixels than the limit of
    300000000"): Pillow's bomb error fired first. It opens now, and decoding it gets as far as its (missing) data."""
    data = make(SIDE, SIDE)
    assert open_image(data, max_pixels=300_000_000).size == (SIDE, SIDE)
    with pytest.raises(ImageError) as err:
        prepare(data, SPEC, max_pixels=300_000_000)
    # past the pixel limit, both at open and when the TIFF loads: the file is short of data, nothing else
    assert err.value.status == 400 and "truncated" in err.value.reason, err.value.reason
    assert "exceeds" not in err.value.reason and "limit" not in err.value.reason, err.value.reason


@pytest.mark.parametrize("make", [grey_png, grey_tiff])
def test_an_image_over_the_limit_is_a_413_naming_its_size_and_the_limit(make):
    """A 201.6 M pixel image under a limit of 200 M: the refusal says how big it is, not only the limit."""
    with pytest.raises(ImageError) as err:
        prepare(make(SIDE, SIDE), SPEC, max_pixels=200_000_000)
    assert err.value.status == 413
    assert err.value.reason == f"image is {SIDE}x{SIDE} = {SIDE * SIDE} pixels, more than the limit of 200000000"


def test_a_limit_below_pillows_bound_still_applies():
    with pytest.raises(ImageError) as err:
        open_image(grey_png(5000, 2000), max_pixels=9_999_999)
    assert err.value.status == 413 and err.value.reason == (
        "image is 5000x2000 = 10000000 pixels, more than the limit of 9999999")


def test_pillows_own_bound_is_unchanged_outside_and_beside_the_servers_limit():
    """The server's limit is scoped to its own decode: Pillow's global bound is not raised, and another thread
    decoding meanwhile (a dataset reader, user code) keeps Pillow's bound."""
    from serve.imaging import pixel_limit

    before = Image.MAX_IMAGE_PIXELS
    data = grey_png(SIDE, SIDE)
    assert open_image(data, max_pixels=300_000_000).size == (SIDE, SIDE)
    assert Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    beside: list[BaseException] = []

    def other_thread() -> None:
        try:
            Image.open(io.BytesIO(data))
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            beside.append(exc)

    with pixel_limit(300_000_000):
        assert Image.open(io.BytesIO(data)).size == (SIDE, SIDE)
        t = threading.Thread(target=other_thread)
        t.start()
        t.join(10)
    assert len(beside) == 1 and isinstance(beside[0], Image.DecompressionBombError)
    with pytest.warns(Image.DecompressionBombWarning):  # and Pillow's warning, too
        Image.open(io.BytesIO(grey_png(10_000, 9_000)))


def test_the_server_applies_a_limit_above_pillows_bound(tmp_path):
    """`python -m serve --max-image-pixels 200000000`: a 196 M pixel image (over Pillow's 179 M) got 413; it is
    decoded now (400 here: the file holds one row), and a 201.6 M one gets a 413 naming its size."""
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path / "fake")
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False,
                            max_image_pixels=200_000_000)
        with TestClient(create_app(settings)) as c:
            def send(data: bytes):  # noqa: ANN202
                return c.post("/v1/models/fake/classify", content=data, headers={"content-type": "image/png"})

            under = send(grey_png(14_000, 14_000))
            assert under.status_code == 400 and "truncated" in under.json()["error"], under.text
            over = send(grey_png(SIDE, SIDE))
            assert over.status_code == 413, over.text
            assert over.json()["error"] == (f"image is {SIDE}x{SIDE} = {SIDE * SIDE} pixels, more than the limit "
                                            "of 200000000")
