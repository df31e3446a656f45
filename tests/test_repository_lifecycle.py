"""A Triton-style repository served by vitc, on the fake runtime (no export): which directories are versions, what a
config.pbtxt may say, load and unload as Triton answers them, the state an endless stream of names leaves, the
metrics of reloaded and unloaded models, uploads that hold no drain, models whose runtime cannot run here, and
what `python -m serve` finds in a model directory."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from test_serve_fixtures import start_server

import runtimes
from models.bundle import read_manifest, write_manifest
from models.cli import WorkFailed
from serve.errors import ServeError
from serve.metrics import Metrics
from serve.registry import ModelSource, ServedModels, load_models, model_sources
from serve.repository import LoadError, ModelRepository
from serve.settings import Settings

NAME = "fake"
CONFIG = """name: "fake"
platform: "fake_platform"
max_batch_size: 8
input [ { name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, 32, 32 ] } ]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 500 }
"""
# The fake runtime under another name whose package is not installed: a model of it cannot run here.
ABSENT = dataclasses.replace(fake_runtime.RUNTIME, name="absent", target="absent", packages=("vitc_no_such_package",))


def add_version(repo: Path, name: str, version: str, runtime: str = "fake") -> Path:
    """repo/name/version: a bundle of the fake artifact alone (what export.triton writes for a real one)."""
    source = repo.parent / ".fake-bundle"
    if not source.exists():
        fake_runtime.write_bundle(source)
    m = read_manifest(source)
    dest = repo / name / version
    dest.mkdir(parents=True)
    shutil.copy(source / fake_runtime.WEIGHTS, dest / fake_runtime.WEIGHTS)
    artifact = next(dataclasses.replace(a, runtime=runtime) for a in m.artifacts if a.runtime == "fake")
    write_manifest(dest, dataclasses.replace(m, artifacts=(artifact,)))
    return dest


@pytest.fixture
def repo(tmp_path) -> Path:
    """A repository with model "fake", version 1, and its config.pbtxt."""
    root = tmp_path / "repo"
    add_version(root, NAME, "1")
    (root / NAME / "config.pbtxt").write_text(CONFIG)
    return root


@pytest.fixture
def fake() -> Iterator[None]:
    with fake_runtime.registered():
        runtimes.register(ABSENT)
        try:
            yield
        finally:
            runtimes.unregister(ABSENT.name)


@contextlib.contextmanager
def client(settings: Settings) -> Iterator[httpx.Client]:
    from fastapi.testclient import TestClient

    from serve.app import create_app

    with TestClient(create_app(settings)) as c:
        yield c


def served(repo: Path, **kw) -> Settings:
    return Settings(model_control_mode="explicit", model_repository=repo, access_log=False, graceful_timeout_s=5, **kw)


def index(c: httpx.Client) -> dict[tuple[str, str], dict]:
    return {(e["name"], e["version"]): e for e in c.post("/v2/repository/index").json()}


def test_only_ascii_int64_directories_are_versions(fake, repo):
    for odd in ("²", "٣", "0", "007", "9" * 26, str(2**63), "abc"):
        shutil.copytree(repo / NAME / "1", repo / NAME / odd)
    add_version(repo, NAME, str(2**63 - 1))
    assert ModelSource(repo / NAME, NAME, repository=True).versions() == ["1", str(2**63 - 1)]
    models = load_models(served(repo))  # no traceback at startup: the odd ones are ignored, as Triton ignores them
    assert models[NAME].version == str(2**63 - 1)


def test_a_config_that_contradicts_the_artifact_or_triton_is_refused(fake, repo):
    config = repo / NAME / "config.pbtxt"
    with client(served(repo)) as c:
        for edit, says in [(('name: "fake"', 'name: "other"'), "not the model directory's name"),
                           (("fake_platform", "tensorrt_plan"), "platform 'tensorrt_plan' is not the artifact's"),
                           (('name: "input"', 'name: "images"'), "input 'images' TYPE_FP32"),
                           (("3, 32, 32", "3, 64, 64"), r"[3, 64, 64] is not the artifact's input"),
                           (("max_batch_size: 8", "max_batch_size: 8\nbogus_field: 3"),
                            "bogus_field is not a field of ModelConfig"),
                           # A typo in a nested field used to load, silently with no batching delay.
                           (("max_queue_delay_microseconds: 500", "max_queue_delay_microsecond: 500"),
                            "dynamic_batching.max_queue_delay_microsecond is not a field of ModelDynamicBatching"),
                           (("max_batch_size: 8", "max_batch_size: 8\ninstance_group [ { kind: KIND_TPU } ]"),
                            "instance_group[0].kind 'KIND_TPU' is not a value of"),
                           (("max_batch_size: 8", 'max_batch_size: 8\ndefault_model_filename: "nope.npy"'),
                            "default_model_filename 'nope.npy' names a file that"),
                           (("dynamic_batching {", "dynamic_batching { preferred_batch_size: [ 16 ]"),
                            "preferred_batch_size 16 must be in 1..max_batch_size (8)")]:
            config.write_text(CONFIG.replace(*edit))
            r = c.post(f"/v2/repository/models/{NAME}/load")
            assert r.status_code == 400 and "config.pbtxt: " in r.json()["error"] and says in r.json()["error"], r.text
            assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the version loaded before serves on
    config.write_text(CONFIG.replace("fake_platform", "tensorrt_plan"))
    with pytest.raises(ServeError) as refused:  # at startup: `python -m serve` prints it as one line, exit 2
        load_models(served(repo))
    assert "platform 'tensorrt_plan' is not the artifact's ('fake_platform')" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_classification_labels_come_from_the_label_filename_as_in_triton(fake, repo, caplog):
    """Triton reads the output's label_filename (relative to the model directory) at load and fails the load when it
    cannot; without one its classification answers "value:index". A bundle served directly keeps its class names."""
    config, names = repo / NAME / "config.pbtxt", [f"Tier {i}" for i in range(10)]
    (repo / NAME / "labels.txt").write_text("\n".join(names) + "\n")  # e.g. localised: not the manifest's names
    labelled = CONFIG.replace("dims: [ 10 ] }", 'dims: [ 10 ] label_filename: "labels.txt" }')
    config.write_text(labelled)
    with caplog.at_level("WARNING", logger="vitc"):
        model = load_models(served(repo))[NAME]
    assert (model.classification_labels, model.label_filename) == (names, "labels.txt")
    said = [r for r in caplog.records if r.getMessage() == "label file differs from the bundle's classes"]
    assert len(said) == 1 and said[0].lines_differing == 10 and said[0].label_filename == "labels.txt"
    class_names = list(read_manifest(repo / NAME / "1").class_names)
    assert model.labels == class_names != names  # /v1 answers with the bundle's own class names
    config.write_text(CONFIG)
    model = load_models(served(repo))[NAME]
    assert (model.classification_labels, model.label_filename) == (None, "")
    with client(served(repo)) as c:
        ask = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.5] * 3072}],
               "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}
        top = c.post(f"/v2/models/{NAME}/infer", json=ask).json()["outputs"][0]["data"]
        assert [len(s.split(":")) for s in top] == [2, 2, 2], top  # no label file: "value:index", as in Triton
        assert c.get(f"/v2/models/{NAME}/config").json()["output"][0]["label_filename"] == ""
        config.write_text(labelled)
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        top = c.post(f"/v2/models/{NAME}/infer", json=ask).json()["outputs"][0]["data"]
        assert all(s.split(":")[2] == names[int(s.split(":")[1])] for s in top), top  # the label file's names
        assert c.get(f"/v2/models/{NAME}/config").json()["output"][0]["label_filename"] == "labels.txt"
        for edit, says in [(("labels.txt", "names.txt"), "label_filename 'names.txt': "),
                           (("labels.txt", "../labels.txt"), "must name a file inside the model directory")]:
            config.write_text(labelled.replace(*edit))
            r = c.post(f"/v2/repository/models/{NAME}/load")
            assert r.status_code == 400 and says in r.json()["error"], r.text
        (repo / NAME / "labels.txt").write_text("\n".join(names[:9]))
        config.write_text(labelled)
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and "holds 9 lines, one label per class was expected (10)" in r.json()["error"]
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the version loaded before serves on
    bundle = load_models(Settings(models=[str(repo / NAME / "1")], backend="fake"))["legacy"]
    assert (bundle.classification_labels, bundle.label_filename) == (class_names, "")


def test_max_batch_size_0_serves_each_request_as_its_own_batch(fake, repo):
    """Triton's layout without batching: the dims carry the batch dimension; a request takes up to the artifact's
    max batch, and requests never merge, even with a dynamic_batching block."""
    (repo / NAME / "config.pbtxt").write_text(CONFIG.replace("max_batch_size: 8", "max_batch_size: 0").replace(
        "format: FORMAT_NCHW dims: [ 3, 32, 32 ]", "dims: [ -1, 3, 32, 32 ]").replace("[ 10 ]", "[ -1, 10 ]"))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with client(served(repo)) as c:
        model = c.app.state.repository.models[NAME]
        assert (model.max_batch, model.batcher.merge) == (model.manifest.input.max_batch, False)
        assert "dynamic_batching" not in c.get(f"/v2/models/{NAME}/config").json()
        assert c.get(f"/v2/models/{NAME}").json()["inputs"][0]["shape"] == [-1, 3, 32, 32]
        r = c.post(f"/v2/models/{NAME}/infer", json={"inputs": [
            {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        w = np.load(repo / NAME / "1" / fake_runtime.WEIGHTS)
        np.testing.assert_allclose(np.reshape(r.json()["outputs"][0]["data"], (3, 10)), fake_runtime.logits(w, x),
                                   rtol=1e-5)
        # Triton's raw binary request deduces the -1 dimension from the body's size here (a batch of one only where
        # Triton batches).
        r = c.post(f"/v2/models/{NAME}/infer", content=x.tobytes(), headers={"Inference-Header-Content-Length": "0"})
        assert r.status_code == 200, r.text
        head = int(r.headers["inference-header-content-length"])
        assert json.loads(r.content[:head])["outputs"][0]["shape"] == [3, 10]
        np.testing.assert_allclose(np.frombuffer(r.content[head:], np.float32).reshape(3, 10),
                                   fake_runtime.logits(w, x), rtol=1e-5)
        r = c.post(f"/v2/models/{NAME}/infer", content=x.tobytes()[:-4],
                   headers={"Inference-Header-Content-Length": "0"})
        assert r.status_code == 400, r.text
        assert "a whole number of 12288-byte rows, got 36860 bytes" in r.json()["error"]
        # As Triton: the classification extension ranks the whole tensor (indices over all 3 x 10 values, labels
        # only where an index has one), and the statistics count each request as one inference.
        r = c.post(f"/v2/models/{NAME}/infer", json={
            "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "logits", "parameters": {"classification": 4}}]})
        out = r.json()["outputs"][0]
        flat = fake_runtime.logits(w, x).ravel()
        assert out["shape"] == [4], out
        assert [int(v.split(":")[1]) for v in out["data"]] == list(np.argsort(-flat, kind="stable")[:4])
        assert c.get(f"/v2/models/{NAME}/stats").json()["model_stats"][0]["inference_count"] == 3


def test_version_policy_and_batching_are_what_config_says(fake, repo):
    add_version(repo, NAME, "2")
    config = repo / NAME / "config.pbtxt"
    with client(served(repo)) as c:
        applied = c.get(f"/v2/models/{NAME}/config").json()
        assert applied["version_policy"] == {"latest": {"num_versions": 1}}
        assert (applied["dynamic_batching"], c.get(f"/v2/models/{NAME}").json()["versions"]) == (
            {"max_queue_delay_microseconds": 500}, ["2"])
        assert applied["instance_group"][0]["kind"] == "KIND_CPU"
        # Pinned to version 1 (a rollback, as on Triton), without dynamic batching: each request runs alone.
        config.write_text(CONFIG.replace("dynamic_batching { max_queue_delay_microseconds: 500 }",
                                         "version_policy { specific { versions: [ 1 ] } }"))
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        applied = c.get(f"/v2/models/{NAME}/config").json()
        assert applied["version_policy"] == {"specific": {"versions": [1]}}
        assert "dynamic_batching" not in applied
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]
        entries = index(c)
        assert entries[(NAME, "1")]["state"] == "READY" and entries[(NAME, "2")]["state"] == "UNAVAILABLE"
        config.write_text(CONFIG + "version_policy { specific { versions: [ 1, 3 ] } }")
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and "lists version 3, which the model directory does not hold" in r.text
        config.write_text(CONFIG + "version_policy { latest { num_versions: 2 } }")  # vitc serves the newest one
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["2"]
        assert c.get(f"/v2/models/{NAME}/config").json()["version_policy"] == {"latest": {"num_versions": 1}}


def test_a_new_version_without_its_manifest_is_reported_not_skipped(fake, repo):
    with client(served(repo)) as c:
        (repo / NAME / "2").mkdir()  # empty, or still being copied
        r = c.post(f"/v2/repository/models/{NAME}/load")
        # Named within the model directory: a load's answer tells no client where the repository lies.
        assert r.status_code == 400 and "version directory 2 has no manifest.json" in r.json()["error"], r.text
        assert c.get(f"/v2/models/{NAME}").json()["versions"] == ["1"]  # version 1 serves on
        (repo / NAME / "3").mkdir()
        entries = index(c)
        assert entries[(NAME, "2")]["state"] == "UNAVAILABLE" and "has no manifest.json" in entries[(NAME, "2")][
            "reason"]
        assert "no manifest.json in its version directory" in entries[(NAME, "3")]["reason"]  # never tried yet


def test_unload_is_idempotent_for_known_models_as_in_triton(fake, repo):
    with client(served(repo)) as c:
        for _ in range(2):
            r = c.post(f"/v2/repository/models/{NAME}/unload")
            assert (r.status_code, r.json()) == (200, {})
        r = c.get(f"/v2/models/{NAME}")  # a known model says why it is not served
        assert r.status_code == 404 and "is not available: unloaded" in r.json()["error"]
        r = c.post("/v2/repository/models/nope/unload")  # unknown: nothing to unload, success as in Triton
        assert (r.status_code, r.json()) == (200, {})


def test_the_reason_a_model_is_not_served_is_the_latest_one(fake, repo):
    config = repo / NAME / "config.pbtxt"
    with client(served(repo)) as c:
        good = config.read_text() if config.exists() else None
        config.write_text(CONFIG.replace("max_queue_delay_microseconds", "max_queue_delay_microsecond"))
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the old one serves
        config.write_text(good) if good is not None else config.unlink()
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        r = c.get(f"/v2/models/{NAME}/ready")  # unloaded since that failure: says so, not the stale config error
        assert r.status_code == 404 and "is not available: unloaded" in r.json()["error"], r.text
        config.write_text(CONFIG.replace("max_queue_delay_microseconds", "max_queue_delay_microsecond"))
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 400
        r = c.get(f"/v2/models/{NAME}/ready")  # a failed load after the unload: that failure is why
        assert r.status_code == 404 and "max_queue_delay_microsecond" in r.json()["error"], r.text
        entries = c.post("/v2/repository/index").json()  # and the index says the same
        assert entries and all("max_queue_delay_microsecond" in e["reason"] for e in entries if e["name"] == NAME)


def test_names_that_are_not_models_leave_no_state(fake, repo):
    async def run() -> None:
        repository = ModelRepository(served(repo), Metrics(), load_models(served(repo)))
        await repository.start()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(1500):  # long names, as a URL path allows
                with pytest.raises(LoadError):
                    await (repository.unload if i % 2 else repository.load)(f"{i:05d}" + "a" * 8000)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 1_000_000  # 1500 names of 8 KB: 12 MB if they were kept
        # Loads and unloads of one name still take turns, and leave nothing behind either.
        await asyncio.gather(repository.load(NAME), repository.unload(NAME), repository.load(NAME))
        assert NAME in repository.models and not repository._turns
        await repository.close(5)

    asyncio.run(run())


def _series(c: httpx.Client, metric: str, model: str) -> list[str]:
    lines = c.get("/metrics").text.splitlines()
    return [ln for ln in lines if ln.startswith(metric + "{") and f'model="{model}"' in ln]


def test_metrics_follow_reloads_and_unloads(fake, repo):
    add_version(repo, "other", "1")
    with client(served(repo)) as c:
        assert len(_series(c, "vitc_model_info", NAME)) == 1
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 200  # the same version again
        time.sleep(0.2)  # the replaced one is retired in the background
        assert len(_series(c, "vitc_model_info", NAME)) == 1
        assert len(_series(c, "vitc_queue_depth", NAME)) == 1
        assert c.post(f"/v2/repository/models/{NAME}/unload").status_code == 200
        assert not _series(c, "vitc_model_info", NAME)
        # At 0, not the closed batcher (tests/test_serve_log_client_and_series.py: it is not kept alive)
        assert _series(c, "vitc_queue_depth", NAME) == [f'vitc_queue_depth{{model="{NAME}"}} 0.0']
        assert _series(c, "vitc_queue_depth", "other")
        # What a request's metric label may name: repository models, loaded or not; never just any name.
        repository = c.app.state.repository
        assert NAME in repository and "other" in repository and "nope" not in repository and "../x" not in repository


def test_a_model_whose_runtime_cannot_run_here_leaves_the_others_serving(fake, repo, caplog):
    add_version(repo, "missing", "1", runtime="absent")
    add_version(repo, "anywhere", "1")  # no config.pbtxt: the server's device, where the fake runtime cannot run
    (repo / NAME / "config.pbtxt").write_text(CONFIG + 'instance_group [ { count: 1 kind: KIND_CPU } ]')
    settings = served(repo, device="cuda")
    models = load_models(settings)
    assert set(models) == {NAME} and models[NAME].backend.device == "cpu"  # its config says KIND_CPU
    assert "absent is not installed" in models.skipped["missing"][1]
    assert "runs on cpu, not 'cuda'" in models.skipped["anywhere"][1]
    assert sum("model unavailable" in r.getMessage() for r in caplog.records) == 2  # one line each
    with client(settings) as c:
        entries = index(c)
        assert entries[(NAME, "1")]["state"] == "READY"
        assert entries[("missing", "1")]["state"] == "UNAVAILABLE"
        assert "absent is not installed" in entries[("missing", "1")]["reason"]
        r = c.post("/v2/repository/models/missing/load")
        assert r.status_code == 400 and "absent is not installed" in r.json()["error"]
        r = c.post("/v2/models/missing/infer", json={"inputs": []})  # refused with the reason, before any upload
        assert r.status_code == 404 and "is not available" in r.json()["error"] and "absent" in r.json()["error"]
    bundle = repo / "missing" / "1"  # given as a bundle, a missing runtime still refuses the start
    with pytest.raises(ServeError, match="absent is not installed"):
        load_models(Settings(models=[str(bundle)], backend="absent"))


def test_a_bundle_given_twice_is_served_once_and_an_empty_model_dir_says_what_it_holds(fake, repo, tmp_path):
    exports = tmp_path / "exports"
    bundle = fake_runtime.write_bundle(exports / "a")
    # The Docker image sets VITC_MODEL_DIR=/models; `--model /models/a` appended names a bundle found there too.
    assert list(load_models(Settings(model_dir=exports, models=[str(bundle)], backend="fake"))) == ["legacy"]
    fake_runtime.write_bundle(exports / "b")
    sources = model_sources(Settings(model_dir=exports, models=[f"x={exports}/./a"]))
    assert [(s.path, s.name) for s in sources] == [(Path(f"{exports}/./a"), "x"), (exports / "b", "b")]
    with pytest.raises(ServeError, match=rf"--model-dir {repo} holds no bundle .*it looks like a "
                                         rf"Triton model repository: serve it with --model-repository {repo}$"):
        model_sources(Settings(model_dir=repo))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ServeError, match=r"empty holds no bundle .*; pass --model PATH"):
        model_sources(Settings(model_dir=tmp_path / "empty"))
    assert isinstance(load_models(served(repo)), ServedModels)


def test_a_bundle_exported_into_the_model_dir_after_the_start_loads_by_its_directory_name(fake, tmp_path):
    """--model-dir was read once: a bundle exported there later was 'no model ... in the repository'."""
    exports = tmp_path / "exports"
    fake_runtime.write_bundle(exports / "a")
    with client(Settings(model_control_mode="explicit",
                         model_dir=exports, backend="fake", access_log=False, graceful_timeout_s=5)) as c:
        assert c.post("/v2/repository/models/later/load").status_code == 400
        fake_runtime.write_bundle(exports / "later")
        (exports / "no-bundle").mkdir()
        assert {e["name"] for e in c.post("/v2/repository/index").json()} == {"a", "later"}
        r = c.post("/v2/repository/models/later/load")
        assert r.status_code == 200, r.text
        assert c.get("/v2/models/later/ready").status_code == 200
        assert c.post("/v2/repository/models/no-bundle/load").status_code == 400
        assert c.post("/v2/repository/models/a/load").status_code == 200  # its directory's name, as at the start
        assert c.post("/v2/repository/models/legacy/load").status_code == 400  # its manifest's name names nothing


def _partial_upload(port: int, path: str, body: bytes) -> socket.socket:
    """A request whose body has arrived but for its last byte."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:-1])
    return s


