"""serve's parts without a server: image decoding edges, the v2 wire format, the dynamic batcher, settings."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import encode, png_header_only

from models.preprocessing import Preprocessing, preprocess
from serve.batching import BatcherClosed, DynamicBatcher, QueueFull
from serve.errors import ServeError
from serve.imaging import ImageError, decode_weight, load_pixels, open_image, pixel_limit, prepare
from serve.protocol import (
    MAX_GZIP_MEMBERS,
    ProtocolError,
    classification_strings,
    decompress,
    encode_response,
    parse_request,
)
from serve.registry import model_sources, parse_model_arg
from serve.settings import Settings

SERVE_ERROR = "python -m serve: error: "

RGB = Preprocessing(resize=32, crop=32, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
GREY = Preprocessing(resize=32, crop=32, mean=(0.27,) * 3, std=(0.4,) * 3, mode="L")
LIMIT = 10_000_000


def served_pixels(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> Image.Image:
    """The pixels the server decodes (prepare's `open_image` + `load_pixels`, in its `pixel_limit`)."""
    with pixel_limit(max_pixels):
        return load_pixels(open_image(data, max_pixels=max_pixels, draft_size=draft_size))


def photo(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    """A smooth colour image (JPEG-friendly) with structure in both axes."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h) + rng.integers(0, 4, (h, w))], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# --- decoding ---------------------------------------------------------------------------------------------


def test_served_input_is_the_shared_preprocessing():
    img = photo()
    np.testing.assert_array_equal(prepare(encode(img, "PNG"), RGB, max_pixels=LIMIT), preprocess([img], RGB))
    np.testing.assert_array_equal(prepare(encode(img, "PNG"), GREY, max_pixels=LIMIT), preprocess([img], GREY))
    # A grey model whose channels are normalised differently (the server looks each channel up on its own).
    uneven = Preprocessing(resize=40, crop=32, mean=(0.2, 0.3, 0.4), std=(0.5, 0.4, 0.3), mode="L")
    np.testing.assert_array_equal(prepare(encode(img, "PNG"), uneven, max_pixels=LIMIT), preprocess([img], uneven))


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = served_pixels(encode(img, "JPEG", quality=95, exif=exif), max_pixels=LIMIT)
    assert out.size == (20, 40)
    arr = np.asarray(out.convert("L"), np.float32)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "PA", "L", "1", "I;16", "CMYK"])
def test_colour_modes_decode_to_model_input(mode):
    base = photo(32, 32)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)  # uint16 -> mode I;16
        ref = base.convert("L")
    elif mode == "CMYK":
        img = base.convert("CMYK")
        ref = img.convert("RGB")
    else:
        img = base.convert(mode)
        ref = img
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "PA" else "PNG"
    data = encode(img, fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    x = prepare(data, RGB, max_pixels=LIMIT)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
    expected = preprocess([ref], RGB)
    tol = 0.2 if fmt == "JPEG" else 1e-6  # JPEG is lossy; the lossless formats must be exact
    assert np.abs(x - expected).max() <= tol + 1e-6, mode


def test_transparent_pixels_become_black():
    img = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    x = prepare(encode(img, "PNG"), RGB, max_pixels=LIMIT)
    black = preprocess([Image.new("RGB", (8, 8))], RGB)
    np.testing.assert_allclose(x, black)


def test_16bit_uses_the_full_range():
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    x = prepare(encode(img, "PNG"), GREY, max_pixels=LIMIT)
    eight = preprocess([Image.fromarray((ramp / 257).round().astype(np.uint8), "L")], GREY)
    assert np.abs(x - eight).max() < 0.05


def test_pixel_limit_refuses_before_decoding():
    with pytest.raises(ImageError) as err:
        served_pixels(png_header_only(30_000, 30_000), max_pixels=LIMIT)
    assert err.value.status == 413 and "pixels" in err.value.reason
    with pytest.raises(ImageError) as err:
        served_pixels(encode(photo(200, 100), "PNG"), max_pixels=19_999)
    assert err.value.status == 413


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"definitely not an image", "not a recognised image"),
    (encode(photo(), "JPEG")[:300], "truncated"),
    (encode(photo(16, 16), "ICO"), "not a recognised image"),  # a real image, but not a format we parse
])
def test_bad_images_are_400(data, reason):
    with pytest.raises(ImageError) as err:
        served_pixels(data, max_pixels=LIMIT)
    assert err.value.status == 400 and reason in err.value.reason.lower()


@pytest.mark.parametrize("fmt", ["PPM", "TGA", "ICO", "PCX", "SGI", "DDS"])
def test_a_format_the_server_refuses_is_unreadable_in_a_dataset_folder_too(fmt, tmp_path):
    from data.datasets import decode_checked, load_dataset

    root = tmp_path / "ds"
    (root / "val" / "cat").mkdir(parents=True)
    (root / "val" / "cat" / "ok.png").write_bytes(encode(photo(), "PNG"))
    other = encode(photo(), fmt)
    (root / "val" / "cat" / "camera.jpg").write_bytes(other)  # another format behind an image suffix
    with pytest.raises(ImageError):
        served_pixels(other, max_pixels=LIMIT)
    assert decode_checked(root / "val" / "cat" / "camera.jpg") is None  # counted as unreadable, as served
    assert decode_checked(root / "val" / "cat" / "ok.png") is not None
    assert load_dataset(root, "val").readable(range(2), 2).images.paths == [root / "val" / "cat" / "ok.png"]


def test_training_and_evaluation_see_the_orientation_the_server_sees(tmp_path):
    from data.datasets import decode_checked

    img = photo(40, 24)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.png"
    img.save(path, exif=exif)
    served = served_pixels(path.read_bytes(), max_pixels=LIMIT)
    assert served.size == (24, 40)
    np.testing.assert_array_equal(np.asarray(decode_checked(path)), np.asarray(served))


def test_grey_scale_follows_the_mode_not_the_content():
    ramp = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0..61380
    x16 = prepare(encode(Image.fromarray(ramp), "PNG"), GREY, max_pixels=LIMIT)
    as_int32 = prepare(encode(Image.fromarray(ramp.astype(np.int32)), "TIFF"), GREY, max_pixels=LIMIT)
    np.testing.assert_array_equal(as_int32, x16)  # 32-bit integers are 16-bit data, like I;16
    dark = ramp // 300  # 0..204: an 8-bit range held in 16 bits stays dark, whatever one pixel says
    bright = dark.copy()
    bright[0, 0] = 60000
    a = prepare(encode(Image.fromarray(dark), "PNG"), GREY, max_pixels=LIMIT)
    b = prepare(encode(Image.fromarray(bright), "PNG"), GREY, max_pixels=LIMIT)
    assert (a != b)[0, 0].sum() == 1  # one pixel differs; the rest keeps its scale
    unit = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)  # float grey is 0..1
    xf = prepare(encode(Image.fromarray(unit, "F"), "TIFF"), GREY, max_pixels=LIMIT)
    eight = preprocess([Image.fromarray((unit * 255).round().astype(np.uint8), "L")], GREY)
    assert np.abs(xf - eight).max() < 0.02


def _progressive_with_scans(scans: int) -> bytes:
    """A valid progressive JPEG whose last scan is repeated until it has `scans` scans."""
    data = encode(photo(64, 64), "JPEG", progressive=True, quality=90)
    last = data.rindex(b"\xff\xda")
    extra = data[last:-2] * (scans - data.count(b"\xff\xda"))
    return data[:-2] + extra + b"\xff\xd9"


def test_files_built_to_overwork_the_decoder_are_refused():
    from models.imagecheck.common import MAX_HEADER_SEGMENTS
    from models.imagecheck.jpeg import MAX_JPEG_SCANS
    from serve.imaging import CHEAP_BYTES, cheap

    jpeg = encode(photo(), "JPEG")
    progressive = _progressive_with_scans(20)
    assert served_pixels(progressive, max_pixels=LIMIT).size == (64, 64) and cheap(progressive)
    cases = [
        (jpeg[:2] + b"\xff\xfe\x00\x02" * (MAX_HEADER_SEGMENTS + 1) + jpeg[2:], "marker segments"),
        (_progressive_with_scans(MAX_JPEG_SCANS + 1), "scans"),
    ]
    png = encode(photo(), "PNG")
    empty = (0).to_bytes(4, "big") + b"zzZz" + zlib.crc32(b"zzZz").to_bytes(4, "big")
    cases.append((png[:33] + empty * (MAX_HEADER_SEGMENTS + 1) + png[33:], "chunks"))
    for data, reason in cases:
        with pytest.raises(ImageError) as err:
            served_pixels(data, max_pixels=LIMIT)
        assert err.value.status == 400 and reason in err.value.reason
        assert not cheap(data)  # never parsed on the event loop either
    assert not cheap(encode(photo(16, 16), "PNG") + b"\0" * CHEAP_BYTES)


def test_formats_that_hold_more_while_decoding_count_more_against_the_budget():
    """Measured peak bytes per pixel: baseline JPEG 5, progressive 7-10 (CMYK 12), AVIF 9, WebP 16."""
    def weight(fmt: str, mode: str = "RGB", **kw) -> int:
        buf = io.BytesIO()
        Image.new(mode, (64, 48)).save(buf, fmt, **kw)
        return decode_weight(Image.open(io.BytesIO(buf.getvalue())))

    assert weight("JPEG") == weight("PNG") == 1
    assert weight("JPEG", progressive=True) == 2 and weight("JPEG", "CMYK", progressive=True) == 3
    assert weight("WEBP") == 3
    # Modes that hold more while converted: a flat 6320 x 6320 LA PNG (92 KB) peaked at 13 bytes a pixel, and two
    # of them OOM-killed a server whose budget counted them at 5.
    assert weight("PNG", "LA") == 3 and weight("PNG", "RGBA") == 2 and weight("JPEG", "CMYK") == 2
    assert weight("PNG", "P", transparency=0) == 2 and weight("PNG", "P") == 1 and weight("PNG", "L") == 1
    # A 16-bit grey PNG (I;16) peaked at 6.4 bytes a pixel: widened to 32-bit samples before it becomes RGB.
    assert weight("PNG", "I;16") == 2 and weight("TIFF", "I;16") == 2 and weight("TIFF", "F") == 2


def test_an_image_dearer_than_the_whole_budget_still_decodes_alone():
    from serve.workpool import Busy, PixelBudget

    budget = PixelBudget(64 * 64)
    webp = encode(photo(64, 64), "WEBP", lossless=True)  # counts 3x its pixels, more than the whole budget
    assert prepare(webp, RGB, max_pixels=LIMIT, budget=budget).shape == (1, 3, 32, 32) and budget.used == 0
    with budget.reserve(1), pytest.raises(Busy):
        prepare(webp, RGB, max_pixels=LIMIT, budget=budget)


def test_a_photo_that_is_not_square_also_pays_for_the_region_preprocessing_copies():
    """A 3:2 photo peaked at about 8 bytes per pixel, not the budget's 5: preprocessing copies its centre square
    before the colour conversion. That copy is counted now; a square image, which is not copied, pays as before."""
    from models.preprocessing import copied_pixels
    from serve.workpool import Busy, PixelBudget

    assert copied_pixels(64, 64, RGB) == 0
    wide = copied_pixels(96, 64, RGB)
    assert 64 * 64 <= wide < 96 * 64
    for (w, h), extra in (((64, 64), 0), ((96, 64), wide)):
        png = encode(photo(w, h), "PNG")
        budget = PixelBudget(w * h + extra)
        prepare(png, RGB, max_pixels=LIMIT, budget=budget)  # fits exactly
        with budget.reserve(1), pytest.raises(Busy):  # one pixel short
            prepare(png, RGB, max_pixels=LIMIT, budget=budget)


def test_jpeg_draft_decodes_big_photos_small():
    big = encode(photo(2048, 1536, seed=1).resize((2048, 1536)), "JPEG", quality=90)
    drafted = served_pixels(big, max_pixels=LIMIT, draft_size=RGB.resize)
    full = served_pixels(big, max_pixels=LIMIT)
    assert full.size == (2048, 1536) and drafted.size == (256, 192)  # 1/8 scale, still >= the 32 px target
    a = prepare(big, RGB, max_pixels=LIMIT, jpeg_draft=True)
    b = prepare(big, RGB, max_pixels=LIMIT, jpeg_draft=False)
    assert a.shape == b.shape == (1, 3, 32, 32)
    assert np.abs(a - b).mean() < 0.05  # same picture, resampled from a smaller decode


# --- Open Inference Protocol wire format -----------------------------------------------------------------


def test_parse_json_and_binary_requests():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    doc = {"id": "r1", "inputs": [{"name": "input", "shape": [2, 3, 2, 2], "datatype": "FP32",
                                   "data": x.tolist()}]}
    req = parse_request(str(doc).replace("'", '"').encode(), None)
    assert req.id == "r1" and req.outputs is None and not req.binary_output
    np.testing.assert_array_equal(req.inputs["input"], x)

    head = (b'{"inputs":[{"name":"input","shape":[2,3,2,2],"datatype":"FP32",'
            b'"parameters":{"binary_data_size":96}}],"outputs":[{"name":"logits","parameters":{"binary_data":true,'
            b'"classification":3}}]}')
    req = parse_request(head + x.tobytes(), str(len(head)))
    np.testing.assert_array_equal(req.inputs["input"], x)
    assert req.outputs[0].binary is True and req.outputs[0].classification == 3


_BIN2 = b'{"inputs":[{"name":"i","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}'
_BIN1 = b'{"inputs":[{"name":"i","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}'
_STR_SIZE = _BIN1.replace(b'"binary_data_size":4', b'"binary_data_size":"4"')
_BOTH = _BIN1.replace(b'"FP32",', b'"FP32","data":[1],')


@pytest.mark.parametrize("body, header, reason", [
    (b"{", None, "not valid JSON"),
    (b'{"inputs": []}', None, "non-empty 'inputs'"),
    (b'{"inputs":[{"name":"input","shape":[2],"datatype":"FP32","data":[1]}]}', None, "1 values for shape"),
    (b'{"inputs":[{"name":"input","shape":[2],"datatype":"BYTES","data":["a","b"]}]}', None, "datatype"),
    (b'{"inputs":[{"name":"input","shape":[-1],"datatype":"FP32","data":[1]}]}', None, "non-negative"),
    (_BIN2 + b"\0" * 4, str(len(_BIN2)), "binary data ends"),
    (_BIN1 + b"\0" * 8, str(len(_BIN1)), "not claimed"),
    (b"{}", "99", "outside the body"),
    (b'{"inputs":[{"name":"input","shape":[2],"datatype":"FP32","data":[true,false]}]}', None, "got booleans"),
    (b'{"inputs":[{"name":"input","shape":[1],"datatype":"INT32","data":[true]}]}', None, "got booleans"),
    (b'{"inputs":[{"name":"input","shape":[2,2],"datatype":"FP32","data":[[1.5,2],[0,false]]}]}', None, "booleans"),
    (b'{"inputs":[{"name":"input","shape":[3],"datatype":"INT32","data":[1,true,0]}]}', None, "got booleans"),
    (b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1]}],'
     b'"outputs":[{"name":"logits"},{"name":"logits"}]}', None, "requested twice"),
    (_BIN1 + b"\0" * 4, "+" + str(len(_BIN1)), "decimal integer"),
    (_BIN1 + b"\0" * 4, f"{len(_BIN1) // 10}_{len(_BIN1) % 10}", "decimal integer"),
    (_STR_SIZE + b"\0" * 4, str(len(_STR_SIZE)), "must be a non-negative"),
    (_BOTH + b"\0" * 4, str(len(_BOTH)), "both 'data' and"),
    (b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1],"parameters":[]}]}', None,
     "'parameters' must be an object"),
    (b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":[1]}],"parameters":false}', None,
     "'parameters' must be an object"),
])
def test_malformed_requests_are_refused(body, header, reason):
    with pytest.raises(ProtocolError, match=reason):
        parse_request(body, header)


def test_responses_parse_with_tritonclient():
    from tritonclient.http import InferResult

    logits = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    for binary in (False, True):
        from serve.protocol import OutputTensor

        body, headers, media = encode_response("m", "1", "abc", [OutputTensor("logits", "FP32", logits, binary)])
        result = InferResult.from_response_body(body, header_length=headers.get("Inference-Header-Content-Length"))
        np.testing.assert_array_equal(result.as_numpy("logits"), logits)
        assert result.get_response()["id"] == "abc"
        assert media == ("application/octet-stream" if binary else "application/json")
    strings = classification_strings(logits, 2, list("abcde"))
    body, headers, _ = encode_response("m", "1", None, [OutputTensor("logits", "BYTES", strings, True)])
    got = InferResult.from_response_body(body, header_length=headers["Inference-Header-Content-Length"])
    top = got.as_numpy("logits")[0, 0].decode().split(":")
    assert int(top[1]) == int(logits[0].argmax()) and top[2] == "abcde"[logits[0].argmax()]
    assert float(top[0]) == pytest.approx(float(logits[0].max()), abs=1e-5)


def test_statistics_have_every_field_of_tritons_model_stats():
    from serve.stats import ModelStats

    stats = ModelStats()
    stats.batch("m", rows=4, seconds=0.002, requests=2)
    stats.request(True, 0.003, rows=2)
    entry = stats.to_triton("m", "1")
    assert {"name", "version", "last_inference", "inference_count", "execution_count", "inference_stats",
            "batch_stats", "response_stats", "memory_usage"} <= entry.keys()
    assert entry["response_stats"] == {} and entry["memory_usage"] == []
    assert entry["inference_count"] == 2 and entry["batch_stats"][0]["batch_size"] == 4


def test_decompression_is_bounded():
    payload = b'{"inputs": []}'
    assert decompress(gzip.compress(payload), "gzip", 1000) == payload
    assert decompress(zlib.compress(payload), "deflate", 1000) == payload
    with pytest.raises(ProtocolError) as err:
        decompress(gzip.compress(b"\0" * 10_000_000), "gzip", 1_000_000)
    assert err.value.status == 413
    with pytest.raises(ProtocolError) as err:
        decompress(payload, "br", 1000)
    assert err.value.status == 415
    # Several gzip members are one body (RFC 1952), bounded all together; anything else after the end is junk.
    assert decompress(gzip.compress(payload[:5]) + gzip.compress(payload[5:]), "gzip", 1000) == payload
    with pytest.raises(ProtocolError) as err:
        decompress(gzip.compress(b"\0" * 600_000) * 2, "gzip", 1_000_000)
    assert err.value.status == 413
    for body, coding in ((gzip.compress(payload) + b"junk", "gzip"), (zlib.compress(payload) + b"j", "deflate")):
        with pytest.raises(ProtocolError, match="junk after"):
            decompress(body, coding, 1000)
    # Each member costs a copy of the rest of the body: their number is bounded (160,000 empty members in 3 MB
    # took 10 s of one core), and x-gzip is gzip (RFC 9110).
    letters = bytes(range(65, 65 + MAX_GZIP_MEMBERS + 1))
    assert decompress(b"".join(gzip.compress(bytes([c])) for c in letters[:-1]), "x-gzip", 1000) == letters[:-1]
    for body in (b"".join(gzip.compress(bytes([c])) for c in letters), gzip.compress(b"") * 160_000):
        with pytest.raises(ProtocolError, match="members") as err:
            decompress(body, "gzip", 1_000_000)
        assert err.value.status == 400


# --- dynamic batcher ---------------------------------------------------------------------------------------


class Recorder:
    """A BatchObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.waits: list[float] = []

    def queued(self, model: str, seconds: float) -> None:
        self.waits.append(seconds)

    def batch(self, model: str, rows: int, seconds: float, requests: int = 1) -> None:
        self.batches.append(rows)


def row_sums(x: np.ndarray) -> np.ndarray:
    """A deterministic 'model': each row's sum, so a wrong row routing is visible."""
    if np.isnan(x).any():
        raise ValueError("NaN input")
    return x.reshape(len(x), -1).sum(axis=1, keepdims=True)


def test_concurrent_requests_are_batched_and_routed():
    async def main():
        rec = Recorder()
        b = DynamicBatcher("m", row_sums, max_batch=16, max_delay_s=0.05, max_queue=100, observer=rec)
        await b.start()
        xs = [np.full((1, 2), i, np.float32) for i in range(40)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.close()
        return rec, outs

    rec, outs = asyncio.run(main())
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(40)]
    assert sum(rec.batches) == 40 and max(rec.batches) > 1 and max(rec.batches) <= 16


def test_the_depth_leaves_out_a_queued_request_as_soon_as_its_client_leaves():
    """A cancelled request stays in the queue until the collector reaches it, never computed: the gauge counted it
    until then (a stalled model whose clients time out showed a backlog)."""
    release = threading.Event()

    def held_sums(x: np.ndarray) -> np.ndarray:
        release.wait(10)
        return row_sums(x)

    async def main() -> list[int]:
        b = DynamicBatcher("m", held_sums, max_batch=1, max_delay_s=0.0, max_queue=100)
        await b.start()
        running = asyncio.ensure_future(b.submit(np.ones((1, 2), np.float32)))
        queued = [asyncio.ensure_future(b.submit(np.full((1, 2), i, np.float32))) for i in range(3)]
        await asyncio.sleep(0.1)  # the first is computing (held), the others wait for the one inference thread
        depths = [b.depth]
        queued[1].cancel()
        await asyncio.sleep(0)
        depths.append(b.depth)
        release.set()
        outs = await asyncio.gather(running, queued[0], queued[2])
        assert [float(o[0, 0]) for o in outs] == [2.0, 0.0, 4.0]
        depths.append(b.depth)
        await b.close()
        return depths

    assert asyncio.run(main()) == [3, 2, 0]


def test_without_merging_each_request_is_a_batch_of_its_own():
    """A Triton model config without dynamic_batching: requests queued together still run one by one, each with
    all its rows."""
    async def main():
        rec = Recorder()
        b = DynamicBatcher("m", row_sums, max_batch=16, max_delay_s=0.05, max_queue=100, observer=rec, merge=False)
        await b.start()
        xs = [np.full((1 + i % 3, 2), i, np.float32) for i in range(12)]
        outs = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.close()
        return rec, xs, outs

    rec, xs, outs = asyncio.run(main())
    assert [o.tolist() for o in outs] == [row_sums(x).tolist() for x in xs]
    assert rec.batches == [len(x) for x in xs]


def test_a_lone_request_does_not_wait_for_companions_but_expected_ones_are_waited_for():
    async def main():
        rec = Recorder()
        b = DynamicBatcher("m", row_sums, max_batch=16, max_delay_s=0.5, max_queue=100, observer=rec)
        await b.start()
        loop = asyncio.get_running_loop()
        with b.admit():  # one request in the server: its batch starts at once
            t0 = loop.time()
            await b.submit(np.ones((1, 2), np.float32))
            lone = loop.time() - t0
        with b.admit(), b.admit():  # a second admitted request (still decoding) is worth waiting for
            t0 = loop.time()
            first = asyncio.ensure_future(b.submit(np.ones((1, 2), np.float32)))
            await asyncio.sleep(0.05)
            await b.submit(np.ones((1, 2), np.float32))
            await first
            paired = loop.time() - t0
        await b.close()
        return lone, paired, rec.batches

    lone, paired, batches = asyncio.run(main())
    assert lone < 0.2 and batches == [1, 2], (lone, batches)
    assert paired < 0.45


def test_streams_share_the_waiting_work_evenly():
    def slow_sums(x: np.ndarray) -> np.ndarray:
        time.sleep(0.02 * len(x))  # rows cost time on a stream, as on a one-thread CPU stream
        return row_sums(x)

    async def main(parallel):
        rec = Recorder()
        b = DynamicBatcher("m", slow_sums, max_batch=32, max_delay_s=0.05, max_queue=100, parallel=parallel,
                           observer=rec)
        await b.start()
        xs = [np.full((1, 2), i, np.float32) for i in range(24)]
        with contextlib.ExitStack() as admitted:
            for _ in xs:  # all 24 are in the server (as after decoding): the first batches can see them coming
                admitted.enter_context(b.admit())
            outs = await asyncio.gather(*(b.submit(x) for x in xs))
        await b.close()
        return rec.batches, outs

    batches, outs = asyncio.run(main(2))
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(24)]
    # Two streams: no batch takes more than its half of what waits, so neither stream idles through a tiny one.
    assert sum(batches) == 24 and max(batches) <= 12 and len(batches) >= 2, batches
    single, _ = asyncio.run(main(1))
    assert max(single) > 12, single  # one stream takes all it can, as before

    async def unadmitted():  # the batcher on its own (no admissions): what is queued is shared, and still batched
        rec = Recorder()
        b = DynamicBatcher("m", slow_sums, max_batch=32, max_delay_s=0.05, max_queue=100, parallel=2, observer=rec)
        await b.start()
        outs = await asyncio.gather(*(b.submit(np.full((1, 2), i, np.float32)) for i in range(24)))
        await b.close()
        return rec.batches, outs

    batches, outs = asyncio.run(unadmitted())
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(24)]
    assert sum(batches) == 24 and 1 < max(batches) <= 12, batches


