"""The real server (uvicorn subprocess, onnxruntime, two models, API key) on a real exported bundle."""

from __future__ import annotations

import asyncio
import io
import json
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from test_serve_fixtures import (
    animal_pngs,
    encode,
    micro_bundle,
    png_header_only,
    scores_by_index,
    softmax,
    start_server,
)

from data.datasets import ANIMAL_CLASSES
from models.bundle import read_manifest
from models.preprocessing import preprocess

KEY = "s3cret-token"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 2_000_000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-ort") / "server.log"
    srv = start_server(
        ["--model", f"micro={bundle}", "--model", f"twin={bundle}", "--backend", "onnxruntime",
         "--max-queue-delay-ms", "20", "--max-body-bytes", str(MAX_BODY), "--max-image-pixels", "4000000",
         "--max-files", "8"],
        log, env={"VITC_API_KEY": KEY},
    )
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def direct(bundle):
    """The runtime used directly on the bundle's ONNX file: image bytes -> softmax probabilities."""
    import onnxruntime as ort

    manifest = read_manifest(bundle)
    art = manifest.select("onnxruntime")
    session = ort.InferenceSession(str(bundle / art.files[0].path), providers=["CPUExecutionProvider"])
    spec = manifest.preprocessing

    def run(images: list[bytes]) -> np.ndarray:
        x = preprocess([Image.open(io.BytesIO(b)) for b in images], spec)
        return softmax(session.run(None, {"input": x})[0])

    return run


@pytest.fixture(scope="module")
def pngs():
    return animal_pngs(24)


def classify(client, png: bytes, model: str = "micro", **params) -> httpx.Response:
    return client.post(f"/v1/models/{model}/classify", content=png, headers={"content-type": "image/png"},
                       params=params)


def test_health_and_docs_are_open_and_everything_else_needs_the_key(server):
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    # The API's description opens in a browser, and says how to authorize (its "Authorize" button).
    assert httpx.get(server.url + "/docs").status_code == httpx.get(server.url + "/redoc").status_code == 200
    spec = httpx.get(server.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearer": []}] and spec["paths"]["/v2/health/ready"]["get"]["security"] == []
    assert "application/json" in spec["paths"]["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    for path in ("/v1/models", "/metrics", "/v2/models/micro"):
        r = httpx.get(server.url + path)
        assert r.status_code == 401 and "bearer" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_models_are_described(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"micro", "twin"}
    m = client.get("/v1/models/micro").json()
    assert (m["variant"], m["stem"], m["runtime"], m["precision"]) == ("vit_c_micro", "conv", "onnxruntime", "fp32")
    assert (m["input"]["height"], m["input"]["width"], m["input"]["channels"]) == (32, 32, 3)
    assert m["labels"] == ANIMAL_CLASSES and m["ready"] is True
    assert m["preprocessing"]["mode"] == "L" and m["max_batch"] == 32
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and "micro, twin" in r.json()["error"]


def test_classification_equals_the_runtime(client, pngs, direct):
    expected = direct(pngs[:8])
    assert expected.std(axis=0).max() > 1e-3, "predictions do not depend on the image"
    for png, p in zip(pngs[:8], expected, strict=True):
        answer = classify(client, png, top_k=10).json()
        assert answer["model"] == "micro"
        np.testing.assert_allclose(scores_by_index(answer), p, atol=1e-5)
        assert answer["predictions"][0]["index"] == int(p.argmax())
        assert answer["predictions"][0]["label"] == ANIMAL_CLASSES[int(p.argmax())]
    top5 = classify(client, pngs[0], model="twin").json()["predictions"]
    assert len(top5) == 5 and [x["score"] for x in top5] == sorted((x["score"] for x in top5), reverse=True)


def test_multipart_single_and_batch_forms(client, pngs, direct):
    one = client.post("/v1/models/micro/classify", files={"file": ("a.png", pngs[0], "image/png")}).json()
    assert isinstance(one, dict)
    files = [("file", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs[:5])]
    many = client.post("/v1/models/micro/classify", params={"top_k": 10}, files=files).json()
    assert isinstance(many, list) and len(many) == 5
    for answer, p in zip(many, direct(pngs[:5]), strict=True):
        np.testing.assert_allclose(scores_by_index(answer), p, atol=1e-5)


def test_open_inference_protocol_with_tritonclient(server, pngs, bundle):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    manifest = read_manifest(bundle)
    x = preprocess([Image.open(io.BytesIO(b)) for b in pngs[:4]], manifest.preprocessing)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(bundle / manifest.select("onnxruntime").files[0].path),
                               providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    tc = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    # (tritonclient adds its own headers to the dict it is given: pass a fresh one per call)
    assert tc.is_server_live() and tc.is_server_ready(headers=dict(AUTH))
    assert tc.is_model_ready("micro", headers=dict(AUTH))
    meta = tc.get_model_metadata("micro", headers=dict(AUTH))
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}
    assert meta["outputs"][0]["shape"] == [-1, 10] and meta["platform"] == "onnxruntime_onnx"
    assert tc.get_model_config("micro", headers=dict(AUTH))["max_batch_size"] == 32
    assert "binary_tensor_data" in tc.get_server_metadata(headers=dict(AUTH))["extensions"]

    for binary in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("logits", binary_data=binary)
        result = tc.infer("micro", [inp], outputs=[out], headers=dict(AUTH), request_id="req-7")
        np.testing.assert_allclose(result.as_numpy("logits"), ref, rtol=1e-5, atol=1e-5)
        assert result.get_response()["id"] == "req-7"
    result = tc.infer("micro", [inp], headers=dict(AUTH), request_compression_algorithm="gzip", model_version="1")
    np.testing.assert_allclose(result.as_numpy("logits"), ref, rtol=1e-5, atol=1e-5)
    top = tc.infer("micro", [inp], outputs=[httpclient.InferRequestedOutput("logits", class_count=2)],
                   headers=dict(AUTH)).as_numpy("logits")
    assert top.shape == (4, 2) and [int(s.decode().split(":")[1]) for s in top[:, 0]] == ref.argmax(1).tolist()

    with pytest.raises(InferenceServerException, match="unknown model") as err:
        tc.infer("nope", [inp], headers=dict(AUTH))
    assert err.value.status() == "404"
    wrong = httpclient.InferInput("input", [1, 3, 16, 16], "FP32")
    wrong.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(InferenceServerException, match="shape") as err:
        tc.infer("micro", [wrong], headers=dict(AUTH))
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match="no version"):
        tc.infer("micro", [inp], headers=dict(AUTH), model_version="2")
    tc.close()


