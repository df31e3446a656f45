"""How many predictions a client may ask for: /v1 `top_k` is bounded by the model's own class count (a 1,500-class
model ranks all 1,500), refused with one 422 naming that range for anything else, however absurd, the same way on
the fast path (serve/fastpath.py) and through FastAPI's route; v2 `classification` takes any int64 and clamps it to
the output, as Triton does. The backend is tests/fake_runtime.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from test_serve_fixtures import animal_pngs, client_of, fake_server

from models.bundle import MAX_CLASSES
from serve.launch import ServerProcess
from serve.protocol import ProtocolError, classification_strings, parse_request
from serve.routes import v1

CLASSES = 1500
CLASSIFY = "/v1/models/fake/classify"
PNG = {"content-type": "image/png"}


def wide_bundle(dest: Path, classes: int) -> Path:
    """The fake runtime's test bundle with `classes` classes (only its fake artifact: nothing else is served)."""
    from models.bundle import Artifact, file_entries, read_manifest, write_manifest

    shutil.copytree(fake_runtime.LEGACY, dest)
    m = read_manifest(dest)
    np.save(dest / fake_runtime.WEIGHTS, fake_runtime.weights(3, classes))
    artifact = Artifact(id="fake-fp32", runtime="fake", format="npy", precision="fp32", servable=True,
                        files=file_entries(dest, [dest / fake_runtime.WEIGHTS]))
    for stale in m.artifacts:
        for f in stale.files:
            (dest / f.path).unlink()
    config, output = dataclasses.replace(m.config, num_classes=classes), dataclasses.replace(m.output, classes=classes)
    write_manifest(dest, dataclasses.replace(m, config=config, output=output, artifacts=(artifact,), golden=None,
                                             served=None, class_names=tuple(f"c{i}" for i in range(classes))))
    return dest


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    bundle = wide_bundle(tmp_path_factory.mktemp("wide") / "fake", CLASSES)
    with fake_server(bundle, tmp_path_factory.mktemp("wide-server")) as s:
        yield s


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with client_of(server) as c:
        yield c


def _both(client: httpx.Client, query: str) -> tuple[httpx.Response, httpx.Response]:
    """The same classify query on the fast path (a plain query) and through FastAPI's route (one more parameter)."""
    png = animal_pngs(1)[0]
    return (client.post(f"{CLASSIFY}?{query}", content=png, headers=PNG),
            client.post(f"{CLASSIFY}?{query}&via=router", content=png, headers=PNG))


# --- /v1 top_k ------------------------------------------------------------------------------------------------------


def test_every_class_of_a_model_wider_than_1000_can_be_ranked_both_ways(client):
    for k in (1000, 1001, CLASSES):
        fast, routed = _both(client, f"top_k={k}")
        assert fast.status_code == routed.status_code == 200, (k, fast.text, routed.text)
        assert fast.json() == routed.json()
        predictions = fast.json()["predictions"]
        assert len(predictions) == k
        if k == CLASSES:  # every class once, best first
            assert sorted(p["index"] for p in predictions) == list(range(CLASSES))
            scores = [p["score"] for p in predictions]
            assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-6


@pytest.mark.parametrize("value, shown", [
    (str(CLASSES + 1), f"'{CLASSES + 1}'"),
    (str(MAX_CLASSES), f"'{MAX_CLASSES}'"),  # within what the fast path takes, beyond this model
    (str(MAX_CLASSES + 1), f"'{MAX_CLASSES + 1}'"),
    ("0", "'0'"),
    ("-3", "'-3'"),
    ("1e9", "'1e9'"),
    ("1000000000", "'1000000000'"),
    # under the 64 KiB header limit; never made an int
    pytest.param("9" * 60_000, "'999999999999999999999999...'", id="60000-digits"),
    ("many", "'many'"),
    ("", "''"),
])
def test_a_bad_top_k_gets_one_422_naming_the_models_range_both_ways(client, value, shown):
    fast, routed = _both(client, f"top_k={value}")
    assert fast.status_code == routed.status_code == 422, (fast.text[:300], routed.text[:300])
    assert fast.json() == routed.json() == {
        "error": f"top_k must be a whole number between 1 and {CLASSES} (the model's classes), got {shown}"}



@pytest.mark.parametrize("query, shown", [
    ("%0A3", r"'\n3'"), ("%093", r"'\t3'"), ("3%0D", r"'3\r'"), ("%0B3", r"'\x0b3'"), ("%1C3", r"'\x1c3'"),
    ("%C2%A03", r"'\xa03'"), ("%E3%80%803", r"'\u30003'"), ("%2B%0A3", r"'+\n3'"),
], ids=["LF", "tab", "CR", "VT", "FS", "NBSP", "ideographic-space", "plus-LF"])
def test_a_top_k_wrapped_in_other_whitespace_is_refused_both_ways(client, query, shown):
    """Only ASCII spaces and a leading `+` may surround the digits (str.strip() took any Unicode whitespace)."""
    fast, routed = _both(client, f"top_k={query}")
    assert fast.status_code == routed.status_code == 422, (fast.text[:300], routed.text[:300])
    assert fast.json() == routed.json() == {
        "error": f"top_k must be a whole number between 1 and {CLASSES} (the model's classes), got {shown}"}


