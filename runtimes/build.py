"""What a runtime's `build` is handed by the export orchestrator (`ExportContext`) and gives back (`Built`), and the
helpers converters share. Torch and the quantiser are imported lazily: a serving install never loads this path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import resource
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from models.failures import disk_full
from models.preprocessing import preprocess
from runtimes.jsondata import json_data

if TYPE_CHECKING:
    from torch import nn

    from data.datasets import ImageSet, Readable
    from models.checkpoint import CheckpointMeta


class ExportError(ValueError):
    """A user-facing export failure: bad checkpoint, target, output path or missing runtime (CLI exit 2)."""


@dataclass
class Built:
    """What a runtime's `build` produced: the artifact's files (inside the bundle) and its manifest facts."""

    files: list[Path]
    info: dict[str, Any] = field(default_factory=dict)


def check_built(runtime: str, built: Any, workdir: Path | None = None) -> Built:
    """`built` as export keeps it (its info as plain JSON data: numpy scalars as Python numbers); TypeError or
    ValueError (one line naming `runtime` and what was expected) unless it is a `Built` whose files are a list of
    `pathlib.Path` and whose info is a dict of JSON data, the rule `describe()` follows. A file given as a str
    inside `workdir` (the bundle's temporary directory) is named relative to it."""
    # A plugin's build returning None, a tuple or a list of str went on to fail in the loader or the manifest
    # writer, with an AttributeError that blamed the Backend's load (or a traceback that took the export down).
    if not isinstance(built, Built):
        raise TypeError(f"{runtime} build returned {type(built).__name__}, expected runtimes.build.Built(files, info)")
    if not isinstance(built.files, list):
        raise TypeError(f"{runtime} build returned files as {type(built.files).__name__}, expected a list of "
                        "pathlib.Path (the artifact's files it wrote into ctx.workdir)")
    for i, path in enumerate(built.files):
        if not isinstance(path, Path):
            # The manifest keeps the reason, and the temporary directory is gone once the bundle is renamed.
            shown = path
            if workdir is not None and isinstance(path, str) and path.startswith(f"{workdir}{os.sep}"):
                shown = path[len(f"{workdir}{os.sep}"):]
            raise TypeError(f"{runtime} build returned files[{i}] as {type(path).__name__} {shown!r:.80}, expected "
                            "a pathlib.Path")
    if not isinstance(built.info, dict):
        raise TypeError(f"{runtime} build returned info as {type(built.info).__name__}, expected a dict")
    try:  # a numpy array, a Path or NaN crashed the manifest's writing after every gate, taking the export down
        info = json_data(built.info)
    except ValueError as exc:
        raise ValueError(f"{runtime} build returned info that is not JSON: {exc}") from None
    return Built(built.files, info)


def cause_in_chain(exc: BaseException | None, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first of `exc` and the errors behind it (its cause, else its context) that `match` accepts, if any:
    converters and runtimes often wrap a disk or memory error in their own exception types."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if match(exc):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def io_or_memory_cause(exc: BaseException) -> OSError | MemoryError | None:
    """The disk or memory error behind `exc`, if any."""
    # Returns the cause and prints nothing, unlike models.cli.machine_failure (which prints and gives an exit code).
    return cause_in_chain(exc, lambda e: isinstance(e, OSError | MemoryError))  # type: ignore[return-value]



# What a probe writes beyond the file that failed (room for the smaller files beside it, an IR's .xml): small, so a
# disk with room for the artifact is not taken for a full one.
PROBE_BYTES = 64 * 1024


def write_failure(directory: Path, size: int = 0, written: Sequence[Path] = ()) -> OSError | None:
    """The disk error behind a converter's failed write of `size` bytes into `directory`, if that was it, else None."""
    # `written`: the files written, the largest first. The error is a file of `written` at the file-size limit, or
    # `size` over it (EFBIG); or a probe write of `size` bytes (plus PROBE_BYTES) that fails now (ENOSPC, EDQUOT).
    # For converters whose write errors carry no errno (OpenVINO's C++ streams raise RuntimeError "basic_ios::clear:
    # iostream error", and delete what they wrote). The error names the file by its name alone (its directory is
    # the export's temporary one).
    name = written[0].name if written else None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        for path in written:
            with contextlib.suppress(OSError):
                if path.stat().st_size >= limit:
                    return OSError(errno.EFBIG, os.strerror(errno.EFBIG), path.name)
        if size >= limit:
            return OSError(errno.EFBIG, os.strerror(errno.EFBIG), name)
    probe_bytes = size + PROBE_BYTES
    if limit != resource.RLIM_INFINITY:
        probe_bytes = min(probe_bytes, limit - 1)  # past the limit SIGXFSZ kills the process
    probe = None
    try:
        # The probe runs with the export's own credentials, quota and reserved blocks, as the write did, and is
        # removed at once.
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            chunk = bytes(min(probe_bytes, 1 << 20))
            for offset in range(0, probe_bytes, len(chunk) or 1):
                f.write(chunk[:probe_bytes - offset])
            f.flush()
            os.fsync(f.fileno())  # a filesystem that allocates late reports ENOSPC here
    except OSError as exc:
        return OSError(exc.errno, exc.strerror, name) if disk_full(exc) else None
    finally:
        if probe is not None:
            with contextlib.suppress(OSError):
                os.unlink(probe)
    return None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence converters' stdout chatter and warnings (export's own progress lines say what happens)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def import_nncf() -> ModuleType:
    """Import NNCF without its torch backend's "no CUDA runtime" log line (irrelevant to ONNX/OpenVINO)."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import nncf

    return nncf


@dataclass
class ExportContext:
    """What the export orchestrator hands every runtime's `build` for one bundle."""

    model: nn.Module  # torch, eval mode
    meta: CheckpointMeta
    workdir: Path  # the bundle's temp directory (renamed into place at the end)
    max_batch: int
    opset: int
    calibration_set: Callable[[], ImageSet]  # lazily loaded TRAIN images
    calibration_samples: int = 300
    hub: Path | None = None  # the fp32 ONNX file the orchestrator exported, for runtimes that convert from it
    _calibration: Readable | None = None
    _calibration_fingerprint: str | None = None

    @property
    def scratch(self) -> Path:
        """Intermediate files (removed before the bundle is finalised)."""
        path = self.workdir / ".scratch"
        path.mkdir(exist_ok=True)
        return path

    @property
    def image_size(self) -> int:
        return self.meta.config.image_size

    def description(self) -> dict[str, str]:
        """What an artifact says about itself for a user handed the file alone (ONNX metadata_props, OpenVINO
        rt_info "vitc"): the model, its class names and preprocessing, as in the manifest (JSON strings), and the
        sha256 of the checkpoint weights it came from (the manifest's source.sha256)."""
        import json

        return {"model": self.meta.model, "class_names": json.dumps(list(self.meta.class_names)),
                "preprocessing": json.dumps(self.meta.preprocessing.to_dict(), sort_keys=True),
                "source_sha256": self.meta.weights_sha256}

    def artifact_description(self, target: str, precision: str, info: dict[str, Any]) -> dict[str, str]:
        """`description` plus what the artifact of `target` at `precision` is, as its manifest `info` records it: its
        id, precision and opset, and for INT8 its calibration and quantization scheme; the one source of ONNX
        metadata_props and OpenVINO rt_info, so the formats cannot drift. Nothing that changes from one export to
        the next (no time, no commit), so that exports stay byte-identical."""
        import json

        props = {**self.description(), "artifact": f"{target}-{precision}", "precision": precision,
                 "opset": str(info["opset"])}
        if "calibration" in info:
            props["calibration"] = json.dumps(info["calibration"], sort_keys=True)
        if "quantization" in info:
            props["quantization"] = info["quantization"]
        return props

    def hub_onnx(self) -> Path:
        """The fp32 ONNX hub; the orchestrator exports it before any runtime that needs it builds."""
        if self.hub is None:
            # Exported only when a wanted runtime declares it needs it: a build that forgot to worked by accident
            # beside the onnx target and was refused on its own.
            raise ExportError("no ONNX hub was exported for this bundle: a runtime whose build calls ctx.hub_onnx() "
                              "must declare needs_hub=True in its Runtime(...)")
        return self.hub

    def calibration_images(self) -> ImageSet:
        """A deterministic subset of the TRAIN split (never validation images) for INT8 calibration; files that do
        not decode are left out and counted, as training does; ExportError (one line) when none decodes."""
        if self._calibration is None:
            from data.datasets import DatasetError

            try:
                self._calibration = self.calibration_set().readable_subset(self.calibration_samples, seed=1)
            except DatasetError as exc:
                raise ExportError(f"calibration data: {exc}") from None
        return self._calibration.images

    def calibration_note(self) -> str:
        """", k unreadable files skipped" once the calibration images are drawn, else ""."""
        return "" if self._calibration is None else self._calibration.note()

    def calibration_batches(self) -> Iterator[np.ndarray]:
        """Calibration images one at a time as (1, 3, H, W) float32, preprocessed like the server does."""
        from data.datasets import DatasetError

        images = self.calibration_images()
        for i in range(len(images)):
            try:
                image = images.image(i)
            except DatasetError as exc:  # it decoded when it was drawn
                raise ExportError(f"calibration data: {exc} (it changed during the export)") from None
            yield preprocess([image], self.meta.preprocessing)

    def calibration_info(self) -> dict[str, Any]:
        """What the INT8 artifacts were calibrated on, for the manifest (fingerprint: the preprocessed images; the
        count of unreadable files left out to draw them, when there were any)."""
        images = self.calibration_images()
        if self._calibration_fingerprint is None:
            h = hashlib.sha256()
            for batch in self.calibration_batches():
                h.update(np.ascontiguousarray(batch, "<f4").tobytes())
            self._calibration_fingerprint = h.hexdigest()
        info = {"dataset": images.name, "split": images.split, "samples": len(images),
                "fingerprint": self._calibration_fingerprint}
        if self._calibration is not None and self._calibration.skipped:
            info["unreadable_skipped"] = len(self._calibration.skipped)
        return info

    @property
    def calibration_fingerprint(self) -> str | None:
        """The calibration images' fingerprint once an INT8 build has used them, else None."""
        return self._calibration_fingerprint
