"""Start and stop: refusals before the port is bound (exit 2, one line), queue-full 503s, graceful SIGTERM."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import micro_bundle

import runtimes
from serve.launch import REPO


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return micro_bundle(tmp_path_factory)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m serve: error: "), proc.stderr
    assert "Traceback" not in proc.stderr and '"listening"' not in proc.stderr + proc.stdout
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_model_path_is_refused(tmp_path):
    assert_refused(run_cli("--model", str(tmp_path / "missing")), "not found")
    (tmp_path / "empty").mkdir()
    assert_refused(run_cli("--model", str(tmp_path / "empty")), "manifest.json")
    assert_refused(run_cli(), "no models")


def test_tampered_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    onnx = copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    assert_refused(run_cli("--model", str(copy)), "sha256")
    (copy / "manifest.json").write_text("{ not json")
    assert_refused(run_cli("--model", str(copy)), "corrupt manifest")


@pytest.mark.skipif(runtimes.get("tensorrt").installed(), reason="TensorRT is installed here")
def test_backend_not_installed_is_refused(bundle):
    assert_refused(run_cli("--model", str(bundle), "--backend", "tensorrt", "--device", "cuda"), "not installed")


def test_bad_settings_port_in_use_and_duplicate_names(bundle):
    assert_refused(run_cli("--model", str(bundle), "--max-batch-size", "0"), "--max-batch-size (VITC_MAX_BATCH_SIZE)")
    assert_refused(run_cli("--model", str(bundle), env={"VITC_BACKEND": "tflite"}), "backend")
    assert_refused(run_cli("--model", str(bundle), "--model", str(bundle)), "two models are named")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_refused(run_cli("--model", str(bundle), "--port", str(port)), "cannot listen", str(port))


def _metric(url: str, prefix: str) -> float:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_sample_image_helper(tmp_path):
    out = tmp_path / "sample.png"
    proc = subprocess.run([sys.executable, "-m", "serve.sample", "--dataset", "animals", "--index", "3",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    from data.datasets import load_dataset

    val = load_dataset("animals", "val")
    img = Image.open(out)
    np.testing.assert_array_equal(np.asarray(img), val.arrays[3])
    assert val.class_names[val.labels[3]] in proc.stdout


def test_sigterm_while_the_models_load_stops_the_start(tmp_path):
    """In the image the server is PID 1, and the kernel drops a signal PID 1 has no handler for: a `docker stop` or
    rollout while the models loaded did nothing, and the pod was killed later without a drain. SIGTERM now stops
    the start at once (one line, exit 143); once serving, it drains as before."""
    import os
    import signal
    import time

    import fake_runtime

    loading = tmp_path / "loading"
    env = {**os.environ, **fake_runtime.server_env(tmp_path), "FAKE_RUNTIME_LOADING": str(loading)}
    bundle = fake_runtime.write_bundle(tmp_path / "b")
    proc = subprocess.Popen([sys.executable, "-m", "serve", "--model", f"fake={bundle}", "--backend", "fake",
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        while not loading.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loading.exists(), proc.stderr.read() if proc.poll() is not None else "the load never started"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "python -m serve: terminated", err
