"""Bounds on what one image costs to decode, past its own pixels (hDU's findings): a tiled TIFF whose tiles are far
larger than its image (libtiff decodes each whole tile into one buffer) is refused by every reader, a drafted
progressive JPEG holds its coefficient buffer at the source size in the decode budget, and bytes that carry a
known format's signature but that Pillow cannot open are called a corrupt or truncated file of that format."""

from __future__ import annotations

import io
import struct
import zlib

import fake_runtime
import numpy as np
import pytest
from PIL import Image

from data.datasets import decoded
from models.decoding import FORMATS, decode_image
from models.imagecheck import tiff
from models.imagecheck.common import DecodeError
from models.preprocessing import Preprocessing, copied_pixels
from serve.imaging import prepare
from serve.workpool import PixelBudget

LIMIT = 40_000_000
URL = "/v1/models/fake/classify"


# -- files ------------------------------------------------------------------------------------------------------------

def _pixels(w: int, h: int, bands: int = 1) -> np.ndarray:
    return np.random.default_rng(w * h + bands).integers(0, 256, (h, w, bands), dtype=np.uint8)


def _tiles(pixels: np.ndarray, tile_w: int, tile_l: int, compression: int) -> list[bytes]:
    """The image cut into whole tiles, row by row, each padded with zeros past the image's edge (as libtiff
    writes them) and deflated (compression 8) or not (1)."""
    h, w, bands = pixels.shape
    out = []
    for y in range(0, h, tile_l):
        for x in range(0, w, tile_w):
            block = np.zeros((tile_l, tile_w, bands), np.uint8)
            part = pixels[y:y + tile_l, x:x + tile_w]
            block[:part.shape[0], :part.shape[1]] = part
            out.append(zlib.compress(block.tobytes()) if compression == 8 else block.tobytes())
    return out


def _tiff_file(tags: list[tuple[int, int, tuple[int, ...]]], blocks: list[bytes], offsets_tag: int) -> bytes:
    """A little-endian classic TIFF of one directory (`tags`: tag, type, values; SHORT or LONG) followed by the
    values that do not fit an entry and then the `blocks`, whose offsets and byte counts (`offsets_tag` and the next
    tag) it fills in."""
    tags = sorted([*tags, (offsets_tag, 4, (0,) * len(blocks)), (offsets_tag + 1, 4, tuple(map(len, blocks)))])
    spill = 8 + 2 + 12 * len(tags) + 4
    at = spill + sum(n for _, t, v in tags if (n := len(v) * (2 if t == 3 else 4)) > 4)
    starts = tuple(at + sum(map(len, blocks[:i])) for i in range(len(blocks)))
    entries, spilled = b"", b""
    for tag, t, values in tags:
        packed = struct.pack(f"<{len(values)}{'H' if t == 3 else 'I'}", *(starts if tag == offsets_tag else values))
        if len(packed) > 4:
            entries += struct.pack("<HHII", tag, t, len(values), spill + len(spilled))
            spilled += packed
        else:
            entries += struct.pack("<HHI", tag, t, len(values)) + packed.ljust(4, b"\0")
    return b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + bytes(4) + spilled + b"".join(blocks)


def _head(w: int, h: int, bands: int, compression: int) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(256, 4, (w,)), (257, 4, (h,)), (258, 3, (8,) * bands), (259, 3, (compression,)),
            (262, 3, (2 if bands == 3 else 1,)), (277, 3, (bands,)), (284, 3, (1,))]


def _tiled_tiff(pixels: np.ndarray, tile_w: int, tile_l: int, compression: int = 8) -> bytes:
    """A tiled TIFF of `pixels` (8 bits a sample, grey or RGB) in tiles of tile_w x tile_l."""
    h, w, bands = pixels.shape
    tags = [*_head(w, h, bands, compression), (322, 4, (tile_w,)), (323, 4, (tile_l,))]
    return _tiff_file(tags, _tiles(pixels, tile_w, tile_l, compression), 324)


