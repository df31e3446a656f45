"""The bundle contract: `manifest.json` beside the artifacts, as typed, validated, frozen dataclasses.

Torch-free: the server, the exporter, the benchmarks and the reports all read bundles through this module and
nothing else. `read_manifest` refuses a manifest with a missing or ill-typed field with one line that names the
field (`BundleError`); every number that later sizes an allocation (image size, batch, classes) is bounded here.
It is read like checkpoint.json (strict JSON, size and nesting bounded, the same model contract: models.checkpoint
`check_model_contract`), and every string and list the code acts on is bounded in length.

Format "vitc-bundle", version 1 (the JSON shape is unchanged since the first release, so older bundles read):
{
  "format": "vitc-bundle", "format_version": 1,
  "name": "animals-vit_c", "model": "vit_c_mini", "stem": "conv", "config": {...ViTConfig.to_dict()},
  "class_names": [...],
  "input":  {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": 3, "height": 32, "width": 32,
             "min_batch": 1, "max_batch": 64},
  "output": {"name": "logits", "dtype": "float32", "shape": [-1, 10]},
  "preprocessing": {...Preprocessing.to_dict()},
  "source": {"checkpoint": "runs/animals-vit_c", "sha256": "<weights sha256>", "dataset": "animals"},
  "created": "2026-11-24T23:59:00Z", "timings": {"onnx_hub_seconds": 3.1},
  "artifacts": [
    {"id": "onnx-fp32", "runtime": "onnxruntime", "format": "onnx", "precision": "fp32",
     "files": [{"path": "model.onnx", "sha256": "...", "bytes": 123}], "runtime_version": "1.32.0",
     "export_seconds": 1.2, "parity_seconds": 0.4, "servable": true, "refused_reason": null,
     "parity": {...Parity}, "opset": 20, ...runtime-specific facts (Artifact.info)}
  ]
}
A refused artifact has `servable: false`, its reason, no `files`, and `refused_files` (what was built, then deleted).
File paths are relative to the bundle directory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models.checkpoint import MAX_DATASET_CHARS, check_model_contract, read_format_version, unknown_contract_field
from models.config import MAX_CLASSES, MAX_IMAGE_SIDE, MAX_PARAMS, ViTConfig, is_label
from models.formats import FormatError, UnreadableFile, files_problem, format_rules
from models.io import atomic_write_bytes, not_a_file, read_strict_json, sha256_file, strict_json_bytes
from models.jsonfields import FieldError, Fields, between
from models.preprocessing import Preprocessing

FORMAT = "vitc-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
GOLDEN_FILE = "golden.npz"  # the golden inputs and logits every export since d0d913b writes beside the manifest
# The digest arrays golden.npz may hold (runtimes.loader): the manifest's model contract (since f6a9d4c), its origin and
# each artifact's record (`record.<id>`, since 2a6ed9e).
GOLDEN_DIGESTS = ("contract", "origin", "record")
# A Triton-style model repository (python -m export.triton writes it, python -m serve --model-repository reads it):
# REPO/<model>/{config.pbtxt, labels.txt, 1/, 2/, ...}, each version directory a bundle.
TRITON_CONFIG_FILE = "config.pbtxt"
TRITON_LABELS_FILE = "labels.txt"
MAX_BATCH_LIMIT = 1024  # bounds engine profiles, parity batches and the server's batch buffers
MAX_MANIFEST_BYTES = 16 << 20
# Listed file sizes are bounded before anything is hashed (a file must have its listed size before it is hashed, and a
# sparse terabyte costs its writer nothing): an artifact file holds at most the largest model's float32 weights (the
# checkpoint bound) and its graph; the golden inputs are 8 images at the largest side a manifest allows (8 x 4096 x
# 4096 x 3 bytes = 384 MiB) and their logits.
MAX_ARTIFACT_FILE_BYTES = 4 * MAX_PARAMS + (1 << 30)
MAX_GOLDEN_BYTES = 512 << 20
PRECISION_ORDER = ("fp32", "bf16", "fp16", "int8")  # most precise first: the default pick when none is asked
DRAFT_BUDGET_POINTS = 0.1  # accuracy JPEG draft decoding may cost before a model's JPEGs are decoded in full
MIN_DRAFT_SAMPLES = 1000  # a 0.1-point cost is one image in 1000: fewer cannot show it, so draft stays off
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bundle names and artifact ids become directory and model names (serve, export.triton): serve's model-name rule.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
NAME_RULE = "1..128 of A-Z a-z 0-9 _ . - starting with a letter or digit"
MAX_PATH_CHARS = 1024
# Lists a reader walks and strings it passes on are bounded too (the file's size alone would allow millions).
MAX_ARTIFACTS = 256  # an export builds a few per runtime
MAX_FILES = 64  # files of one artifact (an OpenVINO IR has two)
# One artifact's record as a build makes it (export.bundle checks it per artifact): half the manifest's bound shared
# by the most artifacts it lists, so records that each pass leave the other half to the header, parity and refusal
# reasons, and the manifest reads back. A real record is 1-2 KB.
MAX_ARTIFACT_RECORD_BYTES = MAX_MANIFEST_BYTES // (2 * MAX_ARTIFACTS)
MAX_ENTRIES = 256  # batch sizes, failures, tolerances, timings, served encodings, libraries
MAX_TEXT_CHARS = 1 << 16  # free text: a refusal reason, a command line, a path
# Line breaks (what str.splitlines splits on) and lone surrogates: a one-line field must stay one line, and a JSON
# answer cannot encode a lone surrogate.
_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029\ud800-\udfff]")


def _label(max_chars: int) -> dict[str, Any]:
    """`Fields.get` options for a name, id or tag: 1..max_chars without control characters."""
    return {"check": lambda v: is_label(v, max_chars),
            "what": f"1..{max_chars} characters without control characters"}


def _line(max_chars: int = MAX_TEXT_CHARS) -> dict[str, Any]:
    """`Fields.get` options for free text shown on one line (may be empty)."""
    return {"check": lambda v: len(v) <= max_chars and _BREAKS.search(v) is None,
            "what": f"one line of at most {max_chars} characters"}


def _text(max_chars: int = MAX_TEXT_CHARS) -> dict[str, Any]:
    """`Fields.get` options for free text (may hold any character: a recorded command line), printed escaped."""
    return {"check": lambda v: len(v) <= max_chars, "what": f"at most {max_chars} characters"}


# What no bundle name or tag may hold (ids are ASCII, NAME_RE): controls (C0, DEL, C1), format characters (Cf: the
# bidi overrides and isolates such as U+202E, zero-width characters), lone surrogates, line and paragraph separators.
# Tools print names and tags in titles and log lines (export.report, export.served, serve.tensor), where a format
# character reorders or hides the rest of the line; export itself only makes ASCII names.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def plain_text(text: str) -> bool:
    """Whether `text` holds no control, format (bidi, zero-width), surrogate or line-separator character."""
    return not any(unicodedata.category(c) in _NOT_IN_NAMES for c in text)


def _tag(max_chars: int) -> dict[str, Any]:
    """`Fields.get` options for a tag: a label (`_label`) without format characters either."""
    return {"check": lambda v: is_label(v, max_chars) and plain_text(v),
            "what": f"1..{max_chars} characters without control or format characters"}


TAG = _tag(64)  # runtime, format, precision, split
NAME = _label(256)  # tensor names, the parity reference
DATASET = _label(MAX_DATASET_CHARS)  # an embedded set's name or a folder's path, as the checkpoint records it
FRACTION = {"check": lambda v: 0.0 <= v <= 1.0, "what": "a fraction in 0..1"}
NON_NEGATIVE = {"check": lambda v: v >= 0, "what": "non-negative"}


def valid_name(name: object) -> bool:
    """Whether `name` is usable as a bundle name or artifact id (a safe single path component)."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


