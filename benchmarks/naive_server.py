"""The baseline vitc is measured against: what a team writes by hand in an afternoon (FastAPI + onnxruntime).

One request at a time (decoding and a default onnxruntime session run on the event loop), the image decoded with
PIL and preprocessed with the bundle's own recorded preprocessing, softmax top-5 as JSON. No batching, no limits.

    python -m benchmarks.naive_server BUNDLE --port 8001
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handler's annotation here


def create_app(bundle: str):  # noqa: ANN201 - a FastAPI app
    """The app for one bundle's fp32 ONNX file."""
    import onnxruntime as ort
    from fastapi import FastAPI
    from PIL import Image

    from models.bundle import read_manifest
    from models.preprocessing import preprocess

    manifest = read_manifest(bundle)
    onnx = manifest.select("onnxruntime", "fp32").files[0].path
    session = ort.InferenceSession(f"{bundle}/{onnx}", providers=["CPUExecutionProvider"])
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request) -> dict:
        # Decoding and inference run right here, on the event loop: one request at a time.
        x = preprocess([Image.open(io.BytesIO(await request.body()))], manifest.preprocessing)
        logits = session.run(None, {"input": x})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:5]
        return {"predictions": [{"label": manifest.class_names[i], "score": float(p[i])} for i in top]}

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True}

    return app


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m benchmarks.naive_server", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args()
    uvicorn.run(create_app(args.bundle), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
