"""The checkpoint contract: a directory with safetensors weights and `checkpoint.json`.

`checkpoint.json` holds everything needed to rebuild and serve the model (variant config, class names,
preprocessing) plus the training summary. Weights are named by content hash and the JSON is replaced
atomically last, so a crash at any moment leaves either the old or the new checkpoint, never a mix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.config import (
    MAX_CLASSES,
    MAX_LABEL_CHARS,
    MIN_CLASSES,
    ConvLayer,
    ConvStem,
    PatchifyStem,
    ViTConfig,
    is_label,
)
from models.io import (
    atomic_write_json,
    default_mode,
    no_temp_dir,
    not_a_file,
    parse_strict_json,
    read_strict_json,
    sha256_file,
    strict_json_bytes,
)
from models.jsonfields import FieldError, Fields
from models.oneline import first_line
from models.preprocessing import Preprocessing
from models.registry import get_config, list_variants

if TYPE_CHECKING:
    import torch
    from torch import nn

FORMAT = "vitc-checkpoint"
FORMAT_VERSION = 1
META_FILE = "checkpoint.json"
MAX_META_BYTES = 16 << 20  # checkpoint.json is a few KiB; this bounds the read and the parse
# What a training summary's numbers and timestamps add to checkpoint.json once the run is over (about 2 KiB): a run
# measures the file before its first step with the strings it knows then, and keeps this much to spare.
META_RESERVE_BYTES = 64 << 10
MAX_TEXT_CHARS = 1 << 16  # a training command line or a data fingerprint recorded in the summary
MAX_DATASET_CHARS = 4096  # the dataset: an embedded set's name or a folder's path
# The dtypes save_checkpoint writes (float32 parameters and buffers, BatchNorm's int64 step counter).
WEIGHT_DTYPES = {"F32": "float32", "I64": "int64"}
_DTYPE_NAMES = {**WEIGHT_DTYPES, "BF16": "bfloat16", "F16": "float16"}  # and a torch artifact's rounded weights
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A missing, corrupt or inconsistent checkpoint."""


@dataclass(frozen=True)
class TrainingRecord:
    """What `checkpoint.json` records of the training that made the weights (older files lack some fields)."""

    command_line: str | None = None  # a shell-quoted command that reruns the training
    config: dict[str, Any] | None = None  # the run's TrainConfig, as a dict
    data: dict[str, str] = field(default_factory=dict)  # split ("train", "val") -> its images' fingerprint
    steps: int | None = None  # optimizer steps taken
    diverged: bool = False  # its weights may hold NaN


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
    dataset: str | None = None  # what the run trained on: an embedded set's name or a folder's path
    training: TrainingRecord | None = None  # None: saved outside a training run

    @property
    def weights_path(self) -> Path:
        return self.path / self.weights_file


def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, *, class_names: list[str],
                    preprocessing: Preprocessing, extra: dict[str, Any] | None = None) -> Path:
    """Write weights then `checkpoint.json` into `out_dir` atomically; older weight files are removed.

    What `load_checkpoint` would refuse (the metadata's contract, strict JSON, float32 finite weights of the config's
    shapes) raises CheckpointError before anything is written or removed: the checkpoint there stays as it was.
    A diverged run's non-finite weights are saved with its summary (`training.diverged`), which the reader names.
    """
    with staged_checkpoint(out_dir, model, class_names=class_names, preprocessing=preprocessing,
                           extra=extra) as publish:
        return publish()


