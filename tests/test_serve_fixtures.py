"""Shared helpers for the serving tests (no tests here): one real exported bundle per session, real servers.

The bundle is a vit_c_micro checkpoint with a randomised head (the default zero head would make every
prediction uniform and every comparison trivially equal), exported by `export.bundle.build_bundle`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from serve.launch import ServerProcess, start

_CACHE: dict[str, Path] = {}


def micro_checkpoint(root: Path) -> Path:
    """A vit_c_micro checkpoint at root/ckpt with a random head (logits that depend on the image), seed 0."""
    import torch

    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models import build_model
    from models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = build_model("vit_c_micro").eval()
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
        model.head.bias.normal_(0, 0.1)
    return save_checkpoint(root / "ckpt", model, class_names=ANIMAL_CLASSES,
                           preprocessing=default_preprocessing("animals", 32), extra={"dataset": "animals"})


def micro_bundle(tmp_path_factory, targets: tuple[str, ...] = ("onnx", "openvino-fp32", "openvino-fp16")) -> Path:
    """A real bundle of vit_c_micro (random head) with ONNX, OpenVINO and torch artifacts, built once."""
    key = ",".join(targets)
    if key not in _CACHE:
        from export.bundle import build_bundle

        root = tmp_path_factory.mktemp("serve-bundle")
        ckpt = micro_checkpoint(root)
        build_bundle(ckpt, root / "micro", targets=targets, name="micro", max_batch=32, parity_samples=64,
                     calibration_samples=16, log=lambda _: None)
        _CACHE[key] = root / "micro"
    return _CACHE[key]


def val_batch(manifest, n: int) -> np.ndarray:  # noqa: ANN001 - a models.bundle.Manifest
    """The first n animals validation images, preprocessed as the bundle says."""
    from data.datasets import load_dataset
    from models.preprocessing import preprocess

    val = load_dataset("animals", "val")
    return preprocess([val.image(i) for i in range(n)], manifest.preprocessing)


def animal_pngs(n: int, start: int = 0) -> list[bytes]:
    """n validation images of the embedded animals set, PNG-encoded (what a client would upload)."""
    from data.datasets import load_dataset

    val = load_dataset("animals", "val")
    return [encode(val.image(i), "PNG") for i in range(start, start + n)]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but carries (almost) no data: a decompression-bomb shape."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def scores_by_index(answer: dict) -> np.ndarray:
    """A /v1 classification answer (all classes) -> probability vector ordered by class index."""
    p = np.zeros(len(answer["predictions"]))
    for pred in answer["predictions"]:
        p[pred["index"]] = pred["score"]
    return p


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """A real `python -m serve` on 127.0.0.1 (free port), ready."""
    return start(args, log_path, env)


LEGACY = Path(__file__).resolve().parent / "data" / "legacy-bundle-v1"


def legacy_with_manifest(tmp_path: Path, manifest: dict | str) -> Path:
    """A copy of the legacy bundle at tmp_path/b whose manifest.json is `manifest` (a dict, or raw text)."""
    bundle = tmp_path / "b"
    shutil.copytree(LEGACY, bundle, dirs_exist_ok=True)
    (bundle / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    return bundle


def one_line(capsys) -> str:  # noqa: ANN001 - pytest's capsys
    """What a CLI wrote to stderr, asserted to be one line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


@contextlib.contextmanager
def fake_server(bundle: Path, tmp: Path, *args: str) -> Iterator[ServerProcess]:
    """A real server of the fake runtime's `bundle` (tests/fake_runtime.py) with `args`; its log ends without a
    traceback."""
    import fake_runtime

    with start_server(["--model", f"fake={bundle}", "--backend", "fake", *args], tmp / "server.log",
                      fake_runtime.server_env(tmp)) as s:
        yield s
    assert "Traceback" not in s.logs()


@contextlib.contextmanager
def client_of(server: ServerProcess) -> Iterator[httpx.Client]:
    """An httpx client of `server`."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@contextlib.contextmanager
def in_process_server(bundle: Path) -> Iterator[int]:
    """The app behind uvicorn and serve.httpproto's protocol, in this process (so the parser can be made to fail;
    its refusals counted in /metrics), serving `bundle` on the fake runtime; yields the port."""
    import fake_runtime

    from serve.app import create_app
    from serve.http_limits import ConnectionLimits
    from serve.settings import Settings

    with fake_runtime.registered():
        app = create_app(Settings(models=[f"fake={bundle}"], backend="fake", access_log=False))
        with serving_app(app, ConnectionLimits(10.0, 100)) as (port, _):
            yield port


@contextlib.contextmanager
def serving_app(app: Any, limits: Any) -> Iterator[tuple[int, Any]]:
    """`app` behind uvicorn and serve.httpproto's protocol with `limits`, in a thread of this process, on a free
    port of 127.0.0.1: yields the port and the uvicorn Server (its event loop: `server.servers[0].get_loop()`)."""
    import socket
    import threading
    import time

    import uvicorn

    from serve.httpproto import HeaderBoundsProtocol

    http = HeaderBoundsProtocol.configured(limits, access_log=False, on_refusal=app.state.metrics.protocol_refused)
    config = uvicorn.Config(app, http=http, log_config=None, access_log=False, lifespan="on", ws="none")
    server = uvicorn.Server(config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        end = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < end:
            time.sleep(0.02)
        assert server.started
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def before_digests(manifest: Any, golden: Any) -> Any:
    """`manifest` (a models.bundle.Manifest) as a vitc before golden.npz's digests wrote it: no list of them, no
    parity intervals (both came later), its golden file now `golden` (a FileEntry, for a file holding none)."""
    from dataclasses import replace

    return replace(manifest, golden=replace(manifest.golden, file=golden, digests=()),
                   artifacts=tuple(replace(a, parity=a.parity and replace(a.parity, accuracy_delta_ci95=None))
                                   for a in manifest.artifacts))