MAX_NAME_CHARS = 128  # NAME_RE's bound: Triton's and serve's model names
NAME_HASH_CHARS = 8  # the hash a shortened name carries (sha256 of the whole text, hex)
_NOT_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def as_name(text: str, suffix: str = "") -> str:
    """`text` + `suffix` made a valid name (for names derived from a path or an older bundle): other runs become '-'.

    Longer than 128 characters, `text` is cut and `suffix` kept whole, with a short hash of the whole before it
    (`<text cut>-<hash>-<suffix>`): a bare cut would lose the suffix (an artifact id) and make two long names that
    share a prefix one."""
    whole = _NOT_NAME.sub("-", text + suffix).lstrip("-_.").rstrip("-")
    if len(whole) <= MAX_NAME_CHARS:
        return whole or "model"
    digest = name_digest(text + suffix)
    tail = _NOT_NAME.sub("-", suffix).strip("-")
    room = MAX_NAME_CHARS - len(digest) - 1 - (len(tail) + 1 if tail else 0)  # the '-' around the hash
    head = _NOT_NAME.sub("-", text).lstrip("-_.")[:max(room, 0)].rstrip("-")
    # Only a suffix of more than 118 characters (none this tool writes) is cut itself; the hash still tells apart.
    return "-".join(part for part in (head, digest, tail) if part)[:MAX_NAME_CHARS].rstrip("-")


def name_digest(text: str) -> str:
    """The short hash `as_name` gives a name it cut (of the whole text, before it was made valid)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:NAME_HASH_CHARS]


def safe_component(name: object) -> bool:
    """Whether a bundle name is one harmless path component (serve and export.triton ask for `valid_name` where
    they use it; a reader only refuses what could escape a directory, or break or reorder a line: `plain_text`)."""
    return (isinstance(name, str) and 0 < len(name) <= 256 and name not in (".", "..") and "/" not in name
            and "\\" not in name and plain_text(name))


def safe_relative_path(path: object) -> bool:
    """Whether `path` is a plain relative path that stays inside its bundle ('/'-separated, no '..', no '.')."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS:
        return False
    if path.startswith("/") or "\\" in path or any(ord(c) < 32 or ord(c) == 127 for c in path):
        return False  # control characters include NUL; backslashes are separators on Windows
    return all(part not in ("", ".", "..") for part in path.split("/"))


class BundleError(ValueError):
    """A missing, corrupt, tampered or inconsistent bundle (one line, naming the file and field)."""


def unreadable(what: str, path: str | os.PathLike, exc: OSError | RuntimeError) -> BundleError:
    """The BundleError for a file or directory that cannot be read: no permission, an I/O error, or a symbolic link
    loop (which Python 3.11's Path.resolve raises as RuntimeError, not OSError)."""
    reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else os.strerror(errno.ELOOP)
    return BundleError(f"{what} {path}: cannot read it: {reason}")


@dataclass(frozen=True)
class InputSpec:
    """The model's one input: a float32 NCHW batch."""

    name: str
    channels: int
    height: int
    width: int
    min_batch: int
    max_batch: int
    layout: str = "NCHW"
    dtype: str = "float32"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        return self.channels, self.height, self.width

    @classmethod
    def read(cls, r: Fields) -> InputSpec:
        side = between(1, MAX_IMAGE_SIDE)
        spec = cls(
            name=r.get("name", str, **NAME), channels=r.get("channels", int, check=between(1, 4), what="1..4"),
            height=r.get("height", int, check=side, what=f"1..{MAX_IMAGE_SIDE}"),
            width=r.get("width", int, check=side, what=f"1..{MAX_IMAGE_SIDE}"),
            min_batch=r.get("min_batch", int, 1, check=between(1, MAX_BATCH_LIMIT), what=f"1..{MAX_BATCH_LIMIT}"),
            max_batch=r.get("max_batch", int, check=between(1, MAX_BATCH_LIMIT), what=f"1..{MAX_BATCH_LIMIT}"),
            layout=r.get("layout", str, "NCHW", check=lambda v: v == "NCHW", what='"NCHW"'),
            dtype=r.get("dtype", str, "float32", check=lambda v: v == "float32", what='"float32"'),
        )
        if spec.min_batch > spec.max_batch:
            raise r.fail("min_batch", f"{spec.min_batch} is above max_batch {spec.max_batch}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "layout": self.layout, "dtype": self.dtype, "channels": self.channels,
                "height": self.height, "width": self.width, "min_batch": self.min_batch, "max_batch": self.max_batch}