def _finish(s: socket.socket, body: bytes) -> tuple[int, bytes]:
    s.sendall(body[-1:])
    s.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            next(ln.split(b":")[1] for ln in data.split(b"\r\n") if ln.lower().startswith(b"content-length"))):
        data += s.recv(65536)
    s.close()
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[1]


def test_an_upload_in_progress_holds_no_unload_or_reload(repo, tmp_path):
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    args = ["--model-repository", str(repo), "--graceful-timeout-s", "5", "--model-control-mode", "explicit"]
    with start_server(args, tmp_path / "server.log", fake_runtime.server_env(tmp_path)) as server:
        infer, admin = f"/v2/models/{NAME}/infer", f"{server.url}/v2/repository/models/{NAME}"
        stalled = _partial_upload(server.port, infer, body)
        time.sleep(0.3)
        start = time.monotonic()
        assert httpx.post(f"{admin}/unload", timeout=30).status_code == 200
        assert time.monotonic() - start < 2.5  # not the 5 s graceful timeout: the upload holds no version
        status, answer = _finish(stalled, body)
        assert status == 404 and b"is not available: unloaded" in answer  # gone by the time its body arrived: said so
        assert httpx.post(f"{admin}/load", timeout=30).status_code == 200
        stalled = _partial_upload(server.port, infer, body)
        time.sleep(0.3)
        start = time.monotonic()
        assert httpx.post(f"{admin}/load", timeout=30).status_code == 200  # a reload does not wait for it either
        assert time.monotonic() - start < 2.5
        status, answer = _finish(stalled, body)
        assert status == 200, answer  # it runs on the version served once its body is in
        w = np.load(repo / NAME / "1" / fake_runtime.WEIGHTS)
        np.testing.assert_allclose(json.loads(answer)["outputs"][0]["data"], fake_runtime.logits(w, x)[0], rtol=1e-5)


