"""Resume state (`resume.pt`): weights, optimizer, schedule, EMA, RNG and data position, written atomically.

Only tensors and plain Python values are stored, so it loads with `torch.load(weights_only=True)` (no
arbitrary unpickling). The file is replaced in one rename: a kill at any moment leaves the previous state.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import CheckpointError
from models.io import atomic_write_bytes

RESUME_FILE = "resume.pt"
STATE_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_resume(out_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise then atomically replace `out_dir/resume.pt`."""
    buf = io.BytesIO()
    torch.save({"version": STATE_VERSION, **state}, buf)
    atomic_write_bytes(Path(out_dir) / RESUME_FILE, buf.getvalue())


def load_resume(out_dir: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any] | None:
    """The saved state (tensors on CPU), None if there is none; CheckpointError if it is unreadable."""
    path = Path(out_dir) / RESUME_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # any unreadable or tampered file is one clear error
        raise CheckpointError(f"cannot read resume state {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a version-{STATE_VERSION} resume state")
    return state


def clear_stale_temporaries(out_dir: str | os.PathLike) -> None:
    """Remove temp files a killed writer left behind (the renamed targets are intact)."""
    for tmp in Path(out_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    for tmp in Path(out_dir).glob(".weights.tmp.safetensors"):
        tmp.unlink(missing_ok=True)
