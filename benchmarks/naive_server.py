"""The baseline vitc is measured against: what a team writes by hand in an afternoon (FastAPI + onnxruntime).

One request at a time (decoding and a default onnxruntime session run on the event loop), the image decoded and
preprocessed the usual way with PIL and numpy (the bundle's recorded sizes, mean and std), softmax top-5 as JSON.
No batching, no limits, no hardening.

    python -m benchmarks.naive_server BUNDLE --port 8001
"""

from __future__ import annotations

import io
import socket
import sys

import numpy as np
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handler's annotation here

from models.cli import InputError, OneLineParser, command, int_in
from models.oneline import first_line

PROG = "python -m benchmarks.naive_server"


def create_app(bundle: str) -> FastAPI:
    """The app for one bundle's fp32 ONNX file."""
    from runtimes import telemetry

    telemetry.off()
    import onnxruntime as ort
    from PIL import Image

    from models.bundle import BundleError, read_manifest, verify_files

    manifest = read_manifest(bundle)
    spec = manifest.preprocessing
    artifact = manifest.select("onnxruntime", "fp32")
    # Checked as vitc's server checks it (listed, inside the bundle, its sha256, its external data listed): the
    # baseline runs the same verified file, never a tampered one or a link out of the bundle (BundleError).
    onnx = next((p for p in verify_files(bundle, artifact) if p.name.endswith(".onnx")), None)
    if onnx is None:
        raise BundleError(f"artifact {artifact.id!r} lists no .onnx file")
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    app = FastAPI()

    def preprocess(img: Image.Image) -> np.ndarray:
        # The usual recipe: shorter side to `resize`, centre crop, scale to [0, 1], normalise, HWC -> NCHW.
        img = img.convert(spec.mode).convert("RGB")
        w, h = img.size
        scale = spec.resize / min(w, h)
        img = img.resize((max(spec.resize, round(w * scale)), max(spec.resize, round(h * scale))),
                         Image.Resampling.BILINEAR)
        left, top = (img.width - spec.crop) // 2, (img.height - spec.crop) // 2
        img = img.crop((left, top, left + spec.crop, top + spec.crop))
        x = (np.asarray(img, np.float32) / 255.0 - mean) / std
        return x.transpose(2, 0, 1)[None].astype(np.float32)

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        # Decoding and inference run right here, on the event loop: one request at a time.
        x = preprocess(Image.open(io.BytesIO(await request.body())))
        logits = session.run(None, {"input": x})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:5]
        return {"predictions": [{"label": manifest.class_names[i], "score": float(p[i])} for i in top]}

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


def port_problem(port: int) -> str | None:
    """Why the server could not listen on 127.0.0.1:`port` (in use, privileged), or None."""
    with socket.socket() as s:
        # As uvicorn (and vitc's server) bind: a port left with connections in TIME_WAIT for a minute after a server
        # on it stopped (overhead's cold starts on the same port) can be listened on, so it is not "in use".
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}"
    return None


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Serve the bundle until interrupted; exit 2 with one line on stderr for a bad bundle or port."""
    import uvicorn

    from models.bundle import BundleError

    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--port", type=int_in(1, 65535), default=8001, help="loopback port, 1..65535 (default 8001)")
    args = p.parse_args(argv)
    if problem := port_problem(args.port):
        raise InputError(f"--port: {problem}")
    try:
        app = create_app(args.bundle)
    except BundleError as exc:
        raise InputError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors (Fail, InvalidProtobuf...) derive from Exception
        raise InputError(f"{args.bundle}: cannot load the ONNX model: {first_line(exc)}") from None
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