@dataclass(frozen=True)
class OutputSpec:
    """The model's one output: float32 logits (batch, classes)."""

    name: str
    classes: int
    dtype: str = "float32"

    @classmethod
    def read(cls, r: Fields) -> OutputSpec:
        shape = r.ints("shape")
        if len(shape) != 2 or shape[0] != -1 or not 1 <= shape[1] <= MAX_CLASSES:
            raise r.fail("shape", f"must be [-1, classes] with 1..{MAX_CLASSES} classes, got {list(shape[:3])}")
        return cls(name=r.get("name", str, **NAME), classes=shape[1],
                   dtype=r.get("dtype", str, "float32", check=lambda v: v == "float32", what='"float32"'))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": [-1, self.classes]}


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact: bundle-relative path, content hash, size."""

    path: str
    sha256: str
    bytes: int

    @classmethod
    def read(cls, r: Fields, max_bytes: int = MAX_ARTIFACT_FILE_BYTES) -> FileEntry:
        return cls(path=r.get("path", str, check=safe_relative_path,
                              what="a plain relative path inside the bundle"),
                   sha256=r.get("sha256", str, check=_SHA256.match, what="64 lowercase hex digits"),
                   bytes=r.get("bytes", int, check=between(0, max_bytes),
                               what=f"non-negative, at most {max_bytes:,}"))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class Parity:
    """An artifact measured against torch fp32 on real validation images (numbers from export/parity.py)."""

    dataset: str
    val_samples: int
    batch_sizes: tuple[int, ...]
    max_abs_err: float | None  # None: non-finite outputs
    max_rel_err: float | None  # None: no reference scale (all-zero reference logits) or non-finite
    reference_logit_scale: float
    top1_agreement: float
    accuracy: float
    reference_accuracy: float
    accuracy_delta: float
    batch_invariance_max_abs: float | None
    tolerance: dict[str, float | None]
    passed: bool
    failures: tuple[str, ...] = ()
    reference: str = "torch fp32"
    split: str = "val"
    inference_precision: str | None = None  # the runtime's precision hint the numbers were measured at
    # Half-width of the paired 95 % interval of accuracy_delta (export.parity.paired_ci95); None in bundles written
    # before it was recorded, which still read.
    accuracy_delta_ci95: float | None = None

    @classmethod
    def read(cls, r: Fields) -> Parity:
        tol = r.obj("tolerance", None)
        tolerance = {k: tol.get(k, float, None, **NON_NEGATIVE) for k in _keys(tol, MAX_ENTRIES)} if tol else {}
        parity = cls(
            dataset=r.get("dataset", str, **DATASET),
            val_samples=r.get("val_samples", int, **NON_NEGATIVE), batch_sizes=r.ints("batch_sizes"),
            max_abs_err=r.get("max_abs_err", float, None, **NON_NEGATIVE),
            max_rel_err=r.get("max_rel_err", float, None, **NON_NEGATIVE),
            reference_logit_scale=r.get("reference_logit_scale", float, **NON_NEGATIVE),
            top1_agreement=r.get("top1_agreement", float, **FRACTION), accuracy=r.get("accuracy", float, **FRACTION),
            reference_accuracy=r.get("reference_accuracy", float, **FRACTION),
            accuracy_delta=r.get("accuracy_delta", float, check=between(-1, 1), what="-1..1"),
            batch_invariance_max_abs=r.get("batch_invariance_max_abs", float, None, **NON_NEGATIVE),
            tolerance=tolerance, passed=r.get("passed", bool), failures=r.strings("failures", ()),
            reference=r.get("reference", str, "torch fp32", **NAME), split=r.get("split", str, "val", **TAG),
            inference_precision=r.get("inference_precision", str, None, **TAG),
            accuracy_delta_ci95=r.get("accuracy_delta_ci95", float, None, check=between(0, 2), what="0..2"),
        )
        if len(parity.batch_sizes) > MAX_ENTRIES or not all(1 <= b <= MAX_BATCH_LIMIT for b in parity.batch_sizes):
            raise r.fail("batch_sizes", f"must list at most {MAX_ENTRIES} batch sizes in 1..{MAX_BATCH_LIMIT}")
        _check_lines(r, "failures", parity.failures)
        return parity

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "reference": self.reference, "dataset": self.dataset, "split": self.split,
            "val_samples": self.val_samples, "batch_sizes": list(self.batch_sizes), "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err, "reference_logit_scale": self.reference_logit_scale,
            "top1_agreement": self.top1_agreement, "accuracy": self.accuracy,
            "reference_accuracy": self.reference_accuracy, "accuracy_delta": self.accuracy_delta,
            "batch_invariance_max_abs": self.batch_invariance_max_abs, "tolerance": dict(self.tolerance),
            "passed": self.passed,
        }
        if self.failures:
            d["failures"] = list(self.failures)
        if self.inference_precision is not None:
            d["inference_precision"] = self.inference_precision
        if self.accuracy_delta_ci95 is not None:  # absent, not null, when unknown: an old record keeps its digest
            d["accuracy_delta_ci95"] = self.accuracy_delta_ci95
        return d

    def delta_text(self, unit: str = "") -> str:
        """"-0.80{unit} ±0.68 (95% CI) on 1000 images": the accuracy delta in points, its paired interval (when
        recorded) and the images it was measured on."""
        ci = "" if self.accuracy_delta_ci95 is None else f" ±{self.accuracy_delta_ci95 * 100:.2f} (95% CI)"
        return f"{self.accuracy_delta * 100:+.2f}{unit}{ci} on {self.val_samples} images"


_ARTIFACT_KEYS = ("id", "runtime", "format", "precision", "files", "runtime_version", "export_seconds",
                  "parity_seconds", "servable", "refused_reason", "refused_files", "parity")


@dataclass(frozen=True)
class Artifact:
    """One runtime's artifact at one precision; `info` holds the runtime's own facts (opset, profile, ...)."""

    id: str
    runtime: str
    format: str
    precision: str
    files: tuple[FileEntry, ...]
    servable: bool
    refused_reason: str | None = None
    parity: Parity | None = None
    runtime_version: str = ""
    export_seconds: float = 0.0
    parity_seconds: float | None = None
    refused_files: tuple[FileEntry, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, r: Fields) -> Artifact:
        parity = r.obj("parity", None)
        art = cls(
            id=r.get("id", str, check=valid_name, what=NAME_RULE), runtime=r.get("runtime", str, **TAG),
            format=r.get("format", str, **TAG), precision=r.get("precision", str, **TAG),
            files=tuple(FileEntry.read(f) for f in _items(r, "files", MAX_FILES, [])),
            servable=r.get("servable", bool), refused_reason=r.get("refused_reason", str, None, **_line()),
            parity=Parity.read(parity) if parity is not None else None,
            runtime_version=r.get("runtime_version", str, "", **_line(RUNTIME_VERSION_CHARS)),
            export_seconds=r.get("export_seconds", float, 0.0, **NON_NEGATIVE),
            parity_seconds=r.get("parity_seconds", float, None, **NON_NEGATIVE),
            refused_files=tuple(FileEntry.read(f) for f in _items(r, "refused_files", MAX_FILES, [])),
            info={k: v for k, v in r.raw.items() if k not in _ARTIFACT_KEYS},
        )
        r.get("inference_precision", str, None, **TAG)  # a runtime compiles with it (runtimes/openvino.py)
        if art.servable and not art.files:
            raise r.fail("files", "is empty, but the artifact is marked servable")
        if art.files and (wrong := files_problem(art.format, [f.path for f in art.files])):
            raise r.fail("files", wrong)
        return art

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "runtime": self.runtime, "format": self.format,
                             "precision": self.precision, "files": [f.to_dict() for f in self.files],
                             "runtime_version": self.runtime_version, "export_seconds": self.export_seconds}
        d.update(self.info)
        if self.parity_seconds is not None:
            d["parity_seconds"] = self.parity_seconds
        d.update(servable=self.servable, refused_reason=self.refused_reason)
        if self.refused_files:
            d["refused_files"] = [f.to_dict() for f in self.refused_files]
        if self.parity is not None:
            d["parity"] = self.parity.to_dict()
        return d


RUNTIME_VERSION_CHARS = 256


def check_runtime_version(runtime: str, version: Any) -> str:
    """`version`, what `runtime`'s version() returned, if a manifest can record it (an artifact's runtime_version,
    provenance.libraries): one line of at most RUNTIME_VERSION_CHARS characters; TypeError or ValueError (one line
    naming the runtime) otherwise."""
    if not isinstance(version, str):
        raise TypeError(f"{runtime} version() returned {type(version).__name__} {version!r:.80}, expected a string "
                        f"(one line of at most {RUNTIME_VERSION_CHARS} characters)")
    if not _line(RUNTIME_VERSION_CHARS)["check"](version):
        raise ValueError(f"{runtime} version() returned {version!r:.80}, expected one line of at most "
                         f"{RUNTIME_VERSION_CHARS} characters")
    return version


def check_artifact_record(artifact: Artifact) -> None:
    """TypeError or ValueError (one line naming the artifact's runtime) unless its record, as a build made it, is
    one the manifest reader takes back as written: `runtime_version` (the runtime's version()) one line of text,
    no `info` key that is a field of the record itself, what `Artifact.read` accepts (its files by its format's
    rule), and at most MAX_ARTIFACT_RECORD_BYTES of JSON."""
    # Export used to publish, exit 0, a bundle its own report, server and next export refused (a version() tuple),
    # or whose artifact a build's info silently relabelled ({"runtime": ...} overwrote the core field).
    rt = artifact.runtime
    check_runtime_version(rt, artifact.runtime_version)
    if clash := [k for k in artifact.info if k in _ARTIFACT_KEYS]:
        raise ValueError(f"{rt} build returned info keys {clash} that are the manifest's own artifact fields "
                         f"({', '.join(_ARTIFACT_KEYS)}): give its facts other names")
    try:
        record = strict_json_bytes(artifact.to_dict())
        Artifact.read(Fields(json.loads(record), f"{rt} build's manifest record"))
    except ValueError as exc:  # FieldError, or strict JSON's
        raise ValueError(str(exc)) from None
    # The reader bounds the whole manifest alone: one record past it lost every other artifact of the export.
    if len(record) > MAX_ARTIFACT_RECORD_BYTES:
        raise ValueError(f"{rt} build's manifest record is {len(record):,} bytes of JSON, more than the "
                         f"{MAX_ARTIFACT_RECORD_BYTES:,} one artifact may take: keep its info short")


@dataclass(frozen=True)
class Source:
    """Where the weights came from."""

    checkpoint: str
    sha256: str
    dataset: str

    @classmethod
    def read(cls, r: Fields) -> Source:
        return cls(checkpoint=r.get("checkpoint", str, **_line()),
                   sha256=r.get("sha256", str, check=_SHA256.match, what="64 lowercase hex digits"),
                   dataset=r.get("dataset", str, **DATASET))

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "sha256": self.sha256, "dataset": self.dataset}


@dataclass(frozen=True)
class Provenance:
    """Where a bundle came from: the code, the training run, the data it saw, every library that shaped it.

    Fingerprints are sha256 over what the data holds (data/datasets.py `ImageSet.fingerprint`; for the parity and
    calibration images, the exact preprocessed tensors): exporting the same checkpoint twice gives the same ones.
    """

    vitc_version: str
    git_commit: str | None
    git_dirty: bool | None
    training_command: str | None  # as the checkpoint recorded it; None for checkpoints written before it did
    training_config_sha256: str | None
    training_data_fingerprint: str | None
    parity_data_fingerprint: str
    calibration_data_fingerprint: str | None  # None when no INT8 artifact was calibrated
    libraries: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, r: Fields) -> Provenance:
        libs = r.obj("libraries", None)
        short = _line(RUNTIME_VERSION_CHARS)  # versions, commits, hashes
        return cls(
            vitc_version=r.get("vitc_version", str, **short), git_commit=r.get("git_commit", str, None, **short),
            git_dirty=r.get("git_dirty", bool, None),
            # The checkpoint's command line as training wrote it (shlex.join keeps an argument's tab or newline, a
            # path's undecodable bytes are lone surrogates): export.report prints it escaped (models.cli.one_line).
            training_command=r.get("training_command", str, None, **_text()),
            training_config_sha256=r.get("training_config_sha256", str, None, **short),
            training_data_fingerprint=r.get("training_data_fingerprint", str, None, **short),
            parity_data_fingerprint=r.get("parity_data_fingerprint", str, **short),
            calibration_data_fingerprint=r.get("calibration_data_fingerprint", str, None, **short),
            libraries={k: libs.get(k, str, **short) for k in _keys(libs, MAX_ENTRIES)} if libs else {},
        )

    def to_dict(self) -> dict[str, Any]:
        return {"vitc_version": self.vitc_version, "git_commit": self.git_commit, "git_dirty": self.git_dirty,
                "training_command": self.training_command, "training_config_sha256": self.training_config_sha256,
                "training_data_fingerprint": self.training_data_fingerprint,
                "parity_data_fingerprint": self.parity_data_fingerprint,
                "calibration_data_fingerprint": self.calibration_data_fingerprint, "libraries": dict(self.libraries)}


@dataclass(frozen=True)
class Golden:
    """A few real validation inputs, torch's logits for them and each servable artifact's own outputs at export (an
    .npz of `pixels`, `logits`, `outputs.<artifact id>`): a server loads an artifact only when it reproduces its own
    outputs, or else torch's logits within its parity tolerance (runtimes.loader.verify_golden)."""

    file: FileEntry
    samples: int
    # The digest arrays the file holds (of GOLDEN_DIGESTS; "record": one per artifact), as listed since 2026-12-07:
    # a reader requires each, so deleting one from the file cannot pass the bundle off as one exported before it.
    digests: tuple[str, ...] = ()

    @classmethod
    def read(cls, r: Fields) -> Golden:
        digests = tuple(r.strings("digests", ()))
        if unknown := [d for d in digests if d not in GOLDEN_DIGESTS]:
            raise r.fail("digests", f"lists {unknown[0]!r:.80}, not one this vitc knows: the bundle may come from a "
                                    "newer vitc (upgrade vitc to serve it, or re-export it with this one)")
        return cls(file=FileEntry.read(r.obj("file"), MAX_GOLDEN_BYTES),
                   samples=r.get("samples", int, check=between(1, 1024), what="1..1024"), digests=digests)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file.to_dict(), "samples": self.samples,
                **({"digests": list(self.digests)} if self.digests else {})}


def _encoding(v: Fields) -> dict[str, float]:
    """One encoding's fractions (accuracy and agreement always; accuracy_no_draft for JPEGs)."""
    for required in ("accuracy", "agreement"):
        v.get(required, float, **FRACTION)  # missing: the field is named
    return {m: v.get(m, float, **FRACTION) for m in _keys(v, MAX_ENTRIES)}


@dataclass(frozen=True)
class ServedParity:
    """Accuracy through the whole serving path (HTTP, decoding, EXIF, JPEG draft, preprocessing, batching, runtime)
    on encoded validation images, against the evaluation pipeline on the dataset's own pixels
    (`python -m export.report BUNDLE --served` measures it). `jpeg_draft`: whether draft decoding of big JPEGs
    costs at most DRAFT_BUDGET_POINTS of accuracy; a server decodes this model's JPEGs in full when it does not."""

    runtime: str
    samples: int
    reference_accuracy: float
    encodings: dict[str, dict[str, float]]  # "jpeg75-128" -> accuracy, agreement (+ accuracy_no_draft for JPEGs)
    jpeg_draft_cost_points: float
    jpeg_draft: bool
    created: str = ""

    @classmethod
    def read(cls, r: Fields) -> ServedParity:
        enc = r.obj("encodings")
        served = cls(
            runtime=r.get("runtime", str, **TAG), samples=r.get("samples", int, **NON_NEGATIVE),
            reference_accuracy=r.get("reference_accuracy", float, **FRACTION),
            encodings={k: _encoding(v) for k in _keys(enc, MAX_ENTRIES) if (v := enc.obj(k))},
            jpeg_draft_cost_points=r.get("jpeg_draft_cost_points", float, check=between(-100, 100),
                                         what="-100..100"),
            jpeg_draft=r.get("jpeg_draft", bool), created=r.get("created", str, "", **_line(256)),
        )
        # The verdict must follow from the record's own numbers: a jpeg_draft flipped to true turns draft decoding
        # on for a model it costs points.
        if served.jpeg_draft and (served.jpeg_draft_cost_points > DRAFT_BUDGET_POINTS
                                  or served.samples < MIN_DRAFT_SAMPLES):
            raise r.fail("jpeg_draft", f"is true, but draft decoding costs {served.jpeg_draft_cost_points:g} points "
                                       f"on {served.samples} images (at most {DRAFT_BUDGET_POINTS} on at least "
                                       f"{MIN_DRAFT_SAMPLES} allowed); run export.report --served again")
        return served

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "samples": self.samples, "reference_accuracy": self.reference_accuracy,
                "encodings": {k: dict(v) for k, v in self.encodings.items()},
                "jpeg_draft_cost_points": self.jpeg_draft_cost_points, "jpeg_draft": self.jpeg_draft,
                "created": self.created}


