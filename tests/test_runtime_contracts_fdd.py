"""The runtime contract as a library and plugin author meets it (hDG's findings 2-5): a VITC_RUNTIMES plugin uses
the package's public API at import time; `register` refuses a malformed optional Runtime field in one line naming
it; BackendOptions takes numpy integers; and `Backend.infer` refuses NaN or infinity on every runtime alike."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import fake_runtime
import numpy as np
import pytest
from test_serve_fixtures import animal_pngs, micro_bundle, val_batch

import runtimes
from models.bundle import read_manifest
from runtimes import BackendError, BackendOptions, base, registry
from runtimes.base import check_batch

REPO = Path(__file__).resolve().parents[1]
FAKE = fake_runtime.RUNTIME


# --- (A) a VITC_RUNTIMES plugin imports `runtimes` itself ----------------------------------------------------------

PLUGINS = {  # each written as README's "Adding a runtime" suggests, through the package's public API
    "fromrt": "import fake_runtime\n"
              "from runtimes import Runtime, open_backend, register\n"
              "RUNTIME = register(Runtime(\n"
              "    name='fromrt', target='fromrt', packages=('numpy',), install='(a test plugin)', format='npy',\n"
              "    triton_platform='fromrt_platform', precisions=('fp32',), default_precisions=('fp32',),\n"
              "    devices=('cpu',), build=fake_runtime.build, load=fake_runtime.FakeBackend, version=lambda: '1'))\n",
    "importrt": "import dataclasses\nimport fake_runtime\nimport runtimes\n"
                "SEEN = runtimes.names()  # the built-ins and the plugins named before it\n"
                "RUNTIME = runtimes.register(dataclasses.replace(fake_runtime.RUNTIME, name='importrt', "
                "target='importrt'))\n",
}
PLUGIN_CODE = """
import sys
import numpy as np
import runtimes.registry as r
import runtimes, importrt
from models.bundle import read_manifest
print(r.load_failures() or 'none')
print(','.join(importrt.SEEN))
bundle = sys.argv[1]
for name in ('fromrt', 'importrt'):
    backend = runtimes.open_backend(bundle, read_manifest(bundle), name)
    print(name, backend.infer(np.full((2, 3, 32, 32), 0.5, np.float32)).shape)
    backend.close()
