"""torch backend: the bundle's safetensors weights in the eager model (reference runs, or GPUs without TensorRT).

Only this module imports torch; the rest of the server stays torch-free.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from serve.backends.base import BackendError, LoadSpec, check_device


class TorchBackend:
    """VisionTransformer in eval mode under inference_mode; fp16 only on CUDA."""

    runtime = "torch"
    parallelism = 1

    def __init__(self, spec: LoadSpec) -> None:
        import torch
        from safetensors.torch import load_file

        from models.config import ViTConfig
        from models.vit import VisionTransformer

        check_device(spec.device, ("cpu", "cuda"), self.runtime)
        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"--device {spec.device}: torch sees no CUDA device")
        self.device = spec.device
        self.precision = spec.precision
        self.max_batch = spec.max_batch
        configs = [p for p in spec.files if p.suffix == ".json"]
        raw = json.loads(configs[0].read_text()) if configs else spec.manifest.get("config")
        if not raw:
            raise BackendError("torch artifact has no model config (manifest 'config' or a .json file)")
        cfg = ViTConfig.from_dict(raw["config"] if "config" in raw else raw)  # checkpoint.json or a bare config
        model = VisionTransformer(cfg)
        model.load_state_dict(load_file(str(spec.file(".safetensors"))), strict=True)
        dtype = torch.float16 if self.precision == "fp16" and spec.device.startswith("cuda") else torch.float32
        self._torch = torch
        self._dtype = dtype
        self.model = model.eval().to(spec.device, dtype)
        if spec.options.threads:
            torch.set_num_threads(spec.options.threads)
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32."""
        torch = self._torch
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, self._dtype)
            return self.model(x).float().cpu().numpy()

    def close(self) -> None:
        """Drop the model."""
        self.model = None


def load(spec: LoadSpec) -> TorchBackend:
    """Build the torch backend for a verified artifact."""
    return TorchBackend(spec)
