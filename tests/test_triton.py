"""Scale-out and provenance: a bundle as a Triton model repository (+ KServe), vitc serving that repository with the
same answers, hot reload through the repository extension under load, statistics, provenance on every surface."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_serve_fixtures import before_digests, micro_bundle, start_server

from export import triton
from models.bundle import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def repository(bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    triton.write_repository(bundle, out, storage_uri="s3://models/vitc")
    return out


def _model_config_pb2():
    """Triton's own model-config protobuf schema, as tritonclient ships it (read without tritonclient.grpc's
    import-time check for the grpc extra, which this schema does not need)."""
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The parameters Triton's OpenVINO backend reads (openvino_backend src/openvino.cc ParseParameters and
# LoadCpuExtensions); it never looks at any other key.
OPENVINO_BACKEND_PARAMETERS = {
    "SKIP_OV_DYNAMIC_BATCHSIZE", "ENABLE_BATCH_PADDING", "RESHAPE_IO_LAYERS", "TARGET_DEVICE", "INFERENCE_NUM_THREADS",
    "COMPILATION_NUM_THREADS", "HINT_BF16", "NUM_STREAMS", "PERFORMANCE_HINT", "CPU_EXTENSION_PATH"}


def _openvino_runs(config, batch: int) -> bool:
    """Whether Triton's OpenVINO backend executes `batch` images (one request): with max_batch_size > 0 it fixes the
    model's batch at that size (ov::set_batch) and refuses any other total unless ENABLE_BATCH_PADDING is YES."""
    padding = config.parameters["ENABLE_BATCH_PADDING"].string_value.lower() == "yes" \
        if "ENABLE_BATCH_PADDING" in config.parameters else False
    return config.max_batch_size == 0 or batch == config.max_batch_size or padding


def test_every_artifact_triton_can_serve_becomes_a_model_with_a_valid_config(bundle, repository):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    m = read_manifest(bundle)
    expected = {f"micro-{a.id}": a for a in m.servable() if a.runtime != "torch"}
    assert {p.name for p in repository.iterdir() if p.is_dir()} == set(expected)
    for name, artifact in expected.items():
        text = (repository / name / "config.pbtxt").read_text()
        config = text_format.Parse(text, pb2.ModelConfig())
        assert config.name == name
        assert config.backend == {"onnxruntime": "onnxruntime", "openvino": "openvino"}[artifact.runtime]
        (inp,), (out,) = config.input, config.output
        (warmup,) = config.model_warmup
        assert (inp.name, inp.data_type, out.name, out.label_filename) == (
            "input", pb2.DataType.TYPE_FP32, "logits", "labels.txt")
        assert warmup.batch_size == 1 and warmup.inputs["input"].zero_data
        if artifact.runtime == "openvino":
            # No batch dimension for Triton: the IR's dynamic batch is an explicit -1, so every request runs at its
            # own batch size, warm-up included (with max_batch_size 32 Triton failed the load at the warm-up).
            assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
            assert (list(inp.dims), list(out.dims)) == ([-1, 3, 32, 32], [-1, 10])
            assert inp.format == pb2.ModelInput.FORMAT_NONE
            assert list(warmup.inputs["input"].dims) == [1, 3, 32, 32]
            assert all(_openvino_runs(config, b) for b in (1, 5, 32))
            # No parameter the backend ignores; what it cannot do (keep fp32) is said in the file.
            assert set(config.parameters) <= OPENVINO_BACKEND_PARAMETERS and "INFERENCE_PRECISION_HINT" not in text
            assert "no parameter that keeps fp32" in text and "AVX512-BF16" in text
        else:
            assert config.max_batch_size == m.input.max_batch
            assert (list(inp.dims), inp.format, list(out.dims)) == ([3, 32, 32], pb2.ModelInput.FORMAT_NCHW, [10])
            assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
            assert config.dynamic_batching.max_queue_delay_microseconds == 2000
            assert list(warmup.inputs["input"].dims) == [3, 32, 32]
        # Triton's rules (core model_config_utils.cc): NCHW needs exactly 3 dims; a warm-up within the batch size.
        assert inp.format != pb2.ModelInput.FORMAT_NCHW or len(inp.dims) == 3
        assert config.max_batch_size == 0 or warmup.batch_size <= config.max_batch_size
        assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU
        assert (repository / name / "labels.txt").read_text().splitlines() == list(m.class_names)
        version = repository / name / "1"
        files = {"onnxruntime": {"model.onnx"}, "openvino": {"model.xml", "model.bin"}}[artifact.runtime]
        assert {p.name for p in version.iterdir()} == files | {"manifest.json", "golden.npz"}
        one = read_manifest(version)  # each version directory is a bundle of its own, with the same provenance
        assert [a.id for a in one.artifacts] == [artifact.id] and one.provenance == m.provenance


