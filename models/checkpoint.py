"""The checkpoint contract: a directory with safetensors weights and `checkpoint.json`.

`checkpoint.json` holds everything needed to rebuild and serve the model (variant config, class names,
preprocessing) plus the training summary. Weights are named by content hash and the JSON is replaced
atomically last, so a crash at any moment leaves either the old or the new checkpoint, never a mix.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.config import MAX_CLASSES, MAX_LABEL_CHARS, ViTConfig, is_label
from models.io import _default_mode, atomic_write_json, read_strict_json, sha256_file
from models.jsonfields import FieldError, Fields
from models.preprocessing import Preprocessing
from models.registry import get_config, list_variants

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "vitc-checkpoint"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
MAX_META_BYTES = 16 << 20  # checkpoint.json is a few KiB; this bounds the read and the parse
MAX_TEXT_CHARS = 1 << 16  # a training command line or a data fingerprint recorded in the summary
MAX_DATASET_CHARS = 4096  # the dataset: an embedded set's name or a folder's path
# The dtypes save_checkpoint writes (float32 parameters and buffers, BatchNorm's int64 step counter).
WEIGHT_DTYPES = {"F32": "float32", "I64": "int64"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    # A name the reader refuses would make the whole checkpoint unreadable: refuse it before anything is written.
    if (bad := next((n for n in class_names if not is_label(n)), None)) is not None:
        raise ValueError(f"class name {bad!r:.80} is not 1..{MAX_LABEL_CHARS} characters without control characters")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".weights.tmp.safetensors"
    # One metadata key: safetensors orders several keys differently per process, breaking reproducible hashes.
    save_file(state, str(tmp), metadata={"format": FORMAT})
    os.chmod(tmp, _default_mode(0o666))  # safetensors writes 0600: servers and other users must read the weights
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
    raw = _load_json(meta_path)
    try:
        return _parse_meta(path, raw, Fields(raw, str(meta_path)))
    except CheckpointError:
        raise
    except FieldError as exc:  # already names the file and the field
        raise CheckpointError(f"corrupt checkpoint metadata {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {_one_line(exc)}") from None


def _load_json(meta_path: Path) -> Any:
    """The parsed file: size-bounded, strict JSON (NaN, Infinity, overflowing numbers, deep nesting are refused)."""
    try:
        return read_strict_json(meta_path, MAX_META_BYTES)
    except ValueError as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {meta_path}: {exc.strerror or exc}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _parse_meta(path: Path, raw: dict[str, Any], r: Fields) -> CheckpointMeta:
    """Every field typed, bounded and consistent with the others (see `_check_consistent`)."""
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{r.where}: format is {str(raw.get('format'))[:80]!r}, expected {FORMAT!r}")
    version = r.get("format_version", int, 0)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{r.where}: format_version {version} is newer than supported")
    weights = r.obj("weights")
    meta = CheckpointMeta(
        path=path,
        model=r.get("model", str, check=lambda v: 0 < len(v) <= 200, what="1..200 characters"),
        config=r.contract("config", ViTConfig.from_dict),
        class_names=r.strings("class_names"),
        preprocessing=r.contract("preprocessing", Preprocessing.from_dict),
        weights_file=weights.get("file", str, check=_plain_file_name, what="a file name inside the checkpoint"),
        weights_sha256=weights.get("sha256", str, check=_SHA256.match, what="64 lowercase hex digits"),
        raw=raw,
    )
    weights.get("format", str, "safetensors", check=lambda v: v == "safetensors", what='"safetensors"')
    _check_consistent(meta, r)
    return meta


def _plain_file_name(name: str) -> bool:
    """A name inside the checkpoint directory: no separators, no `..` (the hash would read any file), no control
    characters (it is quoted in one-line errors)."""
    return is_label(name, 255) and name not in (".", "..") and "/" not in name and "\\" not in name


def _check_consistent(m: CheckpointMeta, r: Fields) -> None:
    """Cross-field invariants: the shared model contract, the top-level class count, the training summary."""
    check_model_contract(r, m.model, m.config, m.class_names, m.preprocessing)
    if r.get("num_classes", int, None) not in (None, m.config.num_classes):
        raise r.fail("num_classes", f"is {r.raw['num_classes']}, config.num_classes {m.config.num_classes}")
    _check_summary(r)


def check_model_contract(r: Fields, model: str, cfg: ViTConfig, class_names: tuple[str, ...],
                         pre: Preprocessing) -> None:
    """What checkpoint.json and a bundle's manifest.json both promise (each reader calls this on its root
    fields): the class names fit the head, the preprocessing produces what the model takes, `model` and `stem`
    name the config."""
    if not 1 <= len(class_names) <= MAX_CLASSES:
        raise r.fail("class_names", f"must list 1..{MAX_CLASSES} names, got {len(class_names)}")
    if (bad := next((i for i, n in enumerate(class_names) if not is_label(n)), None)) is not None:
        raise r.fail(f"class_names[{bad}]", f"must be 1..{MAX_LABEL_CHARS} characters without control characters, "
                                            f"got {class_names[bad]!r:.80}")
    if cfg.num_classes != len(class_names):
        raise r.fail("config.num_classes", f"is {cfg.num_classes}, class_names lists {len(class_names)}")
    if pre.crop != cfg.image_size:
        raise r.fail("preprocessing.crop", f"{pre.crop} differs from config.image_size {cfg.image_size}")
    if pre.channels != cfg.in_chans:
        raise r.fail("preprocessing.channels", f"{pre.channels} ({pre.layout}) differs from config.in_chans "
                                               f"{cfg.in_chans} (NCHW)")
    _check_model_name(r, model, cfg)


def _check_model_name(r: Fields, model: str, cfg: ViTConfig) -> None:
    """`model` is the config's name; a registered variant's name must not label another stem."""
    if model != cfg.name:
        raise r.fail("model", f"{model!r:.80} differs from config.name {cfg.name!r:.80}")
    stem = r.get("stem", str, cfg.stem.kind)
    if stem != cfg.stem.kind:
        raise r.fail("stem", f"{stem!r:.40} differs from config.stem.kind {cfg.stem.kind!r}")
    if model in list_variants() and get_config(model).stem.kind != cfg.stem.kind:
        raise r.fail("model", f"{model} is a {get_config(model).stem.kind}-stem variant, "
                              f"but config.stem is {cfg.stem.kind}")


def _check_summary(r: Fields) -> None:
    """The training summary fields that export and evaluation act on (the dataset to measure on, provenance)."""
    text = {"check": lambda v: len(v) <= MAX_TEXT_CHARS, "what": f"at most {MAX_TEXT_CHARS} characters"}
    r.get("dataset", str, None, check=lambda v: is_label(v, MAX_DATASET_CHARS),
          what=f"a name or path of 1..{MAX_DATASET_CHARS} characters without control characters")
    r.get("weights_source", str, None, **text)
    training = r.obj("training") if r.raw.get("training") is not None else None
    if training is None:
        return
    training.get("command_line", str, None, **text)
    if training.raw.get("data") is not None:
        data = training.obj("data")
        for split in ("train", "val"):
            data.get(split, str, None, **text)


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
        cfg = meta.config if image_size is None else dataclasses.replace(meta.config, image_size=image_size)
    except ValueError as exc:
        raise CheckpointError(f"cannot serve {meta.model} at image size {image_size}: {exc}") from None
    try:
        check_weights(wpath, meta.config)  # names, dtypes and shapes from the header, before any tensor is read
        state = load_file(str(wpath))
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights {wpath}: {exc}") from None
    check_finite(state, wpath, diverged=bool((meta.raw.get("training") or {}).get("diverged")))
    model = VisionTransformer(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit {cfg.name}: {str(exc).splitlines()[0]}") from None
    return model.eval(), meta


def check_finite(state: dict[str, torch.Tensor], wpath: Path, *, diverged: bool = False) -> None:
    """Every floating-point tensor (parameters and buffers such as BatchNorm's running_var) holds finite numbers:
    a NaN weight would otherwise be exported, evaluated and served as garbage. Raises CheckpointError."""
    import torch

    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        low, high = (v.item() for v in torch.aminmax(tensor))  # one pass, no copy; NaN propagates to both
        if not (math.isfinite(low) and math.isfinite(high)):
            what = "NaN" if math.isnan(low) or math.isnan(high) else "an infinite value"
            why = " (the training run diverged)" if diverged else ""
            raise CheckpointError(f"weights {wpath}: {key} holds {what}{why}; the checkpoint cannot be used")


def expected_weights(cfg: ViTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) that `save_checkpoint` writes for `cfg` (built on the meta device:
    no memory)."""
    import torch

    from models.vit import VisionTransformer

    names = {torch.float32: "F32", torch.int64: "I64"}
    with torch.device("meta"):
        state = VisionTransformer(cfg).state_dict()
    return {k: (names[v.dtype], tuple(v.shape)) for k, v in state.items()}


def check_weights(wpath: Path, cfg: ViTConfig) -> None:
    """The safetensors header must list exactly the config's tensors, float32 (int64 counters), at their shapes;
    a float64 or int8 file would otherwise be cast silently on load. Raises CheckpointError."""
    from safetensors import safe_open

    expected = expected_weights(cfg)
    with safe_open(str(wpath), "pt") as f:
        have = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    missing, unexpected = sorted(expected.keys() - have.keys()), sorted(have.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"weights {wpath} do not fit {cfg.name}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for key, (dtype, shape) in expected.items():
        if have[key][0] != dtype:
            raise CheckpointError(f"weights {wpath}: {key} is {have[key][0]}, expected {WEIGHT_DTYPES[dtype]} "
                                  f"({dtype}); re-save the checkpoint in float32")
        if have[key][1] != shape:
            raise CheckpointError(f"weights {wpath} do not fit {cfg.name}: {key} has shape {list(have[key][1])}, "
                                  f"expected {list(shape)}")