@contextlib.contextmanager
def staged_checkpoint(out_dir: str | os.PathLike, model: nn.Module, *, class_names: list[str],
                      preprocessing: Preprocessing, extra: dict[str, Any] | None = None
                      ) -> Iterator[Callable[[], Path]]:
    """`save_checkpoint` in two steps: the weights are checked, written beside the checkpoint and hashed, then
    `publish` (yielded) renames them into place, writes `checkpoint.json` and removes older weight files.

    The slow part happens before the yield, so a caller can hold signals (`models.io.committing`) around `publish`
    alone, with the other files it puts in place beside the checkpoint. Leaving the block without publishing
    removes the temporary (and a directory this call made); a weights file that a published `checkpoint.json`
    names is never removed.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ViTConfig) or not callable(getattr(model, "state_dict", None)):
        raise CheckpointError(f"not saved: model must be a models.vit.VisionTransformer (models.build_model), "
                              f"got {type(model).__name__}")
    meta = _metadata(cfg, class_names, preprocessing, extra)
    _check_meta(out, meta)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_state(state, cfg, diverged=_diverged(meta))
    created = not out.is_dir()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".weights.tmp.safetensors"
    placed: Path | None = None  # a weights file this call renamed into place
    published = False

    def publish() -> Path:
        nonlocal placed, published
        new = out / meta["weights"]["file"]
        placed = None if new.exists() else new  # the same weights as the checkpoint there: keep its file
        os.replace(tmp, new)
        atomic_write_json(out / META_FILE, meta)
        published = True
        for old in out.glob("weights-*.safetensors"):
            if old.name != new.name:
                old.unlink(missing_ok=True)
        return out

    try:
        # One metadata key: safetensors orders several keys differently per process, breaking reproducible hashes.
        _save_file(save_file, state, tmp)
        os.chmod(tmp, default_mode(0o666))  # safetensors writes 0600: servers and other users must read the weights
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
        meta["weights"] = {"file": f"weights-{digest[:16]}.safetensors", "sha256": digest, "format": "safetensors"}
        del state
        yield publish
    finally:
        if not published:
            tmp.unlink(missing_ok=True)
            # A signal raised just after checkpoint.json's rename, before `published` is set, leaves a checkpoint
            # that names these weights: removing them would break it for good.
            if placed is not None and not _names_weights(out, placed.name):
                placed.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # empty again: a directory this call made


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _save_file(save_file: Callable[..., None], state: dict[str, torch.Tensor], tmp: Path) -> None:
    """safetensors' save_file, its I/O failures raised as the OSError they are: it raises SafetensorError (not an
    OSError) for a full disk ("No space left on device (os error 28)") or a file size limit (os error 27), which
    the commands' machine-failure handling (models.cli) would then not recognise, and end in a traceback."""
    from safetensors import SafetensorError

    try:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    except SafetensorError as exc:
        text = str(exc)
        if (code := _OS_ERROR.search(text)) is not None:
            number = int(code.group(1))
            raise OSError(number, os.strerror(number), str(tmp)) from exc
        if "I/O error" in text:  # no number given: an I/O error all the same
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(tmp)) from exc
        raise


def _metadata(cfg: ViTConfig, class_names: list[str], preprocessing: Preprocessing,
              extra: dict[str, Any] | None) -> dict[str, Any]:
    """`checkpoint.json` as `staged_checkpoint` writes it, with a placeholder weights record of the same length."""
    if not isinstance(preprocessing, Preprocessing):
        raise CheckpointError(f"not saved: preprocessing must be a models.preprocessing.Preprocessing "
                              f"(Preprocessing.from_dict reads a dict), got {type(preprocessing).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise CheckpointError(f"not saved: extra must be a dict, got {type(extra).__name__}")
    if clash := sorted(str(k) for k in (extra or {}) if k in CORE_FIELDS):
        raise CheckpointError(f"not saved: extra sets {', '.join(clash)}, which the model, class_names and "
                              f"preprocessing determine")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.name,
        "stem": cfg.stem.kind,
        "config": cfg.to_dict(),
        "num_classes": cfg.num_classes,
        # A str would pass list() as one-letter names: anything but a list or tuple goes to the reader as it is.
        "class_names": list(class_names) if isinstance(class_names, list | tuple) else class_names,
        "preprocessing": preprocessing.to_dict(),
        "weights": {"file": "weights-" + "0" * 16 + ".safetensors", "sha256": "0" * 64, "format": "safetensors"},
        **(extra or {}),
    }
    return meta


