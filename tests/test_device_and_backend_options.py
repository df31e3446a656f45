"""One device syntax with one bound for the runtimes and the server's settings (models.device), the server's
precision choices taken from the parity gates' table, and the server handing a runtime what it sizes itself by
(BackendOptions.max_batch) instead of computing one runtime's capture buckets itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_imports import import_graph

from models.device import DEVICE_RULE, is_device
from runtimes import BackendError, BackendOptions, registry
from runtimes.pytorch import buckets, capture_buckets
from serve.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


# --- device names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:7", "cuda:99"])
def test_device_names_the_runtimes_and_the_settings_both_take(device):
    assert is_device(device)
    assert BackendOptions(device=device).device == device
    assert Settings(models=["x"], device=device).device == device


@pytest.mark.parametrize("device", ["cuda:100", "cuda:1x", "gpu", "cuda\n", "CUDA", "cuda:", ""])
def test_device_names_both_refuse_with_the_same_bound(device):
    assert not is_device(device)
    with pytest.raises(BackendError, match=r"device must be cpu, cuda or cuda:N \(N from 0 to 99\)"):
        BackendOptions(device=device)
    with pytest.raises(ValidationError, match=r"must be cpu, cuda or cuda:N \(N from 0 to 99\)"):
        Settings(models=["x"], device=device)


def test_the_server_refuses_a_device_beyond_the_bound_before_loading_anything(capsys):
    from serve.__main__ import main

    assert main(["--model", "no-such-bundle", "--device", "cuda:100"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m serve: error: invalid setting --device (VITC_DEVICE): must be {DEVICE_RULE} (got 'cuda:100')"]


def test_the_server_precisions_are_the_parity_gates_ones():
    """A precision added to models.tolerance is one the server takes, without a second list to update."""
    code = ("from models import tolerance as t\n"
            "t.TOLERANCES['fp8'] = t.TOLERANCES['fp16']\n"
            "from serve.settings import Settings\n"
            "print(Settings(models=['x'], precision='fp8').precision)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "fp8", done.stderr[-2000:]
    with pytest.raises(ValidationError, match="'fp32', 'fp16', 'bf16' or 'int8'"):
        Settings(models=["x"], precision="fp8")


# --- what the server hands a runtime ------------------------------------------------------------------------------


def test_serve_imports_no_runtime_module_of_its_own_choosing():
    """serve goes through the registry: no runtime's own module (runtimes/pytorch.py, ...) is imported by it."""
    own = set(registry.BUILTIN)
    reached = {(module, dep) for module, deps in import_graph().items() if module.split(".")[0] == "serve"
               for dep in deps if dep in own}
    assert not reached


def test_the_torch_runtime_captures_up_to_the_callers_max_batch():
    assert capture_buckets(BackendOptions(), 64) == buckets(64)
    assert capture_buckets(BackendOptions(max_batch=32), 64) == (1, 2, 4, 8, 16, 32)
    assert capture_buckets(BackendOptions(max_batch=24), 64) == (1, 2, 4, 8, 16, 24)
    assert capture_buckets(BackendOptions(max_batch=1024), 64) == buckets(64)  # within the bundle's
    assert capture_buckets(BackendOptions(buckets=(8, 1, 8), max_batch=2), 64) == (1, 8)  # named ones win
    with pytest.raises(BackendError, match="batch bucket 128 exceeds the bundle's max batch 64"):
        capture_buckets(BackendOptions(buckets=(1, 128)), 64)
    for bad in (0, 1025, True, 2.0, "8"):  # 1025: above MAX_BATCH_LIMIT, what no bundle takes
        with pytest.raises(BackendError, match="max_batch must be a batch size in 1..1024 or None"):
            BackendOptions(max_batch=bad)


def test_the_server_hands_a_compiled_model_its_max_batch_size():
    from serve.registry import ModelSource, _backend_options

    bundle = ModelSource(Path("b"))
    compiled = Settings(models=["b"], backend="torch", compile=True, max_batch_size=24, threads=2)
    options = _backend_options(bundle, None, compiled, "torch", "cpu")
    assert options == BackendOptions(device="cpu", threads=2, compile=True, max_batch=24)
    assert capture_buckets(options, 64) == (1, 2, 4, 8, 16, 24)  # what the server used to work out itself
    # Not compiled, or a repository model (whose config.pbtxt decides its batch once loaded): nothing to size.
    assert _backend_options(bundle, None, Settings(models=["b"], max_batch_size=24), "onnxruntime",
                            "cpu") == BackendOptions()
    repository = ModelSource(Path("r"), "r", repository=True)
    assert _backend_options(repository, None, compiled, "torch", "cpu").max_batch is None