@dataclass(frozen=True)
class Manifest:
    """A whole `manifest.json`."""

    name: str
    model: str
    stem: str
    config: ViTConfig
    class_names: tuple[str, ...]
    input: InputSpec
    output: OutputSpec
    preprocessing: Preprocessing
    source: Source
    created: str
    artifacts: tuple[Artifact, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    provenance: Provenance | None = None  # None: exported before bundles recorded it
    golden: Golden | None = None
    served: ServedParity | None = None  # None: the serving path has not been measured
    # contract_sha256 of the manifest.json this was read from ("" when built in code): the JSON as written, so a
    # newer vitc that writes more fields still reproduces an older bundle's digest.
    read_contract: str = field(default="", repr=False, compare=False)
    # record_sha256 of each artifact record and origin_sha256, as read from disk (empty when built in code).
    read_records: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    read_origin: str = field(default="", repr=False, compare=False)

    @property
    def input_name(self) -> str:
        """The model's one input tensor, as the runtimes and both protocols name it."""
        return self.input.name

    @property
    def output_name(self) -> str:
        """The model's one output tensor (the logits), as the runtimes and both protocols name it."""
        return self.output.name

    @property
    def contract(self) -> str:
        """contract_sha256 of this manifest: as read from disk, else of what `to_dict` writes."""
        return self.read_contract or contract_sha256(self.to_dict())

    def record(self, artifact_id: str) -> str:
        """record_sha256 of one artifact's record: as read from disk, else of what `to_dict` writes."""
        if artifact_id in self.read_records:
            return self.read_records[artifact_id]
        return record_sha256(next(a for a in self.artifacts if a.id == artifact_id).to_dict())

    @property
    def origin(self) -> str:
        """origin_sha256 of this manifest: as read from disk, else of what `to_dict` writes."""
        return self.read_origin or origin_sha256(self.to_dict())

    def servable(self, runtime: str | None = None) -> list[Artifact]:
        """Artifacts that passed their parity gate, optionally of one runtime."""
        return [a for a in self.artifacts if a.servable and (runtime is None or a.runtime == runtime)]

    def artifact(self, runtime: str, precision: str) -> Artifact | None:
        """The artifact (servable or refused) of `runtime` at `precision`, if the bundle lists one."""
        return next((a for a in self.artifacts if a.runtime == runtime and a.precision == precision), None)

    def select(self, runtime: str, precision: str | None = None, known: tuple[str, ...] | None = None) -> Artifact:
        """The servable artifact of `runtime` (at `precision`, else the most precise one); raises BundleError, whose
        list of what is servable leaves out the runtimes not in `known` (this vitc's, when given) and names them."""
        candidates = [a for a in self.servable(runtime) if precision is None or a.precision == precision]
        if not candidates:
            strange = sorted({a.runtime for a in self.servable() if known is not None and a.runtime not in known})
            have = sorted({f"{a.runtime}/{a.precision}" for a in self.servable() if a.runtime not in strange})
            want = runtime + (f"/{precision}" if precision else "")
            refused = self.artifact(runtime, precision) if precision else None
            why = f" (refused at export: {refused.refused_reason})" if refused and not refused.servable else ""
            raise BundleError(f"bundle {self.name!r} has no servable {want} artifact{why}; "
                              f"servable: {', '.join(have) or 'none'}"
                              + "".join(f"; runtime {r!r:.40} is not one this vitc knows" for r in strange))
        order = {p: i for i, p in enumerate(PRECISION_ORDER)}
        return min(candidates, key=lambda a: order.get(a.precision, len(order)))

    def jpeg_draft(self, policy: str) -> bool:
        """Whether big JPEGs decode in draft mode (much faster) under a server's `--jpeg-draft` policy: "measured"
        only when the served-path record (`python -m export.report --served`) shows it costs no more than the
        accuracy budget (on a 32-pixel model it can cost points, so it is never assumed)."""
        if policy != "measured":
            return policy == "always"
        return self.served is not None and self.served.jpeg_draft

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (format version 1)."""
        return {
            "format": FORMAT, "format_version": self.format_version, "name": self.name, "model": self.model,
            "stem": self.stem, "config": self.config.to_dict(), "class_names": list(self.class_names),
            "input": self.input.to_dict(), "output": self.output.to_dict(),
            "preprocessing": self.preprocessing.to_dict(), "source": self.source.to_dict(), "created": self.created,
            "timings": dict(self.timings), "artifacts": [a.to_dict() for a in self.artifacts],
            **({"provenance": self.provenance.to_dict()} if self.provenance else {}),
            **({"golden": self.golden.to_dict()} if self.golden else {}),
            **({"served": self.served.to_dict()} if self.served else {}),
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Validate a parsed manifest; raises BundleError naming the first bad field."""
        try:
            return cls._read(raw, where)
        except FieldError as exc:
            raise BundleError(str(exc)) from None

    @classmethod
    def _read(cls, raw: Any, where: str) -> Manifest:
        r = Fields(raw, where)
        if raw.get("format") != FORMAT:
            raise BundleError(f"{where}: not a {FORMAT} manifest (field 'format' is {raw.get('format')!r:.80})")
        version = read_format_version(r, FORMAT_VERSION, BundleError, newer="upgrade vitc or re-export the bundle",
                                      older="re-export the bundle")
        if (unknown := unknown_contract_field(raw)) is not None:
            raise _newer(where, f"field {unknown!r}")
        config = r.contract("config", lambda d: ViTConfig.from_dict(d))
        preprocessing = r.contract("preprocessing", lambda d: Preprocessing.from_dict(d))
        timings = r.obj("timings", None)
        manifest = cls(
            name=r.get("name", str, check=safe_component,
                       what="one path component without control or format characters"),
            model=r.get("model", str),
            stem=r.get("stem", str, config.stem.kind), config=config,
            class_names=r.strings("class_names"), input=InputSpec.read(r.obj("input")),
            output=OutputSpec.read(r.obj("output")), preprocessing=preprocessing, source=Source.read(r.obj("source")),
            created=r.get("created", str, "", **_line(256)),
            artifacts=tuple(Artifact.read(a) for a in _items(r, "artifacts", MAX_ARTIFACTS)),
            timings={k: timings.get(k, float) for k in _keys(timings, MAX_ENTRIES)} if timings else {},
            format_version=version,
            provenance=Provenance.read(p) if (p := r.obj("provenance", None)) else None,
            golden=Golden.read(g) if (g := r.obj("golden", None)) else None,
            served=ServedParity.read(v) if (v := r.obj("served", None)) else None,
        )
        # The hashes cover fields no reader interprets (a newer vitc's): like a file read_manifest parsed, the
        # document must be strict JSON, or those would escape as raw TypeError, ValueError or RecursionError.
        try:
            strict_json_bytes(raw)
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
        # Each artifact's record exactly as written (the list was validated above: one dict per artifact).
        # A free tag before: "fp8" was served as fp8.
        if (odd := next((a for a in manifest.artifacts if a.precision not in PRECISION_ORDER), None)) is not None:
            raise _newer(where, f"precision {odd.precision!r:.40} of artifact {odd.id!r}")
        manifest = replace(manifest, read_contract=contract_sha256(raw), read_origin=origin_sha256(raw),
                           read_records={a.id: record_sha256(doc) for a, doc in
                                         zip(manifest.artifacts, raw.get("artifacts") or (), strict=True)})
        _check_consistent(manifest, r)
        return manifest


def _newer(where: str, what: str) -> BundleError:
    """The refusal of a manifest holding `what`, which only a newer vitc writes."""
    return BundleError(f"{where}: {what} is not one this vitc knows: the bundle may come from a newer vitc (upgrade "
                       "vitc to serve it, or re-export it with this one)")


CONTRACT_FIELDS = ("model", "stem", "config", "class_names", "preprocessing", "input", "output")
BATCH_FIELDS = ("min_batch", "max_batch")  # a bundle's batch range is not part of what an answer means


def contract_sha256(doc: dict[str, Any]) -> str:
    """sha256 of what a served answer means besides the artifact, in a manifest document: the model and its
    config, the class names, the preprocessing and the input and output tensors. golden.npz (whose own sha256 the
    manifest holds) records it at export, so an edited manifest (relabelled classes, another resize or colour
    mode) is refused at load instead of served: the golden inputs, already preprocessed, cannot notice those."""
    picked = {k: doc.get(k) for k in CONTRACT_FIELDS}
    if isinstance(picked["input"], dict):
        picked["input"] = {k: v for k, v in picked["input"].items() if k not in BATCH_FIELDS}
    return _digest(picked)


def _digest(doc: dict[str, Any]) -> str:
    """sha256 of a JSON document in one canonical spelling (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def record_sha256(doc: dict[str, Any]) -> str:
    """sha256 of an artifact's record (id, runtime, precision, format, parity numbers and gate, calibration, and its
    files' sha256 in order; their paths aside, which export.triton renames in a repository). golden.npz records it
    at export, so a manifest whose numbers, labels or file lists were edited (a top-1 agreement the gate would
    refuse next to "servable", the fp32 IR listed as the int8 one) is reported as tampered, not shown as measured."""
    picked = dict(doc)
    for key in ("files", "refused_files"):
        if isinstance(picked.get(key), list):
            picked[key] = [f.get("sha256") if isinstance(f, dict) else f for f in picked[key]]
    return _digest(picked)


def origin_sha256(doc: dict[str, Any]) -> str:
    """sha256 of where a bundle comes from: the checkpoint's source record and the provenance (commit, data
    fingerprints, library versions), recorded in golden.npz at export like the contract."""
    picked = {k: doc.get(k) for k in ("source", "provenance")}
    return _digest(picked)


def _check_consistent(m: Manifest, r: Fields) -> None:
    """Cross-field invariants the server relies on when it sizes buffers and answers; the model contract (class
    names, preprocessing, `model`/`stem` against the config) is the checkpoint's, checked the same way."""
    if m.output.classes != len(m.class_names):
        raise r.fail("output.shape", f"has {m.output.classes} classes, class_names lists {len(m.class_names)}")
    if (m.input.height, m.input.width) != (m.config.image_size, m.config.image_size):
        raise r.fail("input.height", f"{m.input.height}x{m.input.width} differs from config.image_size "
                                     f"{m.config.image_size}")
    if m.input.channels != m.config.in_chans:
        raise r.fail("input.channels", f"is {m.input.channels}, config.in_chans {m.config.in_chans}")
    if (m.preprocessing.crop, m.preprocessing.crop) != (m.input.height, m.input.width):
        raise r.fail("preprocessing.crop", f"{m.preprocessing.crop} does not match the input size "
                                           f"{m.input.height}x{m.input.width}")
    check_model_contract(r, m.model, m.config, m.class_names, m.preprocessing)
    twice = sorted(i for i, n in Counter(a.id for a in m.artifacts).items() if n > 1)
    if twice:
        raise r.fail("artifacts", f"lists an id twice: {twice[:5]}")


