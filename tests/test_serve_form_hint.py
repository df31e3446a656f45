"""A form-urlencoded /v1 body that does not decode is told that curl -d stripped its line breaks only when it starts
like an image that lost them (hCD 4: a tensor file posted by mistake was told to use the --data-binary it used)."""

from __future__ import annotations

import fake_runtime
import numpy as np
import pytest
from PIL import Image
from test_serve_fixtures import encode as encode_image

from models.bundle import read_manifest
from serve.tensor import encode, image_tensor

URL = "/v1/models/fake/classify"
FORM = {"content-type": "application/x-www-form-urlencoded"}
HINT = "curl -d strips a file's line breaks"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return fake_runtime.write_bundle(tmp_path_factory.mktemp("hint") / "fake")


@pytest.fixture(scope="module")
def client(bundle):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    with fake_runtime.registered():
        settings = Settings(models=[f"fake={bundle}"], backend="fake", access_log=False)
        with TestClient(create_app(settings)) as c:
            yield c


def _image(fmt: str) -> bytes:
    return encode_image(Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8)), fmt)


def _curl_d(data: bytes) -> bytes:
    """What `curl -d @file` sends: the file without its carriage returns and newlines."""
    return data.replace(b"\r", b"").replace(b"\n", b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_an_image_whose_line_breaks_curl_stripped_gets_the_hint(client, fmt):
    data = _image(fmt)
    stripped = _curl_d(data)
    assert stripped != data, f"the {fmt} image has no line-break bytes to strip"
    r = client.post(URL, content=stripped, headers=FORM)
    assert r.status_code == 400 and HINT in r.json()["error"] and "--data-binary @image.jpg" in r.json()["error"]
    assert client.post(URL, content=data, headers=FORM).status_code == 200  # sent unchanged, it is classified


@pytest.mark.parametrize("suffix", [".bin", ".npy", ".json"])
def test_a_body_that_is_no_image_gets_the_plain_answer(client, bundle, suffix):
    manifest = read_manifest(bundle)
    tensor = encode(manifest, image_tensor(manifest, _image("PNG")), suffix)  # what serve.tensor writes
    r = client.post(URL, content=tensor, headers=FORM)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.startswith("not a recognised image; supported: ") and "PNG" in error and HINT not in error, error
    r = client.post(URL, content=b"definitely not an image", headers=FORM)
    assert r.status_code == 400 and HINT not in r.json()["error"]


def test_an_intact_png_signature_was_not_stripped(client):
    """A PNG cut short keeps its signature (curl -d would have stripped its CR LF): its own reason, no hint."""
    r = client.post(URL, content=_image("PNG")[:60], headers=FORM)
    assert r.status_code == 400 and HINT not in r.json()["error"], r.text
