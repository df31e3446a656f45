"""`python -m serve.tensor`: images -> the model input a /v2 or Triton client sends, equal to the server's own
preprocessing and accepted by a real server in each of its formats (raw binary body, JSON request)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import fake_runtime
import numpy as np
import pytest
from test_serve_fixtures import animal_pngs, client_of, fake_server, one_line, softmax

from data.datasets import load_dataset
from models.bundle import read_manifest
from models.preprocessing import preprocess
from serve import tensor
from serve.launch import ServerProcess

CLASSES = 10
W = fake_runtime.weights(3, CLASSES)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("tensor") / "fake")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    with fake_server(bundle, tmp_path_factory.mktemp("tensor-srv")) as s:
        yield s


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    d = tmp_path_factory.mktemp("img")
    paths = []
    for i, data in enumerate(animal_pngs(3, start=5)):
        (p := d / f"{i}.png").write_bytes(data)
        paths.append(p)
    return paths


def test_the_tensor_is_the_evaluation_preprocessing_of_each_image_in_order(bundle, images, tmp_path):
    spec = read_manifest(bundle).preprocessing
    val = load_dataset("animals", "val")
    want = preprocess([val.image(i) for i in range(5, 8)], spec)
    assert tensor.main(["--bundle", str(bundle), *map(str, images), "--out", str(tmp_path / "x.npy")]) == 0
    got = np.load(tmp_path / "x.npy", allow_pickle=False)
    assert got.dtype == np.float32 and got.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(got, want)
    assert tensor.main(["--bundle", str(bundle), *map(str, images), "--out", str(tmp_path / "x.bin")]) == 0
    np.testing.assert_array_equal(np.fromfile(tmp_path / "x.bin", "<f4").reshape(got.shape), got)


def test_a_server_answers_the_raw_body_and_the_json_request_as_it_answers_the_image(server, bundle, images, tmp_path,
                                                                                     capsys):
    with client_of(server) as c:
        assert tensor.main(["--bundle", str(bundle), str(images[0]), "--out", str(tmp_path / "x.bin")]) == 0
        assert "Inference-Header-Content-Length: 0" in capsys.readouterr().out
        raw = c.post("/v2/models/fake/infer", content=(tmp_path / "x.bin").read_bytes(),
                     headers={"Inference-Header-Content-Length": "0"})
        assert raw.status_code == 200, raw.text
        n = int(raw.headers["Inference-Header-Content-Length"])
        raw_logits = np.frombuffer(raw.content[n:], "<f4")

        assert tensor.main(["--bundle", str(bundle), *map(str, images), "--out", str(tmp_path / "x.json")]) == 0
        body = (tmp_path / "x.json").read_bytes()
        doc = json.loads(body)
        assert doc["inputs"][0]["name"] == "input" and doc["inputs"][0]["shape"] == [3, 3, 32, 32]
        answer = c.post("/v2/models/fake/infer", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 200, answer.text
        logits = np.asarray(answer.json()["outputs"][0]["data"], np.float32).reshape(3, CLASSES)
        # Rows of a batch of 3 and a batch of 1 may round differently (BLAS kernels by batch size, on AVX2 more
        # than on AVX-512): the exact check sends the raw body's one image as JSON.
        np.testing.assert_allclose(logits[0], raw_logits, rtol=1e-6, atol=1e-6)
        assert tensor.main(["--bundle", str(bundle), str(images[0]), "--out", str(tmp_path / "one.json")]) == 0
        one = c.post("/v2/models/fake/infer", content=(tmp_path / "one.json").read_bytes(),
                     headers={"content-type": "application/json"})
        assert one.status_code == 200, one.text
        np.testing.assert_array_equal(np.asarray(one.json()["outputs"][0]["data"], np.float32), raw_logits)  # exact

        x = np.load(_npy(bundle, images, tmp_path), allow_pickle=False)
        np.testing.assert_allclose(logits, fake_runtime.logits(W, x), rtol=1e-6, atol=1e-6)
        v1 = c.post("/v1/models/fake/classify?top_k=10", content=images[0].read_bytes(),
                    headers={"content-type": "image/png"})
        assert v1.status_code == 200, v1.text
        probs = np.zeros(CLASSES)
        for p in v1.json()["predictions"]:
            probs[p["index"]] = p["score"]
        np.testing.assert_allclose(probs, softmax(logits[0]), atol=1e-6)


def _npy(bundle, images, tmp_path):
    out = tmp_path / "all.npy"
    assert tensor.main(["--bundle", str(bundle), *map(str, images), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("case, needle", [
    ("suffix", "must end in .bin, .npy, .json"),
    ("not-an-image", "not a recognised image"),
    ("missing-image", "cannot read"),
    ("too-many", "takes at most 2 per request"),
    ("triton-model-dir", "give one of its version directories"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(bundle, images, tmp_path, capsys, case, needle):
    import shutil

    out, args, where = tmp_path / "x.bin", [str(images[0])], bundle
    if case == "suffix":
        out = tmp_path / "x.txt"
    elif case == "not-an-image":
        (bad := tmp_path / "bad.png").write_bytes(b"not an image at all")
        args = [str(images[0]), str(bad)]
    elif case == "missing-image":
        args = [str(tmp_path / "nope.png")]
    elif case == "too-many":
        small = tmp_path / "small"
        shutil.copytree(bundle, small)
        doc = json.loads((small / "manifest.json").read_text())
        doc["input"]["max_batch"] = 2
        (small / "manifest.json").write_text(json.dumps(doc))
        where, args = small, [str(p) for p in images]
    else:
        (where := tmp_path / "model").mkdir()
        (where / "config.pbtxt").write_text('name: "model"\n')
    assert tensor.main(["--bundle", str(where), *args, "--out", str(out)]) == 2
    err = one_line(capsys)
    assert err.startswith("python -m serve.tensor: error: ") and needle in err, err
    assert not out.exists()


def test_the_command_line_runs_as_documented(bundle, images, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "x.bin"
    proc = subprocess.run([sys.executable, "-m", "serve.tensor", "--bundle", str(bundle), str(images[0]),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}: FP32 1 × 3 × 32 × 32 for input 'input'"), proc.stdout
    assert out.stat().st_size == 4 * 3 * 32 * 32
    bad = subprocess.run([sys.executable, "-m", "serve.tensor", "--bundle", str(bundle), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_full_disk_is_the_machine_failing_exit_1(bundle, images, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from models import cli

    def full(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tensor, "atomic_write_bytes", full)
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: tensor.main(["--bundle", str(bundle), str(images[0]), "--out", str(tmp_path / "x.bin")]),
                tensor.PROG)
    assert exit_.value.code == 1 and "No space left on device" in one_line(capsys)