def check_metadata(out_dir: str | os.PathLike, cfg: ViTConfig, *, class_names: list[str],
                   preprocessing: Preprocessing, extra: dict[str, Any] | None = None) -> None:
    """CheckpointError (one line) unless the `checkpoint.json` of this model, these class names and `extra` would be
    written and read back, with META_RESERVE_BYTES to spare under MAX_META_BYTES. A training run calls it before its
    first step, with the summary's strings as they will be (its numbers come at the end, within the reserve): at
    the first save, after the training, a refusal costs the work, and a --resume would train again to meet it."""
    meta = _metadata(cfg, class_names, preprocessing, extra)
    where = str(Path(out_dir) / META_FILE)
    when = "the run's checkpoint could not be saved: "
    try:
        size = len(strict_json_bytes(meta))
    except ValueError as exc:
        raise CheckpointError(f"{when}{where}: {exc}") from None
    if size + META_RESERVE_BYTES > MAX_META_BYTES and isinstance(meta["class_names"], list):
        rest = len(strict_json_bytes({**meta, "class_names": []}))
        # Written as ASCII JSON: a non-ASCII character costs a 6-byte escape (12 beyond the BMP, as emoji are).
        # Said before the first step (nothing has failed to save yet): what would not fit, and that it was refused.
        raise CheckpointError(f"{where} would be larger than {MAX_META_BYTES >> 20} MiB, the most it may hold: "
                              f"{len(meta['class_names']):,} class names take {(size - rest) / 2**20:.1f} MiB of it "
                              f"(the rest of it needs up to {(rest + META_RESERVE_BYTES) >> 10} KiB; a non-ASCII "
                              f"character takes 6 or 12 bytes): refused before training; use fewer classes or shorter "
                              f"class names")
    _check_meta(Path(out_dir), meta, when)


def _names_weights(out: Path, name: str) -> bool:
    """Whether `out`'s checkpoint.json (as it is on disk) names the weights file `name`."""
    try:
        weights = read_strict_json(out / META_FILE, MAX_META_BYTES).get("weights")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(weights, dict) and weights.get("file") == name


# What save_checkpoint derives from the model and its arguments; `extra` adds the training summary beside them.
CORE_FIELDS = frozenset({"format", "format_version", "model", "stem", "config", "num_classes", "class_names",
                         "preprocessing", "weights"})


def _check_meta(out: Path, meta: dict[str, Any], when: str = "not saved: ") -> None:
    """The reader's own checks on `checkpoint.json` as it would be written (strict JSON, size, every field); each
    refusal a CheckpointError starting with `when`."""
    where = str(out / META_FILE)
    try:
        doc = parse_strict_json(strict_json_bytes(meta), MAX_META_BYTES)
    except ValueError as exc:
        raise CheckpointError(f"{when}{where}: {exc}") from None
    _validated(out, doc, where, f"{when.removesuffix(': ')} (load_checkpoint would refuse it): ")


def _diverged(raw: dict[str, Any]) -> bool:
    """Whether the training summary says the run diverged (its weights may hold NaN)."""
    training = raw.get("training")
    return isinstance(training, dict) and bool(training.get("diverged"))


def _check_state(state: dict[str, torch.Tensor], cfg: ViTConfig, *, diverged: bool) -> None:
    """The tensors load_checkpoint takes: the config's names and shapes, float32 (int64 counters), finite."""
    import torch

    names = {torch.float32: "F32", torch.int64: "I64"}
    have = {k: (names.get(v.dtype, str(v.dtype).removeprefix("torch.")), tuple(v.shape)) for k, v in state.items()}
    if problem := _tensor_problem(have, cfg):
        raise CheckpointError(f"not saved: the model's weights{problem}" + (
            "; call model.float() first" if "expected float32" in problem else ""))
    if not diverged and (bad := _non_finite(state)):
        raise CheckpointError(f"not saved: the model's {bad[0]} holds {bad[1]} (the reader refuses it)")


