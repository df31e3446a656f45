"""Shared helpers for the serving tests (no tests here): one real exported bundle per session, a real server.

The bundle is a vit_c_micro checkpoint with a randomised head (the default zero head would make every
prediction uniform and every comparison trivially equal), exported by `export.bundle.build_bundle`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Path] = {}


def micro_bundle(tmp_path_factory, targets: tuple[str, ...] = ("onnx", "openvino-fp32", "openvino-fp16")) -> Path:
    """A real bundle of vit_c_micro (random head) with ONNX, OpenVINO and torch artifacts, built once."""
    key = ",".join(targets)
    if key not in _CACHE:
        import torch

        from export.bundle import build_bundle
        from models import build_model
        from models.checkpoint import save_checkpoint
        from train.data import ANIMAL_CLASSES, default_preprocessing

        root = tmp_path_factory.mktemp("serve-bundle")
        torch.manual_seed(0)
        model = build_model("vit_c_micro").eval()
        with torch.no_grad():
            model.head.weight.normal_(0, 0.5)
            model.head.bias.normal_(0, 0.1)
        ckpt = save_checkpoint(root / "ckpt", model, class_names=ANIMAL_CLASSES,
                               preprocessing=default_preprocessing("animals", 32), extra={"dataset": "animals"})
        _CACHE[key] = build_bundle(ckpt, root / "micro", targets=targets, name="micro", max_batch=32,
                                   parity_samples=64, calibration_samples=16, log=lambda _: None)
    return _CACHE[key]


def animal_pngs(n: int, start: int = 0) -> list[bytes]:
    """n validation images of the embedded animals set, PNG-encoded (what a client would upload)."""
    from train.data import load_dataset

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


class Server:
    """`python -m serve` in a subprocess on 127.0.0.1 with a free port (--port 0, read back from its log)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - kept open for the process's life
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", "0", *args],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.port = self._wait_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_port(self, timeout: float = 60.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"listening"' in line:
                    return int(json.loads(line)["port"])
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.logs()}")

    def wait_ready(self, timeout: float = 60.0, headers: dict | None = None) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if httpx.get(self.url + "/v2/health/ready", timeout=2, headers=headers).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            time.sleep(0.05)
        raise RuntimeError(f"server not ready:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 headers: dict | None = None) -> Server:
    server = Server(args, log_path, env)
    try:
        server.wait_ready(headers=headers)
    except BaseException:
        server.stop()
        raise
    return server