def _chunks(total: int):
    for _ in range(total // 65536 + 1):
        yield b"\0" * 65536


HARD_EDGES = [
    # (description, request kwargs, expected status, words in the reason)
    ("declared body too large", {"content": b"\0" * (MAX_BODY + 1), "headers": {"content-type": "image/png"}},
     413, "larger than"),
    ("streamed body too large", {"content": _chunks(MAX_BODY + 10), "headers": {"content-type": "image/png"}},
     413, "larger than"),
    ("wrong content type", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "content type"),
    # Without a Content-Type a body is application/octet-stream (RFC 9110 8.3): read as an image, or said not one.
    ("no content type", {"content": b"hello"}, 400, "not a recognised image"),
    ("undecodable", {"content": b"GIF89a but not really", "headers": {"content-type": "image/gif"}}, 400,
     "corrupt or truncated GIF"),
    ("no image signature", {"content": b"hello, not an image", "headers": {"content-type": "image/gif"}}, 400,
     "not a recognised image"),
    ("empty body", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    ("multipart without file", {"files": {"other": ("a.png", b"x", "image/png")}}, 422, "'file'"),
    ("multipart text part", {"files": {"file": ("a.txt", b"x", "text/plain")}}, 415, "content type"),
    # A part without a filename or an image type is a text field, whatever its size (Starlette refuses big ones on
    # its own); with an image type it is a file, read as one.
    ("part without filename", {"files": {"file": (None, b"x", "text/plain")}}, 422, "no filename"),
    ("big part without filename", {"files": {"file": (None, b"x" * 70_000, "text/plain")}}, 422, "no filename"),
    ("image part without filename", {"files": {"file": (None, b"x", "image/png")}}, 400, "not a recognised image"),
    ("too many files", {"files": [("file", (f"{i}.png", b"x", "image/png")) for i in range(9)]}, 400, "files"),
]


@pytest.mark.parametrize("what, kwargs, status, words", HARD_EDGES, ids=[h[0] for h in HARD_EDGES])
def test_hard_edges_answer_json_reasons(client, what, kwargs, status, words):
    r = client.post("/v1/models/micro/classify", **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in r.json()["error"].lower()


def test_an_image_sent_without_a_content_type_is_classified(client, pngs):
    """httpx's `content=` and requests' `data=` send no Content-Type: such a body was a 415 "unsupported content type
    'none'", while a form's untyped part was read as an image."""
    typed = client.post("/v1/models/micro/classify", content=pngs[0], headers={"content-type": "image/png"})
    r = client.post("/v1/models/micro/classify", content=pngs[0])
    assert r.status_code == 200 and "content-type" not in r.request.headers, r.text
    assert r.json()["predictions"] == typed.json()["predictions"]


def test_image_edges_and_parameters(client, pngs):
    bomb = classify(client, png_header_only(40_000, 40_000))
    assert bomb.status_code == 413 and "pixels" in bomb.json()["error"]
    truncated = encode(Image.open(io.BytesIO(pngs[0])).resize((300, 300)), "JPEG")[:400]
    r = client.post("/v1/models/micro/classify", content=truncated, headers={"content-type": "image/jpeg"})
    assert r.status_code == 400 and "truncated" in r.json()["error"].lower()
    assert classify(client, pngs[0], model="nope").status_code == 404
    for bad in ("0", "11", "-3", "many"):
        r = classify(client, pngs[0], top_k=bad)
        assert r.status_code == 422 and "top_k" in r.json()["error"]
    # The server is unharmed: the same image still classifies, on a reused connection.
    assert classify(client, pngs[0], top_k=3).status_code == 200


def test_fast_path_and_fastapi_route_answer_alike(client, pngs):
    # Plain requests take serve.fastpath; any other query goes through FastAPI's router to the same handler.
    def both(model: str, query: str) -> tuple[httpx.Response, httpx.Response]:
        url = f"/v1/models/{model}/classify"
        headers = {"content-type": "image/png"}
        return (client.post(f"{url}?{query}", content=pngs[2], headers=headers),
                client.post(f"{url}?{query}&via=router", content=pngs[2], headers=headers))

    for model, query, status in [("micro", "top_k=3", 200), ("micro", "top_k=03", 200), ("nope", "top_k=2", 404),
                                 ("micro", "top_k=99", 422)]:
        fast, routed = both(model, query)
        assert fast.status_code == routed.status_code == status, (query, fast.text, routed.text)
        assert fast.json() == routed.json()
        assert "server-timing" in fast.headers or status != 200


def test_two_hundred_concurrent_requests_are_batched(server, client, pngs, direct):
    expected = direct(pngs)
    before = _batch_histogram(client)

    async def fire():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, limits=limits, timeout=60) as ac:
            async def one(i: int):
                r = await ac.post("/v1/models/micro/classify", params={"top_k": 10},
                                  content=pngs[i % len(pngs)], headers={"content-type": "image/png"})
                return i, r
            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(fire())
    assert [r.status_code for _, r in results] == [200] * 200
    for i, r in results:
        np.testing.assert_allclose(scores_by_index(r.json()), expected[i % len(pngs)], atol=1e-5)
    after = _batch_histogram(client)
    batches = after["count"] - before["count"]
    singles = after["le_1"] - before["le_1"]
    assert after["sum"] - before["sum"] == 200  # every image computed exactly once
    assert batches - singles >= 1 and batches < 200  # dynamic batching happened (batch size > 1)


def _batch_histogram(client) -> dict[str, float]:
    out = {"count": 0.0, "sum": 0.0, "le_1": 0.0}  # no series before the model's first batch
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        if fam.name == "vitc_batch_size":
            for s in fam.samples:
                if s.labels.get("model") != "micro":
                    continue
                if s.name.endswith("_count"):
                    out["count"] = s.value
                elif s.name.endswith("_sum"):
                    out["sum"] = s.value
                elif s.name.endswith("_bucket") and float(s.labels["le"]) == 1.0:
                    out["le_1"] = s.value
    return out


def test_metrics_parse_with_prometheus_client(server, client, pngs):
    classify(client, pngs[0])
    client.get("/v1/models/absent")
    assert httpx.get(server.url + "/v2/models/micro").status_code == 401  # refused before routing
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name, kind in [("vitc_requests", "counter"), ("vitc_request_duration_seconds", "histogram"),
                       ("vitc_queue_duration_seconds", "histogram"), ("vitc_compute_duration_seconds", "histogram"),
                       ("vitc_preprocess_duration_seconds", "histogram"), ("vitc_batch_size", "histogram"),
                       ("vitc_in_flight_requests", "gauge"), ("vitc_queue_depth", "gauge")]:
        assert families[name].type == kind, name
    counts = {(s.labels["model"], s.labels["status"], s.labels["endpoint"]): s.value
              for s in families["vitc_requests"].samples if s.name == "vitc_requests_total"}
    assert counts[("micro", "200", "/v1/models/{name}/classify")] >= 1
    assert counts[("_unknown", "404", "/v1/models/{name}")] >= 1  # unknown names never become label values
    assert counts[("micro", "401", "/v2/models/{name}")] >= 1  # counted under its route, not as "other"
    assert [s.value for s in families["vitc_in_flight_requests"].samples] == [0.0]  # the scrape itself is not counted


def test_access_log_is_structured(server, client, pngs):
    ok = classify(client, pngs[1], model="twin")
    refused = httpx.get(f"{server.url}/v2/models/twin")  # without the key: its own 401, not another test's
    assert (ok.status_code, refused.status_code) == (200, 401)

    def access() -> list[dict]:
        lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
        return [e for e in lines if e["logger"] == "vitc.access"]

    def logged(request_id: str) -> list[dict]:
        return [e for e in access() if e.get("request_id") == request_id]

    # The line is written once the answer has gone (its duration and size known): a moment after the client has it.
    end = time.monotonic() + 10
    while not (logged(ok.headers["x-request-id"]) and logged(refused.headers["x-request-id"])) and \
            time.monotonic() < end:
        time.sleep(0.05)
    (hit,) = logged(ok.headers["x-request-id"])
    assert hit["path"] == "/v1/models/twin/classify" and hit["status"] == 200, hit
    assert hit["model"] == "twin" and hit["duration_ms"] > 0
    assert [e["status"] for e in logged(refused.headers["x-request-id"])] == [401]


def test_openapi_documents_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/models/{name}/classify"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body and "image/png" in body
    assert "/v2/models/{name}/infer" in spec["paths"]
    assert "swagger" in client.get("/docs").text.lower()


def test_v2_statistics_framing_and_paths_are_strict(client):
    x = np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)
    head = json.dumps({"inputs": [{"name": "input", "shape": [3, 3, 32, 32], "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    before = client.get("/v2/models/twin/stats").json()["model_stats"][0]
    r = client.post("/v2/models/twin/infer", content=head + x.tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 200, r.text
    after = client.get("/v2/models/twin/stats").json()["model_stats"][0]
    # Each row of a successful request is one inference; queue time is measured, not rounded to the millisecond.
    assert after["inference_count"] - before["inference_count"] == 3
    assert after["inference_stats"]["queue"]["ns"] > before["inference_stats"]["queue"]["ns"]
    assert after["inference_stats"]["queue"]["ns"] % 1_000_000 != 0
    # Two framings that disagree are refused, not resolved by picking one.
    r = client.post("/v2/models/twin/infer", content=head + x.tobytes(),
                    headers=[("Inference-Header-Content-Length", str(len(head))),
                             ("Inference-Header-Content-Length", "3")])
    assert r.status_code == 400 and "different values" in r.json()["error"]
    # A trailing slash is an unknown path (JSON 404), never a redirect that echoes the Host header.
    for method, path in (("POST", "/v2/models/twin/infer/"), ("GET", "/v2/health/live/"),
                         ("POST", "/v1/models/twin/classify/")):
        r = client.request(method, path, headers={"Host": "evil.example"})
        assert r.status_code == 404 and "location" not in r.headers and r.json()["error"], (path, r.status_code)