def read_checkpoint_meta(path: str | os.PathLike) -> CheckpointMeta:
    """Parse and validate `checkpoint.json` (no torch needed); raises CheckpointError."""
    path = Path(path)
    try:
        if path.is_file() and path.name == META_FILE:
            path = path.parent
        meta_path = path / META_FILE
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {path}")
        problem = not_a_file(meta_path)  # a FIFO or a device is not opened: it would block, or never end
    except OSError as exc:  # stat fails with EACCES when the directory (or one above it) cannot be searched
        raise CheckpointError(f"cannot read checkpoint directory {path}: {exc.strerror or exc}") from None
    if problem is not None:
        raise CheckpointError(f"not a checkpoint: {meta_path} {problem}" if problem.startswith("is ")
                              else f"cannot read {meta_path}: {problem}")
    source = inside_checkpoint(path, meta_path, META_FILE)
    return _validated(path, _load_json(meta_path, source), str(meta_path), "corrupt checkpoint metadata ")


def inside_checkpoint(directory: Path, path: Path, what: str) -> Path:
    """The file to read for `path` (a regular file in checkpoint `directory`): its target when it is a symbolic link,
    so that what was checked is what is read. A link out of the directory is refused unread, by the test a bundle's
    manifest and files pass (`models.bundle.read_manifest`, `verify_file`): the checkpoint is its directory."""
    try:
        real = path.resolve()
        outside = directory.resolve() not in real.parents
    except (OSError, RuntimeError) as exc:  # no permission; a link loop (Python 3.11's resolve: RuntimeError)
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else os.strerror(errno.ELOOP)
        raise CheckpointError(f"cannot read {path}: {reason}") from None
    if outside:  # read, its parse errors would quote another file back; its weights would be another run's
        raise CheckpointError(f"{path} links to a file outside the checkpoint directory {directory}; put the {what} "
                              f"itself there")
    return real if path.is_symlink() else path


def _validated(path: Path, raw: Any, where: str, prefix: str) -> CheckpointMeta:
    """`_parse_meta`, every refusal a one-line CheckpointError (`prefix` + the file and the field)."""
    try:
        return _parse_meta(path, raw, Fields(raw, where))
    except CheckpointError:
        raise
    except FieldError as exc:  # already names the file and the field
        raise CheckpointError(f"{prefix}{exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{prefix}{where}: {type(exc).__name__}: {first_line(exc, 300)}") from None


def _load_json(meta_path: Path, source: Path) -> Any:
    """The parsed file (read from `source`, its checked target): size-bounded, strict JSON (NaN, Infinity,
    overflowing numbers, repeated keys, deep nesting are refused)."""
    try:
        return read_strict_json(source, MAX_META_BYTES)
    except ValueError as exc:
        raise CheckpointError(f"corrupt checkpoint metadata {meta_path}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {meta_path}: {exc.strerror or exc}") from None


def _parse_meta(path: Path, raw: dict[str, Any], r: Fields) -> CheckpointMeta:
    """Every field typed, bounded and consistent with the others (see `_check_consistent`)."""
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{r.where}: format is {str(raw.get('format'))[:80]!r}, expected {FORMAT!r}")
    # Every checkpoint.json vitc wrote, since its first commit, has format_version 1: one without it is not vitc's.
    read_format_version(r, FORMAT_VERSION, CheckpointError, newer="upgrade vitc to read this checkpoint",
                        older="vitc has written 1 or later since its first release: the file was edited or not "
                              "written by vitc")
    if (unknown := unknown_contract_field(raw) or _unknown_key(raw.get("weights"), _WeightsRecord, prefix="weights.")
            ) is not None:
        raise CheckpointError(f"{r.where}: field {unknown!r} is not one this vitc knows: the checkpoint may come from "
                              f"a newer vitc (upgrade vitc to read it)")
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
    dataset, training = _summary(r)
    return dataclasses.replace(meta, dataset=dataset, training=training)


def read_format_version(r: Fields, supported: int, error: Callable[[str], Exception], *, newer: str,
                        older: str) -> int:
    """A contract's `format_version`, by the rule checkpoint.json and manifest.json share: a required integer (not
    a bool, float or string: FieldError) from 1, the first format, to `supported`; `error` (one line naming the
    file) for a newer one, saying `newer`, or one below 1, which no vitc writes, saying `older`."""
    version = r.get("format_version", int)
    if version > supported:
        raise error(f"{r.where}: format_version {version} is newer than this vitc reads ({supported}); {newer}")
    if version < 1:
        raise error(f"{r.where}: format_version {version} is not supported; {older}")
    return version