def test_openvino_runs_the_warm_up_and_any_batch_as_triton_s_backend_configures_it(repository):
    """What Triton's OpenVINO backend does with the generated config: compare the IR's shapes with the dims (-1
    matches the dynamic batch), no ov::set_batch (max_batch_size 0), then run the warm-up and a batch of 5."""
    import openvino as ov
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    model_dir = repository / "micro-openvino-fp32"
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig())
    core = ov.Core()
    model = core.read_model(str(model_dir / "1" / "model.xml"))
    for port, io in ((model.inputs[0], config.input[0]), (model.outputs[0], config.output[0])):
        shape = port.get_partial_shape()
        assert len(shape) == len(io.dims)
        assert all(d == -1 and dim.is_dynamic or dim.is_static and dim.get_length() == d
                   for dim, d in zip(shape, io.dims, strict=True))
    compiled = core.compile_model(model, "CPU")
    warm = config.model_warmup[0].inputs["input"]
    for batch_shape in (list(warm.dims), [5, 3, 32, 32]):
        assert compiled(np.zeros(batch_shape, np.float32))[0].shape == (batch_shape[0], 10)


def test_the_kserve_inference_service_points_triton_at_the_repository(repository):
    import yaml

    text = (repository / triton.ISVC_FILE).read_text()
    isvc = yaml.safe_load(text)
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["storageUri"] == "s3://models/vitc"
    assert isvc["metadata"]["name"] == "vitc-micro"
    # KServe's default Triton (23.05) cannot load ONNX IR 10 or OpenVINO opset13: the release is named.
    assert model["runtimeVersion"] == "24.05-py3" and "24.05 or later" in text
    assert model["args"] == ["--disable-auto-complete-config"]  # --strict-model-config is deprecated
    assert "nvidia.com/gpu" not in model["resources"]["limits"]  # every model runs on the CPU


def test_versions_are_added_never_overwritten(bundle, tmp_path):
    out = tmp_path / "repo"
    triton.write_repository(bundle, out)
    triton.write_repository(bundle, out)
    assert sorted(p.name for p in (out / "micro-onnx-fp32").iterdir() if p.is_dir()) == ["1", "2"]
    assert triton.main([str(bundle), "--out", str(out), "--version", "1"]) == 2


def test_a_publish_after_a_killed_one_says_what_it_cleared(bundle, tmp_path, capsys):
    """A killed run left its staging directory beside the repository: the next run removed it without a word."""
    out = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(out)]) == 0
    (tmp_path / ".repo.k1ll3d_x.tmp" / "micro-onnx-fp32" / "2").mkdir(parents=True)
    (tmp_path / ".repo.k1ll3d_x.tmp" / "micro-onnx-fp32" / "2" / "model.onnx").touch()  # not published yet
    (tmp_path / ".repo.k1ll3d_x.tmp" / ".publishing").mkdir()  # it had begun to publish
    capsys.readouterr()
    assert triton.main([str(bundle), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"note: {out}: a publish into it was stopped before it finished (killed): its staging directory was " \
           "removed" in said, said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_an_edited_config_survives_a_new_version_unless_replaced(bundle, tmp_path, capsys):
    out = tmp_path / "repo"
    triton.write_repository(bundle, out)
    config = out / "micro-onnx-fp32" / "config.pbtxt"
    generated = config.read_text()
    config.write_text(generated.replace("max_batch_size: 32", "max_batch_size: 4").replace("[ 8, 32 ]", "[ 4 ]"))
    edited = config.read_text()
    assert triton.main([str(bundle), "--out", str(out)]) == 0
    assert config.read_text() == edited and f"kept {config}" in capsys.readouterr().out
    assert (out / "micro-onnx-fp32" / "2").is_dir()
    assert triton.main([str(bundle), "--out", str(out), "--replace-config"]) == 0
    assert config.read_text() == generated


def test_a_new_version_regenerates_an_untouched_config_and_refuses_an_edited_one_that_no_longer_fits(
        bundle, tmp_path, capsys):
    """A bundle exported for a smaller max batch added to a repository: the config this tool wrote (and nobody
    edited) follows the new version; an edited one that contradicts it is refused with nothing written (it used to
    be kept, and vitc and Triton then refused the whole repository)."""
    small = tmp_path / "small"
    shutil.copytree(bundle, small)
    manifest = read_manifest(small)
    write_manifest(small, replace(manifest, input=replace(manifest.input, max_batch=4)))
    out = tmp_path / "repo"
    triton.write_repository(bundle, out)
    config = out / "micro-onnx-fp32" / "config.pbtxt"
    assert triton.main([str(small), "--out", str(out)]) == 0
    assert "max_batch_size: 4" in config.read_text() and "kept" not in capsys.readouterr().out
    config.write_text(config.read_text().replace("max_batch_size: 4", "max_batch_size: 2")
                      .replace("preferred_batch_size: [ 4 ]", "preferred_batch_size: [ 2 ]"))  # edited: kept
    assert triton.main([str(bundle), "--out", str(out)]) == 0 and "max_batch_size: 2" in config.read_text()
    config.write_text(config.read_text().replace("max_batch_size: 2", "max_batch_size: 16"))  # too big for 4
    before = sorted(p.name for p in (out / "micro-onnx-fp32").iterdir())
    with pytest.raises(SystemExit) as refused:
        triton.main([str(small), "--out", str(out)])
    assert refused.value.code == 2 and "does not fit that version: max_batch_size 16" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "micro-onnx-fp32").iterdir()) == before
    assert triton.main([str(small), "--out", str(out), "--replace-config"]) == 0
    assert "max_batch_size: 4" in config.read_text()
    # What an older version of this tool wrote (no hash line) and that matches what it writes now is regenerated.
    config.write_text(config.read_text().partition("\n")[2])
    capsys.readouterr()
    assert triton.main([str(small), "--out", str(out)]) == 0
    assert config.read_text().startswith("# written by") and "kept" not in capsys.readouterr().out


