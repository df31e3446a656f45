"""Property-based fuzzing of everything the server parses from a client (not collected directly: test_fuzz.py runs
this module in a child process under a memory cap, so an unbounded allocation fails the run instead of the machine).

Properties: the Open Inference Protocol parser and the body decompressor either return a well-formed request or
raise ProtocolError with a 4xx; image decoding either returns the model input or raises ImageError (400/413) or
Busy, and always gives back its pixel budget; the /v1 upload route answers every body with a 2xx/4xx/503 and a
strict-JSON body. Examples are derandomised, so CI runs the same cases every time.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import fake_runtime
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from models.preprocessing import Preprocessing
from serve.imaging import ImageError, prepare
from serve.protocol import DTYPES, ProtocolError, decompress, parse_request
from serve.workpool import Busy, PixelBudget

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
REPO = Path(__file__).resolve().parents[1]

# --- the Open Inference Protocol parser ---------------------------------------------------------------------

numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.integers(min_value=-(10**30), max_value=10**30))
json_values = st.recursive(
    st.one_of(st.none(), numbers, st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=40,
)
shapes = st.lists(st.one_of(st.integers(-3, 6), st.integers(0, 2**70), st.booleans(), st.text(max_size=2)),
                  max_size=70)
datatypes = st.one_of(st.sampled_from(sorted(DTYPES)), st.sampled_from(["BYTES", "FP8", "", "fp32"]), json_values)


@st.composite
def inputs(draw: st.DrawFn) -> dict:
    spec = {"name": draw(st.one_of(st.just("input"), st.text(max_size=4), json_values)),
            "shape": draw(st.one_of(shapes, json_values)), "datatype": draw(datatypes)}
    if draw(st.booleans()):
        spec["data"] = draw(st.one_of(json_values, st.lists(numbers, max_size=64)))
    if draw(st.booleans()):
        spec["parameters"] = draw(st.one_of(
            st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-8, 4096), json_values)}), json_values))
    return spec


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, str | None]:
    doc = {"inputs": draw(st.one_of(st.lists(inputs(), max_size=3), json_values))}
    for key, value in (("id", json_values), ("outputs", json_values), ("parameters", json_values)):
        if draw(st.booleans()):
            doc[key] = draw(value)
    head = json.dumps(doc, allow_nan=True).encode()
    binary = draw(st.binary(max_size=512))
    header = draw(st.one_of(st.none(), st.just(str(len(head))), st.text(max_size=6)))
    return head + (binary if header is not None else b""), header


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """Well-formed requests (JSON or binary tensors), sometimes with one value pushed out of its range."""
    datatype = draw(st.sampled_from(sorted(DTYPES)))
    dtype = DTYPES[datatype]
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=4))
    count = int(np.prod(shape))
    if dtype.kind == "b":
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = draw(st.lists(st.integers(int(info.min), int(info.max)), min_size=count, max_size=count))
    else:
        values = draw(st.lists(st.floats(-1e4, 1e4, width=16 if dtype.itemsize == 2 else 32), min_size=count,
                               max_size=count))
    if values and draw(st.booleans()):  # one hostile value
        values[draw(st.integers(0, count - 1))] = draw(st.one_of(
            st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)))
    spec: dict = {"name": "input", "shape": shape, "datatype": datatype}
    if draw(st.booleans()) or not all(isinstance(v, int | float | bool) for v in values):
        spec["data"] = values
        return json.dumps({"inputs": [spec]}, allow_nan=True).encode(), None
    raw = np.asarray(values).astype(dtype).tobytes() if values else b""
    spec["parameters"] = {"binary_data_size": len(raw) + draw(st.sampled_from([0, 0, 0, 1, -1]))}
    head = json.dumps({"inputs": [spec], "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]})
    return head.encode() + raw, str(len(head))


def _well_formed(parsed) -> None:  # noqa: ANN001
    for arr in parsed.inputs.values():
        assert isinstance(arr, np.ndarray) and arr.ndim <= 8
        if arr.dtype.kind == "f":
            assert np.isfinite(arr).all()


@FUZZ
@given(st.one_of(near_valid(), requests(),
                 st.tuples(st.binary(max_size=2048), st.one_of(st.none(), st.text(max_size=8)))))
def test_the_v2_parser_accepts_or_refuses_with_a_4xx(case):
    body, header = case
    try:
        _well_formed(parse_request(body, header))
        event("parsed")
    except ProtocolError as exc:
        assert 400 <= exc.status < 500 and str(exc)
        event(f"refused {exc.status}")


@FUZZ
@given(st.one_of(st.binary(max_size=4096),
                 st.binary(max_size=200_000).map(lambda b: zlib.compress(b)),
                 st.integers(0, 3_000_000).map(lambda n: zlib.compress(b"\0" * n, 9))),
       st.sampled_from(["gzip", "deflate", "identity", "br", None]))
def test_decompression_is_bounded(body, encoding):
    try:
        out = decompress(body, encoding, 1_000_000)
        assert len(out) <= 1_000_000 or encoding in ("identity", None)
    except ProtocolError as exc:
        assert exc.status in (400, 413, 415)


# --- image decoding -----------------------------------------------------------------------------------------

SPEC = Preprocessing(resize=36, crop=32)
FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"]
MODES = ["L", "RGB", "RGBA", "P", "LA", "I;16", "I", "F", "1", "CMYK"]


def _png_header(w: int, h: int, depth: int, colour: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def images(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["encoded", "forged", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    if kind == "forged":  # a header that claims anything, with (almost) no data
        return _png_header(draw(st.integers(0, 2**31)), draw(st.integers(0, 2**31)),
                           draw(st.sampled_from([1, 2, 4, 8, 16, 3])), draw(st.sampled_from([0, 2, 3, 4, 6, 5])))
    w, h = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    if draw(st.booleans()):  # extreme aspect ratios
        w, h = (draw(st.integers(1, 3)), draw(st.integers(1000, 200_000)))[:: draw(st.sampled_from([1, -1]))]
    mode = draw(st.sampled_from(MODES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(
        mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        img = img.convert("I") if mode != "F" else img.convert("F")
    fmt = draw(st.sampled_from(FORMATS))
    # zlib's fastest level: a valid PNG all the same, and making the noise images (up to 600,000 pixels) was most of
    # the run (the multipart test makes up to 10 an example).
    png = {"compress_level": 1}
    buf = io.BytesIO()
    try:
        img.save(buf, fmt, **(png if fmt == "PNG" else {}))
    except (OSError, ValueError, KeyError, OverflowError):  # that format cannot hold this image
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "PNG", **png)
    data = bytearray(buf.getvalue())
    for _ in range(draw(st.integers(0, 4))):  # flip bytes, then maybe truncate
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(images(), st.booleans())
def test_image_decoding_answers_or_refuses_and_returns_its_budget(data, draft):
    budget = PixelBudget(50_000_000)
    try:
        x = prepare(data, SPEC, max_pixels=40_000_000, jpeg_draft=draft, budget=budget)
        assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32 and np.isfinite(x).all()
        event("decoded")
    except ImageError as exc:
        assert exc.status in (400, 413) and exc.reason
        event(f"refused {exc.status}")
    except Busy:
        pass
    assert budget.used == 0


# --- the /v1 upload route -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("fuzz") / "fake")
    with fake_runtime.registered():
        settings_ = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False, max_body_bytes=2 << 20,
                             max_files=8)
        with TestClient(create_app(settings_), raise_server_exceptions=False) as c:
            yield c


def _header(text: str) -> str:
    """What an HTTP client can put in a header value (printable ASCII)."""
    return "".join(ch for ch in text if 32 <= ord(ch) < 127)


content_types = st.one_of(st.sampled_from(["image/png", "image/jpeg", "application/octet-stream", "text/plain",
                                           "multipart/form-data", "multipart/form-data; boundary=x", "", "image/"]),
                          st.text(max_size=30))


@FUZZ
@given(st.one_of(images(), st.binary(max_size=2048)), content_types, st.one_of(st.none(), st.text(max_size=5)))
def test_the_upload_route_never_answers_5xx_other_than_503(client, body, content_type, top_k):
    headers = {"content-type": _header(content_type)} if content_type else {}
    params = {"top_k": top_k} if top_k is not None else {}
    r = client.post("/v1/models/fake/classify", content=body, headers=headers, params=params)
    assert r.status_code in (200, 400, 413, 415, 422, 503), (r.status_code, r.text[:300])
    event(f"status {r.status_code}")
    doc = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in a response"))
    assert ("predictions" in doc) if r.status_code == 200 else doc["error"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["file", "other", "FILE"]), images(), content_types), max_size=10))
def test_multipart_uploads_never_answer_5xx_other_than_503(client, parts):
    files = [(field, (f"{i}.img", data, _header(ctype) or None))
             for i, (field, data, ctype) in enumerate(parts)]
    r = client.post("/v1/models/fake/classify", files=files) if files else client.post(
        "/v1/models/fake/classify", data={"x": "1"})
    assert r.status_code in (200, 400, 413, 415, 422, 503), (r.status_code, r.text[:300])
    event(f"status {r.status_code}")
    json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in a response"))