@dataclass(frozen=True)
class _WeightsRecord:
    """The keys of checkpoint.json's `weights`: every vitc has written exactly these three."""

    file: str
    sha256: str
    format: str


def unknown_contract_field(raw: dict[str, Any]) -> str | None:
    """The dotted path of the first `config` (`unknown_config_field`) or `preprocessing` key of a checkpoint.json or
    manifest.json that this vitc's classes lack: a newer vitc's field, which was a TypeError or called corrupt."""
    if (key := unknown_config_field(raw.get("config"))) is not None:
        return key
    return _unknown_key(raw.get("preprocessing"), Preprocessing, prefix="preprocessing.")


def unknown_config_field(config: Any) -> str | None:
    """The dotted path of the first key of a serialised `ViTConfig` (its stem and conv layers included) that this
    vitc's classes lack, or None: a newer vitc's field, which the constructor would refuse as a Python TypeError.
    Anything not shaped like a config is left to `ViTConfig.from_dict`, which says what is wrong."""
    if not isinstance(config, dict):
        return None
    if (key := _unknown_key(config, ViTConfig, prefix="config.")) is not None:
        return key
    stem = config.get("stem")
    kinds = {"patchify": PatchifyStem, "conv": ConvStem}
    if not isinstance(stem, dict) or not isinstance(stem.get("kind"), str) or stem["kind"] not in kinds:
        return None
    if (key := _unknown_key(stem, kinds[stem["kind"]], "kind", prefix="config.stem.")) is not None:
        return key
    layers = stem.get("layers") if stem["kind"] == "conv" else None
    for i, layer in enumerate(layers if isinstance(layers, list) else ()):
        if (key := _unknown_key(layer, ConvLayer, prefix=f"config.stem.layers[{i}].")) is not None:
            return key
    return None


def _unknown_key(obj: Any, cls: type, *extra: str, prefix: str = "") -> str | None:
    """`prefix` + the first key of `obj` that is neither a field of `cls` nor in `extra`; None for a non-dict (its
    own reader says what is wrong with it)."""
    if not isinstance(obj, dict):
        return None
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    return next((prefix + str(k)[:80] for k in obj if k not in known), None)


def _plain_file_name(name: str) -> bool:
    """A name inside the checkpoint directory: no separators, no `..` (the hash would read any file), no control
    characters (it is quoted in one-line errors)."""
    return is_label(name, 255) and name not in (".", "..") and "/" not in name and "\\" not in name


def _check_consistent(m: CheckpointMeta, r: Fields) -> None:
    """Cross-field invariants: the shared model contract and the top-level class count."""
    check_model_contract(r, m.model, m.config, m.class_names, m.preprocessing)
    if r.get("num_classes", int, None) not in (None, m.config.num_classes):
        raise r.fail("num_classes", f"is {r.raw['num_classes']}, config.num_classes {m.config.num_classes}")


def check_model_contract(r: Fields, model: str, cfg: ViTConfig, class_names: tuple[str, ...],
                         pre: Preprocessing) -> None:
    """What checkpoint.json and a bundle's manifest.json both promise (each reader calls this on its root
    fields): the class names fit the head, the preprocessing produces what the model takes, `model` and `stem`
    name the config."""
    if not isinstance(class_names, list | tuple):  # a str would pass as one-letter names
        raise r.fail("class_names", f"must be a list of names, got {type(class_names).__name__}")
    if not MIN_CLASSES <= len(class_names) <= MAX_CLASSES:
        raise r.fail("class_names", f"must list {MIN_CLASSES}..{MAX_CLASSES} names, got {len(class_names)}")
    if (bad := next((i for i, n in enumerate(class_names) if not is_label(n)), None)) is not None:
        raise r.fail(f"class_names[{bad}]", f"must be 1..{MAX_LABEL_CHARS} characters without control characters, "
                                            f"got {class_names[bad]!r:.80}")
    if cfg.num_classes != len(class_names):
        raise r.fail("config.num_classes", f"is {cfg.num_classes}, class_names lists {len(class_names)}")
    first: dict[str, int] = {}
    for i, name in enumerate(class_names):  # answers and Triton's labels.txt could not tell the two apart
        if (j := first.setdefault(name, i)) != i:
            raise r.fail(f"class_names[{i}]", f"repeats class_names[{j}] {name!r:.80}: class names must differ")
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


