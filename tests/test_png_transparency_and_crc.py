"""PNGs as optimisers and broken disks leave them: a colour key at any bit depth is the transparency it means (the
same answer as the picture re-encoded losslessly), every chunk's checksum counts wherever the chunk lies, and the event
loop never decodes an image whose work a small hostile body can make large."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data.datasets import decode_checked
from models.decoding import decode_image
from models.imagecheck.common import DecodeError
from models.imagecheck.png import MAX_PNG_CHUNKS
from models.preprocessing import Preprocessing, preprocess, to_uint8
from serve import imaging
from serve.imaging import CHEAP_SEGMENTS, ImageError, cheap, decode_weight, prepare

LIMIT = 10_000_000
SPECS = (Preprocessing(resize=48, crop=40), Preprocessing(resize=48, crop=40, mode="L"))  # scale and crop 64 x 52


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _filtered(rows: np.ndarray, bpp: int) -> bytes:
    """Rows of bytes (H, W) with each of PNG's five filters in turn (Sub, Average and Paeth reach `bpp` bytes back),
    as an encoder writes them."""
    out, prev = [], np.zeros(rows.shape[1], np.int32)
    for y, row in enumerate(rows.astype(np.int32)):
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])
        kind = y % 5
        pred = (0, left, prev, (left + prev) // 2, _paeth(left, prev, up_left))[kind]
        out.append(bytes([kind]) + ((row - pred) % 256).astype(np.uint8).tobytes())
        prev = row
    return b"".join(out)


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png(samples: np.ndarray, depth: int, colour: int, *, key: bytes | None = None, interlace: bool = False) -> bytes:
    """A PNG written chunk by chunk (what Pillow cannot write: 2- and 4-bit grey with a key, 48-bit RGB, Adam7):
    `samples` is (H, W) grey or (H, W, 3) RGB at `depth` bits."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]

    def rows(part: np.ndarray) -> bytes:
        flat = part.reshape(part.shape[0], -1)
        if depth == 16:
            raw = flat.astype(">u2").view(np.uint8).reshape(part.shape[0], -1)
        elif depth == 8:
            raw = flat.astype(np.uint8)
        else:  # packed, most significant bits first, each row padded to a byte
            per = 8 // depth
            padded = np.zeros((flat.shape[0], -(-flat.shape[1] // per) * per), np.uint8)
            padded[:, :flat.shape[1]] = flat
            raw = np.zeros((flat.shape[0], padded.shape[1] // per), np.uint8)
            for i in range(per):
                raw |= padded[:, i::per] << (8 - depth * (i + 1))
        return _filtered(raw, max(1, channels * depth // 8))

    passes = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in _ADAM7] if interlace else [samples]
    data = b"".join(rows(p) for p in passes if p.size)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, int(interlace))
    trns = _chunk(b"tRNS", key) if key is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + trns + _chunk(b"IDAT", zlib.compress(data))
            + _chunk(b"IEND", b""))


def _encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _same_answer(a: bytes, b: bytes, tmp_path) -> None:
    """`a` and `b` get bitwise the same model input, served and read by a dataset (training, evaluation)."""
    for spec in SPECS:
        served = prepare(a, spec, max_pixels=LIMIT)
        assert np.array_equal(served, prepare(b, spec, max_pixels=LIMIT))
        path = tmp_path / "a.png"
        path.write_bytes(a)
        assert np.array_equal(preprocess([decode_checked(path)], spec), served)


_H, _W = 52, 64
_DISC = (np.mgrid[0:_H, 0:_W][1] - 40) ** 2 + (np.mgrid[0:_H, 0:_W][0] - 24) ** 2 < 150  # the transparent area


# -- a grey colour key at 1, 2 and 4 bits (optipng, oxipng) ----------------------------------------------------------

@pytest.mark.parametrize("depth, key", [(1, 1), (2, 1), (2, 2), (4, 5), (4, 15)])
def test_a_low_bit_depth_grey_colour_key_is_transparency(depth, key, tmp_path):
    """optipng and oxipng write a grey picture with a transparent area as 1, 2 or 4 bits and a key: it gets the answer
    of the same picture re-encoded at 8 bits with an alpha channel (Pillow scales the pixels to 8 bits, not the key)."""
    top = (1 << depth) - 1
    y, x = np.mgrid[0:_H, 0:_W]
    grey = ((x + 2 * y) % (top + 1)).astype(np.uint8)
    grey[grey == key] = (key + 1) % (top + 1)  # no opaque pixel has the key
    grey[_DISC] = key
    scaled = (grey.astype(np.int32) * 255 // top).astype(np.uint8)
    with_alpha = Image.fromarray(np.stack([scaled, np.where(_DISC, 0, 255).astype(np.uint8)], axis=-1), "LA")
    keyed = _png(grey, depth, 0, key=struct.pack(">H", key))
    _same_answer(keyed, _encode(with_alpha), tmp_path)
    assert not np.array_equal(prepare(keyed, SPECS[0], max_pixels=LIMIT),
                              prepare(_encode(Image.fromarray(scaled)), SPECS[0], max_pixels=LIMIT))


def test_a_grey_key_beyond_the_bit_depth_marks_no_pixel(tmp_path):
    """A 2-bit key of 85, which no encoder writes, is not the scaled value of the 2-bit pixels 1 (85 at 8 bits)."""
    grey = (np.arange(_H * _W).reshape(_H, _W) % 4).astype(np.uint8)
    plain = _encode(Image.fromarray((grey * 85).astype(np.uint8)))
    _same_answer(_png(grey, 2, 0, key=struct.pack(">H", 85)), plain, tmp_path)


# -- 16-bit colour keys, matched at full depth --------------------------------------------------------------------

def _rgb48(key: tuple[int, int, int], near: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """48-bit samples with the key in the disc and an opaque patch of `near` (the key's high bytes or low bytes),
    and the same picture's 8-bit RGBA (what Pillow keeps of each sample: its high byte)."""
    y, x = np.mgrid[0:_H, 0:_W]
    rgb = np.stack([x * 1000, y * 1200, (x + y) * 500 + 7], axis=-1).astype(np.uint32)
    rgb[_DISC] = key
    rgb[30:40, 8:30] = near
    assert not (rgb[~_DISC] == key).all(axis=-1).any()
    rgba = np.concatenate([(rgb >> 8).astype(np.uint8), np.where(_DISC, 0, 255).astype(np.uint8)[..., None]], -1)
    return rgb, rgba


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("key, near", [
    ((0, 100, 200), (0, 100 * 257, 200 * 257)),  # a dark key: its samples fit 8 bits; the patch is the 8-bit colour
    ((2563, 51209, 7681), (2563 + 190, 51209 + 40, 7681 + 20)),  # the patch shares the key's high bytes
])
def test_a_48_bit_rgb_colour_key_is_matched_at_full_depth(key, near, interlace, tmp_path):
    rgb, rgba = _rgb48(key, near)
    keyed = _png(rgb, 16, 2, key=struct.pack(">HHH", *key), interlace=interlace)
    _same_answer(keyed, _encode(Image.fromarray(rgba, "RGBA")), tmp_path)
    pixels = to_uint8(decode_image(keyed, max_pixels=LIMIT), Preprocessing(resize=52, crop=52))
    assert (pixels[35, 20] == (np.asarray(near) >> 8)).all()  # opaque, its colour kept
    assert (pixels[24, 40] == 0).all()


def test_a_48_bit_colour_key_costs_a_second_decode_in_the_budget():
    rgb, _ = _rgb48((1, 2, 3), (4, 5, 6))
    keyed = Image.open(io.BytesIO(_png(rgb, 16, 2, key=struct.pack(">HHH", 1, 2, 3))))
    plain = Image.open(io.BytesIO(_png(rgb, 16, 2)))
    assert (decode_weight(plain), decode_weight(keyed)) == (1, 3)


@pytest.mark.parametrize("key, near", [(200, 200 * 257), (50_000, 50_001)])
def test_a_16_bit_grey_colour_key_is_matched_at_full_depth(key, near, tmp_path):
    y, x = np.mgrid[0:_H, 0:_W]
    grey = (x * 900 + y * 100 + 3).astype(np.uint16)
    grey[_DISC], grey[30:40, 8:30] = key, near
    # The same picture with an alpha channel, 8-bit as vitc reads 16-bit grey (0..65535 scaled, rounded).
    scaled = np.clip(np.round(grey.astype(np.float32) * np.float32(255 / 65535)), 0, 255).astype(np.uint8)
    with_alpha = Image.fromarray(np.stack([scaled, np.where(_DISC, 0, 255).astype(np.uint8)], axis=-1), "LA")
    _same_answer(_png(grey, 16, 0, key=struct.pack(">H", key)), _encode(with_alpha), tmp_path)


# -- the colour key's cost: the crop's pixels, in Pillow's per-pixel operations ------------------------------------

def test_an_rgb_colour_key_is_the_same_crop_as_an_alpha_channel():
    """The key is masked on the crop only, in Pillow's per-pixel operations (its cost is measured, not asserted: a
    NumPy mask over the whole source crop took 4x the alpha channel's preprocessing)."""
    rgb = np.random.default_rng(0).integers(0, 250, (1500, 2000, 3), dtype=np.uint8)
    rgb[:, :600] = 255
    keyed = Image.fromarray(rgb)
    keyed.info["transparency"] = (255, 255, 255)
    alpha = Image.fromarray(np.concatenate([rgb, np.where(rgb[..., :1] == 255, 0, 255).astype(np.uint8)], -1))
    spec = Preprocessing(resize=256, crop=224)
    assert np.array_equal(to_uint8(keyed, spec), to_uint8(alpha, spec))


# -- every chunk's checksum, wherever it lies; a file cut off names the chunk -------------------------------------

def _photo_png() -> bytes:
    y, x = np.mgrid[0:48, 0:64]
    return _encode(Image.fromarray(np.stack([x * 4, y * 5, x + y], -1).astype(np.uint8)))


def _split(png: bytes) -> tuple[bytes, bytes, bytes]:
    """(signature and chunks before the image data, the IDAT chunks, IEND)."""
    first, iend = png.index(b"IDAT") - 4, png.rindex(b"IEND") - 4
    return png[:first], png[first:iend], png[iend:]


def _with_bad_crc(png: bytes, kind: bytes, nth: int = 0) -> bytes:
    at = [i for i in range(len(png)) if png.startswith(kind, i)][nth] - 4
    end = at + 8 + int.from_bytes(png[at:at + 4], "big")
    return png[:end] + bytes([png[end] ^ 1]) + png[end + 1:]


def _two_idats() -> bytes:
    head, idat, iend = _split(_photo_png())
    data = zlib.decompress(idat[8:-4])
    stream = zlib.compress(data)
    return head + _chunk(b"IDAT", stream[:40]) + _chunk(b"IDAT", stream[40:]) + iend


def _text_after() -> bytes:
    head, idat, iend = _split(_photo_png())
    return head + idat + _chunk(b"tEXt", b"Comment\0after the pixels") + iend


BROKEN = {  # name -> (bytes, the words of the reason)
    "bad CRC, tEXt after IDAT": (lambda: _with_bad_crc(_text_after(), b"tEXt"),
                                 "corrupt PNG: its 'tEXt' chunk fails its checksum (CRC)"),
    "bad CRC, IDAT": (lambda: _with_bad_crc(_photo_png(), b"IDAT"),
                      "corrupt PNG: its 'IDAT' chunk fails its checksum (CRC)"),
    "bad CRC, second IDAT": (lambda: _with_bad_crc(_two_idats(), b"IDAT", 1),
                             "corrupt PNG: its 'IDAT' chunk fails its checksum (CRC)"),
    "bad CRC, IEND": (lambda: _with_bad_crc(_photo_png(), b"IEND"),
                      "corrupt PNG: its 'IEND' chunk fails its checksum (CRC)"),
    "cut in tEXt before IDAT": (lambda: (lambda p: p[:p.index(b"tEXt") + 30])(
        _split(_photo_png())[0] + _chunk(b"tEXt", b"k\0" + b"v" * 1000) + b"".join(_split(_photo_png())[1:])),
        "corrupt PNG: it is cut off in its 'tEXt' chunk (truncated)"),
    "cut in IDAT": (lambda: _photo_png()[:len(_split(_photo_png())[0]) + 30],
                    "corrupt PNG: it is cut off in its 'IDAT' chunk (truncated)"),
    "cut in IEND's CRC": (lambda: _photo_png()[:-2], "corrupt PNG: it is cut off in its 'IEND' chunk (truncated)"),
    "cut in a chunk's header": (lambda: _photo_png()[:-7],
                                "corrupt PNG: it is cut off after its 'IDAT' chunk (truncated)"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_chunk_anywhere_is_a_400_naming_it(name, tmp_path):
    data, words = BROKEN[name][0](), BROKEN[name][1]
    with pytest.raises(ImageError) as served:
        prepare(data, SPECS[0], max_pixels=LIMIT)
    assert served.value.status == 400 and served.value.reason.startswith(words), served.value.reason
    with pytest.raises(DecodeError) as shared:  # the one rule: training and evaluation find it unreadable too
        decode_image(data, max_pixels=LIMIT)
    assert shared.value.reason == served.value.reason
    path = tmp_path / "broken.png"
    path.write_bytes(data)
    assert decode_checked(path) is None


def test_whole_chunks_decode_wherever_they_lie_and_a_missing_iend_is_pillows_call():
    for data in (_text_after(), _two_idats(), _photo_png()[:-12]):  # the last: no IEND, the image data whole
        assert prepare(data, SPECS[0], max_pixels=LIMIT).shape == (1, 3, 40, 40)


def test_a_png_of_more_chunks_than_its_size_holds_is_refused_after_a_bounded_walk():
    head, idat, iend = _split(_photo_png())
    empty = _chunk(b"prVt", b"")
    ok = head + idat + empty * 5000 + iend  # 60 KB: few enough for its size
    assert prepare(ok, SPECS[0], max_pixels=LIMIT).shape == (1, 3, 40, 40)
    many = head + idat + empty * (MAX_PNG_CHUNKS + 400) + iend
    with pytest.raises(ImageError) as err:
        prepare(many, SPECS[0], max_pixels=LIMIT)
    assert err.value.status == 400 and err.value.reason.startswith(
        f"PNG has more than {MAX_PNG_CHUNKS + len(many) // 1024} chunks, more than a file of {len(many)} bytes holds")


# -- the event loop decodes only what costs a small constant -------------------------------------------------------

def test_the_cheap_check_reads_a_bounded_number_of_chunks(monkeypatch):
    """A 60 KB PNG of 5,000 empty chunks after its pixels cost 12 ms to decode on the event loop (Pillow reads every
    chunk in Python), and `cheap` itself walked all of them first."""
    head, idat, iend = _split(_photo_png())
    data = head + idat + _chunk(b"prVt", b"") * 5000 + iend
    assert len(data) < imaging.CHEAP_BYTES
    read = []

    def counted(body: bytes):
        for item in itertools.islice(real(body), 100_000):
            read.append(item)
            yield item

    real = imaging.png_chunks
    monkeypatch.setattr(imaging, "png_chunks", counted)
    monkeypatch.setattr(imaging, "check_structure", lambda body: pytest.fail("walked the whole body"))
    assert not cheap(data)
    assert len(read) == CHEAP_SEGMENTS + 1
    monkeypatch.undo()
    assert cheap(_photo_png())
    assert not cheap(head + idat + _chunk(b"prVt", b"") * CHEAP_SEGMENTS + iend)


def _progressive(scans: int, side: int = 64) -> bytes:
    """A valid progressive JPEG whose last scan is repeated until it has `scans` scans."""
    data = _encode(Image.new("RGB", (side, side), (90, 30, 200)), "JPEG", progressive=True, quality=90)
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * (scans - data.count(b"\xff\xda")) + b"\xff\xd9"


def test_what_a_small_body_can_make_slow_is_decoded_off_the_event_loop():
    jpeg = _encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    assert cheap(jpeg) and cheap(_progressive(20)) and cheap(_encode(Image.new("RGB", (256, 256), 9)))
    assert cheap(_encode(Image.new("RGB", (64, 64), 9), "WEBP"))
    slow = {
        "1024 x 1024 flat PNG (5 KB, 10-19 ms)": _encode(Image.new("RGB", (1024, 1024), (9, 30, 200))),
        "128 scans (8 KB, 73 ms at 1 M pixels)": _progressive(128, 256),
        "100 JPEG segments": jpeg[:2] + b"\xff\xfe\x00\x02" * 100 + jpeg[2:],
        "GIF (extension blocks read in Python)": _encode(Image.new("L", (8, 8), 7), "GIF"),
        "TIFF (tags read in Python)": _encode(Image.new("L", (8, 8), 7), "TIFF"),
    }
    for name, data in slow.items():
        assert len(data) < imaging.CHEAP_BYTES and not cheap(data), name
        assert prepare(data, SPECS[0], max_pixels=LIMIT).shape == (1, 3, 40, 40), name  # decoded all the same
