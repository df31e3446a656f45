"""Checkpoint -> bundle: every requested artifact exported, parity-checked against torch, and described in
`manifest.json` (schema in export/manifest.py). The bundle is built in a temp directory and renamed into place,
so a failure at any point leaves no partial bundle behind (and an older bundle at `out` stays intact).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from export.context import FAMILIES, INPUT_NAME, OUTPUT_NAME, ExportContext, ExportError, Runner, Target, parse_targets
from export.manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE, file_entries, verify_files, write_manifest
from export.parity import ParityData, Tolerance, measure, run_batched
from models.checkpoint import CheckpointError, load_checkpoint
from models.io import atomic_dir
from models.preprocessing import preprocess

MODULES = {"torch": "export.pytorch", "onnx": "export.onnx", "openvino": "export.openvino",
           "tensorrt": "export.tensorrt"}
FORMATS = {"torch": "safetensors", "onnx": "onnx", "openvino": "openvino-ir", "tensorrt": "tensorrt-engine"}
MAX_BATCH_LIMIT = 1024  # bounds the engine profile and the parity batches
PREPROCESS_CHUNK = 256


def runtime_module(family: str):  # noqa: ANN201 - one of the export.<runtime> modules
    """The export module of a target family (imported lazily: TensorRT may be absent)."""
    return importlib.import_module(MODULES[family])


def load_runner(bundle: str | os.PathLike, artifact: dict[str, Any], manifest: dict[str, Any],
                threads: int | None = None) -> Runner:
    """A batch -> logits function for one artifact of a bundle (files verified against their sha256 first)."""
    files = verify_files(bundle, artifact)
    family = next(f for f, (runtime, _, _) in FAMILIES.items() if runtime == artifact["runtime"])
    return _load(family, files, manifest["config"], artifact, threads)


def _load(family: str, files: list[Path], config: dict[str, Any], info: dict[str, Any],
          threads: int | None = None) -> Runner:
    """Each runtime's `load` with the manifest facts it needs (torch: the config; OpenVINO: its precision hint)."""
    module = runtime_module(family)
    if family == "torch":  # torch's thread count is process-wide: build_bundle sets it
        return module.load(files, config)
    if family == "openvino":
        return module.load(files, info.get("inference_precision", module.INFERENCE_PRECISION), threads=threads)
    if family == "onnx":
        return module.load(files, threads=threads)
    return module.load(files)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch with `threads` intra-op threads (None: unchanged), restoring the old count afterwards."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def parity_data(model, meta, dataset: str, samples: int, max_batch: int) -> ParityData:  # noqa: ANN001
    """Preprocessed validation images of the checkpoint's dataset and torch's logits for them."""
    import torch

    from train.data import DatasetError, load_dataset

    try:
        val = load_dataset(dataset, "val")
    except DatasetError as exc:
        raise ExportError(f"parity data: {exc}") from None
    if len(val.class_names) != len(meta.class_names):
        raise ExportError(
            f"dataset {dataset!r} has {len(val.class_names)} classes, the checkpoint {len(meta.class_names)}"
        )
    val = val.subset(samples, seed=0)
    x = np.concatenate([
        preprocess([val.image(i) for i in range(s, min(s + PREPROCESS_CHUNK, len(val)))], meta.preprocessing)
        for s in range(0, len(val), PREPROCESS_CHUNK)
    ])

    def torch_run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return ParityData(x, val.labels, run_batched(torch_run, x, max_batch), dataset=str(dataset))


def _check_out(out: Path) -> None:
    """Refuse outputs that would clobber something that is not a bundle."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise ExportError(f"output {out} is a non-empty directory that is not a bundle; refusing to replace it")
    try:  # fail before the slow work if the bundle could not be written
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write bundle {out}: {exc.strerror or exc}") from None


def _make_readable(bundle: Path) -> None:
    """Temp files are created private (0600/0700); a bundle is read by a server that may run as another user."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(bundle, 0o777 & ~umask)
    for f in bundle.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _dataset_of(meta, dataset: str | None) -> str:  # noqa: ANN001
    name = dataset or meta.raw.get("dataset")
    if not name:
        raise ExportError(f"checkpoint {meta.path} records no 'dataset'; pass the dataset for parity images")
    return str(name)


