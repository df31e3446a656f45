"""/v2 where Triton and tritonclient set the behaviour: the raw binary request (Inference-Header-Content-Length: 0),
the reason given for a binary body sent without its header length, versions read as integers, long request ids.
One real server; its backend is tests/fake_runtime.py (exact logits, no export needed)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator

import fake_runtime
import httpx
import numpy as np
import pytest
from test_serve_fixtures import client_of, fake_server

from serve.launch import ServerProcess

INFER = "/v2/models/fake/infer"
HEADER = "Inference-Header-Content-Length"
SHAPE = (1, 3, 32, 32)
CLASSES = 10  # the legacy bundle's animals
W = fake_runtime.weights(3, CLASSES)  # what fake_runtime.write_bundle stores


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("raw")
    with fake_server(fake_runtime.write_bundle(tmp / "fake"), tmp) as s:
        yield s


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with client_of(server) as c:
        yield c


def _tensor(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _json_logits(client: httpx.Client, x: np.ndarray) -> np.ndarray:
    r = client.post(INFER, json={"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                             "data": x.ravel().tolist()}]})
    assert r.status_code == 200, r.text
    return np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(len(x), CLASSES)


def _binary_request(x: np.ndarray) -> tuple[bytes, bytes]:
    """(JSON header, its tensor bytes) of Triton's binary tensor extension."""
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head, x.tobytes()


def _ok_infers(client: httpx.Client) -> float:
    """Successful answers of the infer route in the Prometheus metrics."""
    lines = [ln for ln in client.get("/metrics").text.splitlines()
             if ln.startswith("vitc_requests_total{") and 'model="fake"' in ln and "infer" in ln
             and 'status="200"' in ln]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


