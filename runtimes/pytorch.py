"""torch: the checkpoint's safetensors weights, rebuilt from the manifest's config, run eagerly (CPU or CUDA).

The export copies the verified weights into the bundle, so its parity check covers the bundle round trip
(manifest config + copied weights -> identical logits), not a conversion. Only this module imports torch; a
server with another backend stays torch-free.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from runtimes.base import BackendError, LoadSpec, Runtime, Variant, first_line
from runtimes.build import Built, ExportContext, ExportError

WEIGHTS_FILE = "model.safetensors"
_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}
# torch's intra-op thread count is one per process: backends asking for their own count take turns.
_THREADS_LOCK = threading.Lock()


def version() -> str:
    """The torch version."""
    import torch

    return torch.__version__.split("+")[0]


def build(ctx: ExportContext, precision: str) -> Built:
    """Copy the verified checkpoint weights into the bundle."""
    if precision != "fp32":
        raise ExportError(f"torch: only fp32 is exported, not {precision!r}")
    out = ctx.workdir / WEIGHTS_FILE
    shutil.copyfile(ctx.meta.weights_path, out)
    return Built([out], {"format_detail": "safetensors state_dict of models.vit.VisionTransformer"})


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with n intra-op threads, restored afterwards, without racing another backend doing the same."""
    if n is None:
        yield
        return
    import torch

    with _THREADS_LOCK:
        old = torch.get_num_threads()
        if old != n:
            torch.set_num_threads(n)
        try:
            yield
        finally:
            if old != n:
                torch.set_num_threads(old)


class TorchBackend:
    """VisionTransformer in eval mode under inference_mode; bf16/fp16 by autocast when asked."""

    runtime = "torch"
    parallelism = 1

    def __init__(self, spec: LoadSpec) -> None:
        import torch
        from safetensors.torch import load_file

        from models.vit import VisionTransformer

        options = spec.options
        if options.device_kind == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"--device {options.device}: torch sees no CUDA device")
        autocast = options.inference_precision
        if autocast not in (None, "fp32", *_AUTOCAST):
            raise BackendError(f"torch computes in fp32, bf16 or fp16, not {autocast!r}")
        if autocast == "fp16" and options.device_kind != "cuda":
            raise BackendError("torch fp16 runs on CUDA only")
        self.device, self.precision, self.max_batch = options.device, spec.precision, spec.max_batch
        self._torch = torch
        self._autocast = getattr(torch, _AUTOCAST[autocast]) if autocast in _AUTOCAST else None
        self._threads = options.threads if options.device_kind == "cpu" else None
        model = VisionTransformer(spec.manifest.config)
        try:
            model.load_state_dict(load_file(str(spec.file(".safetensors"))), strict=True)
        except RuntimeError as exc:
            raise BackendError(f"{spec.file('.safetensors').name}: weights do not fit the manifest's config: "
                               f"{first_line(exc)}") from None
        self.model = model.eval().to(options.device)
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, classes) float32."""
        torch = self._torch
        with self._lock, _threads(self._threads), torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device)
            if self._autocast is None:
                return self.model(x).float().cpu().numpy()
            with torch.autocast(x.device.type, dtype=self._autocast):
                return self.model(x).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {"threads_effective": self._threads or self._torch.get_num_threads(),
                "inference_precision": str(self._autocast or self._torch.float32).replace("torch.", "")}

    def close(self) -> None:
        """Drop the model."""
        self.model = None


RUNTIME = Runtime(
    name="torch", target="torch", packages=("torch", "safetensors"), install="pip install 'vitc[train]'",
    format="safetensors", triton_platform="pytorch", precisions=("fp32",), default_precisions=("fp32",),
    devices=("cpu", "cuda"), build=build, load=TorchBackend, version=version,
    variants=(Variant("fp32"), Variant("bf16", artifact="fp32", inference_precision="bf16")),
)
