"""/v2 where tester hCQ found vitc refusing valid requests: the bound on a request's JSON arrays and objects counted
brackets inside strings (an `id` or a string parameter holding `[`), and held only `data` nested as [B][C][H][W], so
the same values one per list (`x.reshape(-1, 1).tolist()`) were a 400; and an input in a datatype the model does not
take was told the parser's twelve datatypes, then, in one of those, "must be FP32". Real HTTP (uvicorn and
serve.httpproto in this process) on the fake runtime (tests/fake_runtime.py: exact logits, no export)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator

import fake_runtime
import httpx
import numpy as np
import pytest
from test_serve_fixtures import in_process_server

from serve import protocol
from serve.protocol import JSON_MEMORY_PER_BYTE, MAX_ID_CHARS, ProtocolError, parse_request

INFER = "/v2/models/fake/infer"
MAX_BATCH = 8  # the fake bundle's (tests/data/legacy-bundle-v1)
# What the server reads before parsing, at the least, for this model: its largest batch nested as its shape.
FIXED = 1 + MAX_BATCH * (1 + 3 * (1 + 32)) + 4096


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[httpx.Client]:
    bundle = fake_runtime.write_bundle(tmp_path_factory.mktemp("strings") / "fake")
    with in_process_server(bundle) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        yield c


def _images(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _request(x: np.ndarray, data: list | None = None, **extra: object) -> dict:
    data = x.ravel().tolist() if data is None else data
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}], **extra}


def _logits(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text[:300]
    out = r.json()["outputs"][0]
    return np.asarray(out["data"], np.float32).reshape(out["shape"])


def _refusal(r: httpx.Response) -> str:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    return r.json()["error"]


# Strings of every kind of bracket and escape: JSON writes `"` and `\` escaped, so the counter must read escapes.
STRINGS = ["[" * 8000, "{" * 8000, '"[' * 6000, "\\[{" * 3000, "\\" + "[" * 8000 + "\\", "[" * MAX_ID_CHARS]


@pytest.mark.parametrize("text", STRINGS, ids=["brackets", "braces", "quotes", "backslashes", "edges", "longest"])
def test_brackets_in_an_id_are_accepted_and_the_id_is_echoed(client, text):
    r = client.post(INFER, json=_request(_images(1), id=text))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["id"] == text


@pytest.mark.parametrize("text", STRINGS[:5])
def test_brackets_in_string_parameters_are_accepted(client, text):
    x = _images(1)
    body = _request(x, parameters={"note": text}, outputs=[{"name": "logits", "parameters": {"note": text}}])
    body["inputs"][0]["parameters"] = {"note": text}
    flat = _logits(client.post(INFER, json=_request(x)))
    np.testing.assert_allclose(_logits(client.post(INFER, json=body)), flat, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch", [2, MAX_BATCH])
def test_one_list_per_value_is_read_row_major_as_the_flat_data(client, batch):
    """`x.reshape(-1, 1).tolist()`: B*C*H*W lists of one value, beyond the count of [B][C][H][W]; as flat data."""
    x = _images(batch)
    flat = _logits(client.post(INFER, json=_request(x)))
    assert flat.shape[0] == batch
    for data in (x.reshape(-1, 1).tolist(), x.reshape(batch, 3, -1, 1).tolist(), [x.reshape(-1, 1).tolist()]):
        np.testing.assert_allclose(_logits(client.post(INFER, json=_request(x, data))), flat, rtol=1e-6, atol=1e-6)


def _junk(lists: int, **extra: object) -> bytes:
    """A request for one image whose key "junk" holds `lists` empty lists (6 more arrays and objects hold them and
    the request), then `tail`: a body no valid request for the model needs, or not JSON at all."""
    tail = extra.pop("tail", b"")
    head = json.dumps(_request(_images(1), **extra), separators=(",", ":")).encode()
    return head[:-1] + b',"junk":[' + b",".join([b"[]"] * lists) + b"]}" + tail


@pytest.mark.parametrize("rid", ["a\\", 'a"', "\\\\", '\\"', "[" * 20_000])
def test_more_arrays_than_any_valid_request_holds_are_refused_before_parsing(client, rid):
    """Strings end where JSON ends them (`"a\\"` ends, `"a\""` goes on): the lists after them count, and a body that
    is no JSON at all past them is refused on its count, before it is parsed."""
    lists = 60_000  # past FIXED, and past one per BYTES_PER_CONTAINER bytes of the body
    for tail in (b"", b"not json"):
        body = _junk(lists, id=rid, tail=tail)
        reason = _refusal(client.post(INFER, content=body, headers={"content-type": "application/json"}))
        assert reason.startswith(f"request JSON holds {lists + 6} arrays and objects; "), reason
        assert "flat or nested as its shape" in reason, reason
        per = protocol.BYTES_PER_CONTAINER
        assert f"one list per {per} bytes" in reason, reason
        assert lists > max(FIXED, len(body) // per)


def test_the_count_reads_json_strings_as_json_does():
    cases = {b'{"a":"[{","b":[{}]}': 3, b'{"a":"\\"[","b":[]}': 2, b'{"a":"\\\\","b":[[]]}': 3,
             b'{"a":"\\\\\\"[{\\\\","b":[]}': 2, b'["\\u005c",[]]': 2, b'["[\\\\\\\\"]': 1, b'"[[': 0}
    for text, want in cases.items():
        assert protocol.count_containers(text, 0) == want, text
    # UTF-16 JSON: every bracket byte counts (escapes are not read there), never fewer than the real ones.
    assert protocol.count_containers('{"a":"[[","b":[]}'.encode("utf-16"), 0) == 4


def test_the_dearest_body_the_bound_admits_parses_within_the_memory_reserved_for_it():
    """The bound keeps JSON's Python objects within JSON_MEMORY_PER_BYTE, which the decode budget reserves for a
    body: objects (about 200 bytes for 7 of JSON) as dense as the bound allows, the rest numbers."""
    size = 2 << 20
    head = b'{"inputs":[{"name":"input","shape":[1],"datatype":"FP32","data":['
    units = size // protocol.BYTES_PER_CONTAINER - 8
    body = head + b'{"":0},' * units + b"0.1," * ((size - len(head) - 7 * units) // 4) + b"0]}]}"
    assert units + 5 <= len(body) // protocol.BYTES_PER_CONTAINER
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=r"data is not FP32 \(got objects\)"):  # all of it parsed
            parse_request(body, None, 100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak > 10 * len(body), "the body parsed without the memory the test is about"
    assert peak <= JSON_MEMORY_PER_BYTE * len(body), peak / len(body)


# A tensor in any datatype but the one the model takes: base64 image bytes (KServe's pattern), the parser's other
# datatypes, ones it has no numpy type for, and JSON that is not a datatype name.
ODD = [("BYTES", [1], ["iVBORw0KGgo="], "BYTES"), ("BF16", [1, 3, 32, 32], [0.5] * 3072, "BF16"),
       ("FP8", [1, 3, 32, 32], [0.5] * 3072, "FP8"), ("UINT8", [1, 3, 32, 32], [1] * 3072, "UINT8"),
       ("FP16", [1, 3, 32, 32], [0.5] * 3072, "FP16"), ("INT64", [1, 3, 32, 32], [1] * 3072, "INT64"),
       ("BOOL", [1, 3, 32, 32], [True] * 3072, "BOOL"), ("FP64", [1, 3, 32, 32], [0.5] * 3072, "FP64"),
       ("fp32", [1, 3, 32, 32], [0.5] * 3072, "fp32"), (["FP32"], [1, 3, 32, 32], [0.5] * 3072, "a list")]


@pytest.mark.parametrize("datatype, shape, data, shown", ODD, ids=[str(d[0]) for d in ODD])
def test_a_datatype_the_model_does_not_take_is_named_beside_the_one_it_takes(client, datatype, shape, data, shown):
    body = {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}
    assert _refusal(client.post(INFER, json=body)) == f"input 'input' must be FP32 (the model's datatype), got {shown}"


@pytest.mark.parametrize("datatype", ["UINT8", "BYTES"])
def test_binary_data_in_another_datatype_gets_the_same_reason(client, datatype):
    head = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": datatype,
                                   "parameters": {"binary_data_size": 3072}}]}).encode()
    r = client.post(INFER, content=head + bytes(3072), headers={"Inference-Header-Content-Length": str(len(head))})
    assert _refusal(r) == f"input 'input' must be FP32 (the model's datatype), got {datatype}"


def test_the_parser_alone_still_reads_every_datatype_it_has():
    """Without a model (other callers of parse_request) the parser keeps its own datatypes and its reason."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "UINT8", "data": [1, 2]}]}).encode()
    assert parse_request(body, None).inputs["x"].dtype == np.uint8
    with pytest.raises(ProtocolError, match=r"^input 'x': unsupported datatype 'BYTES'; supported: BOOL, "):
        parse_request(body.replace(b"UINT8", b"BYTES"), None)