def test_a_gpu_server_runs_the_repository_models_its_config_puts_on_the_cpu(repository):
    """export.triton gives OpenVINO and onnxruntime models KIND_CPU instance groups: on a server started with
    --device cuda (the GPU image) they run on the CPU, as Triton runs them, instead of refusing the start."""
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    models = load_models(Settings(model_repository=repository, device="cuda"))
    try:
        assert {name: m.backend.device for name, m in models.items()} == {
            "micro-onnx-fp32": "cpu", "micro-openvino-fp32": "cpu", "micro-openvino-fp16": "cpu"}
    finally:
        close_models(models)


def _infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    return client.infer(model, [inp]).as_numpy("logits")


def test_a_bundle_and_its_repository_answer_tritonclient_alike(bundle, repository, tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    with start_server(["--model", str(bundle)], tmp_path / "bundle.log") as a, \
            start_server(["--model-repository", str(repository)], tmp_path / "repo.log") as b:
        direct = _infer(a.url, "micro", x)
        served = _infer(b.url, "micro-onnx-fp32", x)
        np.testing.assert_allclose(served, direct, rtol=1e-6, atol=1e-6)
        assert direct.std(axis=0).max() > 1e-3
        np.testing.assert_allclose(_infer(b.url, "micro-openvino-fp32", x), direct, atol=1e-4)
        meta = httpx.get(b.url + "/v2/models/micro-onnx-fp32").json()
        assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
        # onnxruntime and OpenVINO in one process: SIGTERM still ends in a clean exit (no crash in their teardown).
        assert b.stop() == 0, b.logs()[-2000:]


def _load_loop(url: str, model: str, stop: threading.Event, results: list[int]) -> None:
    """Closed-loop clients until `stop`: every status code goes into `results`."""
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})

    async def run() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async def one() -> None:
                while not stop.is_set():
                    results.append((await client.post(f"/v2/models/{model}/infer", content=body)).status_code)
            await asyncio.gather(*(one() for _ in range(8)))

    asyncio.run(run())