def test_the_work_pool_runs_cheap_work_inline_only_when_idle():
    from serve.workpool import Busy, WorkPool

    async def main():
        pool = WorkPool(1, 0, name="t")
        here = threading.get_ident()
        inline = await pool.run(threading.get_ident, inline_if_idle=True)
        gate = threading.Event()
        busy = asyncio.ensure_future(pool.run(gate.wait, 5))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):  # one thread, no queue: a second job is refused, not queued or run inline
            await pool.run(threading.get_ident, inline_if_idle=True)
        gate.set()
        await busy
        worker = await pool.run(threading.get_ident)
        pool.shutdown()
        return here, inline, worker

    here, inline, worker = asyncio.run(main())
    assert inline == here and worker != here


def test_full_queue_is_refused_not_grown():
    gate = threading.Event()

    def slow(x):
        gate.wait(5)
        return row_sums(x)

    async def main():
        b = DynamicBatcher("m", slow, max_batch=1, max_delay_s=0, max_queue=2)
        await b.start()
        first = asyncio.ensure_future(b.submit(np.ones((1, 1), np.float32)))
        await asyncio.sleep(0.05)  # first is running (blocked); the next two wait in the queue
        queued = [asyncio.ensure_future(b.submit(np.ones((1, 1), np.float32))) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit(np.ones((1, 1), np.float32))
        gate.set()
        done = await asyncio.gather(first, *queued)
        await b.close()
        with pytest.raises(BatcherClosed):
            await b.submit(np.ones((1, 1), np.float32))
        return done

    assert [float(d[0, 0]) for d in asyncio.run(main())] == [1.0, 1.0, 1.0]


def test_a_failing_request_does_not_fail_its_batch():
    calls: list[int] = []

    def recorded(x):
        calls.append(len(x))
        return row_sums(x)

    async def main():
        rec = Recorder()
        b = DynamicBatcher("m", recorded, max_batch=8, max_delay_s=0.05, max_queue=10, observer=rec)
        await b.start()
        good = [np.ones((1, 2), np.float32), np.full((2, 2), 2, np.float32)]
        bad = np.full((1, 2), np.nan, np.float32)
        results = await asyncio.gather(b.submit(good[0]), b.submit(bad), b.submit(good[1]), return_exceptions=True)
        await b.close()
        return rec, results

    rec, (a, err, c) = asyncio.run(main())
    assert float(a[0, 0]) == 2.0 and c[:, 0].tolist() == [4.0, 4.0]
    assert isinstance(err, ValueError) and "NaN" in str(err)
    assert calls == [4, 1, 1, 2]  # batched together, then each request on its own
    assert rec.batches == [1, 2]  # only the batches that ran are counted


def test_admission_bounds_requests_in_progress():
    async def main():
        b = DynamicBatcher("m", row_sums, max_batch=4, max_delay_s=0, max_queue=2)
        await b.start()
        with b.admit(), b.admit():
            with pytest.raises(QueueFull):
                b.admit()
        with b.admit():
            assert b.admitted == 1
        await b.close()

    asyncio.run(main())


def test_close_finishes_queued_work():
    async def main():
        b = DynamicBatcher("m", row_sums, max_batch=64, max_delay_s=0.5, max_queue=100)
        await b.start()
        pending = [asyncio.ensure_future(b.submit(np.ones((1, 3), np.float32))) for _ in range(10)]
        await asyncio.sleep(0.01)
        await b.close(timeout=5)
        return await asyncio.gather(*pending)

    assert [float(o[0, 0]) for o in asyncio.run(main())] == [3.0] * 10


# --- settings ------------------------------------------------------------------------------------------------


def test_an_api_key_read_from_a_file_works_and_an_empty_flag_is_refused(capsys):
    """A key ending in a newline (a Secret made with --from-file) could never match: HTTP strips the header's
    whitespace. `--api-key "$TOKEN"` with TOKEN unset would serve without authentication."""
    from serve.__main__ import main
    from serve.middleware import AuthMiddleware

    assert Settings(api_key="s3cret\n").api_key.get_secret_value() == "s3cret"
    assert Settings(api_key=" \n").api_key is None
    assert main(["--api-key", "", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--api-key is empty" in err

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    from fastapi.testclient import TestClient

    key = Settings(api_key="s3cret\n").api_key.get_secret_value()
    client = TestClient(AuthMiddleware(app, api_key=key, open_paths=()))
    assert client.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer s3cre"}).status_code == 401


def test_settings_from_environment_and_flags(monkeypatch):
    monkeypatch.setenv("VITC_MODELS", "exports/a, b=exports/b")
    monkeypatch.setenv("VITC_BACKEND", "openvino")
    monkeypatch.setenv("VITC_API_KEY", "")
    s = Settings()
    assert s.models == ["exports/a", "b=exports/b"] and s.backend == "openvino" and s.api_key is None
    assert Settings(backend="onnxruntime").backend == "onnxruntime"  # flags win over the environment
    monkeypatch.setenv("VITC_MODELS", '["x", "y"]')
    assert Settings().models == ["x", "y"]
    with pytest.raises(ValueError):
        Settings(device="gpu")


def test_tuning_flags_the_backend_ignores_are_refused(monkeypatch):
    # torch runs one batch at a time and TensorRT takes no tuning: --parallel or a hint would silently do nothing.
    for backend, flags, refused in (("torch", {"parallel": 4}, "--parallel"),
                                    ("torch", {"openvino_hint": "latency"}, "--openvino-hint"),
                                    ("tensorrt", {"threads": 2, "compile": True}, "--threads, --compile"),
                                    ("openvino", {"channels_last": False}, "--channels-last")):
        with pytest.raises(ValueError, match=f"--backend {backend} does not use {refused} "):
            Settings(backend=backend, models=["x"], **flags)
    monkeypatch.setenv("VITC_PARALLEL", "2")  # the environment counts as given too, and is named as given
    with pytest.raises(ValueError, match="--backend torch does not use VITC_PARALLEL=2 "):
        Settings(backend="torch", models=["x"])
    with pytest.raises(ValueError, match="--backend torch does not use --parallel "):  # the flag wins, and is named
        Settings(backend="torch", models=["x"], parallel=3)
    monkeypatch.setenv("VITC_BACKEND", "torch")
    with pytest.raises(ValueError, match="VITC_BACKEND=torch does not use VITC_PARALLEL=2 "):
        Settings(models=["x"])
    monkeypatch.delenv("VITC_BACKEND")
    monkeypatch.setenv("VITC_OPENVINO_HINT", "latency")
    with pytest.raises(ValueError, match="VITC_OPENVINO_HINT=latency runs one batch at a time; VITC_PARALLEL=2 needs"):
        Settings(models=["x"])
    monkeypatch.delenv("VITC_OPENVINO_HINT")
    monkeypatch.delenv("VITC_PARALLEL")
    monkeypatch.setenv("VITC_PRECISION", "int8")
    with pytest.raises(ValueError, match="VITC_PRECISION=int8 does not apply to --model-repository"):
        Settings(model_repository="r")
    monkeypatch.delenv("VITC_PRECISION")
    monkeypatch.setenv("VITC_MAX_BUFFERED_BYTES", "2048")
    with pytest.raises(ValueError, match=r"VITC_MAX_BUFFERED_BYTES=2048 must be at least --max-body-bytes \(4096\)"):
        Settings(models=["x"], max_body_bytes=4096)
    monkeypatch.delenv("VITC_MAX_BUFFERED_BYTES")
    assert Settings(backend="torch", models=["x"], threads=2, compile=True).compile
    assert Settings(backend="torch", models=["x"], parallel=1).parallel == 1  # what torch does anyway
    assert Settings(backend="openvino", models=["x"], parallel=3, openvino_hint="throughput").parallel == 3
    # A repository's models run on their own artifacts' runtimes: --backend is refused for them
    # (tests/test_serve_repository_flags.py); --parallel applies to them.
    assert Settings(model_repository="r", parallel=2).parallel == 2
    with pytest.raises(ValueError, match="latency runs one batch at a time"):
        Settings(models=["x"], parallel=2, openvino_hint="latency")


def test_the_readmes_vitc_parallel_refusal_names_the_variable_the_user_set(monkeypatch, capsys):
    from serve.__main__ import main

    monkeypatch.setenv("VITC_PARALLEL", "4")
    assert main(["--model", "x", "--backend", "torch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m serve: error: invalid settings: --backend torch does not use VITC_PARALLEL=4 (its "
                   "tuning flags: --threads, --compile, --channels-last)"]


def test_model_arguments():
    assert parse_model_arg("cats=exports/x") == ("cats", Path("exports/x"))
    assert parse_model_arg("exports/x")[0] is None
    assert parse_model_arg("/data/a=b/x")[0] is None  # a path with '=' is not a name



def test_model_dir_serves_every_bundle_under_it(tmp_path):
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text("{}")
    (tmp_path / "not-a-bundle").mkdir()
    sources = model_sources(Settings(model_dir=tmp_path, models=["x"]))
    assert [s.describe() for s in sources] == ["x", str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ServeError, match="no models"):
        model_sources(Settings())
    with pytest.raises(ServeError, match="not a directory"):
        model_sources(Settings(model_dir=tmp_path / "missing"))


# --- the classify fast path -------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, query, fast", [
    ("POST", "/v1/models/m/classify", b"", True),
    ("POST", "/v1/models/m.v2_x/classify", b"top_k=3", True),
    ("POST", "/v1/models/m/classify", b"top_k=1000", True),
    ("POST", "/v1/models/m/classify", b"top_k=1001", False),  # out of range: FastAPI answers the 422
    ("POST", "/v1/models/m/classify", b"top_k=0", False),
    ("POST", "/v1/models/m/classify", b"top_k=03", False),
    ("POST", "/v1/models/m/classify", b"top_k=3&x=1", False),
    ("GET", "/v1/models/m/classify", b"", False),
    ("POST", "/v1/models/a/b/classify", b"", False),
    ("POST", "/v1/models//classify", b"", False),
    ("POST", "/v2/models/m/infer", b"", False),
])
def test_fast_path_takes_only_plain_classify_requests(method, path, query, fast):
    from serve.fastpath import FastPathMiddleware

    calls = []

    async def router(scope, receive, send):
        calls.append("router")

    async def handler(request, name, top_k):
        from starlette.responses import JSONResponse

        calls.append(("handler", name, top_k))
        return JSONResponse({})

    async def send(message):
        pass

    mw = FastPathMiddleware(router, path="/v1/models/{name}/classify", handler=handler, max_top_k=1000)
    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": [],
             "root_path": ""}
    asyncio.run(mw(scope, None, send))
    if fast:
        assert calls == [("handler", path.split("/")[3], int(query.split(b"=")[1]) if query else None)]
        assert scope["route"].path == "/v1/models/{name}/classify" and scope["path_params"] == {"name": calls[0][1]}
    else:
        assert calls == ["router"]


def test_the_body_budget_gives_memory_back_once_a_burst_is_over(monkeypatch):
    from serve import workpool
    from serve.middleware import TRIM_BYTES, BodyBudget

    trims = []
    monkeypatch.setattr(workpool, "_trim", lambda: trims.append(1))
    budget = BodyBudget(1 << 40)
    for _ in range(3):  # small bodies come and go: nothing to give back
        assert budget.take(1 << 20)
        budget.give(1 << 20)
    assert trims == []
    chunk = TRIM_BYTES // 8
    for _ in range(8):
        assert budget.take(chunk)
    for i in range(8):
        budget.give(chunk)
        assert len(trims) == (1 if i >= 5 else 0)  # once, when three quarters of the peak are given back
    assert budget.held == 0


def test_exotic_colour_modes_reach_a_model_as_training_decodes_them(tmp_path):
    from data.datasets import decode_checked

    rgb = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
    for mode in ("L", "RGB"):
        spec = Preprocessing(resize=32, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3, mode=mode)
        for exotic in ("YCbCr", "CMYK", "LAB"):
            path = tmp_path / f"x-{exotic}.tif"
            Image.fromarray(rgb).convert(exotic).save(path)
            served = prepare(path.read_bytes(), spec, max_pixels=10**7, jpeg_draft=False)
            # Training went YCbCr -> L directly (the Y band), the server via RGB: one grey level apart.
            np.testing.assert_array_equal(served, preprocess([decode_checked(path)], spec))


def test_a_misspelt_environment_setting_is_refused_not_ignored(monkeypatch, capsys):
    from serve.__main__ import main
    from serve.settings import unknown_environment

    env = {"VITC_MODEL": "x", "VITC_NO_ACCESS_LOG": "1", "VITC_MAX_BODY_BYTE": "9", "VITC_MODELS": "y",
           "VITC_RUNTIMES": "m", "VITC_BUILD_ID": "42", "PATH": "/bin"}
    near, other = unknown_environment(env)
    assert near == ["VITC_MAX_BODY_BYTE: did you mean VITC_MAX_BODY_BYTES?", "VITC_MODEL: did you mean VITC_MODELS?",
                    "VITC_NO_ACCESS_LOG: did you mean VITC_ACCESS_LOG=false?"]
    assert other == ["VITC_BUILD_ID"]  # someone else's variable: logged as ignored at start, not refused
    # A Service named `vitc` gives every pod of its namespace these (Kubernetes service links): not settings, and
    # VITC_PORT=tcp://... stopped the image from starting ("invalid setting --port").
    links = {"VITC_PORT": "tcp://10.96.0.12:8000", "VITC_SERVICE_HOST": "10.96.0.12", "VITC_SERVICE_PORT": "8000",
             "VITC_PORT_8000_TCP": "tcp://10.96.0.12:8000", "VITC_PORT_8000_TCP_ADDR": "10.96.0.12"}
    assert unknown_environment(links) == ([], [])
    # So does a Service named vitc-api or vitc-models (VITC_API_PORT was refused: "did you mean VITC_PORT?").
    others = {"VITC_API_PORT": "tcp://10.96.0.13:80", "VITC_API_SERVICE_PORT_HTTP": "80",
              "VITC_MODELS_PORT_80_TCP_ADDR": "10.96.0.14", "VITC_MODELS_SERVICE_HOST": "10.96.0.14"}
    assert unknown_environment(others) == ([], [])
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    assert Settings(models=["x"]).port == 8000 and Settings(models=["x"], port=9000).port == 9000
    monkeypatch.setenv("VITC_PORT", "9001")  # a real port setting still counts
    assert Settings(models=["x"]).port == 9001
    monkeypatch.setenv("VITC_MODEL", "exports/x")  # the server used to say "no models to serve"
    assert main([]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        SERVE_ERROR + "environment variable VITC_MODEL: did you mean VITC_MODELS? (every setting is "
        "VITC_<SETTING>; see --help)"]


def test_a_larger_image_limit_grows_the_default_decode_budget():
    # --max-image-pixels 200,000,000 (documented up to 10^9) was refused: the default budget held 10^8.
    s = Settings(models=["x"], max_image_pixels=200_000_000)
    assert s.decode_budget_pixels == 200_000_000
    assert Settings(models=["x"], max_image_pixels=1000).decode_budget_pixels == 100_000_000
    with pytest.raises(ValueError, match="must be at least"):
        Settings(models=["x"], max_image_pixels=200_000_000, decode_budget_pixels=100_000_000)


@pytest.mark.parametrize("datatype", [[], {}, ["FP32"], {"a": 1}])
def test_an_unhashable_datatype_is_a_400_not_a_500(datatype):
    import json as _json

    body = _json.dumps({"inputs": [{"name": "input", "shape": [1], "datatype": datatype, "data": [1]}]}).encode()
    with pytest.raises(ProtocolError, match="unsupported datatype"):
        parse_request(body, None)
