"""Open an artifact as a Backend: pick it from the manifest, verify its files, load it, prove it answers (a warm-up
batch, then the bundle's golden inputs: the artifact must reproduce what it computed for them at export, or else
torch's logits within its parity tolerance).

The server, the benchmarks and the export's parity gate all come through `open_artifact`, so the numbers the
manifest records are measured on the code that serves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy

from models.bundle import (
    GOLDEN_DIGESTS,
    GOLDEN_FILE,
    MAX_ARTIFACTS,
    MAX_GOLDEN_BYTES,
    NAME_RE,
    PRECISION_ORDER,
    Artifact,
    BundleError,
    Golden,
    Manifest,
    verify_file,
    verify_files,
)
from models.failures import memory_failure
from models.io import read_zip_end
from models.preprocessing import normalize
from models.tolerance import TOLERANCES
from runtimes import registry
from runtimes.base import (
    Backend,
    BackendError,
    BackendOptions,
    LoadSpec,
    Runtime,
    check_backend,
    check_logits,
    description,
    first_line,
    inference_error,
    plugin_fault,
)

# MAX_GOLDEN_BYTES (models.bundle) bounds the golden file and its arrays before they are allocated.
_NPY_HEADER_LIMIT = 10_000  # numpy's own default for untrusted headers
log = logging.getLogger("vitc.runtimes")  # the server routes "vitc" and its children through its JSON log


def select(manifest: Manifest, runtime: Runtime, precision: str | None = None, device: str | None = None
           ) -> Artifact:
    """The servable artifact the runtime would open (its own, or its fallback's); raises BundleError."""
    # With `device`, its own artifacts that this machine cannot run there (`Runtime.mismatch`: a TensorRT engine
    # built for another GPU or TensorRT) are passed over: for the next one it can run, else for the fallback (with a
    # warning naming why). An artifact asked for by a precision the fallback lacks, or in a bundle without the
    # fallback, is still returned: its load then refuses it with the reason.
    fallback_fits = runtime.fallback is not None and precision in (None, runtime.fallback[1])
    try:
        chosen = manifest.select(runtime.name, precision, registry.names())
    except BundleError:
        if not fallback_fits:
            raise
        return manifest.select(*runtime.fallback, registry.names())
    if device is None:
        return chosen
    order = {p: i for i, p in enumerate(PRECISION_ORDER)}
    own = sorted((a for a in manifest.servable(runtime.name) if precision in (None, a.precision)),
                 key=lambda a: order.get(a.precision, len(order)))
    reasons = {}
    for artifact in own:
        if (reason := runtime.mismatch(artifact, device)) is None:
            if reasons:  # another precision than the one that would have opened: say so, as for the fallback
                _passed_over(runtime.name, device, artifact.id, reasons)
            return artifact
        reasons[artifact.id] = reason
    if not fallback_fits:
        return chosen
    try:
        fallback = manifest.select(*runtime.fallback, registry.names())
    except BundleError:
        return chosen
    _passed_over(runtime.name, device, fallback.id, reasons)
    return fallback


def _passed_over(runtime: str, device: str, opened: str, reasons: dict[str, str]) -> None:
    """Warn that `opened` runs instead of the artifacts `reasons` names (artifact id -> why not here)."""
    reason = "; ".join(reasons.values())
    log.warning("%s on %s opens %r instead of the bundle's %s: %s", runtime, device, opened,
                ", ".join(map(repr, reasons)), reason,
                extra={"runtime": runtime, "device": device, "passed_over": list(reasons), "reason": reason,
                       "opened": opened})


def open_backend(bundle: str | os.PathLike, manifest: Manifest, runtime: str, precision: str | None = None,
                 options: BackendOptions | None = None, timings: dict[str, float] | None = None) -> Backend:
    """Select the servable artifact, verify its sha256, load it, warm it up and prove its golden inputs."""
    # `timings`, when given, receives the seconds of each step: verify, load, warm_up, golden.
    # A path passed where the manifest goes failed with "'str' object has no attribute 'select'".
    if not isinstance(manifest, Manifest):
        raise TypeError(f"manifest must be a models.bundle.Manifest (models.bundle.read_manifest(bundle)), got "
                        f"{type(manifest).__name__}")
    if options is not None and not isinstance(options, BackendOptions):
        raise TypeError(f"options must be a runtimes.BackendOptions, got {type(options).__name__}")
    options = options or BackendOptions()
    timings = {} if timings is None else timings
    start = time.perf_counter()
    rt = registry.pick(runtime)  # what a failed plugin claimed is refused, not opened by the runtime that has it
    rt.require(options.device)
    artifact = select(manifest, rt, precision, options.device)
    files = verify_files(bundle, artifact)
    timings["verify"] = time.perf_counter() - start
    backend = open_artifact(rt, LoadSpec(manifest, artifact, tuple(files), options), where=str(bundle),
                            timings=timings)
    start = time.perf_counter()
    try:
        check_golden(backend, bundle, manifest, artifact, options.inference_precision)
    except BaseException as exc:
        backend.close()
        if plugin_fault(exc):
            raise _load_failure(rt.name, artifact.id, str(bundle), "golden inputs", exc) from exc
        raise
    timings["golden"] = time.perf_counter() - start
    return backend


def _load_failure(runtime: str, artifact_id: str, where: str, step: str, exc: BaseException) -> Exception:
    """What a fault of the backend during a load `step` (its warm-up, its golden inputs) becomes: one BackendError
    line naming the runtime and the artifact, whatever the runtime raised (MemoryError for the machine's memory)."""
    # A plugin's infer raised its own ValueError here unwrapped: a traceback at the server's start, a hot reload's
    # 500, a bare multi-line exception from open_backend. A built-in backend's errors are BackendErrors already.
    if not isinstance(exc, BackendError):
        exc = inference_error(runtime, exc)
        if isinstance(exc, MemoryError):
            return exc
    return BackendError(f"{runtime} cannot load {artifact_id!r}{' from ' + where if where else ''}: {step}: "
                        f"{first_line(exc)}")


def check_golden(backend: Backend, bundle: str | os.PathLike, manifest: Manifest, artifact: Artifact,
                 compute: str | None = None) -> None:
    """The artifact must reproduce the bundle's golden inputs (see `verify_golden`), or BackendError."""
    # This is what makes a loaded artifact trustworthy on this machine (another CPU, GPU or library build), not
    # only on the one that exported it. Bundles exported before golden inputs existed skip it (`check_pre_golden`
    # tells them from a manifest whose golden record was deleted by hand).
    if (path := check_manifest(bundle, manifest, [artifact.id])) is None:
        return
    pixels, reference = read_golden(path, manifest)
    own = read_golden_outputs(path, manifest, artifact.id)
    verify_golden(backend, normalize(pixels, manifest.preprocessing), reference, artifact, own, compute,
                  manifest.input.max_batch)


def check_manifest(bundle: str | os.PathLike, manifest: Manifest, artifact_ids: list[str],
                   what: str = "golden inputs") -> Path | None:
    """Check what a server checks before it trusts the manifest of `artifact_ids`; the golden file's path or None."""
    # BundleError (one line) on a failure; None: no golden record. Without a golden record: that the manifest can
    # be one from before golden inputs existed (`check_pre_golden`).
    if manifest.golden is None:
        check_pre_golden(bundle, manifest)
        return None
    path = verify_file(bundle, manifest.golden.file, what)  # as the artifact's files (and the report) are
    # The golden file's sha256 (a mismatch names it `what`), then the model contract and those artifacts' records
    # against what it recorded at export.
    check_contract(path, manifest)
    if edited := check_records(path, manifest, artifact_ids):
        raise BundleError(next(iter(edited.values())))
    return path




def check_pre_golden(bundle: str | os.PathLike, manifest: Manifest) -> None:
    """BundleError when a manifest without a golden record cannot be one exported before golden inputs existed."""
    # Provenance and golden.npz came in the same commit (d0d913b) and every export since writes both in one step,
    # so provenance without a golden record, or a golden.npz the manifest does not list, is a record deleted by
    # hand: deleting it would otherwise turn off every check of the contract, the records and the golden logits.
    why = None
    if manifest.provenance is not None:
        why = "it has provenance but no golden record (every export that records one records the other)"
    elif os.path.lexists(Path(bundle) / GOLDEN_FILE):
        why = f"{GOLDEN_FILE} is present but the manifest does not list it (its golden record was removed)"
    if why is not None:
        raise BundleError(f"manifest.json was edited after export: {why}; restore it or re-export")


def golden_outputs(backend: Backend, x: np.ndarray, max_batch: int, classes: int | None = None) -> np.ndarray:
    """The backend's logits for the golden inputs, batched the way `verify_golden` runs them, each batch checked
    as the server checks it (`check_logits`: a masked array is refused, not judged on the values it hides; with
    `classes`, float32 logits of shape (rows, classes), as every served batch must be)."""
    # Without `classes` integer logits passed here and were refused as numbers that "differ from its own at export".
    step = max(1, min(max_batch, backend.max_batch))
    batches = [x[i:i + step] for i in range(0, len(x), step)]
    return np.concatenate([np.asarray(check_logits(backend.infer(b), len(b), classes), np.float32)
                           for b in batches])


def verify_golden(backend: Backend, x: np.ndarray, reference: np.ndarray, artifact: Artifact,
                  own: np.ndarray | None = None, compute: str | None = None, max_batch: int = 1024) -> None:
    """Run the golden inputs `x` and raise BackendError unless the artifact reproduces them."""
    # Export runs this very check on every artifact before it calls it servable, and every load runs it again, so a
    # bundle export certifies loads on the machine that exported it. The two used to disagree: export gates an
    # artifact over the whole parity set (e.g. INT8: >= 80 % top-1 agreement over 512 images), while the load
    # judged accuracy again on only the 8 golden images, where one flipped near-tie is 12.5 points: an INT8
    # artifact with 87.5 % agreement was certified, then refused by its own server at 75 %. Eight images cannot
    # re-judge accuracy; they can tell whether this is still the artifact that was measured.
    y = golden_outputs(backend, x, max_batch, reference.shape[1] if reference.ndim == 2 else None)
    if y.shape != reference.shape or not np.isfinite(y).all():
        raise BackendError(f"{artifact.id!r} does not reproduce the bundle's {len(x)} golden inputs on this "
                           f"machine: outputs of shape {y.shape} are not finite logits of shape {reference.shape}")
    tol = dict((artifact.parity.tolerance if artifact.parity else {}) or {})
    lowered = (compute in TOLERANCES and artifact.precision in PRECISION_ORDER
               and PRECISION_ORDER.index(compute) > PRECISION_ORDER.index(artifact.precision))
    failures = []
    # `own` (what this artifact computed for the golden inputs at export, kept in golden.npz): the outputs must
    # match it within the artifact's batch-invariance bound, the noise export already accepted between one batch
    # composition and another. Then export's parity numbers hold here too, and the artifact is trusted.
    if own is not None and own.shape == y.shape and not lowered:
        default = asdict(TOLERANCES.get(artifact.precision, TOLERANCES["fp32"]))
        atol = tol.get("batch_atol") if tol.get("batch_atol") is not None else default["batch_atol"]
        rtol = tol.get("batch_rtol") if tol.get("batch_rtol") is not None else default["batch_rtol"]
        bound = atol + rtol * float(np.abs(own).max())
        err = float(np.abs(y - own).max())
        if err <= bound:
            return
        failures.append(f"its logits differ from its own at export by {err:.3g} > {bound:.3g}")
    # Otherwise (bundles exported before artifacts recorded their outputs, another machine whose kernels round
    # differently, or a backend asked to compute below the artifact's precision, `compute`, e.g. OpenVINO bf16 on
    # an fp32 IR): torch's logits within the artifact's parity tolerance, or that lower precision's.
    if lowered:
        tol = asdict(TOLERANCES[compute])
    agreement = float((y.argmax(1) == reference.argmax(1)).mean())
    torch_failures = []
    if agreement < (tol.get("min_top1_agreement") or 0.0):
        torch_failures.append(f"top-1 agreement with torch {agreement:.0%} < {tol['min_top1_agreement']:.0%}")
    if tol.get("atol") is not None:
        bound = tol["atol"] + (tol.get("rtol") or 0.0) * float(np.abs(reference).max())
        err = float(np.abs(y - reference).max())
        if err > bound:
            torch_failures.append(f"max logit error vs torch {err:.3g} > {bound:.3g}")
    if torch_failures:
        raise BackendError(f"{artifact.id!r} does not reproduce the bundle's {len(x)} golden inputs on this "
                           f"machine: {'; '.join(failures + torch_failures)}")


def golden_layout(manifest: Manifest) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Array name -> (dtype, shape) of the golden .npz: uint8 (n, H, W, 3) pixels before normalisation (what
    preprocessing's `to_uint8` gives), float32 (n, classes) logits."""
    n, spec = manifest.golden.samples, manifest.input
    return {"pixels": (np.dtype(np.uint8), (n, spec.height, spec.width, 3)),
            "logits": (np.dtype(np.float32), (n, manifest.output.classes))}


def read_golden(path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, logits) of the golden .npz; each array's .npy header is checked against the manifest before the
    array is allocated, and nothing is unpickled. Raises BundleError (one line)."""
    golden: Golden = manifest.golden
    layout = golden_layout(manifest)
    need = sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in layout.values())
    fail = f"golden inputs {golden.file.path!r}"
    try:
        if need > MAX_GOLDEN_BYTES:
            raise BundleError(f"{golden.samples} samples need {need:,} bytes, more than the {MAX_GOLDEN_BYTES:,} "
                              "allowed")
        with _golden_zip(path) as z:
            arrays = [_read_member(z, name, dtype, shape) for name, (dtype, shape) in layout.items()]
    except BundleError as exc:
        raise BundleError(f"{fail}: {exc}; re-export the bundle") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, EOFError, OSError,
            NotImplementedError, RuntimeError) as exc:  # not a zip, truncated, corrupt, compressed or encrypted oddly
        raise BundleError(f"{fail} are unreadable ({type(exc).__name__}: {first_line(exc)[:200]}); "
                          "re-export the bundle") from None
    pixels, logits = arrays
    if not np.isfinite(logits).all():  # NaN reference logits would make every comparison pass
        raise BundleError(f"{fail}: the reference logits are not finite; re-export the bundle")
    return pixels, logits


# golden.npz: CONTRACT_KEY, the manifest's contract_sha256 at export, 32 bytes; ORIGIN_KEY, its origin_sha256 (source
# and provenance); `RECORD_KEY.<artifact id>`, that artifact's record_sha256 (each 32 bytes).
CONTRACT_KEY, ORIGIN_KEY, RECORD_KEY = GOLDEN_DIGESTS
# The digests an export that writes one always writes too (the order they came in: the contract, then the origin
# with the records): a bundle that shows it was exported with one must hold these as well.
_WRITTEN_WITH = {RECORD_KEY: (ORIGIN_KEY, CONTRACT_KEY), ORIGIN_KEY: (CONTRACT_KEY,), CONTRACT_KEY: ()}


def required_digests(path: Path, manifest: Manifest) -> dict[str, str]:
    """The digests (CONTRACT_KEY, ORIGIN_KEY, RECORD_KEY: one array per artifact) the golden file must hold, each
    with what in the bundle shows that the vitc which exported it writes that digest."""
    # check_pre_golden's ratchet, per array: a missing digest means "exported before it existed" only when nothing
    # in the bundle postdates it; otherwise it was deleted by hand (and the manifest edited), which would turn its
    # check off. Each array's evidence: the golden record listing it (`Golden.digests`), the parity intervals
    # (98d35ca, after both), the sources (dad9ae7, after the contract) and the records (written with the origin).
    with _golden_zip(path) as z:
        names = z.namelist()
    required = {d: f"the manifest's golden record lists {d!r}" for d in manifest.golden.digests}
    if any(a.parity is not None and a.parity.accuracy_delta_ci95 is not None for a in manifest.artifacts):
        for d in (CONTRACT_KEY, ORIGIN_KEY):
            required.setdefault(d, "its parity records carry accuracy_delta_ci95")
    if any(n.startswith(RECORD_KEY + ".") for n in names):
        required.setdefault(ORIGIN_KEY, "it holds artifact records")
    if any(n.startswith((RECORD_KEY + ".", ORIGIN_KEY + ".", SOURCE_KEY + ".")) for n in names):
        required.setdefault(CONTRACT_KEY, "it holds the digests or sources that came after the contract")
    # Transitive: a list naming "record" alone (the origin and contract arrays deleted with it) still requires them.
    for digest, evidence in list(required.items()):
        for implied in _WRITTEN_WITH[digest]:
            required.setdefault(implied, evidence)
    return required


def _deleted(manifest: Manifest, key: str, evidence: str) -> str:
    """The refusal of a golden file without the `key` digest, which `evidence` shows its export wrote."""
    return (f"{manifest.golden.file.path} was edited after export: it holds no {key!r} array, yet {evidence} (every "
            "export that writes that writes it too); restore the bundle or re-export")


def check_contract(path: Path, manifest: Manifest) -> None:
    """BundleError when the manifest's model contract (class names, preprocessing, config, tensors) is not the one
    the golden file recorded at export; bundles exported before that record (`required_digests`) pass."""
    recorded = _optional_member(path, manifest, CONTRACT_KEY, np.dtype(np.uint8), (32,))
    if recorded is None and (evidence := required_digests(path, manifest).get(CONTRACT_KEY)):
        raise BundleError(_deleted(manifest, CONTRACT_KEY, evidence))
    if recorded is not None and recorded.tobytes().hex() != manifest.contract:
        raise BundleError("manifest.json was edited after export: its class names, preprocessing, config or tensors "
                          f"differ from what {manifest.golden.file.path!r} recorded; restore it or re-export")



def check_records(path: Path, manifest: Manifest, artifact_ids: list[str]) -> dict[str, str]:
    """What was edited after export, by artifact id ("" for the source and provenance): each artifact record
    (parity numbers and gate, runtime, precision, ...) and the origin against what the golden file recorded.
    Bundles exported before that record (`required_digests`) pass; BundleError when the golden file itself is
    unreadable."""
    digest = np.dtype(np.uint8), (32,)
    edited = {}
    required = required_digests(path, manifest)
    recorded = _optional_member(path, manifest, ORIGIN_KEY, *digest)
    if recorded is None and (evidence := required.get(ORIGIN_KEY)):
        edited[""] = _deleted(manifest, ORIGIN_KEY, evidence)
    if recorded is not None and recorded.tobytes().hex() != manifest.origin:
        edited[""] = "manifest.json was edited after export: its source or provenance differs from what the golden " \
                     "file recorded; restore it or re-export"
    # A golden file with an origin, or one whose export wrote one or the records, records every artifact: none may
    # go without.
    sealed = recorded is not None or "" in edited or RECORD_KEY in required
    if sealed:  # and every artifact it records is listed (one removed would let a server fall back to another)
        listed = {a.id for a in manifest.artifacts}
        with _golden_zip(path) as z:
            recorded_ids = [n[len(RECORD_KEY) + 1:-4] for n in z.namelist()
                            if n.startswith(RECORD_KEY + ".") and n.endswith(".npy")]
        for gone in sorted(set(recorded_ids) - listed):
            edited[gone] = (f"manifest.json was edited after export: artifact {gone!r}, which the golden file records, "
                            "is not listed (removed); restore it or re-export")
    for artifact_id in artifact_ids:
        recorded = _optional_member(path, manifest, f"{RECORD_KEY}.{artifact_id}", *digest)
        if recorded is None and sealed:
            edited[artifact_id] = (f"manifest.json was edited after export: the golden file records no artifact "
                                   f"{artifact_id!r} (renamed or added, or its record deleted); restore it or "
                                   "re-export")
        elif recorded is not None and recorded.tobytes().hex() != manifest.record(artifact_id):
            edited[artifact_id] = (f"manifest.json was edited after export: artifact {artifact_id!r} (its parity "
                                   "numbers, gate, runtime or precision) differs from what the golden file recorded; "
                                   "restore it or re-export")
    return edited


SOURCE_KEY = "source"  # golden.npz: `source.<i>`, golden input i as decoded before preprocessing (L or RGB)
MAX_SOURCE_SIDE = 512  # sources larger than this are not kept (export) nor read (load): 8 of them stay under 6 MB


def _source_shape(shape: tuple[int, ...]) -> bool:
    """A decoded grey (H, W) or RGB (H, W, 3) image of at most MAX_SOURCE_SIDE a side."""
    return len(shape) in (2, 3) and all(1 <= d <= MAX_SOURCE_SIDE for d in shape[:2]) and shape[2:] in ((), (3,))


def preprocessing_drift(bundle: str | os.PathLike, manifest: Manifest) -> dict[str, Any] | None:
    """How this machine's preprocessing (its Pillow) differs from the export's on the golden inputs' sources: None
    when it gives the same pixels (or the bundle keeps no sources), else the largest difference in levels and how
    many pixels differ. The golden check cannot see it: it replays pixels already preprocessed."""
    from PIL import Image

    from models.preprocessing import to_uint8

    if manifest.golden is None:
        return None
    path = Path(bundle).resolve() / manifest.golden.file.path
    pixels, _ = read_golden(path, manifest)
    worst, differing = 0, 0
    with _golden_zip(path) as z:
        for i in range(len(pixels)):
            if f"{SOURCE_KEY}.{i}.npy" not in z.namelist():
                continue
            source = _read_member(z, f"{SOURCE_KEY}.{i}", np.dtype(np.uint8), None, fits=_source_shape)
            here = to_uint8(Image.fromarray(source), manifest.preprocessing).astype(np.int16)
            delta = np.abs(here - pixels[i].astype(np.int16))
            worst, differing = max(worst, int(delta.max())), differing + int(np.count_nonzero(delta))
    return {"max_levels": worst, "pixels": differing} if worst else None


def own_outputs_key(artifact_id: str) -> str:
    """The golden.npz array holding what artifact `artifact_id` computed for the golden inputs at export."""
    return f"outputs.{artifact_id}"


def read_golden_outputs(path: Path, manifest: Manifest, artifact_id: str) -> np.ndarray | None:
    """What the artifact computed for the golden inputs at export (float32 (n, classes)), or None when the bundle
    predates that record; checked like `read_golden`. Raises BundleError (one line)."""
    dtype, shape = golden_layout(manifest)["logits"]
    own = _optional_member(path, manifest, own_outputs_key(artifact_id), dtype, shape)
    if own is not None and not np.isfinite(own).all():
        raise BundleError(f"golden inputs {manifest.golden.file.path!r}: the outputs recorded for {artifact_id!r} "
                          "are not finite; re-export the bundle")
    return own


def golden_arrays(path: Path, manifest: Manifest, artifact_id: str) -> dict[str, np.ndarray]:
    """The arrays of the golden .npz that a bundle of artifact `artifact_id` alone keeps (pixels, logits, the
    contract and origin digests, the sources, and that artifact's own outputs and record), each read and checked as
    a server reads it: what export.triton copies into a version directory. Raises BundleError (one line)."""
    pixels, logits = read_golden(path, manifest)
    arrays = {"pixels": pixels, "logits": logits}
    digest = np.dtype(np.uint8), (32,)
    for name in (CONTRACT_KEY, ORIGIN_KEY, f"{RECORD_KEY}.{artifact_id}"):
        if (value := _optional_member(path, manifest, name, *digest)) is not None:
            arrays[name] = value
    if (own := read_golden_outputs(path, manifest, artifact_id)) is not None:
        arrays[own_outputs_key(artifact_id)] = own
    for i in range(len(pixels)):
        name = f"{SOURCE_KEY}.{i}"
        if (source := _optional_member(path, manifest, name, np.dtype(np.uint8), None, _source_shape)) is not None:
            arrays[name] = source
    return arrays


def _optional_member(path: Path, manifest: Manifest, name: str, dtype: np.dtype, shape: tuple[int, ...] | None,
                     fits: Callable[[tuple[int, ...]], bool] | None = None) -> np.ndarray | None:
    """One array of the golden .npz that older bundles lack (None then), checked like `read_golden`."""
    fail = f"golden inputs {manifest.golden.file.path!r}"
    try:
        with _golden_zip(path) as z:
            if f"{name}.npy" not in z.namelist():
                return None
            return _read_member(z, name, dtype, shape, fits)
    except BundleError as exc:
        raise BundleError(f"{fail}: {exc}; re-export the bundle") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, ValueError, EOFError, OSError,
            NotImplementedError, RuntimeError) as exc:
        raise BundleError(f"{fail} are unreadable ({type(exc).__name__}: {first_line(exc)[:200]}); "
                          "re-export the bundle") from None


# pixels, logits, the contract, the origin, each artifact's outputs and record, and the sources of the (at most 16)
# golden inputs
MAX_GOLDEN_MEMBERS = 2 * MAX_ARTIFACTS + 4 + 16
MAX_GOLDEN_DIRECTORY = MAX_GOLDEN_MEMBERS * (46 + 128)  # bytes of central directory: a header and a name an entry
# Every array a golden file holds, in what this and every earlier vitc wrote (pixels and logits, then the artifacts'
# outputs, the contract, the sources, the origin and the artifacts' records); nothing else is read past: any other
# member makes the file corrupt for every reader alike (serve and export.report read only these, export.triton
# copies only these).
_GOLDEN_MEMBER = re.compile(r"(?:pixels|logits|contract|origin|(?:outputs|record)\.(?P<id>.+)"
                            r"|source\.(?:0|[1-9][0-9]{0,3}))\.npy")


def _golden_zip(path: Path) -> zipfile.ZipFile:
    """The golden .npz opened once its size and its number of entries (from the end-of-central-directory record,
    before zipfile reads the directory: 1.5 million empty entries took 30 s and 0.9 GB) are within bounds."""
    size = path.stat().st_size
    if size > MAX_GOLDEN_BYTES:
        raise BundleError(f"the file is larger than {MAX_GOLDEN_BYTES >> 20} MiB")
    with path.open("rb") as f:
        end = read_zip_end(f)
    if end is not None:
        # The classic record's count and size (what zipfile reads, whatever the count says); 0xFFFF... (zip64) too.
        entries, directory = end.classic_entries, end.classic_directory
        if entries > MAX_GOLDEN_MEMBERS or directory > MAX_GOLDEN_DIRECTORY:
            raise BundleError(f"its zip directory holds {entries:,} entries in {directory:,} bytes, at most "
                              f"{MAX_GOLDEN_MEMBERS} entries in {MAX_GOLDEN_DIRECTORY:,} bytes expected")
        if end.zip64:  # a zip64 locator: zipfile would trust its sizes instead
            raise BundleError("it is a zip64 archive, which no golden file needs")
    z = zipfile.ZipFile(path)  # (no record: zipfile says what is wrong)
    try:
        _check_members(z.namelist())
    except BaseException:
        z.close()
        raise
    return z


def _check_members(names: list[str]) -> None:
    """BundleError unless every member is a golden array (`_GOLDEN_MEMBER`), each once."""
    seen = set()
    for name in names:
        m = _GOLDEN_MEMBER.fullmatch(name)
        if m is None or (m["id"] is not None and NAME_RE.fullmatch(m["id"]) is None):
            raise BundleError(f"it holds {name!r:.80}, which is no golden array (vitc writes pixels, logits, contract, "
                              "origin, source.<i>, outputs.<artifact> and record.<artifact>)")
        if name in seen:
            raise BundleError(f"it holds {name!r:.80} twice")
        seen.add(name)


def _read_member(z: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...] | None,
                 fits: Callable[[tuple[int, ...]], bool] | None = None) -> np.ndarray:
    """One `name.npy` of the archive, its header (dtype, order, and `shape`, or a shape `fits` accepts) checked
    before its data is read."""
    member = f"{name}.npy"
    if member not in z.namelist():
        raise BundleError(f"no {name!r} array")
    with z.open(member) as f:
        version = npy.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise BundleError(f"array {name!r}: unsupported .npy version {version}")
        read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        got_shape, fortran, got_dtype = read_header(f, max_header_size=_NPY_HEADER_LIMIT)
        if fits is not None and fits(tuple(got_shape)):
            shape = tuple(got_shape)
        if got_dtype.hasobject or got_dtype.newbyteorder("=") != dtype or fortran or tuple(got_shape) != shape:
            raise BundleError(f"array {name!r} is {got_dtype}{list(got_shape)}"
                              f"{' (Fortran order)' if fortran else ''}, expected {dtype}"
                              f"{list(shape) if shape is not None else ' of another shape'}")
        size = dtype.itemsize * int(np.prod(shape))
        data = f.read(size + 1)  # one byte more: trailing data is corruption too
    if len(data) != size:
        raise BundleError(f"array {name!r} holds {len(data)} bytes of data, expected {size}")
    return np.frombuffer(data, got_dtype).reshape(shape).astype(dtype, copy=False)


def open_artifact(runtime: Runtime, spec: LoadSpec, where: str = "", timings: dict[str, float] | None = None
                  ) -> Backend:
    """`runtime.load(spec)` with its errors as one BackendError line, then a warm-up that checks the output."""
    timings = {} if timings is None else timings
    start = time.perf_counter()
    try:
        backend = runtime.load(spec)
    except (BackendError, BundleError):
        raise
    except Exception as exc:  # runtimes raise their own types; the caller needs one readable line
        if (failure := memory_failure(exc)) is not None:  # the machine, not the artifact (a start exits 1, not 2)
            # The runtime's words stay: "Resource temporarily unavailable" is a thread that could not start.
            raise MemoryError(f"out of memory loading {spec.artifact.id!r} on {runtime.name}: "
                              f"{first_line(failure)}") from exc
        raise BackendError(f"{runtime.name} cannot load {spec.artifact.id!r}"
                           f"{' from ' + where if where else ''}: {first_line(exc)}") from exc
    try:
        check_backend(backend)
        description(backend, runtime.name)  # JSON data, or refused now rather than a listing that answers 500
    except Exception as exc:  # refused here, once: export then refuses the artifact, a server start exits 2
        with contextlib.suppress(Exception):
            backend.close()
        if not plugin_fault(exc):  # the machine's memory or threads (as `description` passes them on): exit 1
            raise
        why = str(exc) if isinstance(exc, BackendError) else \
            f"reading its Backend's attributes raised {type(exc).__name__}: {first_line(exc)}"
        raise BackendError(f"{runtime.name} cannot load {spec.artifact.id!r}"
                           f"{' from ' + where if where else ''}: {why}") from None
    timings["load"] = time.perf_counter() - start
    if spec.manifest.golden is not None and spec.artifact.servable:
        return backend  # the golden inputs that follow warm it up and check its outputs (one inference fewer)
    start = time.perf_counter()
    try:
        warm_up(backend, spec)
    except BaseException as exc:
        backend.close()
        if plugin_fault(exc):
            raise _load_failure(runtime.name, spec.artifact.id, where, "warm-up on one image", exc) from exc
        raise
    timings["warm_up"] = time.perf_counter() - start
    return backend


def warm_up(backend: Backend, spec: LoadSpec) -> None:
    """One batch-1 inference (first-call allocations happen now) whose output must be (1, classes) float32."""
    check_logits(backend.infer(np.zeros((1, *spec.manifest.input.sample_shape), np.float32)), 1, spec.num_classes)