def test_a_raw_binary_request_is_a_batch_of_one_answered_in_binary(client, server):
    from tritonclient.http import InferResult

    x = _tensor()
    stats = client.get("/v2/models/fake/stats").json()["model_stats"][0]
    ok = _ok_infers(client)
    r = client.post(INFER, content=x.tobytes(), headers={HEADER: "0", "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HEADER])
    assert json.loads(r.content[:n]) == {
        "model_name": "fake", "model_version": "1",
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [1, CLASSES],
                     "parameters": {"binary_data_size": 4 * CLASSES}}]}
    raw = np.frombuffer(r.content[n:], "<f4").reshape(1, CLASSES)
    np.testing.assert_array_equal(raw, _json_logits(client, x))  # the same tensor as JSON: the same logits
    np.testing.assert_allclose(raw, fake_runtime.logits(W, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(InferResult.from_response_body(r.content, header_length=n).as_numpy("logits"), raw)
    # Decompressed first, as Triton does: the body is then the tensor.
    zipped = client.post(INFER, content=gzip.compress(x.tobytes()), headers={HEADER: "0", "content-encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.content == r.content
    # Counted like any request: statistics, metrics and the access log.
    after = client.get("/v2/models/fake/stats").json()["model_stats"][0]
    assert after["inference_count"] == stats["inference_count"] + 3
    assert after["inference_stats"]["success"]["count"] == stats["inference_stats"]["success"]["count"] + 3
    assert _ok_infers(client) == ok + 3
    logged = [json.loads(ln) for ln in server.logs().splitlines() if ln.startswith("{")]
    assert sum(e.get("msg") == "request" and e.get("path") == INFER and e.get("status") == 200 for e in logged) >= 3


@pytest.mark.parametrize("body, header, reason", [
    (_tensor().tobytes()[:-4], "0", "12288 bytes, got 12284"),
    (np.concatenate([_tensor(1), _tensor(2)]).tobytes(), "0", "12288 bytes, got 24576"),  # batch 1 only, as Triton
    (b"", "0", "12288 bytes, got 0"),
    (np.full(SHAPE, np.nan, np.float32).tobytes(), "00", "non-finite"),
    (b"{}", "1" * 5000, "outside the body"),  # was int() past 4,300 digits: a 500
])
def test_a_bad_raw_binary_request_is_refused_with_the_reason(client, body, header, reason):
    r = client.post(INFER, content=body, headers={HEADER: header})
    assert r.status_code == 400 and reason in r.json()["error"], r.text


@pytest.mark.parametrize("tail", [
    _tensor().tobytes(),  # not UTF-8
    bytes(12288),  # UTF-8 (NULs): json's "Extra data"
    (b"\x20\x00\x80\x3f" * 3072),  # starts with a byte that is JSON whitespace
])
def test_a_binary_body_without_its_header_length_says_which_to_send(client, tail):
    x = np.frombuffer(tail, "<f4").reshape(SHAPE)
    head, _ = _binary_request(x)
    hint = f"send {HEADER}: {len(head)}"
    r = client.post(INFER, content=head + tail)
    assert r.status_code == 400 and hint in r.json()["error"] and "not valid JSON" not in r.json()["error"], r.text
    r = client.post(INFER, content=head + tail, headers={HEADER: str(len(head) + 8)})  # a wrong length: the same
    assert r.status_code == 400 and f"{hint} (not {len(head) + 8})" in r.json()["error"], r.text
    for short in (len(head) // 2, len(head) - 1):  # a length that cuts the JSON: the same hint
        r = client.post(INFER, content=head + tail, headers={HEADER: str(short)})
        assert r.status_code == 400 and f"{HEADER} {short} ends inside the JSON" in r.json()["error"], r.text
        assert hint in r.json()["error"], r.text
    r = client.post(INFER, content=head + tail, headers={HEADER: str(len(head))})  # as told: served
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(1, CLASSES)
    np.testing.assert_array_equal(got, _json_logits(client, x))


def test_a_json_error_keeps_its_reason_unless_the_json_ends_early(client):
    cases = [
        (b'{"inputs": []} {"inputs": []}', f"send {HEADER}: 14"),  # a second object: it says where the first ends
        (b"{", "not valid JSON: Expecting property name"),
        (b'{"inputs": [\xff\xfe]}', "not valid JSON: 'utf-8' codec"),
        (b"[1] \x00", "not valid JSON: Extra data"),  # not an object: nothing to hint
    ]
    for body, reason in cases:
        r = client.post(INFER, content=body)
        assert r.status_code == 400 and reason in r.json()["error"], r.text


def test_versions_are_integers_as_in_triton(client):
    x = _tensor(3)
    for v in ("1", "01", "0" * 5000 + "1"):
        assert client.get(f"/v2/models/fake/versions/{v}").json()["versions"] == ["1"]
        assert client.get(f"/v2/models/fake/versions/{v}/ready").status_code == 200
        r = client.post(f"/v2/models/fake/versions/{v}/infer", content=x.tobytes(), headers={HEADER: "0"})
        assert r.status_code == 200, r.text
    for v in ("2", "0", "10", "1x", "+1", "١"):
        r = client.get(f"/v2/models/fake/versions/{v}")
        assert r.status_code == 404 and "serving version 1" in r.json()["error"], (v, r.text)


def test_a_long_request_id_is_returned(client):
    head, tail = _binary_request(_tensor(4))
    for rid, status in (("r" * 1000, 200), ("é" * 65_536, 200), ("r" * 65_537, 400)):
        doc = json.loads(head) | {"id": rid}
        body = json.dumps(doc).encode()
        r = client.post(INFER, content=body + tail, headers={HEADER: str(len(body))})
        assert r.status_code == status, r.text[:200]
        if status == 200:
            assert r.json()["id"] == rid
        else:
            assert "'id' must be a string of at most 65536 characters" in r.json()["error"]


def test_shared_memory_trace_and_logging_are_refused_with_a_reason_tritonclient_shows(client, server):
    """vitc serves none of these Triton extensions: each call says so (a bare 404 said nothing), and a request that
    names a shared memory region is refused rather than answered in the body (its region would stay unwritten)."""
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    triton = tc.InferenceServerClient(server.url.removeprefix("http://"))
    calls = [triton.get_system_shared_memory_status, triton.get_cuda_shared_memory_status,
             lambda: triton.register_system_shared_memory("r", "/vitc-shm", 64), triton.get_trace_settings,
             lambda: triton.get_trace_settings(model_name="fake"), triton.get_log_settings,
             lambda: triton.update_log_settings({"log_info": True})]
    for call in calls:
        with pytest.raises(InferenceServerException) as err:
            call()
        assert "vitc does not serve Triton's" in str(err.value) and "extension" in str(err.value), err.value
    with pytest.raises(InferenceServerException, match="Triton's trace extension"):  # not the model's name
        triton.get_trace_settings(model_name="logging")
    assert "shared_memory" not in "".join(triton.get_server_metadata()["extensions"])
    x = _tensor().ravel().tolist()
    for body in ({"inputs": [{"name": "input", "shape": list(SHAPE), "datatype": "FP32",
                              "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 12288}}]},
                 {"inputs": [{"name": "input", "shape": list(SHAPE), "datatype": "FP32", "data": x}],
                  "outputs": [{"name": "logits", "parameters": {"shared_memory_region": "r",
                                                                "shared_memory_byte_size": 40}}]}):
        r = client.post(INFER, json=body)
        assert r.status_code == 400 and "does not serve Triton's shared memory" in r.json()["error"], r.text
