"""/v2 where tester hCC found vitc apart from Triton and the Open Inference Protocol: unload of an unknown name,
the batch statistics of a model without batching, the types of `parameters`, a bundle's label_filename, answers
compressed for Accept-Encoding, `GET /v2/`, and errors that name a model by its name. In process on the fake runtime
(tests/fake_runtime.py: exact logits, no export), and one real server for tritonclient's own decompression."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
import test_repository_lifecycle as lifecycle
from test_repository_lifecycle import CONFIG, NAME, add_version
from test_repository_lifecycle import client as _client
from test_repository_lifecycle import served as _repository
from test_serve_fixtures import client_of, fake_server

from models.bundle import read_manifest
from serve import protocol
from serve.launch import ServerProcess
from serve.protocol import ProtocolError, parse_request
from serve.settings import Settings

UNBATCHED = CONFIG.replace("max_batch_size: 8", "max_batch_size: 0").replace(
    "format: FORMAT_NCHW dims: [ 3, 32, 32 ]", "dims: [ -1, 3, 32, 32 ]").replace("[ 10 ]", "[ -1, 10 ]")
fake = lifecycle.fake  # the fixture: the fake runtime, and one whose package is absent
HEADER = "Inference-Header-Content-Length"
VARY = "Accept-Encoding"


def _body(rows: int = 1, **extra: object) -> dict:
    x = np.random.default_rng(rows).standard_normal((rows, 3, 32, 32)).astype(np.float32)
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}


def _add_model(repo: Path, name: str, config: str | None = CONFIG, runtime: str = "fake") -> None:
    """repo/name/1: the fake artifact alone (as export.triton writes a real one), with `config` as config.pbtxt."""
    add_version(repo, name, "1", runtime)
    if config is not None:
        (repo / name / "config.pbtxt").write_text(config.replace('name: "fake"', f'name: "{name}"'))


# F1 ---------------------------------------------------------------------------------------------------------------

def test_unload_of_a_name_the_server_does_not_know_succeeds_and_a_malformed_one_is_refused(fake, tmp_path):
    repo = tmp_path / "repo"
    _add_model(repo, NAME)
    with _client(_repository(repo)) as c:
        for _ in range(2):  # idempotent, as Triton's unload of a name it does not know
            r = c.post("/v2/repository/models/nope/unload")
            assert (r.status_code, r.json()) == (200, {}), r.text
        r = c.post("/v2/repository/models/nope/unload", json={"parameters": {"unload_dependents": True}})
        assert r.status_code == 200, r.text
        assert "nope" not in {e["name"] for e in c.post("/v2/repository/index").json()}  # it left no state
        assert c.get("/v2/models/nope").json()["error"].startswith("unknown model 'nope'")
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the others serve on
        for odd, status in [(".hidden", 400), ("a%20b", 400), ("%2E%2E", 400), ("x" * 129, 400),
                            ("..%2Fetc", 404)]:  # names no model can have: refused as a load of them is
            r = c.post(f"/v2/repository/models/{odd}/unload")
            assert r.status_code == status and "error" in r.json(), (odd, r.text)


# F2 ---------------------------------------------------------------------------------------------------------------

def _stats(c: httpx.Client, name: str) -> tuple[int, list[tuple[int, int]]]:
    s = c.get(f"/v2/models/{name}/stats").json()["model_stats"][0]
    return s["inference_count"], [(b["batch_size"], b["compute_infer"]["count"]) for b in s["batch_stats"]]


def test_batch_stats_count_a_request_without_batching_as_batch_size_1_as_triton(fake, tmp_path):
    repo = tmp_path / "repo"
    _add_model(repo, "unbatched", UNBATCHED)
    _add_model(repo, "batched", CONFIG)
    with _client(_repository(repo)) as c:
        for rows in (4, 3):
            assert c.post("/v2/models/unbatched/infer", json=_body(rows)).status_code == 200
            assert c.post("/v2/models/batched/infer", json=_body(rows)).status_code == 200
        count, batches = _stats(c, "unbatched")
        assert (count, batches) == (2, [(1, 2)])  # Triton's onnxruntime backend: 1 per request at max_batch_size 0
        assert sum(size * n for size, n in batches) == count
        count, batches = _stats(c, "batched")  # rows are inferences where the first dimension is the batch
        assert (count, batches) == (7, [(3, 1), (4, 1)])


# F3 ---------------------------------------------------------------------------------------------------------------

def _wire(body: dict) -> bytes:
    """`body` as JSON, an infinite float written as the number beyond every float a client sends (1e999)."""
    return json.dumps(body).replace("Infinity", "1e999").encode()


def _request(**parameters: object) -> bytes:
    return _wire(_body(1, parameters=parameters))


@pytest.mark.parametrize("parameters, says", [
    ({"p": {"nested": [1, 2]}}, "request parameter 'p' must be a string, a number or a boolean, got an object"),
    ({"p": [1]}, "request parameter 'p' must be a string, a number or a boolean, got a list"),
    ({"ok": 1, "p": None}, "request parameter 'p' must be a string, a number or a boolean, got null"),
    ({"triton_enable_empty_final_response": True}, "'triton_enable_empty_final_response': keys starting with "
                                                   "'triton_' are reserved"),
    ({"sequence_id": {"x": 1}}, 'parameters.sequence_id must be an unsigned integer or a string, got {"x": 1}'),
    ({"sequence_id": -1}, "parameters.sequence_id must be an unsigned integer or a string, got -1"),
    ({"sequence_start": "yes"}, 'parameters.sequence_start must be true or false, got "yes"'),
    ({"priority": "high"}, 'parameters.priority must be an unsigned integer, got "high"'),
    ({"priority": 1.5}, "parameters.priority must be an unsigned integer, got 1.5"),
    ({"timeout": -5}, "parameters.timeout must be an unsigned integer (microseconds), got -5"),
    ({"timeout": 1 << 64}, "parameters.timeout must be an unsigned integer (microseconds), got 18446744073709551616"),
    ({"binary_data_output": "yes"}, 'parameters.binary_data_output must be true or false, got "yes"'),
    ({"x": float("inf")}, "request parameter 'x' is a number beyond every float"),
    ({"x": float("-inf")}, "request parameter 'x' is a number beyond every float"),
], ids=["object", "list", "null", "triton_", "sequence_id-object", "sequence_id-negative", "sequence_start",
        "priority-string", "priority-float", "timeout-negative", "timeout-2^64", "binary_data_output", "1e999",
        "-1e999"])
def test_request_parameters_triton_refuses_are_refused_naming_the_key(parameters, says):
    with pytest.raises(ProtocolError) as refused:
        parse_request(_request(**parameters), None)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_scalar_parameters_and_the_triton_keys_of_their_type_are_accepted():
    accepted = {"sequence_id": "session-7", "sequence_start": True, "sequence_end": False, "priority": 0,
                "timeout": (1 << 64) - 1, "binary_data_output": True, "my_string": "x", "my_int": -3,
                "my_float": 0.25, "my_bool": False, "headers": "h"}
    assert parse_request(_request(**accepted), None).binary_output is True
    assert parse_request(_request(sequence_id=(1 << 64) - 1), None).binary_output is False
    body = _body(1, outputs=[{"name": "logits", "parameters": {"classification": 2, "note": "n", "w": 1.5}}])
    body["inputs"][0]["parameters"] = {"note": "n", "flag": True}
    assert parse_request(json.dumps(body).encode(), None).outputs[0].classification == 2


@pytest.mark.parametrize("where, parameters, says", [
    ("input", {"p": {}}, "input 'input' parameter 'p' must be a string, a number or a boolean, got an object"),
    ("output", {"p": []}, "output 'logits' parameter 'p' must be a string, a number or a boolean, got a list"),
    ("output", {"classification": None}, "classification must be an integer from 0 to 2^63-1"),  # its own check
    ("output", {"binary_data": "yes"}, "output 'logits': binary_data must be true or false"),
    ("output", {"binary_data": None}, "output 'logits': binary_data must be true or false"),
    ("input", {"x": float("inf")}, "input 'input' parameter 'x' is a number beyond every float"),
    ("output", {"x": float("-inf")}, "output 'logits' parameter 'x' is a number beyond every float"),
    ("input", {"binary_data_size": "4"}, "binary_data_size must be a non-negative integer"),
])
def test_tensor_parameters_are_scalars_and_the_known_ones_keep_their_own_checks(where, parameters, says):
    body = _body(1, outputs=[{"name": "logits"}])
    (body["inputs"] if where == "input" else body["outputs"])[0]["parameters"] = parameters
    with pytest.raises(ProtocolError) as refused:
        parse_request(_wire(body), None)
    assert says in str(refused.value)


def test_an_http_request_with_such_parameters_is_a_400_and_so_is_an_unload_triton_cannot_read(fake, tmp_path):
    repo = tmp_path / "repo"
    _add_model(repo, NAME)
    with _client(_repository(repo)) as c:
        r = c.post(f"/v2/models/{NAME}/infer", json=_body(1, parameters={"priority": "high"}))
        assert r.status_code == 400 and "parameters.priority must be an unsigned integer" in r.json()["error"]
        assert c.post(f"/v2/models/{NAME}/infer", json=_body(1, parameters={"priority": 2, "x": "y"})).is_success
        for params, says in [({"unload_dependents": "yes"}, "parameters.unload_dependents must be true or false"),
                             ({"unload_dependents": 1}, "parameters.unload_dependents must be true or false"),
                             ({"p": {}}, "repository request parameter 'p' must be a string, a number or a boolean")]:
            r = c.post(f"/v2/repository/models/{NAME}/unload", json={"parameters": params})
            assert r.status_code == 400 and says in r.json()["error"], r.text
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # nothing was unloaded
        r = c.post(f"/v2/repository/models/{NAME}/load", json={"parameters": {"p": [1]}})
        assert r.status_code == 400 and "parameter 'p'" in r.json()["error"], r.text
        assert c.post(f"/v2/repository/models/{NAME}/unload", json={"parameters": {"unload_dependents": False,
                                                                                   "note": 1}}).status_code == 200


# F4 ---------------------------------------------------------------------------------------------------------------

def test_a_bundle_s_config_names_the_labels_its_classification_answers_with(fake, tmp_path):
    bundle = fake_runtime.write_bundle(tmp_path / "b")
    repo = tmp_path / "repo"
    _add_model(repo, "unlabelled")
    settings = Settings(model_control_mode="explicit",
                        models=[f"{NAME}={bundle}"], backend="fake", model_repository=repo, access_log=False)
    with _client(settings) as c:
        assert c.get(f"/v2/models/{NAME}/config").json()["output"][0]["label_filename"] == "labels.txt"
        ask = _body(1, outputs=[{"name": "logits", "parameters": {"classification": 2}}])
        top = c.post(f"/v2/models/{NAME}/infer", json=ask).json()["outputs"][0]["data"]
        names = read_manifest(bundle).class_names
        assert all(s.split(":")[2] == names[int(s.split(":")[1])] for s in top), top
        assert c.get("/v2/models/unlabelled/config").json()["output"][0]["label_filename"] == ""  # value:index
    assert not (bundle / "labels.txt").exists()  # the view only: nothing written


# F5 ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("accept, coding", [
    (None, None), ("", None), ("identity", None), ("br", None), ("gzip", "gzip"), ("GZIP", "gzip"),
    ("x-gzip", "gzip"), ("deflate", "deflate"), ("gzip;q=0", None), ("gzip;q=0, deflate", "deflate"),
    ("deflate, gzip", "gzip"), ("deflate;q=1, gzip;q=0.5", "deflate"), ("gzip ; q=0.5, deflate;q=0.5", "gzip"),
    ("*", "gzip"), ("*;q=0", None), ("*, gzip;q=0", "deflate"), ("gzip;q=0.5, identity", None),
    ("identity;q=0.1, gzip;q=0.5", "gzip"), ("gzip;q=abc", None), ("gzip;q=2", None), ("br, deflate;q=0.1", "deflate"),
])
def test_the_answer_coding_follows_accept_encoding_q_values(accept, coding):
    assert protocol.answer_coding(accept) == coding


def _raw(c: httpx.Client, path: str, accept: str = "identity", **kw: object) -> tuple[httpx.Response, bytes]:
    """The answer and its body as it came over the wire (httpx would decompress it, and asks for gzip itself)."""
    with c.stream("POST", path, headers={"Accept-Encoding": accept}, **kw) as r:
        return r, b"".join(r.iter_raw())


def _check_compression(c: httpx.Client) -> None:
    """JSON and binary infer answers, compressed as Accept-Encoding asks, carry the same bytes as plain ones."""
    infer = f"/v2/models/{NAME}/infer"
    ask = _body(3, parameters={"binary_data_output": False})
    plain, body = _raw(c, infer, "identity", json=ask)
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    assert plain.headers["vary"] == VARY  # the answer depends on it, compressed or not
    for accept, coding, inflate in [("gzip", "gzip", gzip.decompress), ("deflate", "deflate", zlib.decompress),
                                    ("gzip;q=0.4, deflate;q=0.9", "deflate", zlib.decompress)]:
        r, wire = _raw(c, infer, accept, json=ask)
        assert (r.status_code, r.headers.get("content-encoding"), r.headers["vary"]) == (200, coding, VARY)
        assert int(r.headers["content-length"]) == len(wire) < len(body) and inflate(wire) == body
    binary = _body(3, parameters={"binary_data_output": True})
    plain, body = _raw(c, infer, json=binary)
    r, wire = _raw(c, infer, "gzip", json=binary)
    assert r.headers["content-encoding"] == "gzip" and gzip.decompress(wire) == body
    head = int(r.headers[HEADER])  # the JSON header's length in the uncompressed body, as Triton and tritonclient
    assert head == int(plain.headers[HEADER]) and json.loads(body[:head])["outputs"][0]["shape"] == [3, 10]
    r, wire = _raw(c, infer, "gzip;q=0", json=ask)
    assert "content-encoding" not in r.headers and wire.startswith(b"{")
    r, wire = _raw(c, infer, "gzip", json={"inputs": []})  # errors as they were
    assert r.status_code == 400 and json.loads(wire)["error"]


def test_infer_answers_are_compressed_for_accept_encoding_in_process(fake, tmp_path):
    with _client(Settings(model_control_mode="explicit",
                          models=[f"{NAME}={fake_runtime.write_bundle(tmp_path / 'b')}"], backend="fake",
                          access_log=False)) as c:
        _check_compression(c)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("hcc")
    with fake_server(fake_runtime.write_bundle(tmp / "fake"), tmp, "--model-control-mode", "explicit") as s:
        yield s


def test_tritonclient_decodes_compressed_answers_of_a_real_server(server):
    import tritonclient.http as httpclient

    with client_of(server) as c:
        _check_compression(c)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
        want = fake_runtime.logits(fake_runtime.weights(3, 10), x)
        for binary in (False, True):
            inp = httpclient.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("logits", binary_data=binary)
            for algorithm in ("gzip", "deflate", None):
                result = client.infer(NAME, [inp], outputs=[out], response_compression_algorithm=algorithm,
                                      request_compression_algorithm=algorithm)
                np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-6)
        client.unload_model("nope")  # F1: an idempotent clean-up, as against Triton
        assert client.is_model_ready(NAME)
    finally:
        client.close()


# F6 ---------------------------------------------------------------------------------------------------------------

def test_server_metadata_answers_at_v2_slash_too(fake, tmp_path):
    with _client(Settings(model_control_mode="explicit",
                          models=[f"{NAME}={fake_runtime.write_bundle(tmp_path / 'b')}"], backend="fake",
                          access_log=False)) as c:
        r = c.get("/v2/")
        assert r.status_code == 200 and r.json() == c.get("/v2").json()
        assert r.json()["name"] == "vitc"
        assert c.head("/v2/").status_code == 200
        assert c.get("/v2/health/live/").status_code == 404  # other trailing slashes stay unknown, as in Triton
        assert c.get(f"/v2/models/{NAME}/").status_code == 404


# F7 ---------------------------------------------------------------------------------------------------------------

def test_load_errors_name_the_model_never_the_command_line_form_or_a_server_path(fake, tmp_path):
    repo = tmp_path / "repo"
    _add_model(repo, NAME)
    _add_model(repo, "elsewhere", runtime="absent")  # its runtime is not installed: unavailable from the start
    (repo / "odd+name").mkdir()
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    bundle = fake_runtime.write_bundle(bundles / "legacy")
    with _client(_repository(repo, model_dir=bundles, backend="fake")) as c:
        (repo / NAME / "config.pbtxt").write_text(CONFIG.replace("max_batch_size: 8", "max_batch_size: 64"))
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and r.json()["error"] == (
            f"model '{NAME}': config.pbtxt max_batch_size 64 is more than the artifact was exported for (8)"), r.text
        index = {(e["name"], e["version"]): e for e in c.post("/v2/repository/index").json()}
        assert index[(NAME, "1")]["state"] == "READY"  # the version loaded before serves on
        assert index[("elsewhere", "1")]["reason"].startswith("model 'elsewhere': ")
        r = c.post("/v2/repository/models/odd+name/load")
        assert r.status_code == 400 and r.json()["error"].startswith("model directory 'odd+name' is not served: ")
        (bundle / fake_runtime.WEIGHTS).write_bytes(b"spoiled")  # a --model-dir bundle served by its own name
        r = c.post("/v2/repository/models/legacy/load")
        assert r.status_code == 400 and r.json()["error"].startswith("model 'legacy': "), r.text
        for answer in (c.post("/v2/repository/index").text, c.get("/v2/models/elsewhere").text):
            assert str(repo) not in answer and "=/" not in answer, answer