def _summary(r: Fields) -> tuple[str | None, TrainingRecord | None]:
    """The dataset and the training summary fields that export, evaluation and a resume act on, typed."""
    text = {"check": lambda v: len(v) <= MAX_TEXT_CHARS, "what": f"at most {MAX_TEXT_CHARS} characters"}
    dataset = r.get("dataset", str, None, check=lambda v: is_label(v, MAX_DATASET_CHARS),
                    what=f"a name or path of 1..{MAX_DATASET_CHARS} characters without control characters")
    r.get("weights_source", str, None, **text)
    training = r.obj("training") if r.raw.get("training") is not None else None
    if training is None:
        return dataset, None
    data = {}
    if training.raw.get("data") is not None:
        prints = training.obj("data")
        data = {split: v for split in ("train", "val") if (v := prints.get(split, str, None, **text)) is not None}
    # Free text: shlex.join keeps an argument's tab or newline, and a path's undecodable bytes come back as lone
    # surrogates. Whatever prints it escapes it (export.report): a rule here refused what earlier runs wrote.
    return dataset, TrainingRecord(
        command_line=training.get("command_line", str, None, **text),
        config=training.get("config", dict, None),
        data=data,
        steps=training.get("steps", int, None, check=lambda v: v >= 0, what="a count of steps"),
        diverged=bool(training.get("diverged", bool, False)),
    )


