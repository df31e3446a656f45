"""What a bundle records about where it came from (`models.bundle.Provenance`), gathered at export time."""

from __future__ import annotations

import hashlib
import json
import platform

import runtimes
from export.parity import ParityData
from models.bundle import Provenance, check_runtime_version
from models.checkpoint import CheckpointMeta, TrainingRecord
from models.host import distribution_versions, source_revision, vitc_version

# Libraries beside the runtimes (whose versions each runtime reports itself) that shape an exported artifact.
LIBRARIES = ("onnx", "onnxscript", "nncf", "numpy", "pillow", "safetensors", "onnxruntime-gpu")


def gather(meta: CheckpointMeta, parity: ParityData, calibration_fingerprint: str | None) -> Provenance:
    """The provenance of a bundle exported now from `meta`, gated on `parity`, calibrated (INT8) on what printed
    as `calibration_fingerprint`."""
    training = meta.training or TrainingRecord()
    revision = source_revision()
    libraries = {"python": platform.python_version()}
    for rt in runtimes.runtimes():
        if rt.installed():
            try:
                libraries[rt.name] = check_runtime_version(rt.name, rt.version())
            except Exception:  # noqa: BLE001 - a runtime that cannot say its version (as text) is left out, not fatal
                continue
    return Provenance(
        vitc_version=vitc_version(), git_commit=revision["commit"], git_dirty=revision["dirty"],
        training_command=training.command_line,
        training_config_sha256=hashlib.sha256(json.dumps(training.config, sort_keys=True).encode()).hexdigest()
        if training.config else None,
        training_data_fingerprint=training.data.get("train"),
        parity_data_fingerprint=parity.fingerprint(), calibration_data_fingerprint=calibration_fingerprint,
        libraries={**libraries, **distribution_versions(LIBRARIES)},
    )
