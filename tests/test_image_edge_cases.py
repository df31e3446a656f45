"""Images as real users send them get the answer their pixels warrant, on every path: a PNG colour key is
transparency like any other, PNG metadata cannot inflate without bound, a broken PNG is named as one, and every
content type that names an image the server decodes (or just bytes, as curl sends them) is taken."""

from __future__ import annotations

import io
import struct
import zlib

import fake_runtime
import numpy as np
import pytest
from PIL import Image

from data.datasets import decode_checked
from models.preprocessing import PNG_TEXT_BYTES, Preprocessing, preprocess, to_uint8
from serve.imaging import ImageError, cheap, decode_weight, load_pixels, open_image, pixel_limit, prepare

LIMIT = 10_000_000
SPEC = Preprocessing(resize=48, crop=40)  # scales and crops a 64 x 52 image: the crop keeps the transparency
GREY_SPEC = Preprocessing(resize=48, crop=40, mode="L")


def served_pixels(data: bytes, *, max_pixels: int) -> Image.Image:
    """The pixels the server decodes (prepare's `open_image` + `load_pixels`, in its `pixel_limit`)."""
    with pixel_limit(max_pixels):
        return load_pixels(open_image(data, max_pixels=max_pixels))


def _png(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **params)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _raw_png(width: int, height: int, depth: int, colour: int, rows: list[bytes], before: bytes = b"",
             after: bytes = b"") -> bytes:
    """A PNG written chunk by chunk (what Pillow cannot write: 48-bit RGB, misplaced or broken chunks)."""
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    idat = _chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in rows)))
    return b"\x89PNG\r\n\x1a\n" + ihdr + before + idat + after + _chunk(b"IEND", b"")


def _tiny_png(before: bytes = b"", after: bytes = b"") -> bytes:
    return _raw_png(2, 2, 8, 0, [b"\x10\x20", b"\x30\x40"], before, after)


# -- 1. A colour key (PNG tRNS on a grey or RGB image) is transparency, composited onto black like an alpha ------

def _picture(mode: str) -> tuple[Image.Image, Image.Image]:
    """One picture twice: with an alpha channel, and as PNG optimisers rewrite it losslessly (the transparent area
    one colour, white, named by a colour key). The opaque pixels never use the key."""
    rng = np.random.default_rng(0)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 250, (52, 64, channels), dtype=np.uint8)
    alpha = np.full((52, 64, 1), 255, np.uint8)
    pixels[:, :20], alpha[:, :20] = 255, 0  # the left third transparent, white under it
    with_alpha = Image.fromarray(np.concatenate([pixels, alpha], axis=2), "RGBA" if mode == "RGB" else "LA")
    return with_alpha, Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


@pytest.mark.parametrize("mode, key", [("RGB", (255, 255, 255)), ("L", 255)])
def test_a_colour_key_png_gets_the_answer_of_the_same_picture_with_alpha(mode, key, tmp_path):
    with_alpha, opaque = _picture(mode)
    alpha_png, keyed_png = _png(with_alpha), _png(opaque, transparency=key)
    assert Image.open(io.BytesIO(keyed_png)).info["transparency"] == key
    for spec in (SPEC, GREY_SPEC):
        served = prepare(keyed_png, spec, max_pixels=LIMIT)
        assert np.array_equal(served, prepare(alpha_png, spec, max_pixels=LIMIT))  # bitwise: one picture, one answer
        assert not np.array_equal(served, prepare(_png(opaque), spec, max_pixels=LIMIT))  # the key is not opaque
        # Training's evaluation reads the file the same way (decode_checked + preprocess).
        path = tmp_path / f"keyed-{mode}.png"
        path.write_bytes(keyed_png)
        assert np.array_equal(preprocess([decode_checked(path)], spec), served)


def test_a_16_bit_grey_colour_key_is_matched_at_full_depth():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 60_000, (32, 32), dtype=np.uint16)
    grey[:8] = 65_000  # transparent
    grey[8, :4] = 65_001  # one level off the key: the same 8-bit value, but opaque
    spec = Preprocessing(resize=32, crop=32, mode="L")  # no scaling: the pixels themselves
    plain = served_pixels(_png(Image.fromarray(grey)), max_pixels=LIMIT)
    keyed = served_pixels(_png(Image.fromarray(grey), transparency=65_000), max_pixels=LIMIT)
    assert keyed.mode == "I;16" and keyed.info["transparency"] == 65_000
    expected = to_uint8(plain, spec)
    expected[:8] = 0
    assert np.array_equal(to_uint8(keyed, spec), expected)
    assert to_uint8(keyed, spec)[8, 0, 0] == 253  # 65_001 * 255 / 65_535, kept