def _build_one(ctx: ExportContext, target: Target, data: ParityData,
               tolerance: Tolerance | None, config: dict[str, Any]) -> dict[str, Any]:
    """Export one artifact, measure its parity, and return its manifest entry (files removed if refused)."""
    module = runtime_module(target.family)
    entry: dict[str, Any] = {"id": target.id, "runtime": target.runtime, "format": FORMATS[target.family],
                             "precision": target.precision, "files": []}
    before = set(ctx.workdir.iterdir())
    start = time.perf_counter()
    try:
        built = module.export(ctx, target.precision)
        entry["export_seconds"] = round(time.perf_counter() - start, 3)
        entry["runtime_version"] = module.version()
        entry.update(built.info)
        entry["files"] = file_entries(ctx.workdir, built.files)
        start = time.perf_counter()
        run = _load(target.family, built.files, config, built.info, ctx.threads)
        entry["parity"] = measure(run, data, target.precision, ctx.max_batch, tolerance)
        if "inference_precision" in built.info:  # which precision the numbers were measured at
            entry["parity"]["inference_precision"] = built.info["inference_precision"]
        entry["parity_seconds"] = round(time.perf_counter() - start, 3)
        failures = entry["parity"].get("failures", [])
    except Exception as exc:  # a converter or runtime crash refuses this artifact, not the whole bundle
        failures = [f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"]
        entry.setdefault("export_seconds", round(time.perf_counter() - start, 3))
    entry["servable"] = not failures
    entry["refused_reason"] = "; ".join(failures) or None
    if failures:  # a refused artifact never ships: its entry keeps the numbers and the reason
        for path in set(ctx.workdir.iterdir()) - before:
            if path.is_file():
                path.unlink()
        entry["refused_files"], entry["files"] = entry["files"], []
    return entry


def build_bundle(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    targets: Sequence[str] = ("onnx", "openvino"),
    *,
    name: str | None = None,
    max_batch: int = 32,
    parity_samples: int = 512,
    calibration_samples: int = 300,
    dataset: str | None = None,
    calibration_dataset: str | None = None,
    opset: int | None = None,
    tolerances: dict[str, Tolerance] | None = None,
    threads: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Export `checkpoint` to the bundle directory `out`; returns `out`. Raises ExportError on bad input.

    The torch artifact (safetensors + manifest config) is always included. Artifacts that fail their parity
    gate are listed with `servable: false` and a `refused_reason`, without files. Parity uses the `dataset`'s
    val split and INT8 calibration the train split of `calibration_dataset` (both default to the checkpoint's).
    `threads` caps the CPU threads of torch and the runtimes (on a shared machine 1 avoids oversubscription).
    """
    from export.onnx import OPSET
    from train.data import load_dataset

    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    wanted = parse_targets(["torch", *targets])
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise ExportError(f"max batch must be in 1..{MAX_BATCH_LIMIT}, got {max_batch}")
    if parity_samples < 1 or calibration_samples < 1:
        raise ExportError("parity and calibration sample counts must be positive")
    if any(t.family == "tensorrt" for t in wanted):
        runtime_module("tensorrt").require()
    _check_out(out)
    try:
        model, meta = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    data_name = _dataset_of(meta, dataset)
    with torch_threads(threads):
        data = parity_data(model, meta, data_name, parity_samples, max_batch)
        log(f"{meta.model}: parity on {len(data.x)} {data_name} val images, "
            f"torch top-1 {data.reference_accuracy:.2%}")
        try:
            with atomic_dir(out) as tmp:
                ctx = ExportContext(
                    model=model, meta=meta, workdir=tmp, max_batch=max_batch, opset=opset or OPSET,
                    calibration_set=lambda: load_dataset(calibration_dataset or data_name, "train"),
                    calibration_samples=calibration_samples, threads=threads,
                )
                if any(t.family != "torch" for t in wanted):
                    ctx.hub_onnx()  # shared by every runtime; timed once, outside the per-artifact times
                    log(f"torch -> ONNX (opset {ctx.opset}, dynamic batch): {ctx.timings['onnx_hub_seconds']:.1f}s")
                artifacts = []
                for target in wanted:
                    tolerance = (tolerances or {}).get(target.precision)
                    artifacts.append(_build_one(ctx, target, data, tolerance, meta.config.to_dict()))
                    log(summary_line(artifacts[-1]))
                shutil.rmtree(tmp / ".scratch", ignore_errors=True)
                write_manifest(tmp, _manifest(ctx, name or out.resolve().name, checkpoint, data_name, artifacts))
                _make_readable(tmp)
        except OSError as exc:
            raise ExportError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    return out


def _manifest(ctx: ExportContext, name: str, checkpoint: str | os.PathLike, dataset: str,
              artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest (schema in export/manifest.py) of a bundle whose artifacts are built."""
    meta, cfg = ctx.meta, ctx.meta.config
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "model": meta.model, "stem": cfg.stem.kind, "config": cfg.to_dict(),
        "class_names": list(meta.class_names),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channels": cfg.in_chans,
                  "height": cfg.image_size, "width": cfg.image_size, "min_batch": 1, "max_batch": ctx.max_batch},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, cfg.num_classes]},
        "preprocessing": meta.preprocessing.to_dict(),
        "source": {"checkpoint": str(checkpoint), "sha256": meta.weights_sha256, "dataset": dataset},
        "created": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "timings": ctx.timings,
        "artifacts": artifacts,
    }


def summary_line(entry: dict[str, Any]) -> str:
    """One progress line per artifact."""
    p = entry.get("parity")
    head = f"{entry['id']:<14} {entry.get('export_seconds', 0):6.1f}s"
    if p:
        head += (f"  max|err| {p['max_abs_err']:.2e}  agree {p['top1_agreement']:.2%}  acc {p['accuracy']:.2%}"
                 f" (torch {p['reference_accuracy']:.2%})")
    if entry["servable"]:
        return head + "  ok"
    return head + f"  REFUSED: {entry['refused_reason']}"