def load_checkpoint(path: str | os.PathLike, *, image_size: int | None = None) -> tuple[nn.Module, CheckpointMeta]:
    """Rebuild the model (eval mode) with verified weights; `image_size` resizes the position embedding, and the
    metadata returned describes that size (`at_image_size`; `raw` stays the file's JSON)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from models.vit import VisionTransformer

    meta = read_checkpoint_meta(path)
    wpath = meta.weights_path
    try:
        if (problem := not_a_file(wpath)) == "is missing":
            raise CheckpointError(f"checkpoint weights missing: {wpath}")
        if problem is not None:
            raise CheckpointError(f"checkpoint weights file {wpath} {problem}" if problem.startswith("is ")
                                  else f"cannot read weights {wpath}: {problem}")
        source = inside_checkpoint(meta.path, wpath, "weights file")
        digest = sha256_file(source)
    except OSError as exc:  # no permission, an I/O error: every command reports it as a bad input, in one line
        raise CheckpointError(f"cannot read weights {wpath}: {exc.strerror or exc}") from None
    if digest != meta.weights_sha256:
        raise CheckpointError(f"checkpoint weights {wpath} do not match the sha256 in {META_FILE} (corrupt?)")
    try:
        sized = meta if image_size is None else at_image_size(meta, image_size)
    except ValueError as exc:
        raise CheckpointError(f"cannot serve {meta.model} at image size {image_size}: {exc}") from None
    try:
        check_weights(source, meta.config)  # names, dtypes and shapes from the header, before any tensor is read
        state = load_file(str(source))
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError) as exc:
        if no_temp_dir(exc):  # torch's first import, not the weights: the command says it
            raise
        raise CheckpointError(f"cannot read weights {wpath}: {exc}") from None
    check_finite(state, wpath, diverged=meta.training is not None and meta.training.diverged)
    model = VisionTransformer(sized.config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit {sized.config.name}: {first_line(exc)}") from None
    return model.eval(), sized


def at_image_size(meta: CheckpointMeta, image_size: int) -> CheckpointMeta:
    """`meta` for its model at `image_size`: the config's size, the crop, and the resize in the same ratio to the crop
    (ImageNet's rule where it has it, as training at that size saves it); ValueError for a size the model refuses."""
    spec, cfg = meta.preprocessing, dataclasses.replace(meta.config, image_size=image_size)
    size = cfg.image_size
    if spec.resize != spec.crop and spec.resize == Preprocessing.imagenet(spec.crop).resize:
        resize = Preprocessing.imagenet(size).resize  # its rounded resize, scaled, would drift from 256/224
    else:
        resize = max(size, round(size * spec.resize / spec.crop))
    return dataclasses.replace(meta, config=cfg, preprocessing=dataclasses.replace(spec, crop=size, resize=resize))


def check_finite(state: dict[str, torch.Tensor], wpath: Path, *, diverged: bool = False) -> None:
    """Every floating-point tensor (parameters and buffers such as BatchNorm's running_var) holds finite numbers:
    a NaN weight would otherwise be exported, evaluated and served as garbage. Raises CheckpointError."""
    if bad := _non_finite(state):
        why = " (the training run diverged)" if diverged else ""
        raise CheckpointError(f"weights {wpath}: {bad[0]} holds {bad[1]}{why}; the checkpoint cannot be used")


def _non_finite(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """(the first floating-point tensor holding NaN or infinity, "NaN" or "an infinite value"), or None."""
    import torch

    for key, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        low, high = (v.item() for v in torch.aminmax(tensor))  # one pass, no copy; NaN propagates to both
        if not (math.isfinite(low) and math.isfinite(high)):
            return key, "NaN" if math.isnan(low) or math.isnan(high) else "an infinite value"
    return None


def expected_weights(cfg: ViTConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) that `save_checkpoint` writes for `cfg` (built on the meta device:
    no memory)."""
    import torch

    from models.vit import VisionTransformer

    names = {torch.float32: "F32", torch.int64: "I64"}
    with torch.device("meta"):
        state = VisionTransformer(cfg).state_dict()
    return {k: (names[v.dtype], tuple(v.shape)) for k, v in state.items()}


def check_weights(wpath: Path, cfg: ViTConfig, floats: tuple[str, ...] = ("F32",)) -> None:
    """The safetensors header must list exactly the config's tensors, float32 (int64 counters), at their shapes;
    a float64 or int8 file would otherwise be cast silently on load. `floats`: the dtypes a float32 tensor may be
    stored in (a torch artifact's bf16 or fp16 weights). Raises CheckpointError."""
    if problem := weights_problem(wpath, cfg, floats):
        raise CheckpointError(f"weights {wpath}{problem}" + (
            "; re-save the checkpoint in float32" if "expected float32" in problem else ""))


def weights_problem(wpath: Path, cfg: ViTConfig, floats: tuple[str, ...] = ("F32",)) -> str | None:
    """Why the safetensors header of `wpath` does not list `cfg`'s tensors (as `check_weights` says it, to follow
    "weights <where>"), or None; read from the header alone, before any tensor (or model) is allocated."""
    from safetensors import safe_open

    with safe_open(str(wpath), "pt") as f:
        have = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    return _tensor_problem(have, cfg, floats)


def _tensor_problem(have: dict[str, tuple[str, tuple[int, ...]]], cfg: ViTConfig,
                    floats: tuple[str, ...] = ("F32",)) -> str | None:
    """Why tensors (name -> safetensors dtype, shape) are not what `cfg`'s checkpoint holds (to follow "weights
    <where>"), or None; `floats` as in `check_weights`."""
    expected = expected_weights(cfg)
    missing, unexpected = sorted(expected.keys() - have.keys()), sorted(have.keys() - expected.keys())
    if missing or unexpected:
        return f" do not fit {cfg.name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for key, (dtype, shape) in expected.items():
        allowed = floats if dtype == "F32" else (dtype,)
        if have[key][0] not in allowed:
            return f": {key} is {have[key][0]}, expected {' or '.join(f'{_DTYPE_NAMES[d]} ({d})' for d in allowed)}"
        if have[key][1] != shape:
            return f" do not fit {cfg.name}: {key} has shape {list(have[key][1])}, expected {list(shape)}"
    return None