def test_a_48_bit_rgb_colour_key_is_transparency():  # at full depth: tests/test_png_transparency_and_crc.py
    white, red = struct.pack(">HHH", 0xFFFF, 0xFFFF, 0xFFFF), struct.pack(">HHH", 0xFFFF, 0, 0)
    rows = [white * 2 + red * 2] * 4
    data = _raw_png(4, 4, 16, 2, rows, before=_chunk(b"tRNS", white))
    pixels = to_uint8(served_pixels(data, max_pixels=LIMIT), Preprocessing(resize=4, crop=4))
    assert (pixels[:, :2] == 0).all() and (pixels[:, 2:] == (255, 0, 0)).all()


def test_a_grey_gif_transparent_index_is_transparency_too():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, "GIF", transparency=7)
    img = served_pixels(buf.getvalue(), max_pixels=LIMIT)
    assert img.mode == "L" and img.info["transparency"] == 7
    pixels = to_uint8(img, Preprocessing(resize=16, crop=16, mode="L"))[..., 0]
    assert pixels[0, 7] == 0 and pixels[0, 8] == 8 and np.count_nonzero(pixels == 0) == 2  # index 7, and black


def test_the_decode_budget_counts_the_copy_an_rgb_colour_key_makes():
    _, opaque = _picture("RGB")
    assert decode_weight(Image.open(io.BytesIO(_png(opaque)))) == 1
    assert decode_weight(Image.open(io.BytesIO(_png(opaque, transparency=(255, 255, 255))))) == 2  # as RGBA


# -- 2. PNG metadata: bounded while Pillow opens the file, and never inflated on the event loop --------------------

_MEBIBYTE_OF_ZEROS = zlib.compress(b"\0" * (1 << 20), 9)  # about 1 KB


def _ztxt(i: int) -> bytes:
    return _chunk(b"zTXt", b"k%d\0\0" % i + _MEBIBYTE_OF_ZEROS)


