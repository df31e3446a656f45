"""The real server on the OpenVINO backend (THROUGHPUT hint: several infer requests run batches in parallel)."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import animal_pngs, micro_bundle, scores_by_index, softmax, start_server

from models.bundle import read_manifest
from models.preprocessing import preprocess


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-ov") / "server.log"
    srv = start_server(["--model", str(bundle), "--backend", "openvino",
                        "--max-queue-delay-ms", "20", "--no-access-log"], log)
    yield srv
    assert srv.stop() == 0, srv.logs()[-3000:]


@pytest.fixture(scope="module")
def pngs():
    return animal_pngs(16, start=100)


@pytest.fixture(scope="module")
def direct(bundle, pngs):
    """OpenVINO used directly (f32 precision hint, as the export's parity check ran it)."""
    import openvino as ov

    manifest = read_manifest(bundle)
    xml = next(f.path for f in manifest.select("openvino", "fp32").files if f.path.endswith("xml"))
    compiled = ov.Core().compile_model(str(bundle / xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = preprocess([Image.open(io.BytesIO(b)) for b in pngs], manifest.preprocessing)
    return x, compiled.create_infer_request().infer({0: x})[0]


def test_openvino_model_info(server):
    info = httpx.get(server.url + "/v1/models/micro").json()
    assert (info["runtime"], info["precision"]) == ("openvino", "fp32")
    assert httpx.get(server.url + "/v2/models/micro").json()["platform"] == "openvino"
    # The config names the backend, as Triton's does: written back to a config.pbtxt, it loads (a platform alone
    # does not, for OpenVINO).
    config = httpx.get(server.url + "/v2/models/micro/config").json()
    assert (config["platform"], config["backend"]) == ("openvino", "openvino")


def test_classification_equals_openvino(server, pngs, direct):
    _, logits = direct
    expected = softmax(logits)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for png, p in zip(pngs, expected, strict=True):
            r = c.post("/v1/models/micro/classify?top_k=10", content=png, headers={"content-type": "image/png"})
            np.testing.assert_allclose(scores_by_index(r.json()), p, atol=1e-5)


def test_v2_binary_tensors_with_tritonclient(server, direct):
    import tritonclient.http as httpclient

    x, logits = direct
    tc = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_allclose(tc.infer("micro", [inp]).as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    tc.close()


def test_parallel_load_is_batched_and_correct(server, pngs, direct):
    _, logits = direct
    expected = softmax(logits)

    def one(i: int) -> tuple[int, httpx.Response]:
        r = httpx.post(server.url + "/v1/models/micro/classify?top_k=10", content=pngs[i % len(pngs)],
                       headers={"content-type": "image/png"}, timeout=60)
        return i, r

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(96)))
    for i, r in results:
        assert r.status_code == 200
        np.testing.assert_allclose(scores_by_index(r.json()), expected[i % len(pngs)], atol=1e-5)
    text = httpx.get(server.url + "/metrics").text
    count = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith('vitc_batch_size_count{model="micro"}'))
    assert count < 96  # some batches held more than one image


def test_reloading_or_unloading_openvino_models_keeps_the_exit_clean(bundle, tmp_path):
    """A hot reload or unload releases an OpenVINO model before ones loaded after it; with a Core per model that
    crashed the process at exit (SIGSEGV, exit 139) after the drain had finished."""
    from export import triton

    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    names = sorted(p.name for p in repo.iterdir() if "openvino" in p.name)
    assert len(names) >= 2, names
    srv = start_server(["--model-repository", str(repo), "--no-access-log", "--model-control-mode", "explicit"],
                       tmp_path / "server.log")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post(f"/v2/repository/models/{names[0]}/load").status_code == 200  # the old one is retired
            assert c.post(f"/v2/repository/models/{names[1]}/unload").status_code == 200
    finally:
        code = srv.stop()
    assert code == 0, srv.logs()[-3000:]