def test_models_named_on_the_command_line_replace_the_model_directory_of_the_environment(monkeypatch, tmp_path):
    """The image sets VITC_MODEL_DIR=/models; `--model /models/x` or `--model-repository /models` appended serve just
    that (a scan of /models as well served every bundle beside x, or refused a repository layout)."""
    from serve.__main__ import settings_args

    monkeypatch.setenv("VITC_MODEL_DIR", str(tmp_path))
    assert Settings(**settings_args([])).model_dir == tmp_path
    assert Settings(**settings_args(["--model", "a"])).model_dir is None
    assert Settings(**settings_args(["--model-repository", str(tmp_path)])).model_dir is None
    assert Settings(**settings_args(["--model", "a", "--model-dir", str(tmp_path)])).model_dir == tmp_path


def test_what_vitc_does_not_apply_is_logged_never_dropped_silently(fake, repo, caplog):
    """A config that asks Triton for a queue policy or a response cache loads (as on Triton) with one warning that
    names them; a repository directory whose name is no model name is named at start and by a load."""
    import logging

    (repo / NAME / "config.pbtxt").write_text(CONFIG.replace(
        "max_queue_delay_microseconds: 500", "max_queue_delay_microseconds: 500 "
        "default_queue_policy { max_queue_size: 1 }") + "response_cache { enable: true }\n")
    shutil.copytree(repo / NAME, repo / "animals+vit")
    with caplog.at_level(logging.WARNING, logger="vitc.serve"):
        models = load_models(served(repo))
    try:
        assert set(models) == {NAME}
        unapplied = [r for r in caplog.records if r.msg == "config.pbtxt settings not applied"]
        assert len(unapplied) == 1 and unapplied[0].fields == ["response_cache",
                                                              "dynamic_batching.default_queue_policy"]
        skipped = [r for r in caplog.records if r.msg == "repository directories skipped"]
        assert len(skipped) == 1 and skipped[0].directories == ["animals+vit"]
    finally:
        for m in models.values():
            m.backend.close()
    with client(served(repo)) as c:
        r = c.post("/v2/repository/models/animals+vit/load")
        assert r.status_code == 400 and "is not served: a model name is" in r.json()["error"], r.text
        r = c.post("/v2/repository/models/nope/load")  # a name with no directory: as before
        assert r.status_code == 400 and "no model 'nope'" in r.json()["error"]