def _striped_tiff(pixels: np.ndarray, rows_per_strip: int) -> bytes:
    """A deflated grey TIFF of `pixels` in one strip that declares `rows_per_strip` rows."""
    h, w, bands = pixels.shape
    tags = [*_head(w, h, bands, 8), (278, 4, (rows_per_strip,))]
    return _tiff_file(tags, [zlib.compress(pixels.tobytes())], 273)


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _photo(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A smooth picture (few bytes as a JPEG)."""
    img = Image.merge("RGB", [Image.linear_gradient("L").resize((w, h)),
                              Image.linear_gradient("L").rotate(90).resize((w, h)), Image.new("L", (w, h), 128)])
    return img.convert(mode)


# -- the server, with a test-double model -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("fdr") / "fake")
    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False)
        with TestClient(create_app(settings)) as c:
            yield c


def _posted(client, data: bytes, media: str) -> list:
    """The answers to `data` sent as a raw body and as a multipart file."""
    return [client.post(URL, **sent) for sent in ({"content": data, "headers": {"content-type": media}},
                                                  {"files": {"file": ("x", data, media)}})]


# -- 1. a tile far larger than its image ------------------------------------------------------------------------------

def _huge_tile() -> bytes:
    """hDU's file, smaller: a 64 x 64 grey image in one 4096 x 4096 tile (16 MB decoded for 4 KB of pixels)."""
    return _tiled_tiff(_pixels(64, 64), 4096, 4096)


def test_a_tile_far_larger_than_its_image_is_refused_by_every_reader(tmp_path):
    data = _huge_tile()
    assert len(data) < 100_000
    with pytest.raises(DecodeError) as err:
        decode_image(data, max_pixels=LIMIT)
    assert "4096x4096" in err.value.reason and "64x64" in err.value.reason, err.value.reason
    assert "\n" not in err.value.reason and not err.value.over_limit
    (tmp_path / "tile.tif").write_bytes(data)  # training and train.eval read files through the same rule
    again = decoded(tmp_path / "tile.tif")
    assert isinstance(again, DecodeError) and again.reason == err.value.reason


def test_the_server_answers_400_naming_the_tile_and_the_image(client):
    for r in _posted(client, _huge_tile(), "image/tiff"):
        assert r.status_code == 400, r.text
        reason = r.json()["error"]
        assert "tiles of 4096x4096" in reason and "64x64" in reason, reason


@pytest.mark.parametrize("size, tile, bands, compression", [
    ((64, 64), (256, 256), 1, 8),  # an image smaller than one tile, as libtiff and GDAL write it
    ((64, 64), (256, 256), 1, 1),  # the same, uncompressed (Pillow's own decoder, not libtiff)
    ((300, 200), (256, 256), 3, 8),  # two tiles across, the second mostly padding
    ((40, 30), (512, 512), 3, 8),
    ((20, 12), (1024, 1024), 1, 8),  # the largest tile a small image may have
    ((17, 1500), (32, 1504), 1, 8),  # one tile, wider and taller than the image
])
def test_genuine_tiled_tiffs_still_decode(size, tile, bands, compression, client):
    pixels = _pixels(*size, bands)
    data = _tiled_tiff(pixels, *tile, compression)
    img = decode_image(data, max_pixels=LIMIT)
    assert img.size == size
    assert np.array_equal(np.asarray(img).reshape(pixels.shape), pixels)
    for r in _posted(client, data, "image/tiff"):
        assert r.status_code == 200, r.text


def test_a_tile_past_both_bounds_is_refused_and_one_within_either_is_not(monkeypatch):
    monkeypatch.setattr(tiff, "MAX_TIFF_TILE_PIXELS", 256)  # a 16 x 16 tile, whatever the image
    assert decode_image(_tiled_tiff(_pixels(20, 20), 16, 16), max_pixels=LIMIT).size == (20, 20)
    assert decode_image(_tiled_tiff(_pixels(32, 20), 32, 16), max_pixels=LIMIT).size == (32, 20)  # 512 <= 640
    with pytest.raises(DecodeError, match=r"of 20x20 pixels is stored in tiles of 32x16 pixels"):
        decode_image(_tiled_tiff(_pixels(20, 20), 32, 16), max_pixels=LIMIT)


def test_strips_are_not_bound_by_the_tile_rule():
    """libtiff clamps a strip's rows to the image's: a RowsPerStrip far past the image height allocates nothing
    more (measured), and is a normal value (2**32 - 1 means one strip)."""
    pixels = _pixels(64, 64)
    for rows in (64, 1 << 30, 2 ** 32 - 1):
        img = decode_image(_striped_tiff(pixels, rows), max_pixels=LIMIT)
        assert np.array_equal(np.asarray(img).reshape(pixels.shape), pixels)


class _Recorded(PixelBudget):
    """A real budget that also keeps what each reservation asked for."""

    def __init__(self, pixels: int) -> None:
        super().__init__(pixels, wait_s=0)
        self.asked: list[int] = []

    def reserve(self, pixels, holder=None, kept=None):
        self.asked.append(pixels)
        return super().reserve(pixels, holder, kept)


def _reserved(data: bytes, spec: Preprocessing, *, jpeg_draft: bool = True) -> int:
    budget = _Recorded(10 ** 9)
    prepare(data, spec, max_pixels=LIMIT, jpeg_draft=jpeg_draft, budget=budget)
    assert budget.used == 0
    return budget.asked[0]


def test_the_budget_holds_a_tiled_tiff_s_tile_buffer():
    spec = Preprocessing(resize=36, crop=32)
    pixels = _pixels(20, 12, 3)
    bare = 20 * 12 * 1 + copied_pixels(20, 12, spec)
    # libtiff decodes each tile whole: 1024 x 1024 x 3 bytes, in budget pixels of 5 bytes
    assert _reserved(_tiled_tiff(pixels, 1024, 1024), spec) == bare + -(-1024 * 1024 * 3 // 5)
    assert _reserved(_tiled_tiff(pixels, 16, 16), spec) == bare + -(-16 * 16 * 3 // 5)


# -- 2. a drafted progressive JPEG's coefficients ---------------------------------------------------------------------

def test_a_drafted_progressive_jpeg_holds_its_coefficients_at_the_source_size():
    spec = Preprocessing(resize=36, crop=32)
    w, h = 1600, 1200
    progressive = _encode(_photo(w, h), "JPEG", quality=80, progressive=True)  # 4:2:0
    baseline = _encode(_photo(w, h), "JPEG", quality=80)
    dw, dh = 200, 150  # libjpeg decodes at 1/8
    assert Image.open(io.BytesIO(progressive)).draft(None, (36, 36))[1][2:] == (dw, dh)
    drafted = copied_pixels(dw, dh, spec)
    # Baseline under draft: its drafted pixels, as before.
    assert _reserved(baseline, spec) == dw * dh * 1 + drafted
    # Progressive under draft: its drafted pixels once, and its coefficients for the whole source: 2 bytes each,
    # 64 for each 8 x 8 block of Y and of the quarter-size Cb and Cr (3 bytes a source pixel).
    blocks = (w // 8) * (h // 8) + 2 * (w // 16) * (h // 16)
    cost = _reserved(progressive, spec)
    assert cost == dw * dh * 1 + -(-blocks * 128 // 5) + drafted
    assert cost >= w * h * 3 // 5
    # Not drafted, its cost is unchanged: 2 budget pixels a pixel (coefficients included).
    assert _reserved(progressive, spec, jpeg_draft=False) == w * h * 2 + copied_pixels(w, h, spec)
    assert cost < w * h * 2


def test_a_drafted_progressive_grey_jpeg_holds_two_bytes_a_source_pixel():
    spec = Preprocessing(resize=36, crop=32, mode="L")
    w, h = 800, 640
    grey = _encode(_photo(w, h, "L"), "JPEG", quality=80, progressive=True)
    dw, dh = 100, 80
    assert _reserved(grey, spec) == dw * dh * 1 + -(-(w // 8) * (h // 8) * 128 // 5) + copied_pixels(dw, dh, spec)


# -- 3. a known signature on bytes Pillow cannot open -----------------------------------------------------------------

def _cut(fmt: str, keep, **params) -> bytes:
    data = _encode(Image.new("RGB", (400, 300), (9, 99, 199)), fmt, **params)
    return data[:keep(len(data))]


CUT = {  # each cut where Pillow's open of that format fails and it says "cannot identify image file"
    "AVIF": lambda: _cut("AVIF", lambda n: n // 2),
    "GIF": lambda: _cut("GIF", lambda n: 30),
    "WEBP": lambda: _cut("WEBP", lambda n: 12),
    "BMP": lambda: _cut("BMP", lambda n: 16),
    "TIFF": lambda: _cut("TIFF", lambda n: 40),
    "JPEG": lambda: _cut("JPEG", lambda n: 20),
}


@pytest.mark.parametrize("fmt", sorted(CUT))
def test_a_cut_file_with_a_known_signature_is_named_by_its_format(fmt):
    if fmt not in FORMATS:
        pytest.skip(f"this Pillow opens no {fmt}")
    with pytest.raises(DecodeError) as err:
        decode_image(CUT[fmt](), max_pixels=LIMIT)
    reason = err.value.reason
    assert reason.startswith(f"corrupt or truncated {fmt} ("), reason
    assert "not a recognised image" not in reason and "\n" not in reason


def test_the_server_names_a_truncated_avif_and_gif(client):
    for fmt, media in (("AVIF", "image/avif"), ("GIF", "image/gif")):
        if fmt not in FORMATS:
            continue
        for r in _posted(client, CUT[fmt](), media):
            assert r.status_code == 400, r.text
            assert r.json()["error"].startswith(f"corrupt or truncated {fmt}"), r.json()


def test_bytes_without_a_known_signature_are_still_not_recognised():
    for data in (b"definitely not an image", b"GIF8", _encode(Image.new("RGB", (16, 16)), "ICO"),
                 b"\0\0\0\x18ftypheic" + bytes(16)):
        with pytest.raises(DecodeError) as err:
            decode_image(data, max_pixels=LIMIT)
        assert err.value.reason.startswith("not a recognised image; supported: "), err.value.reason


def test_the_readme_states_the_tile_bound():
    from pathlib import Path

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert f"whose tiles each hold more pixels than both its image and {tiff.MAX_TIFF_TILE_PIXELS:,}" in readme
