"""The bundle contract: `manifest.json` beside the artifacts. Torch-free: the server reads it.

Schema (format "vitc-bundle", version 1):
{
  "format": "vitc-bundle", "format_version": 1,
  "name": "animals-vit_c",            # served model name (default: bundle directory name)
  "model": "vit_c_mini", "stem": "conv", "config": {...ViTConfig.to_dict()},
  "class_names": [...],
  "input":  {"name": "input", "layout": "NCHW", "dtype": "float32", "channels": 3, "height": 32, "width": 32,
             "min_batch": 1, "max_batch": 64},
  "output": {"name": "logits", "dtype": "float32", "shape": [-1, 10]},
  "preprocessing": {...Preprocessing.to_dict()},
  "source": {"checkpoint": "runs/animals-vit_c", "sha256": "<weights sha256>", "dataset": "animals"},
  "created": "2026-11-24T23:59:00Z",
  "artifacts": [
    {"id": "onnx-fp32", "runtime": "onnxruntime", "format": "onnx", "precision": "fp32",
     "files": [{"path": "model.onnx", "sha256": "...", "bytes": 123}],
     "runtime_version": "1.32.0", "opset": 18, "export_seconds": 1.2,
     "servable": true, "refused_reason": null,
     "parity": {"reference": "torch fp32", "batch_sizes": [1, 2, 7, 64], "max_abs_err": ..., "max_rel_err": ...,
                "top1_agreement": 1.0, "accuracy": 0.91, "reference_accuracy": 0.91, "val_samples": 1000,
                "batch_invariance_max_abs": ..., "inference_precision": "f32", "passed": true}}
  ]
}

Fields added by `export` (readers may ignore them): top-level "timings" {"onnx_hub_seconds"}; per artifact
"parity_seconds", "inference_precision" (OpenVINO: the INFERENCE_PRECISION_HINT to compile with, "f32"),
"calibration" {"dataset", "split": "train", "samples"} (INT8), "fp32_ops" (fp16 graphs), "profile"/"device"/
"typing" (TensorRT), and for a refused artifact "refused_files" (what was built and then deleted: `files` is
empty); per parity "dataset", "split", "reference_logit_scale", "accuracy_delta", "tolerance", "failures".
File paths are relative to the bundle directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from models.io import atomic_write_json, sha256_file

FORMAT = "vitc-bundle"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
RUNTIMES = ("onnxruntime", "openvino", "tensorrt", "torch")


class BundleError(ValueError):
    """A missing, corrupt, tampered or inconsistent bundle."""


def read_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """Load and structurally validate `manifest.json`; raises BundleError with a one-line reason."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_FILE
    if not bundle.is_dir():
        raise BundleError(f"bundle directory not found: {bundle}")
    if not path.is_file():
        raise BundleError(f"not a bundle: {path} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"corrupt manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {manifest['format_version']} is newer than supported")
    for key in ("name", "model", "class_names", "input", "preprocessing", "artifacts"):
        if key not in manifest:
            raise BundleError(f"{path}: missing field {key!r}")
    if not isinstance(manifest["artifacts"], list):
        raise BundleError(f"{path}: 'artifacts' must be a list")
    return manifest


def servable_artifacts(manifest: dict[str, Any], runtime: str | None = None) -> list[dict[str, Any]]:
    """Artifacts that passed their parity gate, optionally for one runtime."""
    return [
        a for a in manifest["artifacts"]
        if a.get("servable") and (runtime is None or a.get("runtime") == runtime)
    ]


def select_artifact(manifest: dict[str, Any], runtime: str, precision: str | None = None) -> dict[str, Any]:
    """The servable artifact for `runtime` (and `precision`, else the most precise); raises BundleError."""
    candidates = servable_artifacts(manifest, runtime)
    if precision is not None:
        candidates = [a for a in candidates if a.get("precision") == precision]
    if not candidates:
        have = sorted({f"{a['runtime']}/{a['precision']}" for a in servable_artifacts(manifest)})
        want = runtime + (f"/{precision}" if precision else "")
        raise BundleError(
            f"bundle {manifest['name']!r} has no servable {want} artifact; servable: {', '.join(have) or 'none'}"
        )
    order = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}
    return min(candidates, key=lambda a: order.get(a.get("precision"), 9))


def verify_files(bundle: str | os.PathLike, artifact: dict[str, Any]) -> list[Path]:
    """Check every file of an artifact exists and matches its sha256; returns the paths."""
    bundle = Path(bundle).resolve()
    paths = []
    for entry in artifact.get("files", []):
        p = (bundle / entry["path"]).resolve()
        if bundle not in p.parents:
            raise BundleError(f"artifact file {entry['path']!r} points outside the bundle")
        if not p.is_file():
            raise BundleError(f"artifact file missing: {p}")
        if sha256_file(p) != entry["sha256"]:
            raise BundleError(f"artifact file {p} does not match its sha256 in the manifest (tampered or corrupt)")
        paths.append(p)
    if not paths:
        raise BundleError(f"artifact {artifact.get('id')!r} lists no files")
    return paths


def file_entries(bundle: str | os.PathLike, paths: list[Path]) -> list[dict[str, Any]]:
    """Manifest `files` entries (bundle-relative path, sha256, bytes) for files inside `bundle`."""
    bundle = Path(bundle).resolve()
    return [
        {"path": Path(p).resolve().relative_to(bundle).as_posix(), "sha256": sha256_file(p),
         "bytes": Path(p).stat().st_size}
        for p in paths
    ]


def write_manifest(bundle: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Atomically write `manifest.json`, then read it back through `read_manifest` and check every file."""
    path = Path(bundle) / MANIFEST_FILE
    atomic_write_json(path, manifest)
    checked = read_manifest(bundle)
    for artifact in servable_artifacts(checked):
        verify_files(bundle, artifact)
    return path
