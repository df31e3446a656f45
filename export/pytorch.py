"""The torch artifact: the checkpoint's safetensors weights, rebuilt from the manifest's config.

It is what the server's torch backend loads, so parity here checks the bundle round trip (manifest config +
copied weights -> identical logits), not a conversion.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from export.context import Built, ExportContext, ExportError, Runner

RUNTIME = "torch"
WEIGHTS_FILE = "model.safetensors"


def version() -> str:
    """The torch version."""
    import torch

    return torch.__version__.split("+")[0]


def export(ctx: ExportContext, precision: str) -> Built:
    """Copy the verified checkpoint weights into the bundle."""
    if precision != "fp32":
        raise ExportError(f"torch: only fp32 is exported, not {precision!r}")
    out = ctx.workdir / WEIGHTS_FILE
    shutil.copyfile(ctx.meta.weights_path, out)
    return Built([out], {"format_detail": "safetensors state_dict of models.vit.VisionTransformer"})


def check(path: Path, config: dict[str, Any]) -> None:
    """The weights fit the manifest's config exactly."""
    load([path], config)


def load(files: list[Path], config: dict[str, Any]) -> Runner:
    """Rebuild the model from the manifest config and the bundle's weights, as a batch -> logits function."""
    import torch
    from safetensors.torch import load_file

    from models.config import ViTConfig
    from models.vit import VisionTransformer

    model = VisionTransformer(ViTConfig.from_dict(config))
    try:
        model.load_state_dict(load_file(str(files[0])), strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{files[0]}: weights do not fit the config: {str(exc).splitlines()[0]}") from None
    model.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(batch, np.float32))).numpy()

    return run