"""


def _plugin_bundle(dest: Path) -> Path:
    """The legacy test bundle with one fake-runtime artifact per plugin (no export needed)."""
    from models.bundle import Artifact, file_entries, write_manifest

    fake_runtime.write_bundle(dest)
    m = read_manifest(dest)
    added = []
    for name in PLUGINS:
        path = dest / name / fake_runtime.WEIGHTS
        path.parent.mkdir()
        np.save(path, fake_runtime.weights(3, len(m.class_names)))
        added.append(Artifact(id=f"{name}-fp32", runtime=name, format="npy", precision="fp32", servable=True,
                              files=file_entries(dest, [path])))
    write_manifest(dest, dataclasses.replace(m, artifacts=(*m.artifacts, *added)))
    return dest


def test_a_plugin_importing_the_runtimes_package_loads_and_opens_its_artifacts(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name, text in PLUGINS.items():
        (plugins / f"{name}.py").write_text(text)
    bundle = _plugin_bundle(tmp_path / "bundle")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITC_")}
    env.update(VITC_RUNTIMES=",".join(PLUGINS), PYTHONPATH=f"{plugins}:{REPO / 'tests'}:{REPO}")
    r = subprocess.run([sys.executable, "-c", PLUGIN_CODE, str(bundle)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    builtins = ",".join(rt.name for m in registry.BUILTIN if (rt := importlib.import_module(m).RUNTIME))
    want = ["none", f"{builtins},fromrt", "fromrt (2, 10)", "importrt (2, 10)"]  # built-ins, then plugins in order
    assert r.stdout.splitlines() == want, r.stdout + r.stderr


def test_loading_the_runtimes_again_registers_nothing_twice():
    before, failures = runtimes.runtimes(), registry.load_failures()
    registry.load_runtimes()
    assert runtimes.runtimes() == before and registry.load_failures() == failures


# --- (B) register() refuses a malformed optional field, naming it --------------------------------------------------

def _release() -> object:
    from runtimes.base import TritonRelease

    return TritonRelease(cannot_load=lambda _a, _t: None, cannot_tell=lambda _a, _t: None, advice=lambda _a: "",
                         same=lambda _a, _b: True, loaded_by=lambda _t: "")


@pytest.mark.parametrize(("changes", "reason"), [
    ({"tunes": ("thread",)}, r"tunes has 'thread', not one of the server's tuning settings \(threads, parallel"),
    ({"export_device": "gpu"}, r"export_device must be one of its devices \(cpu\), got 'gpu'"),
    ({"export_device": "cuda"}, r"export_device must be one of its devices \(cpu\), got 'cuda'"),
    ({"export_device": None}, "export_device must be one of its devices"),
    ({"fallback": "onnxruntime"}, r"fallback must be None or a \(runtime name, precision\) pair, got 'onnxruntime'"),
    ({"fallback": ("onnxruntime",)}, r"fallback must be None or a \(runtime name, precision\) pair"),
    ({"fallback": ["onnxruntime", "fp32"]}, r"fallback must be None or a \(runtime name, precision\) pair"),
    ({"fallback": ("ONNX", "fp32")}, r"fallback must be None or a \(runtime name, precision\) pair"),
    ({"fallback": ("onnxruntime", "fp8")}, r"fallback must be None or a \(runtime name, precision\) pair"),
    ({"unavailable": None}, "unavailable must be callable, got None"),
    ({"mismatch": None}, "mismatch must be callable, got None"),
    ({"triton_min_check": None}, "triton_min_check must be callable"),
    ({"profile": "ops"}, "profile must be callable or None"),
    ({"install": None}, "install must be a non-empty string, got None"),
    ({"format": ""}, "format must be a non-empty string"),
    ({"triton_platform": 3}, "triton_platform must be a non-empty string"),
    ({"export_extra": 3}, "export_extra must be a string or None"),
    ({"needs_hub": "yes"}, "needs_hub must be True or False"),
    ({"triton_backend": 3}, "triton_backend must be a string or None, got 3"),
    ({"triton_threads": 4}, "triton_threads must be a string or None"),
    ({"triton_streams": ["NUM_STREAMS"]}, "triton_streams must be a string or None"),
    ({"triton_threads_shared": 1}, "triton_threads_shared must be True or False"),
    ({"triton_platform_fills": None}, "triton_platform_fills must be True or False"),
    ({"triton_cpu_only": "no"}, "triton_cpu_only must be True or False"),
    ({"triton_fixed_batch": 0}, "triton_fixed_batch must be True or False"),
    ({"triton_note": None}, "triton_note must be a string"),
    ({"triton_files": (".onnx", "model.onnx")}, r"triton_files must be a tuple of \(file suffix, name\) pairs"),
    ({"triton_files": ((".onnx", 3),)}, r"triton_files must be a tuple of \(file suffix, name\) pairs"),
    ({"triton_release": "24.01"}, "triton_release must be a runtimes.base.TritonRelease or None"),
])
def test_register_refuses_a_malformed_optional_field_naming_it(changes, reason):
    before = runtimes.names()
    try:
        with pytest.raises(ValueError, match=f"runtime 'fake': {reason}") as exc:
            runtimes.register(dataclasses.replace(FAKE, **changes))
        assert "\n" not in str(exc.value)
        assert runtimes.names() == before
    finally:  # one taken by mistake is not left behind for the next case
        if "fake" not in before:
            runtimes.unregister("fake")


def test_register_takes_every_optional_field_well_formed():
    rt = dataclasses.replace(
        FAKE, tunes=("threads", "parallel", "openvino_hint", "compile", "channels_last"), export_device="cpu",
        fallback=("onnxruntime", "fp32"), profile=lambda *_: {},
        export_extra="export", needs_hub=True, triton_backend="fake_backend", triton_files=((".npy", "model.npy"),),
        triton_threads="THREADS", triton_threads_shared=True, triton_streams="STREAMS", triton_platform_fills=True,
        triton_cpu_only=True, triton_fixed_batch=True, triton_note="# a note\n", triton_release=_release())
    try:
        assert runtimes.register(rt) is rt and runtimes.get("fake") is rt
    finally:
        runtimes.unregister("fake")


def test_every_builtin_runtime_passes_the_checks():
    for module in registry.BUILTIN:
        registry.check_runtime(importlib.import_module(module).RUNTIME)
    assert all(registry.by_target(t) for t in ("onnx", "openvino", "tensorrt", "torch"))


def test_the_tunables_a_runtime_may_declare_are_the_servers_settings():
    from serve.settings import Settings

    # Each is a setting whose flag the server refuses for a runtime that does not list it: a name that is no
    # setting would be a tunable nobody can set.
    assert set(base.TUNABLES) <= set(Settings.model_fields)


# --- (C) BackendOptions takes numpy integers, stored as ints --------------------------------------------------------

def test_backend_options_take_numpy_integers_as_plain_ints():
    o = BackendOptions(threads=np.int64(2), parallel=np.int32(3), max_batch=np.uint8(4),
                       buckets=(np.int64(1), np.int16(4)))
    assert o == BackendOptions(threads=2, parallel=3, max_batch=4, buckets=(1, 4))
    assert hash(o) == hash(BackendOptions(threads=2, parallel=3, max_batch=4, buckets=(1, 4)))
    assert all(type(v) is int for v in (o.threads, o.parallel, o.max_batch, *o.buckets))
    json.dumps(dataclasses.asdict(o))  # what the server and the benchmarks record
    for bad, reason in (({"threads": np.int64(0)}, "threads must be an integer in 1..1024, got np.int64\\(0\\)"),
                        ({"parallel": np.bool_(True)}, "parallel must be an integer"),
                        ({"max_batch": np.float32(4)}, "max_batch must be a batch size"),
                        ({"buckets": (np.int64(2000),)}, "buckets must be a tuple of batch sizes")):
        with pytest.raises(BackendError, match=reason):
            BackendOptions(**bad)


# --- (D) NaN or infinity in a batch is refused on every runtime -----------------------------------------------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


@pytest.mark.parametrize("runtime", ("onnxruntime", "openvino", "torch"))
def test_infer_refuses_a_batch_holding_nan_or_infinity_on_every_runtime(bundle, runtime):
    manifest = read_manifest(bundle)
    backend = runtimes.open_backend(bundle, manifest, runtime, "fp32", BackendOptions(threads=1))
    try:
        x = val_batch(manifest, 4)
        clean = backend.infer(x)
        assert np.isfinite(clean).all()
        for value in (np.nan, np.inf, -np.inf):
            bad = x.copy()
            bad[1, 2, 3, 4] = value
            for batch in (bad, bad[1:2], bad[::-1]):  # the row alone, and a strided view
                with pytest.raises(BackendError, match="a batch must hold finite values, got NaN or infinity") as err:
                    backend.infer(batch)
                assert "\n" not in str(err.value) and err.value.__cause__ is None
        np.testing.assert_array_equal(backend.infer(x), clean)  # the backend still answers
    finally:
        backend.close()


def test_finite_values_whose_sum_overflows_are_taken_and_the_rest_refused():
    big = np.full((2, 3, 8, 8), np.finfo(np.float32).max, np.float32)  # finite, though their sum is not
    big[1] *= -1
    check_batch(big, (3, 8, 8), 2)
    check_batch(big[:1], (3, 8, 8), 2)
    for value in (np.nan, np.inf):
        bad = big.copy()
        bad[0, 0, 0, 0] = value
        with pytest.raises(BackendError, match="finite"):
            check_batch(bad, (3, 8, 8), 2)


def test_the_server_still_answers_400_for_non_finite_v2_inputs_and_serves_images(bundle):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    x = np.zeros((1, 3, 32, 32), np.float32)
    x[0, 0, 0, 0] = np.nan
    head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    settings = Settings(models=[f"micro={bundle}"], backend="onnxruntime", threads=1, access_log=False)
    with TestClient(create_app(settings)) as client:
        r = client.post("/v2/models/micro/infer", content=head + x.tobytes(),
                        headers={"Inference-Header-Content-Length": str(len(head)),
                                 "content-type": "application/octet-stream"})
        assert r.status_code == 400 and "non-finite values" in r.text, r.text
        r = client.post("/v1/models/micro/classify", content=animal_pngs(1)[0], headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