@pytest.mark.parametrize("query", ["3", "+3", "%2B3", "%203%20", "%20%2B3", "003"])
def test_a_top_k_with_spaces_a_plus_or_leading_zeros_is_taken_both_ways(client, query):
    fast, routed = _both(client, f"top_k={query}")
    assert fast.status_code == routed.status_code == 200, (fast.text[:300], routed.text[:300])
    assert fast.json() == routed.json() and len(fast.json()["predictions"]) == 3

def test_an_unknown_model_is_a_404_before_its_top_k_is_judged(client):
    for value in ("3", "0", "1e9"):
        r = client.post(f"/v1/models/nope/classify?top_k={value}", content=b"x", headers=PNG)
        assert r.status_code == 404 and "unknown model" in r.json()["error"], r.text


def test_the_fast_path_takes_any_top_k_up_to_the_largest_bundle_and_never_converts_more_digits():
    from serve.fastpath import FastPathMiddleware

    assert v1.MAX_TOP_K == MAX_CLASSES  # what serve.app hands the fast path
    calls = []

    async def router(scope, receive, send):
        calls.append("router")

    async def handler(request, name, top_k):
        from starlette.responses import JSONResponse

        calls.append(top_k)
        return JSONResponse({})

    async def send(message):
        pass

    mw = FastPathMiddleware(router, path="/v1/models/{name}/classify", handler=handler, max_top_k=v1.MAX_TOP_K)
    for query, taken in [(b"top_k=1500", 1500), (b"top_k=100000", 100000), (b"top_k=100001", "router"),
                         (b"top_k=1000000", "router"), (b"top_k=" + b"9" * 60_000, "router"),
                         (b"top_k=1500\n", "router")]:
        calls.clear()
        scope = {"type": "http", "method": "POST", "path": "/v1/models/m/classify", "query_string": query,
                 "headers": [], "root_path": ""}
        asyncio.run(mw(scope, None, send))
        assert calls == [taken], query[:20]


def test_openapi_documents_top_k_as_an_integer_up_to_the_largest_bundle(client):
    params = client.get("/openapi.json").json()["paths"][CLASSIFY.replace("fake", "{name}")]["post"]["parameters"]
    top_k = [p for p in params if p["name"] == "top_k"]
    assert len(top_k) == 1 and top_k[0]["schema"] == {"type": "integer", "minimum": 1, "maximum": MAX_CLASSES}


# --- v2 classification ----------------------------------------------------------------------------------------------


def _v2(k: object) -> dict:
    x = np.full((1, 3, 32, 32), 0.25, np.float32)
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "logits", "parameters": {"classification": k}}]}


def _output(k: object) -> dict:
    return {"inputs": [{"name": "i", "shape": [1], "datatype": "FP32", "data": [1.0]}],
            "outputs": [{"name": "logits", "parameters": {"classification": k}}]}


@pytest.mark.parametrize("k", [0, 3, 1 << 20, (1 << 20) + 1, 10**12, (1 << 63) - 1])
def test_any_int64_classification_count_is_taken(k):
    assert parse_request(json.dumps(_output(k)).encode(), None).outputs[0].classification == k


@pytest.mark.parametrize("k, got", [(-1, "-1"), (1 << 63, "an integer outside int64"),
                                    (10**4000, "an integer outside int64"), (-(1 << 63), str(-(1 << 63))),
                                    (1.5, "a number"), (True, "a boolean"), ("3", "a string"), (None, "null")],
                         ids=["-1", "2^63", "4001-digits", "-2^63", "1.5", "true", "string", "null"])
def test_a_classification_count_outside_int64_is_refused_naming_the_rule(k, got):
    with pytest.raises(ProtocolError) as exc:
        parse_request(json.dumps(_output(k)).encode(), None)
    assert str(exc.value) == ("output 'logits': classification must be an integer from 0 to 2^63-1 (an int64, as in "
                              f"Triton; a count above the output's size ranks all of it), got {got}")


def test_a_huge_classification_count_is_clamped_to_the_output_without_allocating_it():
    logits = np.random.default_rng(0).standard_normal((2, CLASSES)).astype(np.float32)
    assert classification_strings(logits, (1 << 63) - 1, None).shape == (2, CLASSES)


def test_v2_ranks_every_class_for_a_count_above_the_old_cap(client):
    r = client.post("/v2/models/fake/infer", json=_v2(10**12))
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [1, CLASSES] and len(out["data"]) == CLASSES
    assert sorted(int(s.split(":")[1]) for s in out["data"]) == list(range(CLASSES))
    refused = client.post("/v2/models/fake/infer", json=_v2(1 << 63))
    assert refused.status_code == 400 and "2^63-1" in refused.json()["error"], refused.text
