"""The runtime registry: the one list of runtimes, and a runtime added through it reaching export, serve and
benchmarks with no other change (tests/fake_runtime.py is such a runtime)."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import fake_runtime
import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import animal_pngs, scores_by_index, softmax

import runtimes
from models.bundle import read_manifest
from models.preprocessing import preprocess
from runtimes import BackendError, BackendOptions

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy-bundle-v1"


@pytest.fixture
def fake():
    with fake_runtime.registered() as rt:
        yield rt


def test_the_builtin_runtimes_and_what_each_declares():
    assert runtimes.names() == ("onnxruntime", "openvino", "tensorrt", "torch")
    for rt in runtimes.runtimes():
        assert rt is runtimes.get(rt.name) is runtimes.by_target(rt.target)
        assert set(rt.default_precisions) <= set(rt.precisions) and rt.devices and rt.triton_platform
        assert "pip install -c constraints.txt " in rt.install and "vitc[" not in rt.install  # pinned, no PyPI vitc
        assert all(v.device in rt.devices for v in rt.variants)
    platforms = {rt.name: rt.triton_platform for rt in runtimes.runtimes()}
    assert platforms == {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino", "tensorrt": "tensorrt_plan",
                         "torch": "pytorch_libtorch"}


def test_unknown_duplicate_and_missing_runtimes_are_one_line_errors(fake):
    known = "known: onnxruntime, openvino, tensorrt, torch, fake"
    with pytest.raises(BackendError, match=f"unknown backend 'tflite'; {known}"):
        runtimes.get("tflite")
    with pytest.raises(ValueError, match="already registered"):  # another runtime of its name (itself: a no-op)
        runtimes.register(dataclasses.replace(fake, target="fake2"))
    if not runtimes.get("tensorrt").installed():
        with pytest.raises(BackendError, match="tensorrt is not installed .* constraints.txt tensorrt cuda-bindings"):
            runtimes.get("tensorrt").require("cuda")
    with pytest.raises(BackendError, match="runs on cpu, not 'cuda'"):
        runtimes.get("openvino").require("cuda")
    with pytest.raises(BackendError, match="device must be cpu, cuda or cuda:N"):
        BackendOptions(device="gpu")


def test_backend_options_are_typed_and_checked():
    assert BackendOptions(device="cuda:1").device_index == 1 and BackendOptions().device_kind == "cpu"
    for bad in ({"threads": 0}, {"parallel": 5000}, {"hint": "fast"}, {"threads": "2"}):
        with pytest.raises(BackendError):
            BackendOptions(**bad)


def test_the_server_and_benchmarks_take_their_lists_from_the_registry(fake):
    from benchmarks.runners import all_targets, parse_targets
    from serve.settings import Settings

    assert Settings(backend="fake").backend == "fake"
    assert [t.id for t in parse_targets("fake-fp32")] == ["fake-fp32"]
    assert "fake-fp32" in [t.id for t in all_targets()]
    help_text = subprocess.run([sys.executable, "-m", "serve", "--help"], cwd=REPO, capture_output=True,
                               text=True, timeout=60).stdout
    assert "onnxruntime | openvino | tensorrt | torch" in help_text


def test_settings_refuse_an_unregistered_backend():
    from pydantic import ValidationError

    from serve.settings import Settings

    with pytest.raises(ValidationError, match="unknown backend; known: onnxruntime, openvino, tensorrt, torch"):
        Settings(backend="fake")


def test_export_gates_a_new_runtime_through_its_own_backend(fake, tmp_path, micro_checkpoint):
    """The parity gate opens the artifact with the runtime's `load` and the server's options, and refuses what
    does not reproduce torch (a linear map of channel means cannot), deleting its files."""
    from export.bundle import build_bundle

    ckpt = micro_checkpoint(tmp_path)
    m = build_bundle(ckpt, tmp_path / "b", ["fake"], max_batch=4, parity_samples=16, threads=1, log=lambda _: None)
    artifact = m.artifacts[-1]
    assert (artifact.id, artifact.runtime, artifact.format, artifact.runtime_version) == ("fake-fp32", "fake",
                                                                                         "npy", "0.0")
    assert not artifact.servable and "top-1 agreement" in artifact.refused_reason
    assert artifact.refused_files[0].path == "fake.npy" and not (tmp_path / "b" / "fake.npy").exists()
    spec = fake_runtime.LOADS[-1]
    assert spec.options == BackendOptions(device="cpu", threads=1)
    assert (spec.manifest.input_name, spec.manifest.output_name) == ("input", "logits")
    assert (spec.max_batch, spec.num_classes) == (4, 10)
    assert artifact.parity.val_samples == 16 and artifact.parity.inference_precision == "fp32"


@pytest.fixture
def fake_bundle(fake, tmp_path) -> Path:
    """The legacy bundle with one servable artifact of the fake runtime (no export needed)."""
    return fake_runtime.write_bundle(tmp_path / "fake-bundle")


def test_routes_serve_a_runtime_registered_through_the_registry(fake_bundle):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    settings = Settings(models=[f"fake={fake_bundle}"], backend="fake", access_log=False)
    w = np.load(fake_bundle / fake_runtime.WEIGHTS)
    spec = read_manifest(fake_bundle).preprocessing
    pngs = animal_pngs(6)
    with TestClient(create_app(settings)) as client:
        info = client.get("/v1/models/fake").json()
        assert (info["runtime"], info["precision"], info["ready"]) == ("fake", "fp32", True)
        assert client.get("/v2/models/fake").json()["platform"] == "fake_platform"
        for png in pngs:
            x = preprocess([Image.open(io.BytesIO(png))], spec)
            r = client.post("/v1/models/fake/classify", content=png, headers={"content-type": "image/png"},
                            params={"top_k": 10})
            np.testing.assert_allclose(scores_by_index(r.json()), softmax(fake_runtime.logits(w, x))[0], atol=1e-6)
            # Where the time went, stage by stage (milliseconds), for any client to see.
            stages = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
            assert list(stages) == ["receive", "decode", "queue", "compute", "encode", "total"]
            ms = {k: float(v) for k, v in stages.items()}
            assert all(v >= 0 for v in ms.values()) and ms["total"] >= ms["compute"] + ms["decode"]
        x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        out = client.post("/v2/models/fake/infer", content=json.dumps(body)).json()["outputs"][0]
        np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), fake_runtime.logits(w, x),
                                   rtol=1e-5, atol=1e-5)
        info = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith("vitc_model_info{")]
        assert len(info) == 1 and info[0].endswith(" 1.0")
        assert 'model="fake",precision="fp32",runtime="fake",variant="vit_c_micro",version="1"' in info[0]
    assert fake_runtime.LOADS[-1].options == BackendOptions(hint="throughput")
