"""Which Triton releases load vitc's exports: the oldest one (MIN_TRITON_RELEASE, the InferenceService's default),
and what each runtime declares beyond it: `Runtime.triton_min_check` (what that release reads of its artifacts) and
`Runtime.triton_release` (artifacts that load only in some releases, as TensorRT's engines). export.triton checks a
repository's models against the release its InferenceService runs with these; export.kserve names the release.
"""

from __future__ import annotations

import re
from pathlib import Path

import runtimes
from models.bundle import Artifact
from runtimes.base import TritonRelease

# The oldest Triton that loads what vitc exports (build.py of each release): up to 24.04 its onnxruntime (1.17)
# reads ONNX IR 9 at most, the exports are IR 10; before 24.02 its OpenVINO (2023.0) lacks opset13, which the IRs'
# ScaledDotProductAttention is. What this release reads is each runtime's `triton_min_check`.
MIN_TRITON_RELEASE = "24.05"
TRITON_TAG = re.compile(r"([0-9]{2})\.([0-9]{2})(-[a-z0-9][a-z0-9._-]{0,100})?")  # an nvcr.io tritonserver tag


def release(tag: str) -> tuple[int, int]:
    """(year, month) of a Triton tag (YY.MM[-suffix], checked by the caller)."""
    year, month = tag.partition("-")[0].split(".")
    return int(year), int(month)


def beyond_min_triton(version_dir: Path, artifact: Artifact) -> str | None:
    """Why the oldest supported Triton cannot load this artifact's staged files (a newer exporter wrote them);
    None when it can, as far as the files tell."""
    return runtimes.get(artifact.runtime).triton_min_check(version_dir, artifact)


def release_rules(artifact: Artifact) -> TritonRelease | None:
    """How the Triton release decides whether it loads this artifact (None: every release from the oldest on does)."""
    return runtimes.get(artifact.runtime).triton_release
