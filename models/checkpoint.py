"""The checkpoint contract: a directory with safetensors weights and `checkpoint.json`.

`checkpoint.json` holds everything needed to rebuild and serve the model (variant config, class names,
preprocessing) plus the training summary. Weights are named by content hash and the JSON is replaced
atomically last, so a crash at any moment leaves either the old or the new checkpoint, never a mix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.config import ViTConfig
from models.io import atomic_write_json, sha256_file
from models.preprocessing import Preprocessing

if TYPE_CHECKING:
    from torch import nn

FORMAT = "vitc-checkpoint"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"


class CheckpointError(ValueError):
    """A missing, corrupt or inconsistent checkpoint."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The parsed `checkpoint.json`."""

    path: Path
    model: str
    config: ViTConfig
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    weights_file: str
    weights_sha256: str
    raw: dict[str, Any]

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights_file


def save_checkpoint(
    out_dir: str | os.PathLike,
    model: nn.Module,
    *,
    class_names: list[str],
    preprocessing: Preprocessing,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write weights then `checkpoint.json` into `out_dir` atomically; older weight files are removed."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg: ViTConfig = model.cfg
    if len(class_names) != cfg.num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries, the model has {cfg.num_classes} classes")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".weights.tmp.safetensors"
    # One metadata key: safetensors orders several keys differently per process, breaking reproducible hashes.
    save_file(state, str(tmp), metadata={"format": FORMAT})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    weights_file = f"weights-{digest[:16]}.safetensors"
    os.replace(tmp, out / weights_file)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.name,
        "stem": cfg.stem.kind,
        "config": cfg.to_dict(),
        "num_classes": cfg.num_classes,
        "class_names": list(class_names),
        "preprocessing": preprocessing.to_dict(),
        "weights": {"file": weights_file, "sha256": digest, "format": "safetensors"},
        **(extra or {}),
    }
    atomic_write_json(out / META_FILE, meta)
    for old in out.glob("weights-*.safetensors"):
        if old.name != weights_file:
            old.unlink(missing_ok=True)
    return out


def read_checkpoint_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Parse and validate `checkpoint.json` (no torch needed); raises CheckpointError."""
    path = Path(path)
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    meta_path = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not meta_path.is_file():
        raise CheckpointError(f"not a checkpoint: {meta_path} is missing")
    try:
        raw = json.loads(meta_path.read_text())
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"{meta_path}: format is {raw.get('format')!r}, expected {FORMAT!r}")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: format_version {raw['format_version']} is newer than supported")
        cfg = ViTConfig.from_dict(raw["config"])
        return CheckpointMeta(
            path=path,
            model=raw["model"],
            config=cfg,
            class_names=tuple(raw["class_names"]),
            preprocessing=Preprocessing.from_dict(raw["preprocessing"]),
            weights_file=raw["weights"]["file"],
            weights_sha256=raw["weights"]["sha256"],
            raw=raw,
        )
    except CheckpointError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {type(exc).__name__}: {exc}") from None


def load_checkpoint(path: str | os.PathLike, *, image_size: int | None = None) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model (eval mode) with verified weights; `image_size` resizes the position embedding."""
    import dataclasses

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.vit import VisionTransformer

    meta = read_checkpoint_meta(path)
    wpath = meta.weights_path
    if not wpath.is_file():
        raise CheckpointError(f"checkpoint weights missing: {wpath}")
    if sha256_file(wpath) != meta.weights_sha256:
        raise CheckpointError(f"checkpoint weights {wpath} do not match the sha256 in {META_FILE} (corrupt?)")
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {wpath}: {exc}") from None
    cfg = meta.config if image_size is None else dataclasses.replace(meta.config, image_size=image_size)
    model = VisionTransformer(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit {cfg.name}: {str(exc).splitlines()[0]}") from None
    return model.eval(), meta