@pytest.mark.parametrize("where", ["before", "after"])  # read when the file opens, or when its pixels load
def test_png_text_that_inflates_past_the_bound_is_refused_by_name(where, tmp_path):
    data = _tiny_png(**{where: b"".join(_ztxt(i) for i in range(PNG_TEXT_BYTES // (1 << 20) + 2))})
    assert len(data) < 8_000  # a few KB that Pillow would inflate to 4 MiB (and up to 64 MiB: its own bound)
    with pytest.raises(ImageError) as err:
        served_pixels(data, max_pixels=LIMIT)
    assert err.value.status == 400
    assert err.value.reason.startswith("PNG text metadata (tEXt/zTXt/iTXt chunks) holds more than 2 MiB")
    path = tmp_path / "text.png"
    path.write_bytes(data)
    assert decode_checked(path) is None  # training and evaluation read it no differently: unreadable


def test_png_metadata_of_real_size_still_decodes():
    workflow = _chunk(b"tEXt", b"workflow\0" + b"{}" * 150_000)  # an AI tool's JSON: 300 KB
    xmp = _chunk(b"iTXt", b"XML:com.adobe.xmp\0\x01\0\0\0" + zlib.compress(b"<x/>" * 40_000))
    profile = _chunk(b"iCCP", b"sRGB\0\0" + zlib.compress(bytes(range(256)) * 12))
    assert served_pixels(_tiny_png(before=profile + xmp + workflow), max_pixels=LIMIT).size == (2, 2)


def test_one_colour_profile_is_allowed_and_several_are_refused():
    profile = _chunk(b"iCCP", b"p\0\0" + _MEBIBYTE_OF_ZEROS)
    assert served_pixels(_tiny_png(before=profile), max_pixels=LIMIT).size == (2, 2)
    for data in (_tiny_png(before=profile * 40), _tiny_png(before=profile, after=profile * 39)):
        with pytest.raises(ImageError) as err:  # 40 KB that Pillow inflates to 40 MiB
            served_pixels(data, max_pixels=LIMIT)
        assert err.value.status == 400 and "40 iCCP colour profile chunks" in err.value.reason


def test_compressed_png_metadata_is_never_inflated_on_the_event_loop():
    assert cheap(_tiny_png())
    assert cheap(_tiny_png(before=_chunk(b"tEXt", b"k\0plain text")))  # costs what its bytes cost
    for chunk in (_ztxt(0), _chunk(b"iTXt", b"k\0\x01\0\0\0" + _MEBIBYTE_OF_ZEROS),
                  _chunk(b"iCCP", b"p\0\0" + _MEBIBYTE_OF_ZEROS)):
        assert not cheap(_tiny_png(before=chunk)) and not cheap(_tiny_png(after=chunk))


# -- 4. A broken PNG is called a broken PNG -----------------------------------------------------------------------

def test_a_png_with_a_bad_checksum_is_named_a_corrupt_png():
    good = _tiny_png(before=_chunk(b"tEXt", b"Comment\0hello"))
    assert served_pixels(good, max_pixels=LIMIT).size == (2, 2)
    at = good.index(b"tEXt") + 4 + len(b"Comment\0hello")
    cases = [
        (good[:at] + b"\0\0\0\0" + good[at + 4:], "corrupt PNG: its 'tEXt' chunk fails its checksum (CRC)"),
        (good[:19] + b"\x07" + good[20:], "corrupt PNG: its 'IHDR' chunk fails its checksum (CRC)"),
        (good[:30], "corrupt PNG: it is cut off in its 'IHDR' chunk (truncated)"),
    ]
    for data, reason in cases:
        with pytest.raises(ImageError) as err:
            served_pixels(data, max_pixels=LIMIT)
        assert err.value.status == 400 and err.value.reason.startswith(reason), err.value.reason
        assert "supported:" not in err.value.reason
    with pytest.raises(ImageError) as err:  # what is no image at all is still said to be none
        served_pixels(b"definitely not an image", max_pixels=LIMIT)
    assert err.value.reason.startswith("not a recognised image; supported:")


# -- 6. Content types: an image's aliases, and raw bytes as curl sends them ---------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("types") / "fake")
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False)
        with TestClient(create_app(settings)) as c:
            yield c


def _image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


URL = "/v1/models/fake/classify"


@pytest.mark.parametrize("fmt, media", [
    ("PNG", "image/apng"), ("PNG", "image/x-png"), ("TIFF", "image/tif"), ("TIFF", "image/x-tiff"),
    ("BMP", "image/x-bmp"),
    ("PNG", "application/x-www-form-urlencoded"),  # curl --data-binary @photo.png, no -H
])
def test_every_type_of_an_image_the_server_decodes_is_taken(client, fmt, media):
    data = _image(fmt)
    expected = client.post(URL, content=data, headers={"content-type": "application/octet-stream"})
    assert expected.status_code == 200, expected.text
    r = client.post(URL, content=data, headers={"content-type": media})
    assert r.status_code == 200, r.text
    assert r.json() == expected.json()
    r = client.post(URL, files={"file": ("x", data, media)})
    assert r.status_code == 200 and r.json() == expected.json()


def test_a_form_encoded_body_that_does_not_decode_says_how_to_send_a_file(client):
    png = _image("PNG")
    r = client.post(URL, content=png.replace(b"\n", b""),  # what curl -d @photo.png sends
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400
    assert "application/x-www-form-urlencoded" in r.json()["error"] and "--data-binary" in r.json()["error"]
    r = client.post(URL, content=b"nope", headers={"content-type": "image/png"})  # no hint where it does not apply
    assert r.status_code == 400 and "--data-binary" not in r.json()["error"]


def test_a_multipart_part_refused_for_its_type_is_named(client):
    png = _image("PNG")
    r = client.post(URL, files=[("file", ("a.png", png, "image/png")), ("file", ("notes.txt", b"x", "text/plain"))])
    assert r.status_code == 415
    assert r.json()["error"].startswith("multipart 'file' part #1 ('notes.txt') has unsupported content type "
                                        "'text/plain'")
    r = client.post(URL, content=png, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "unsupported content type 'text/plain'" in r.json()["error"]