def _items(r: Fields, key: str, limit: int, default: Any = ...) -> list[Fields]:
    """The objects of a list field, refused beyond `limit` entries before any is read."""
    values = r.get(key, list, default)
    if values is not None and len(values) > limit:
        raise r.fail(key, f"lists {len(values)} entries, at most {limit} allowed")
    return r.items(key, default)


def _keys(r: Fields, limit: int) -> list[str]:
    """The keys of an object field whose keys are data (timings, tolerances), at most `limit`, each a short tag."""
    if len(r.raw) > limit:
        raise r.fail("", f"has {len(r.raw)} keys, at most {limit} allowed")
    if (bad := next((k for k in r.raw if not is_label(k, 128)), None)) is not None:
        raise r.fail("", f"has key {bad!r:.80}, which is not 1..128 characters without control characters")
    return list(r.raw)


def _check_lines(r: Fields, key: str, values: tuple[str, ...]) -> None:
    """A list of one-line texts (parity failures), bounded in number and length."""
    if len(values) > MAX_ENTRIES:
        raise r.fail(key, f"lists {len(values)} entries, at most {MAX_ENTRIES} allowed")
    line = _line()
    if (bad := next((i for i, v in enumerate(values) if not line["check"](v)), None)) is not None:
        raise r.fail(f"{key}[{bad}]", f"must be {line['what']}")


