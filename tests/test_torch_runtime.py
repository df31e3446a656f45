"""The torch runtime as a first-class one: bf16/fp16 artifacts through their parity gates, channels_last, and
torch.compile with batch buckets captured at load (inductor on the CPU here; CUDA graphs on a GPU)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_serve_fixtures import micro_bundle, val_batch

import runtimes
from models.bundle import read_manifest
from models.tolerance import BF16_TOLERANCE, FP16_TOLERANCE
from runtimes import BackendError, BackendOptions
from runtimes.pytorch import buckets

TARGETS = ("torch-bf16", "torch-fp16")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory, TARGETS)


@pytest.fixture(scope="module")
def manifest(bundle):
    return read_manifest(bundle)


@pytest.fixture(scope="module")
def batch(manifest):
    return val_batch(manifest, 11)


def _open(bundle, manifest, precision="fp32", **options):
    return runtimes.open_backend(bundle, manifest, "torch", precision, BackendOptions(threads=2, **options))


def test_bf16_and_fp16_artifacts_are_gated_and_half_the_size(bundle, manifest):
    fp32 = manifest.select("torch", "fp32")
    for precision, tol in (("bf16", BF16_TOLERANCE), ("fp16", FP16_TOLERANCE)):
        a = manifest.select("torch", precision)
        assert a.servable and a.parity.passed and a.parity.tolerance["rtol"] == tol.rtol
        assert 0 < a.parity.max_abs_err <= tol.logit_bound(a.parity.reference_logit_scale)
        assert a.files[0].path == f"model-{precision}.safetensors"
        assert a.files[0].bytes < 0.6 * fp32.files[0].bytes
        assert a.info["compute"].startswith("torch autocast")


def test_low_precision_backends_stay_close_to_fp32(bundle, manifest, batch):
    ref = _open(bundle, manifest).infer(batch)
    for precision, tol in (("bf16", BF16_TOLERANCE), ("fp16", FP16_TOLERANCE)):
        backend = _open(bundle, manifest, precision)
        y = backend.infer(batch)
        assert backend.describe()["inference_precision"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
        assert 0 < np.abs(y - ref).max() <= tol.logit_bound(float(np.abs(ref).max()))


def test_lower_compute_precision_is_held_to_its_own_gate_at_load(bundle, manifest):
    # bf16 compute on the fp32 artifact: the golden check must use the bf16 tolerance, not fp32's 1e-4 (which it
    # cannot meet), and still refuse what bf16 could not explain.
    backend = _open(bundle, manifest, "fp32", inference_precision="bf16")
    assert backend.describe()["inference_precision"] == "bfloat16"


def test_channels_last_gives_the_same_logits(bundle, manifest, batch):
    ref = _open(bundle, manifest).infer(batch)
    backend = _open(bundle, manifest, channels_last=True)
    assert backend.describe()["channels_last"] is True
    np.testing.assert_allclose(backend.infer(batch), ref, atol=1e-5, rtol=1e-5)


def test_buckets():
    assert buckets(1) == (1,) and buckets(2) == (1, 2) and buckets(32) == (1, 2, 4, 8, 16, 32)
    assert buckets(24) == (1, 2, 4, 8, 16, 24)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_a_compiled_server_captures_the_batch_sizes_it_can_form_at_load_and_matches_eager(bundle, manifest, batch,
                                                                                          tmp_path, monkeypatch):
    """`--compile --max-batch-size 4` on a bundle exported for 32 captured 1..32 anyway: minutes of start for graphs
    no batch could use (gpu-check's server timed out). Now it captures 1, 2 and 4, every one before the model loads,
    and pads a batch up to its bucket without the padding leaking out."""
    # One compiled backend for both checks (the server's bucket choice, a compiled backend's results): each inductor
    # compile takes seconds, and a max batch of 8 or more adds a size-specialised recompile.
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    ref = _open(bundle, manifest).infer(batch)
    assert manifest.input.max_batch == 32
    models = load_models(Settings(models=[f"m={bundle}"], backend="torch", compile=True, max_batch_size=4, threads=2))
    try:
        backend = models["m"].backend
        info = backend.describe()
        assert info["compiled"] and info["batch_buckets"] == list(buckets(4)) == [1, 2, 4]
        assert models["m"].max_batch == backend.max_batch == 4
        assert set(info["compile_seconds"]) == set(info["batch_buckets"])  # all captured before load_models returned
        for n in (1, 2, 3, 4):  # 3 is padded to its bucket (4); the padding never leaks out
            y = backend.infer(batch[:n])
            assert y.shape == (n, manifest.output.classes)
            np.testing.assert_allclose(y, ref[:n], atol=1e-4, rtol=1e-4)
        with pytest.raises(BackendError, match="exceeds"):
            backend.infer(np.zeros((5, *manifest.input.sample_shape), np.float32))
    finally:
        close_models(models)


def test_serve_refuses_torch_options_for_other_backends(bundle, capsys):
    from serve.__main__ import main

    assert main(["--model", str(bundle), "--backend", "onnxruntime", "--compile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m serve: error: invalid settings: --backend onnxruntime does not use --compile (its "
                   "tuning flags: --threads, --parallel, --openvino-hint)"]


def test_a_nan_weight_pinned_under_a_valid_sha256_is_refused_at_load(bundle, manifest, tmp_path):
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from models.bundle import file_entries, write_manifest

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    weights = copy / "model.safetensors"
    state = load_file(str(weights))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    art = next(a for a in manifest.artifacts if a.runtime == "torch" and a.precision == "fp32")
    fixed = replace(art, files=tuple(file_entries(copy, [weights])))
    write_manifest(copy, replace(manifest, artifacts=tuple(fixed if a is art else a for a in manifest.artifacts)))
    with pytest.raises(BackendError, match="head.weight holds NaN"):
        _open(copy, read_manifest(copy))