def test_running_out_of_memory_while_loading_is_the_machine_not_the_model(fake, repo, monkeypatch):
    """OpenVINO's bad_alloc (under a memory limit) was a "cannot load" of the artifact, exit 2, its reason lost
    behind the source location OpenVINO prints first: it is now the machine failing (a start exits 1 through
    models.cli.run), and a reload says so while what served before serves on."""
    import fake_runtime

    from runtimes.base import first_line

    failure = RuntimeError("Exception from src/inference/src/cpp/core.cpp:117:\n[ GENERAL_ERROR ] std::bad_alloc")
    assert first_line(failure) == "[ GENERAL_ERROR ] std::bad_alloc"
    from models.failures import memory_failure  # OpenVINO's other words for it, under a tighter limit

    for words in ("can't alloc", "Resource temporarily unavailable"):
        assert memory_failure(RuntimeError(f"Exception from src/plugin.cpp:54:\n{words}")) is not None
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException  # not a RuntimeError: it was missed

    assert memory_failure(RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc"))
    with client(served(repo)) as c:
        def no_memory(self, spec):  # noqa: ANN001, ANN202
            raise failure

        monkeypatch.setattr(fake_runtime.FakeBackend, "__init__", no_memory)
        with pytest.raises(WorkFailed, match=rf"^cannot load model '{NAME}': out of memory$"):  # a start: exit 1
            load_models(served(repo))
        no_thread = RuntimeError("Exception from src/plugin.cpp:54:\nResource temporarily unavailable")
        monkeypatch.setattr(fake_runtime.FakeBackend, "__init__", lambda self, spec: (_ for _ in ()).throw(no_thread))
        with pytest.raises(WorkFailed, match=rf"^cannot load model '{NAME}': out of memory or threads \(a thread "):
            load_models(served(repo))  # it said "out of memory" alone, naming neither the model nor threads
        monkeypatch.setattr(fake_runtime.FakeBackend, "__init__", no_memory)
        r = c.post(f"/v2/repository/models/{NAME}/load")
        assert r.status_code == 400 and "out of memory while loading version 1" in r.json()["error"], r.text
        assert c.get(f"/v2/models/{NAME}/ready").status_code == 200  # the loaded one serves on


def test_a_repository_request_body_past_64_kib_is_413_before_it_is_parsed(fake, repo):
    """The index and load bodies are parsed on the event loop: megabytes of JSON would stall every request."""
    big = b'{"ready": true, "pad": [' + b",".join([b"0"] * 100_000) + b"]}"
    with client(served(repo)) as c:
        for path in ("/v2/repository/index", f"/v2/repository/models/{NAME}/load",
                     f"/v2/repository/models/{NAME}/unload"):
            r = c.post(path, content=big)
            assert r.status_code == 413 and "at most 65536 bytes" in r.json()["error"], (path, r.text)
        assert c.post("/v2/repository/index", content=b'{"ready": true}').status_code == 200


def test_a_repeated_key_in_a_repository_request_is_refused(fake, repo):
    """Triton reads the first of a repeated key, Python the last: {"ready": true, "ready": false} listed models
    Triton would not."""
    with client(served(repo)) as c:
        for path, body in (("/v2/repository/index", b'{"ready": true, "ready": false}'),
                           (f"/v2/repository/models/{NAME}/load", b'{"parameters": {}, "parameters": {"a": 1}}')):
            r = c.post(path, content=body)
            assert r.status_code == 400 and "repeats the key" in r.json()["error"], (path, r.text)


def test_readiness_is_strict_as_triton_unless_told_otherwise(fake, repo):
    from serve.__main__ import settings_args

    add_version(repo, "missing", "1", runtime="absent")
    with client(served(repo)) as c:
        # A model it knows serves nothing (its runtime is not installed here): not ready, as Triton's default.
        assert (c.get("/v2/health/ready").status_code, c.get(f"/v2/models/{NAME}/ready").status_code) == (400, 200)
        assert c.post("/v2/repository/models/missing/unload").status_code == 200  # given up on: ready
        assert c.get("/v2/health/ready").status_code == 200 and index(c)[("missing", "1")]["reason"] == "unloaded"
        assert c.post("/v2/repository/models/missing/load").status_code == 400  # tried again, failed again
        assert c.get("/v2/health/ready").status_code == 400
        assert "absent is not installed" in index(c)[("missing", "1")]["reason"]
        # A failed reload of a served model leaves it serving its old version: that is no reason to be unready.
        assert c.post("/v2/repository/models/missing/unload").status_code == 200
        (repo / NAME / "config.pbtxt").write_text(CONFIG.replace("max_batch_size: 8", "max_batch_size: -1"))
        assert c.post(f"/v2/repository/models/{NAME}/load").status_code == 400
        assert c.get("/v2/health/ready").status_code == 200
    (repo / NAME / "config.pbtxt").write_text(CONFIG)
    settings = Settings(**settings_args(["--model-repository", str(repo), "--no-strict-readiness"]))
    assert settings.strict_readiness is False
    with client(settings.model_copy(update={"access_log": False})) as c:  # ready once started, as Triton's false
        assert c.get("/v2/health/ready").status_code == 200 and index(c)[("missing", "1")]["state"] == "UNAVAILABLE"


def test_a_failed_model_whose_directory_is_gone_is_listed_and_its_unload_makes_the_server_ready(fake, repo):
    add_version(repo, "missing", "1", runtime="absent")
    with client(served(repo)) as c:
        assert c.get("/v2/health/ready").status_code == 400
        shutil.rmtree(repo / "missing")  # the operator removes the model that could not load
        entry = next(e for e in c.post("/v2/repository/index").json() if e["name"] == "missing")
        assert entry["state"] == "UNAVAILABLE" and "absent is not installed" in entry["reason"]  # why it is not ready
        assert c.post("/v2/repository/models/missing/unload").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        assert "missing" not in {e["name"] for e in c.post("/v2/repository/index").json()}


@pytest.mark.parametrize("mode", ["none", "explicit"])
def test_a_model_dir_holding_models_in_another_layout_is_refused_in_either_control_mode(repo, tmp_path, mode):
    """Explicit mode may start on an empty --model-dir, but one holding a Triton repository or a bundle itself is a
    mistake no load can mend (a load found "no model ... known: none"): refused with the flag that serves it."""
    bundle = fake_runtime.write_bundle(tmp_path / "bundle")
    with pytest.raises(ServeError, match=rf"it looks like a Triton model repository: serve it with "
                                         rf"--model-repository {repo}$"):
        model_sources(Settings(model_dir=repo, model_control_mode=mode))
    with pytest.raises(ServeError, match=rf"it is a bundle itself: serve it with --model {bundle}$"):
        model_sources(Settings(model_dir=bundle, model_control_mode=mode))
    (tmp_path / "empty").mkdir()
    if mode == "explicit":  # still allowed: models are loaded later
        assert model_sources(Settings(model_dir=tmp_path / "empty", model_control_mode=mode)) == []