def read_manifest(bundle: str | os.PathLike) -> Manifest:
    """Load and validate `manifest.json`; raises BundleError with a one-line reason."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    try:
        # Never opened when it is not a regular file: a FIFO would block the reader, a device never end.
        found = bundle.is_dir()
        problem = not_a_file(path) if found else None
    except OSError as exc:  # a bundle directory this process may not look into
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not found:
        raise BundleError(f"bundle directory not found: {bundle}")
    if problem is not None:
        raise BundleError(f"not a bundle: {path} {problem}" if problem.startswith("is ")
                          else f"cannot read {path}: {problem}")
    try:
        real = path.resolve()
        outside = bundle.resolve() not in real.parents
    except (OSError, RuntimeError) as exc:
        raise unreadable("manifest", path, exc) from None
    if outside:  # a link out of the bundle: read, its parse errors would quote another file back (over HTTP too)
        raise BundleError(f"{path} links to a file outside the bundle directory; put the manifest itself there")
    try:
        # Strict like checkpoint.json: NaN or Infinity is refused, not read as null (write_manifest never writes them).
        # The target checked above is what is read, whatever the link says by now.
        raw = read_strict_json(real, MAX_MANIFEST_BYTES)
    except ValueError as exc:
        raise BundleError(f"corrupt manifest {path}: {exc}; re-export the bundle") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    return Manifest.from_dict(raw, str(path))


def write_manifest(bundle: str | os.PathLike, manifest: Manifest) -> Path:
    """Atomically write `manifest.json` (strict JSON: no NaN or Infinity)."""
    path = Path(bundle) / MANIFEST_FILE
    text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def verify_file(bundle: str | os.PathLike, entry: FileEntry, what: str = "artifact file") -> Path:
    """The resolved path of one listed file, checked to lie inside the bundle and match its size and sha256."""
    if not safe_relative_path(entry.path):
        raise BundleError(f"{what} {entry.path!r} is not a plain relative path inside the bundle")
    try:
        root = Path(bundle).resolve()
        p = (root / entry.path).resolve()
        if root not in p.parents:  # a symlink inside the bundle may still point out of it
            raise BundleError(f"{what} {entry.path!r} points outside the bundle")
        if (problem := not_a_file(p)) == "is missing":
            raise BundleError(f"{what} missing: {p}")
        if problem is not None:  # a FIFO or a device: never opened (it would block, or never end)
            raise BundleError(f"{what} {p} {problem}" if problem.startswith("is ")
                              else f"{what} {p}: cannot read it: {problem}")
        size = p.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{what} {p} is {size:,} bytes, the manifest says {entry.bytes:,} (tampered or corrupt)")
        if sha256_file(p) != entry.sha256:
            raise BundleError(f"{what} {p} does not match its sha256 in the manifest (tampered or corrupt)")
    except (OSError, RuntimeError) as exc:  # no permission, an I/O error, a symlink loop: one line, not a traceback
        raise unreadable(what, Path(os.path.abspath(bundle)) / entry.path, exc) from None
    return p


def verify_files(bundle: str | os.PathLike, artifact: Artifact) -> list[Path]:
    """Check every file of an artifact exists inside the bundle and matches its sha256, and that its format reads no
    file the manifest does not list; returns the paths."""
    paths = [verify_file(bundle, entry) for entry in artifact.files]
    if not paths:
        raise BundleError(f"artifact {artifact.id!r} lists no files")
    if wrong := files_problem(artifact.format, [f.path for f in artifact.files]):  # a manifest built in code
        raise BundleError(f"artifact {artifact.id!r}: its files {wrong}")
    try:
        format_rules(artifact.format).verify(paths)
    except FormatError as exc:
        raise BundleError(f"artifact {artifact.id!r}: {exc}") from None
    except UnreadableFile as exc:
        raise unreadable("artifact file", exc.path, exc.cause) from None
    return paths


def file_entries(bundle: str | os.PathLike, paths: list[Path]) -> tuple[FileEntry, ...]:
    """Manifest file entries (bundle-relative path, sha256, bytes) for files inside `bundle`."""
    bundle = Path(bundle).resolve()
    return tuple(FileEntry(Path(p).resolve().relative_to(bundle).as_posix(), sha256_file(p), Path(p).stat().st_size)
                 for p in paths)