def test_hot_reload_under_load_drops_no_request_and_refuses_a_bad_version(bundle, tmp_path):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    for extra in ("micro-openvino-fp32", "micro-openvino-fp16"):
        shutil.rmtree(repo / extra)
    name = "micro-onnx-fp32"
    with start_server(["--model-repository", str(repo), "--model-control-mode", "explicit"],
                      tmp_path / "server.log") as server:
        client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
        results: list[int] = []
        stop = threading.Event()
        loader = threading.Thread(target=_load_loop, args=(server.url, name, stop, results))
        loader.start()
        try:
            time.sleep(1.0)
            triton.write_repository(bundle, repo)  # version 2 appears beside version 1
            for _ in range(3):  # swap in version 2 (and load it again) while requests keep coming
                client.load_model(name)
                time.sleep(0.5)
            assert client.get_model_metadata(name)["versions"] == ["2"]
            # Version 3 whose golden logits disagree with what it computes: refused, version 2 keeps serving.
            bad = repo / name / "3"
            shutil.copytree(repo / name / "2", bad)
            m = read_manifest(bad)
            with np.load(bad / "golden.npz", allow_pickle=False) as z:
                pixels, logits = z["pixels"], z["logits"]
            np.savez_compressed(bad / "golden.npz", pixels=pixels, logits=-logits)
            from models.bundle import file_entries

            write_manifest(bad, before_digests(m, file_entries(bad, [bad / "golden.npz"])[0]))
            with pytest.raises(InferenceServerException, match="golden inputs"):
                client.load_model(name)
            assert client.get_model_metadata(name)["versions"] == ["2"] and client.is_model_ready(name)
            time.sleep(0.5)
        finally:
            stop.set()
            loader.join(60)
        assert len(results) > 50 and set(results) == {200}, {s: results.count(s) for s in set(results)}
        index = {(e["name"], e["version"]): e for e in client.get_model_repository_index()}
        assert index[(name, "2")]["state"] == "READY"
        assert index[(name, "3")]["state"] == "UNAVAILABLE" and "golden" in index[(name, "3")]["reason"]
        stats = client.get_inference_statistics(name)["model_stats"][0]
        assert stats["version"] == "2" and stats["inference_count"] > 0 and stats["execution_count"] > 0
        assert stats["inference_stats"]["success"]["count"] > 0 and stats["inference_stats"]["fail"]["count"] == 0
        assert sum(b["compute_infer"]["count"] for b in stats["batch_stats"]) == stats["execution_count"]
        client.unload_model(name)
        assert httpx.get(server.url + f"/v2/models/{name}").status_code == 404
        assert not client.is_model_ready(name)
        assert not client.is_server_ready()  # strict readiness: a server serving no model takes no traffic
        shutil.rmtree(bad)
        client.load_model(name)  # an unloaded model loads again from the repository (its newest good version)
        assert client.is_model_ready(name) and client.get_model_metadata(name)["versions"] == ["2"]
        assert client.is_server_ready()
        # The repository's config.pbtxt is what batches: edited, then loaded again, it takes effect.
        config = repo / name / "config.pbtxt"
        text = config.read_text()
        config.write_text(text.replace("max_batch_size: 32", "max_batch_size: 4").replace("[ 8, 32 ]", "[ 4 ]")
                          .replace("max_queue_delay_microseconds: 2000", "max_queue_delay_microseconds: 250"))
        client.load_model(name)
        served = client.get_model_config(name)
        assert (served["platform"], served["backend"]) == ("onnxruntime_onnx", "onnxruntime")
        assert served["max_batch_size"] == 4 and served["dynamic_batching"]["max_queue_delay_microseconds"] == 250
        assert served["output"][0]["label_filename"] == "labels.txt"
        batch = {"inputs": [{"name": "input", "shape": [8, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 8 * 3072}]}
        r = httpx.post(server.url + f"/v2/models/{name}/infer", json=batch)
        assert r.status_code == 400 and "outside 1..4" in r.json()["error"]
        config.write_text(text.replace("max_batch_size: 32", "max_batch_size: 4096"))  # more than was exported
        with pytest.raises(InferenceServerException, match="max_batch_size 4096"):
            client.load_model(name)
        config.write_text(text)
        # A configuration sent with the load is refused with the reason, not silently ignored.
        with pytest.raises(InferenceServerException, match="config.pbtxt"):
            client.load_model(name, config=json.dumps({"max_batch_size": 1}))
        # The index lists what the repository holds, loaded or not, with why a model is unavailable.
        shutil.copytree(repo / name, repo / "later")
        (repo / "empty").mkdir()
        with pytest.raises(InferenceServerException, match="no version directory"):
            client.load_model("empty")
        index = {e["name"]: e for e in client.get_model_repository_index()}
        assert index["later"]["state"] == "UNAVAILABLE" and index["later"]["reason"] == "not loaded"
        assert index["empty"]["state"] == "UNAVAILABLE" and "no version directory" in index["empty"]["reason"]
        assert index[name]["state"] == "READY"


def test_provenance_shows_on_every_surface(bundle, tmp_path):
    m = read_manifest(bundle)
    p = m.provenance
    with start_server(["--model", str(bundle)], tmp_path / "server.log") as server:
        info = httpx.get(server.url + "/v1/models/micro").json()
        assert info["provenance"] == p.to_dict() and info["version"] == "1"
        params = httpx.get(server.url + "/v2/models/micro").json()["parameters"]
        assert params["weights_sha256"] == m.source.sha256[:12] and params["vitc_version"] == p.vitc_version
        metric = [ln for ln in httpx.get(server.url + "/metrics").text.splitlines()
                  if ln.startswith("vitc_model_info{")]
        assert len(metric) == 1 and f'weights_sha256="{m.source.sha256[:12]}"' in metric[0]
        assert f'git_commit="{(p.git_commit or "unknown")[:12]}"' in metric[0]
