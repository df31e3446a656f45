"""Checkpoint -> bundle: every requested artifact built by its runtime, parity-checked through the Backend that
serves it, and described in `manifest.json` (the contract in models/bundle.py).

The bundle is built in a temp directory and renamed into place, so a failure at any point leaves no partial
bundle behind (and an older bundle at `out` stays intact). Only a bundle holding nothing but its own files is
replaced: any other non-empty `out` is refused, so no user file is ever deleted. A runtime that fails to convert
or misses its parity gate refuses its own artifact, not the bundle (but never replaces a bundle that served it);
a failing disk or memory stops the export. So does a checkpoint that changes while it is exported (a training
writing it): the torch artifact is copied from the weights file held open since they were verified, and the
checkpoint must say at the end what it said at the start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from data.datasets import EVAL_SUBSET_SEED, DatasetError, ImageSet, Readable, load_dataset, load_labelled
from export import provenance
from export.parity import ParityData, Tolerance, measure, run_batched
from export.targets import Target, parse_targets
from models.bundle import (
    GOLDEN_FILE,
    MANIFEST_FILE,
    MAX_BATCH_LIMIT,
    MAX_TEXT_CHARS,
    NAME_RULE,
    Artifact,
    BundleError,
    Golden,
    InputSpec,
    Manifest,
    OutputSpec,
    Source,
    as_name,
    check_artifact_record,
    file_entries,
    read_manifest,
    valid_name,
    write_manifest,
)
from models.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint, read_checkpoint_meta
from models.failures import memory_failure, storage_failure
from models.host import MAX_THREADS
from models.io import DirectoryBusy, atomic_dir, ensure_dir, resolve_path, same_file, sha256_file
from models.jsonfields import is_int
from models.oneline import first_line, one_line
from models.preprocessing import Preprocessing, normalize, preprocess, to_uint8
from runtimes import Backend, BackendError, BackendOptions, ExportError, LoadSpec, open_artifact
from runtimes.base import INPUT_NAME, OUTPUT_NAME, description
from runtimes.build import ExportContext, cause_in_chain, check_built
from runtimes.loader import (
    CONTRACT_KEY,
    MAX_SOURCE_SIDE,
    ORIGIN_KEY,
    RECORD_KEY,
    SOURCE_KEY,
    golden_outputs,
    own_outputs_key,
    verify_golden,
)
from runtimes.onnx_graph import OPSET, export_torch
from runtimes.registry import DEFAULT_TARGETS

if TYPE_CHECKING:
    import PIL.Image
    from torch import nn

PREPROCESS_CHUNK = 256
GOLDEN_SAMPLES = 8
# The ONNX opsets `opset` may ask for: what torch 2.14's exporter writes as asked (it exports at 18 and converts;
# below 17 it silently keeps 18, from 26 its graph fails the ONNX checker). The hub's own opset_import is read back
# after the export as well, so the manifest records the opset the file has (export.kserve trusts it).
OPSETS = range(17, 26)
MAX_SAMPLES = 2**31 - 1  # parity/calibration images: "all of the split" in practice (export.cli's bound too)
# The default parity set: the whole val split up to DEFAULT_PARITY_SAMPLES images and PARITY_MEMORY_BYTES of
# preprocessed pixels (a seeded draw of them above either). Each image costs one forward pass per artifact and is held
# as float32 for every artifact's run (0.6 MB at 3x224x224): 5000 keep a small model's export quick while one point
# of accuracy is 50 images (5 on the 512 it once was, where artifacts within the 1-point gate measured 1.4 and 1.6
# points below torch on the whole 1000-image split); 1 GiB holds 1,780 images at 224 px (5000 were 3 GB). An explicit
# --parity-samples is drawn as asked.
DEFAULT_PARITY_SAMPLES = 5000
PARITY_MEMORY_BYTES = 1 << 30


class ExportIOError(RuntimeError):
    """The machine failed during an export (disk full, file-size limit, out of memory): the old bundle is kept."""


class ExportMemoryError(ExportIOError):
    """The export ran out of memory: the old bundle is kept, and the sizes that drive memory can be lowered."""


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch with `threads` intra-op threads (None: torch's own, capped by a CPU quota), restoring the old count
    afterwards."""
    import torch

    from models.host import quota_cpus

    old = torch.get_num_threads()
    threads = threads or quota_cpus()  # torch sizes itself by the CPU set, not a container's CPU limit
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_parity_samples(preprocessing: Preprocessing) -> int:
    """The parity images an export draws unless told: DEFAULT_PARITY_SAMPLES, fewer where their preprocessed pixels
    would pass PARITY_MEMORY_BYTES."""
    image_bytes = 4 * preprocessing.channels * preprocessing.crop ** 2
    return max(1, min(DEFAULT_PARITY_SAMPLES, PARITY_MEMORY_BYTES // image_bytes))


def parity_images(meta: CheckpointMeta, dataset: str, samples: int) -> Readable:
    """The parity images: `samples` of the dataset's val split drawn as train.eval draws them, with the
    files that do not decode left out and counted as training and evaluation do; ExportError when none decodes."""
    try:
        # train.eval's rule: the checkpoint's classes (a folder may hold some of them), whatever train/ holds
        return load_labelled(dataset, "val", meta.class_names).readable_subset(samples, seed=EVAL_SUBSET_SEED)
    except DatasetError as exc:
        raise ExportError(f"parity data: {exc}") from None


def parity_data(model: nn.Module, meta: CheckpointMeta, dataset: str, samples: int, max_batch: int,
                images: ImageSet | None = None) -> ParityData:
    """Preprocessed validation images of the checkpoint's dataset (`images`, else `parity_images`) and torch's
    logits for them."""
    import torch

    val = images if images is not None else parity_images(meta, dataset, samples).images
    x: np.ndarray | None = None
    for s in range(0, len(val), PREPROCESS_CHUNK):
        chunk = preprocess([_decoded(val, i) for i in range(s, min(s + PREPROCESS_CHUNK, len(val)))],
                           meta.preprocessing)
        if x is None:  # filled in place: concatenating the chunks held the set twice at its peak
            x = np.empty((len(val), *chunk.shape[1:]), chunk.dtype)
        x[s:s + len(chunk)] = chunk
    if x is None:
        x = preprocess([], meta.preprocessing)

    def torch_run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return ParityData(x, val.labels, run_batched(torch_run, x, max_batch, meta.config.num_classes),
                      dataset=str(dataset))


def _decoded(images: ImageSet, i: int) -> PIL.Image.Image:
    """Image i, which decoded when it was chosen; ExportError (one line) if it no longer does."""
    try:
        return images.image(i)
    except DatasetError as exc:
        raise ExportError(f"parity data: {exc} (it changed during the export)") from None


def _holds(out: Path, cwd: Path) -> bool:
    """Whether `out` is `cwd` or above it (a path that does not resolve, a symlink loop, is reported later)."""
    try:
        here = resolve_path(cwd)
        return resolve_path(out) in (here, *here.parents)
    except OSError:
        return False


def _check_out(out: Path, keeps: set[str] | None) -> None:
    """Refuse outputs that would clobber something that is not a bundle (or, unless `keeps` is None, a servable
    artifact whose id is not in `keeps`), or that could not be written."""
    try:  # Python 3.11's Path.exists raises EACCES under a parent that cannot be searched
        if out.exists() and not out.is_dir():
            raise ExportError(f"output {out} exists and is not a directory")
    except OSError as exc:
        raise ExportError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    _check_replaceable(out, keeps)
    try:  # fail before the slow work if the bundle could not be written
        ensure_dir(out.parent)
        with tempfile.TemporaryFile(dir=out.parent):  # the new bundle is built and swapped in there
            pass
    except OSError as exc:
        raise ExportError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.R_OK):  # the swap lists it for an earlier export's leftovers
        raise ExportError(f"cannot write bundle {out}: {out.parent} cannot be listed (no read permission)")
    # An existing `out` is moved aside by a rename into another directory, which needs write access to `out`
    # itself (its '..' entry changes), and its old files are then deleted.
    for d in ([out, *(p for p in out.rglob("*") if p.is_dir() and not p.is_symlink())] if out.is_dir() else []):
        if not os.access(d, os.W_OK | os.X_OK):
            raise ExportError(f"cannot write bundle {out}: {d} is not writable (the bundle is replaced by moving "
                              "the old one aside)")


def _check_replaceable(out: Path, keeps: set[str] | None = None, refused: Sequence[Artifact] = ()) -> None:
    """Refuse to replace `out` unless it is absent, empty, or a vitc bundle holding nothing but its own files:
    replacing it deletes everything in it. With `keeps` (the artifact ids the export builds servable), refuse too
    when it would drop a servable artifact of the old bundle (`python -m export.openvino --out B` must not silently
    delete B's ONNX model, which a TensorRT server builds its engine from), naming the reason when the export
    `refused` it. A symbolic link is refused: the swap would replace the link by a directory, and what it points to
    (what a server reads) would keep the old bundle."""
    if out.is_symlink():
        raise ExportError(f"output {out} is a symbolic link; give the path of the directory itself")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        manifest = read_manifest(out)
    except BundleError as exc:
        raise ExportError(f"output {out} is a non-empty directory and not a bundle ({exc}); "
                          "refusing to replace it") from None
    if extra := _foreign_entry(out, _own_files(manifest)):
        raise ExportError(f"output {out} is a bundle that also holds {extra!r}, which is not one of its files; "
                          "refusing to replace it (move that away, or pick another --out)")
    if keeps is not None and (dropped := [a.id for a in manifest.artifacts if a.servable and a.id not in keeps]):
        if why := [f"{a.id} ({(a.refused_reason or '')[:200]})" for a in refused if a.id in dropped]:
            # A rebuild that failed its conversion or gate must not delete the servable artifact it was to replace.
            raise ExportError(f"output {out} holds servable artifacts this export refused: {'; '.join(why)}; "
                              "the bundle is unchanged (pass --replace to replace it without them, or give another "
                              "--out)")
        every = ",".join(dict.fromkeys([*sorted(keeps - {"torch-fp32"}), *dropped]))
        raise ExportError(f"output {out} holds servable artifacts this export would drop: {', '.join(dropped)}; "
                          f"build them again too (python -m export --targets {every}), give another --out, or "
                          "pass --replace to drop them")


def _own_files(manifest: Manifest) -> set[str]:
    """The bundle-relative paths a bundle owns: its manifest, golden file and every artifact file it lists."""
    entries = [f for a in manifest.artifacts for f in (*a.files, *a.refused_files)]
    if manifest.golden is not None:
        entries.append(manifest.golden.file)
    return {MANIFEST_FILE, GOLDEN_FILE, *(f.path for f in entries)}


def _foreign_entry(out: Path, own: set[str]) -> str | None:
    """The first path under `out` that is not a bundle file nor a directory leading to one, else None."""
    dirs = {"/".join(p.split("/")[:i]) for p in own for i in range(1, p.count("/") + 1)}
    for root, subdirs, files in os.walk(out):
        rel = Path(root).relative_to(out)
        for name in subdirs:
            path = (rel / name).as_posix()
            if path not in dirs or os.path.islink(os.path.join(root, name)):
                return path
        for name in files:
            if (path := (rel / name).as_posix()) not in own:
                return path
    return None


def bundle_name(name: str | None, out: Path) -> str:
    """The bundle's served name: `name` checked, else derived from the --out directory name (made valid)."""
    if name is not None:
        if not valid_name(name):
            raise ExportError(f"--name {name!r} is not a valid model name ({NAME_RULE})")
        return name
    try:
        return as_name(resolve_path(out).name)
    except OSError as exc:  # a symlink loop above it
        raise ExportError(f"output {out}: {exc.strerror or exc}") from None


def _dataset_of(meta: CheckpointMeta, dataset: str | os.PathLike | None) -> str:
    name = dataset or meta.dataset
    if not name:
        raise ExportError(f"checkpoint {meta.path} records no 'dataset'; pass the dataset for parity images")
    return str(name)


def _header(meta: CheckpointMeta, name: str, checkpoint: str | os.PathLike, dataset: str, max_batch: int) -> Manifest:
    """The bundle's manifest before any artifact is listed: the model's contract, which the backends load by."""
    cfg = meta.config
    return Manifest(
        name=name, model=meta.model, stem=cfg.stem.kind, config=cfg, class_names=tuple(meta.class_names),
        input=InputSpec(name=INPUT_NAME, channels=cfg.in_chans, height=cfg.image_size, width=cfg.image_size,
                        min_batch=1, max_batch=max_batch),
        output=OutputSpec(name=OUTPUT_NAME, classes=cfg.num_classes), preprocessing=meta.preprocessing,
        source=Source(checkpoint=str(checkpoint), sha256=meta.weights_sha256, dataset=dataset),
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


SCRATCH = ".scratch"  # ExportContext.scratch: intermediate files, deleted before the bundle is written


class _NotNew(Exception):
    """A build returned a file that is not a new file of its own in the bundle: its artifact is refused."""


def _build_one(ctx: ExportContext, header: Manifest, target: Target, data: ParityData,
               tolerance: Tolerance | None, threads: int | None,
               outputs: dict[str, np.ndarray] | None = None, earlier: Sequence[Artifact] = ()) -> Artifact:
    """Build one artifact, gate it through the serving Backend, and return its manifest entry.

    A servable artifact has also passed the very golden-input check every server runs at load
    (runtimes.loader.verify_golden), against what it computed for those inputs here, which goes into
    `outputs[artifact id]` (and golden.npz): what export certifies loads on this machine by construction.
    A refused artifact keeps its numbers and reason; what its build wrote (`_remove_new`) is deleted so it never
    ships. One whose build returns a file that is not new in the bundle (`earlier`: the artifacts built before it)
    is refused before its gate (`_check_new_files`).
    """
    rt = target.runtime
    artifact = Artifact(id=target.id, runtime=rt.name, format=rt.format, precision=target.precision, files=(),
                        servable=False)
    existing = _tree(ctx.workdir)
    start = time.perf_counter()
    try:
        built = check_built(rt.name, rt.build(ctx, target.precision), ctx.workdir)
        artifact = replace(artifact, export_seconds=round(time.perf_counter() - start, 3))
        _check_new_files(ctx.workdir, rt.name, built.files, existing, earlier)
        made = replace(artifact, runtime_version=rt.version(), info=built.info,
                       files=file_entries(ctx.workdir, built.files))
        # The whole record, files included (its format's rule), before it is kept (a refused artifact's record is
        # read back too): checked only by the manifest's read-back, it failed the export of every other artifact.
        check_artifact_record(made)
        artifact = made
        start = time.perf_counter()
        options = BackendOptions(device=rt.export_device, threads=threads)  # the server's defaults, --threads aside
        backend = open_artifact(rt, LoadSpec(header, artifact, tuple(built.files), options))
        try:
            # In batches the backend takes, as the server and the golden check cap them (its own limit may be lower).
            parity = measure(backend.infer, data, target.precision, min(ctx.max_batch, backend.max_batch), tolerance)
            hint = description(backend, rt.name).get("inference_precision")
            parity = replace(parity, inference_precision=str(hint) if hint else None)
            artifact = replace(artifact, parity=parity)
            failures = list(parity.failures)
            if not failures:
                failures = _golden_check(backend, artifact, data, header.input.max_batch, outputs)
        finally:
            backend.close()
        artifact = replace(artifact, parity_seconds=round(time.perf_counter() - start, 3))
    except _NotNew as exc:  # never opened: what it listed belongs to another artifact, the export, or nobody
        failures = [str(exc)]
    except Exception as exc:  # a converter or runtime crash refuses this artifact, not the whole bundle
        if failure := memory_failure(exc):  # the machine failed, not the artifact: stop, keep the old bundle
            raise ExportMemoryError(f"{target.id}: out of memory ({type(failure).__name__}: "
                                    f"{first_line(failure)[:200]})") from None
        # The storage failing (a full disk, quota or file-size limit, an I/O error, a file system gone read-only)
        # stops the export too; any other OSError is this runtime's own (a shared library it cannot load, a file its
        # build did not write): it refuses this artifact alone.
        if failure := cause_in_chain(exc, storage_failure):
            raise ExportIOError(f"{target.id}: {type(failure).__name__}: {first_line(failure)}") from None
        # An ExportError is a runtime refusing its artifact in its own words (a weight its precision cannot hold):
        # the reason alone, where anything else is a crash.
        failures = [first_line(exc) if isinstance(exc, ExportError) else
                    f"export failed: {type(exc).__name__}: {first_line(exc)}"]
        if not artifact.export_seconds:
            artifact = replace(artifact, export_seconds=round(time.perf_counter() - start, 3))
    if failures:
        (outputs or {}).pop(target.id, None)
        _remove_new(ctx.workdir, existing)
        return replace(artifact, servable=False, refused_reason=_reason(failures, ctx.workdir),
                       refused_files=artifact.files, files=())
    return replace(artifact, servable=True, refused_reason=None)


def _in_bundle(text: str, workdir: Path) -> str:
    """`text` with the paths inside `workdir`, the bundle's temporary directory, relative to it: the manifest keeps
    the text, and that directory is renamed into --out (or removed) when the export ends."""
    return text.replace(f"{workdir}{os.sep}", "")


def _reason(failures: Sequence[str], workdir: Path) -> str:
    """An artifact's refused_reason as the manifest reader takes it back: one line of at most MAX_TEXT_CHARS, its
    unprintable characters escaped, its paths relative to the bundle."""
    # A converter's one-line error of 70,000 characters (or naming a file with undecodable bytes: lone surrogates)
    # made a manifest the read-back refused, and the export lost every other artifact with it.
    text = one_line(_in_bundle("; ".join(failures), workdir))
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS - 3] + "..."


def _golden_check(backend: Backend, artifact: Artifact, data: ParityData, max_batch: int,
                  outputs: dict[str, np.ndarray] | None) -> list[str]:
    """Record what the artifact computes for the golden inputs, then run the load-time check on it (a second
    run, as a server will: an artifact that does not reproduce itself is refused here, not at load)."""
    n = min(GOLDEN_SAMPLES, len(data.x))
    x, reference = data.x[:n], data.reference[:n]
    own = golden_outputs(backend, x, max_batch, reference.shape[1])
    try:
        verify_golden(backend, x, reference, artifact, own, max_batch=max_batch)
    except BackendError as exc:
        return [f"golden inputs: {first_line(exc)}"]
    if outputs is not None:
        outputs[artifact.id] = own
    return []


def _tree(root: Path) -> set[str]:
    """Every path under `root` (files and directories, links not followed), relative and in POSIX form."""
    paths = set()
    for parent, dirs, files in os.walk(root):
        rel = Path(parent).relative_to(root)
        paths.update((rel / name).as_posix() for name in (*dirs, *files))
    return paths


def _remove_new(workdir: Path, existing: set[str]) -> None:
    """Delete every path under `workdir` that is not in `existing` (its tree before a refused build), outside the
    export's scratch directory: a new directory with all it holds, a link itself (never what it points to)."""
    # Unlinking new plain files alone left a build's subdirectory and its model in the published bundle, unlisted, and
    # the next export to that --out refused to replace a bundle holding a foreign entry. Sorted, a new directory comes
    # before what it holds, which goes with it.
    for rel in sorted(_tree(workdir) - existing):
        path = workdir / rel
        if rel.split("/")[0] == SCRATCH or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _check_new_files(workdir: Path, runtime: str, files: Sequence[str | os.PathLike], existing: set[str],
                     earlier: Sequence[Artifact]) -> None:
    """_NotNew (one line naming the runtime and the file) unless every file a build returned is a new file in the
    bundle directory `workdir` (not in `existing`, the paths there before the build), outside its scratch directory,
    listed once."""
    # A plugin's build that returned another artifact's model.onnx overwrote a file that had passed its gate, and
    # the export exited 0 with a bundle its own report called CORRUPT; one that returned the ONNX hub certified
    # .scratch/hub.onnx, deleted before the bundle was written. Links are followed: a link to another artifact's
    # file is that file.
    root = workdir.resolve()
    owners = {f.path: a.id for a in earlier for f in a.files}
    seen: set[str] = set()
    rule = f"a build may only return new files it wrote into the bundle directory, outside {SCRATCH}"
    for given in files:
        try:
            rel = Path(given).resolve().relative_to(root).as_posix()
        except ValueError:
            raise _NotNew(f"{runtime} build returned {str(given)!r}, which lies outside the bundle "
                          f"({rule})") from None
        why = None
        if rel == ".":
            why = ", which is the bundle directory itself"
        elif rel.split("/")[0] == SCRATCH:
            why = f", which lies in the export's {SCRATCH} directory, deleted before the bundle is written"
        elif rel in seen:
            why = " twice"
        elif rel in owners:
            why = f", a file of {owners[rel]!r} built before it"
        elif rel in existing:
            why = ", which was there before its build"
        if why is not None:
            raise _NotNew(f"{runtime} build returned {rel!r}{why} ({rule})")
        seen.add(rel)


def _changed_files(workdir: Path, artifacts: Sequence[Artifact]) -> dict[int, str]:
    """Index in `artifacts` -> the first file of that servable artifact that is no longer what its gate certified
    (missing, another size or sha256)."""
    # Run after every build and gate: a plugin that rewrites a file it did not list (or that a refused build had
    # listed, whose cleanup removes new names only) must not leave an earlier artifact corrupt. The sha256, not the
    # file's times: a rewrite within the file system's timestamp granularity keeps those.
    changed = {}
    for i, artifact in enumerate(artifacts):
        for f in artifact.files if artifact.servable else ():
            path = workdir / f.path
            if not path.is_file() or path.stat().st_size != f.bytes or sha256_file(path) != f.sha256:
                changed[i] = f.path
                break
    return changed


def _refuse(workdir: Path, artifact: Artifact, reason: str, outputs: dict[str, np.ndarray]) -> Artifact:
    """`artifact` refused for `reason` as well, its files deleted and its golden outputs dropped."""
    for f in artifact.files:
        with contextlib.suppress(FileNotFoundError):
            (workdir / f.path).unlink()
    outputs.pop(artifact.id, None)
    reasons = [r for r in (artifact.refused_reason, reason) if r]
    return replace(artifact, servable=False, refused_reason=_reason(reasons, workdir),
                   refused_files=artifact.files or artifact.refused_files, files=())


def _keep_certified(workdir: Path, artifacts: list[Artifact], artifact: Artifact, outputs: dict[str, np.ndarray],
                    log: Callable[[str], None]) -> Artifact:
    """`artifact`, just built and gated, refused when its build or load changed a file of one of `artifacts` (built
    before it), which is refused in that list too (and logged): no bundle ships an artifact whose file changed,
    nor the artifact of a build that changed one."""
    changed = _changed_files(workdir, artifacts)
    for i, path in changed.items():
        artifacts[i] = _refuse(workdir, artifacts[i], f"its file {path!r} was changed after its gate, by the build or "
                                                      f"load of {artifact.id}", outputs)
        log(summary_line(artifacts[i]))
    if not changed or not artifact.servable:  # a refused one is not shipped anyway; its victims' reasons name it
        return artifact
    spoiled = ", ".join(f"{path!r} of {artifacts[i].id!r}" for i, path in changed.items())
    return _refuse(workdir, artifact, f"its build or load changed {spoiled}, built before it (a build may only "
                                      "write new files)", outputs)


@dataclass(frozen=True)
class ExportConfig:
    """One export: which checkpoint goes to which bundle, with what; every field is checked when it is made."""

    checkpoint: str | os.PathLike
    out: str | os.PathLike
    targets: Sequence[str] = DEFAULT_TARGETS
    _: KW_ONLY
    name: str | None = None  # the served name (default: the `out` directory's name, made valid)
    max_batch: int = 32
    parity_samples: int | None = None  # val images drawn (more than the split: all of it; None: default_parity_samples)
    calibration_samples: int = 300
    dataset: str | os.PathLike | None = None  # parity images, val split (default: the checkpoint's)
    calibration_dataset: str | os.PathLike | None = None  # INT8 calibration, train split (default: `dataset`)
    opset: int | None = None  # one of OPSETS (default OPSET)
    tolerances: dict[str, Tolerance] | None = None  # parity gates by precision, instead of export.parity's
    threads: int | None = None  # CPU threads of torch and the runtimes (default: theirs)
    log: Callable[[str], None] | None = None  # progress lines (default: stderr)
    drop_artifacts: bool = False  # replace a bundle at `out` even when this export drops some of its artifacts

    def __post_init__(self) -> None:
        """ExportError (one line) unless every field has its type and range: checked before any work, so a wrong one
        never becomes a raw traceback, a silently rounded count or a bundle its reader refuses."""
        self._check_inputs()
        self._check_sizes()
        self._check_options()
        # numpy integers pass as integers (what a script computes a count with); from here on they are plain ints
        for key in ("max_batch", "parity_samples", "calibration_samples", "opset", "threads"):
            if (value := getattr(self, key)) is not None:
                object.__setattr__(self, key, int(value))
        object.__setattr__(self, "targets", tuple(self.targets))

    def _check_inputs(self) -> None:
        for arg, value in (("checkpoint", self.checkpoint), ("out", self.out)):
            if not isinstance(value, str | os.PathLike):
                raise ExportError(f"{arg} must be a path, got {type(value).__name__} {value!r:.80}")
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, Sequence):
            raise ExportError(f"targets must be a list of target names such as ['onnx', 'openvino-int8'], got "
                              f"{type(targets).__name__} {targets!r:.80}")
        if bad := [t for t in targets if not isinstance(t, str)]:
            raise ExportError(f"targets must be target names (strings), got {bad[0]!r:.80}")
        if self.name is not None and not isinstance(self.name, str):
            raise ExportError(f"name must be a string or None, got {type(self.name).__name__} {self.name!r:.80}")

    def _check_sizes(self) -> None:
        if not (is_int(self.max_batch, numpy=True) and 1 <= self.max_batch <= MAX_BATCH_LIMIT):
            raise ExportError(f"max batch must be an integer in 1..{MAX_BATCH_LIMIT}, got {self.max_batch!r:.80}")
        for arg, value in (("parity", self.parity_samples), ("calibration", self.calibration_samples)):
            if value is None and arg == "parity":
                continue
            if not (is_int(value, numpy=True) and 1 <= value <= MAX_SAMPLES):
                raise ExportError(f"{arg} sample counts must be positive integers, got {value!r:.80}")

    def _check_options(self) -> None:
        for arg, value in (("dataset", self.dataset), ("calibration dataset", self.calibration_dataset)):
            if value is not None and not isinstance(value, str | os.PathLike):
                raise ExportError(f"{arg} must be a dataset name or folder, got {type(value).__name__} {value!r:.80}")
        if (opset := self.opset) is not None and not (is_int(opset, numpy=True) and opset in OPSETS):
            raise ExportError(f"opset must be an integer in {OPSETS.start}..{OPSETS.stop - 1} (what the ONNX exporter "
                              f"writes as asked), got {opset!r:.80}")
        if (tolerances := self.tolerances) is not None and not (isinstance(tolerances, dict) and all(
                isinstance(k, str) and isinstance(v, Tolerance) for k, v in tolerances.items())):
            raise ExportError(f"tolerances must map precision names to export.parity.Tolerance, got "
                              f"{tolerances!r:.120}")
        if self.threads is not None and not (is_int(self.threads, numpy=True) and 1 <= self.threads <= MAX_THREADS):
            raise ExportError(f"threads must be an integer in 1..{MAX_THREADS}, got {self.threads!r:.80}")
        if self.log is not None and not callable(self.log):
            raise ExportError(f"log must be a function of one line, got {type(self.log).__name__}")
        if not isinstance(self.drop_artifacts, bool):
            raise ExportError(f"drop_artifacts must be True or False, got {self.drop_artifacts!r:.80}")


def build(config: ExportConfig) -> Manifest:
    """Export `config.checkpoint` to the bundle directory `config.out`; returns the manifest written there."""
    # The torch artifact (safetensors + manifest config) is always included. Artifacts that fail their parity
    # gate are listed with `servable: false` and a `refused_reason`, without files. Parity uses the `dataset`'s
    # val split and INT8 calibration the train split of `calibration_dataset` (both default to the checkpoint's).
    # `threads` caps the CPU threads of torch and the runtimes (on a shared machine 1 avoids oversubscription).
    # `opset` (default OPSET) is one of OPSETS, checked against the exported file, whose opset the manifest records.
    # Raises ExportError (one line) on bad input, a missing runtime or a checkpoint that changed while it was
    # exported (a training writing it), ExportIOError when the disk or memory fails; either way the old bundle at
    # `out` is untouched (ExportMemoryError, an ExportIOError, when memory ran out).
    try:
        cwd = Path.cwd()
    except FileNotFoundError:
        raise ExportError("the current directory no longer exists (replaced or removed): cd to one that does") from None
    out = cwd / config.out  # absolute (`--out .`: the temporary directory goes beside it, not into it)
    if _holds(out, cwd):
        # The finished bundle replaces --out by a rename: the shell would be left in a deleted directory.
        raise ExportError(f"--out {out} is the current directory (or holds it): the new bundle replaces that "
                          "directory; run the export from outside it (cd ..)")
    if not [t for t in config.targets if t.strip()]:  # "torch" alone is always built: an empty list is a mistake
        raise ExportError("no targets given (pass --targets torch for a torch-only bundle)")
    wanted = parse_targets(["torch", *config.targets])
    for rt in dict.fromkeys(t.runtime for t in wanted):
        try:
            rt.require(rt.export_device)
        except BackendError as exc:
            raise ExportError(str(exc)) from None
    # An existing bundle at `out` is replaced only when every artifact servable in it comes out servable again
    # (not refused), unless `drop_artifacts`.
    keeps = None if config.drop_artifacts else {t.id for t in wanted}
    _check_out(out, keeps)
    name = bundle_name(config.name, out)
    log = config.log or (lambda msg: print(msg, file=sys.stderr))
    try:
        return _build(config, wanted, keeps, out=out, name=name, log=log)
    except Exception as exc:  # MemoryError, or what torch's allocator and the runtimes raise instead (one line)
        ours = ExportError | ExportIOError | BackendError | DirectoryBusy | BundleError | CheckpointError
        if isinstance(exc, ours) or not (failure := memory_failure(exc)):
            raise
        raise ExportMemoryError(f"out of memory ({type(failure).__name__}: {first_line(failure)[:200]})") from None


def build_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike, targets: Sequence[str] = DEFAULT_TARGETS,
                 **options: Any) -> Manifest:
    """`build(ExportConfig(checkpoint, out, targets, **options))`: the keyword form scripts and tests call."""
    return build(ExportConfig(checkpoint, out, targets, **options))


def _hub_opset(path: Path) -> int:
    """The default-domain opset the exported ONNX file imports."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _calibration(wanted: Sequence[Target], calibration_dataset: str | os.PathLike | None,
                 data_name: str) -> Callable[[], ImageSet]:
    """The INT8 calibration set (train split), loaded before any slow work so a bad name fails first; a loader
    that returns it. None of it is loaded when no target calibrates and no calibration dataset was named."""
    name = calibration_dataset or data_name
    if calibration_dataset is None and not any(t.precision == "int8" for t in wanted):
        return lambda: load_dataset(name, "train")
    try:
        images = load_dataset(name, "train")
    except DatasetError as exc:
        raise ExportError(f"calibration data: {exc}") from None
    if len(images) == 0:
        raise ExportError(f"calibration data: dataset {name!r} has no train images")
    return lambda: images


def _changed(meta: CheckpointMeta) -> ExportError:
    return ExportError(f"checkpoint {meta.path} changed while it was exported (a training is writing it?): export it "
                       "again when it has finished")


def _load(checkpoint: str | os.PathLike) -> tuple[nn.Module, CheckpointMeta]:
    """load_checkpoint, its refusal an ExportError: the "changed" one when checkpoint.json was there and now says
    something else or is gone (a training replaced the weights while they were read)."""
    try:
        first = read_checkpoint_meta(checkpoint)
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    try:
        return load_checkpoint(checkpoint)
    except CheckpointError as exc:
        _check_unchanged(first)
        raise ExportError(str(exc)) from None


def _open_weights(meta: CheckpointMeta) -> BinaryIO:
    """The weights file load_checkpoint has just verified, held open: a training that replaces the checkpoint
    meanwhile (`train --overwrite` removes it at its first save) cannot take these bytes away from the export."""
    try:
        return open(meta.weights_path, "rb")
    except FileNotFoundError:
        raise _changed(meta) from None
    except OSError as exc:
        raise ExportError(f"cannot read weights {meta.weights_path}: {exc.strerror or exc}") from None


def _pinned(meta: CheckpointMeta, weights: BinaryIO, into: Path) -> CheckpointMeta:
    """`meta` with its weights read from the open `weights`, not from a checkpoint directory that a training may
    rewrite meanwhile: through /proc/self/fd where the system has it (nothing copied: the bundle's disk needs no room
    for a second copy), else from a copy made into `into` (a new directory in the bundle's scratch)."""
    fd = weights.fileno()
    proc = Path("/proc/self/fd")
    if same_file(fd, proc / str(fd)):  # opening it opens this file, even once the checkpoint has removed it
        return replace(meta, path=proc, weights_file=str(fd))
    into.mkdir(parents=True)
    weights.seek(0)
    with open(into / meta.weights_file, "xb") as f:
        shutil.copyfileobj(weights, f, 1 << 20)
    return replace(meta, path=into)


def _check_reference(artifacts: Sequence[Artifact], meta: CheckpointMeta) -> None:
    """ExportError unless the torch-fp32 artifact, servable or refused, holds the weights the checkpoint records (its
    sha256): else the file read was rewritten in place since it was verified."""
    for a in artifacts:
        files = a.files or a.refused_files  # other weights than the model's fail its parity gate too
        if a.id == "torch-fp32" and files and [f.sha256 for f in files] != [meta.weights_sha256]:
            raise _changed(meta)


def _check_unchanged(meta: CheckpointMeta) -> None:
    """ExportError unless the checkpoint's `checkpoint.json` still says what it said when the export read it: a
    bundle of a checkpoint that is gone or replaced would name weights that are no longer there."""
    try:
        now = read_checkpoint_meta(meta.path)
    except CheckpointError:
        raise _changed(meta) from None
    if now.raw != meta.raw:
        raise _changed(meta)


def _build(config: ExportConfig, wanted: Sequence[Target], keeps: set[str] | None, *, out: Path, name: str,
           log: Callable[[str], None]) -> Manifest:
    """`build` once its output is checked (`out`: config.out made absolute; `name`: the bundle's, resolved)."""
    max_batch = config.max_batch
    model, meta = _load(config.checkpoint)
    data_name = _dataset_of(meta, config.dataset)
    calibration_set = _calibration(wanted, config.calibration_dataset, data_name)
    header = _header(meta, name, config.checkpoint, data_name, max_batch)
    with _open_weights(meta) as weights, torch_threads(config.threads):
        samples = config.parity_samples or default_parity_samples(meta.preprocessing)
        parity_set = parity_images(meta, data_name, samples)
        data = parity_data(model, meta, data_name, samples, max_batch, parity_set.images)
        log(f"{meta.model}: parity on {len(data.x)} {data_name} val images{parity_set.note()}, "
            f"torch top-1 {data.reference_accuracy:.2%}")
        try:
            artifacts: list[Artifact] = []

            def before_swap() -> None:  # what came out servable must keep what the old bundle served
                _check_unchanged(meta)  # of the checkpoint read, not one a training wrote meanwhile
                _check_reference(artifacts, meta)
                _check_servable(artifacts, out)
                built = None if keeps is None else {a.id for a in artifacts if a.servable}
                _check_replaceable(out, built, [a for a in artifacts if not a.servable])

            with atomic_dir(out, before_swap=before_swap) as tmp:
                ctx = ExportContext(
                    model=model, meta=_pinned(meta, weights, tmp / ".scratch" / "checkpoint"), workdir=tmp,
                    max_batch=max_batch, opset=config.opset or OPSET,
                    calibration_set=calibration_set, calibration_samples=config.calibration_samples,
                )
                if any(t.precision == "int8" for t in wanted):  # no readable image: one line, before any build
                    calibration = ctx.calibration_images()
                    log(f"INT8 calibration on {len(calibration)} {calibration.name} train images"
                        f"{ctx.calibration_note()}")
                timings: dict[str, float] = {}
                if any(t.runtime.needs_hub for t in wanted):  # shared by those runtimes; timed once
                    start = time.perf_counter()
                    ctx.hub = export_torch(model, ctx.scratch / "hub.onnx", ctx.image_size, ctx.opset,
                                           ctx.description())
                    # What the file says, not what was asked: every artifact records it (export.kserve trusts it).
                    if (written := _hub_opset(ctx.hub)) != ctx.opset:
                        raise ExportError(f"the ONNX exporter wrote opset {written}, not the {ctx.opset} asked for; "
                                          f"ask for one it writes ({OPSETS.start}..{OPSETS.stop - 1} with torch "
                                          "2.14)")
                    timings["onnx_hub_seconds"] = round(time.perf_counter() - start, 3)
                    log(f"torch -> ONNX (opset {ctx.opset}, dynamic batch): {timings['onnx_hub_seconds']:.1f}s")
                outputs: dict[str, np.ndarray] = {}
                for target in wanted:
                    tolerance = (config.tolerances or {}).get(target.precision)
                    artifact = _build_one(ctx, header, target, data, tolerance, config.threads, outputs, artifacts)
                    artifact = _keep_certified(tmp, artifacts, artifact, outputs, log)
                    if parity_set.skipped:  # the parity images' provenance: what was left out to draw them
                        artifact = replace(artifact, info={**artifact.info,
                                                           "parity_unreadable_skipped": len(parity_set.skipped)})
                    artifacts.append(artifact)
                    log(summary_line(artifacts[-1]))
                shutil.rmtree(tmp / ".scratch", ignore_errors=True)
                draft = replace(header, artifacts=tuple(artifacts), timings=timings,
                                provenance=provenance.gather(meta, data, ctx.calibration_fingerprint))
                golden = write_golden(tmp, meta, parity_set.images, data, header.contract, outputs,
                                      records={a.id: draft.record(a.id) for a in artifacts}, origin=draft.origin)
                manifest = replace(draft, golden=golden)
                write_manifest(tmp, manifest)
                _check_reads_back(tmp, out)
        except DirectoryBusy as exc:
            raise ExportError(str(exc)) from None
        except OSError as exc:
            raise ExportIOError(f"cannot write bundle {out}: {exc.strerror or exc}") from None
    return manifest


def _check_servable(artifacts: Sequence[Artifact], out: Path) -> None:
    """ExportError (one line) unless some artifact came out servable: a bundle that serves nothing is no bundle (every
    server refuses it at start), so nothing is written and `out` stays as it was, whatever --replace says."""
    if any(a.servable for a in artifacts):
        return
    # torch-fp32 is always built, and every other artifact is gated against its logits: its reason is the cause.
    reference = next(a for a in artifacts if a.id == "torch-fp32")
    raise ExportError(f"no artifact is servable, not even the torch-fp32 reference ({reference.refused_reason}): "
                      f"nothing was written, {out} is as it was")


def _check_reads_back(tmp: Path, out: Path) -> None:
    """ExportError (one line) unless the manifest just written in `tmp` reads back through the reader every server,
    report and later export uses: the last defence before it replaces `out`, which then stays as it was."""
    try:
        read_manifest(tmp)
    except BundleError as exc:
        kept = f"{out} was left as it was" if os.path.lexists(out) else f"nothing was written to {out}"
        # The reader's advice to re-export is for a bundle found on disk: this is the export's own manifest.
        reason = _in_bundle(str(exc), tmp).removesuffix("; re-export the bundle")
        raise ExportError(f"export failed: the manifest written does not read back, so {kept}: {reason}") from None


def write_golden(bundle: Path, meta: CheckpointMeta, images: ImageSet, data: ParityData, contract: str,
                 outputs: dict[str, np.ndarray] | None = None, records: dict[str, str] | None = None,
                 origin: str | None = None) -> Golden:
    """Write the bundle's golden.npz (parity images, their logits, the manifest's digests); returns its record."""
    # The first GOLDEN_SAMPLES parity images (`images`: the parity set, uint8, before normalisation: small, and it
    # checks normalisation too) with torch's logits for them, and each servable artifact's own logits for them
    # (`outputs`, by artifact id), for servers to check an artifact against before they call it ready
    # (runtimes.loader.verify_golden), the manifest's `contract` digest (runtimes.loader.check_contract), and the
    # digests of each artifact record (`records`, by id) and of the `origin` (runtimes.loader.check_records).
    n = min(GOLDEN_SAMPLES, len(data.x))
    decoded = [_decoded(images, i) for i in range(n)]
    pixels = np.stack([to_uint8(img, meta.preprocessing) for img in decoded])
    if not np.array_equal(normalize(pixels, meta.preprocessing), data.x[:n]):
        raise ExportError("golden inputs do not reproduce the parity images (preprocessing is not deterministic)")
    path = bundle / GOLDEN_FILE
    own = {own_outputs_key(k): np.asarray(v, np.float32) for k, v in sorted((outputs or {}).items())}
    # The sources as decoded (grey or RGB, not too big): a server re-runs its own preprocessing on them, which the
    # already preprocessed pixels cannot show (another Pillow resizing differently).
    sources = {f"{SOURCE_KEY}.{i}": np.asarray(img, np.uint8) for i, img in enumerate(decoded)
               if img.mode in ("L", "RGB") and max(img.size) <= MAX_SOURCE_SIDE}
    digests = {CONTRACT_KEY: contract, **({ORIGIN_KEY: origin} if origin else {}),
               **{f"{RECORD_KEY}.{k}": v for k, v in sorted((records or {}).items())}}
    np.savez_compressed(path, pixels=pixels, logits=data.reference[:n], **own, **sources,
                        **{k: np.frombuffer(bytes.fromhex(v), np.uint8) for k, v in digests.items()})
    # The digests listed in the manifest too: a reader then requires each (runtimes.loader.required_digests).
    written = (CONTRACT_KEY, *((ORIGIN_KEY,) if origin else ()), *((RECORD_KEY,) if records else ()))
    return Golden(file=file_entries(bundle, [path])[0], samples=n, digests=written)


def summary_line(artifact: Artifact) -> str:
    """One progress line per artifact."""
    p = artifact.parity
    head = f"{artifact.id:<14} {artifact.export_seconds:6.1f}s"
    if p:
        err = "n/a" if p.max_abs_err is None else f"{p.max_abs_err:.2e}"
        # The delta with its interval and sample count: the gate judges a point estimate, whose noise this shows.
        head += (f"  max|err| {err}  agree {p.top1_agreement:.2%}  acc {p.accuracy:.2%}"
                 f" (torch {p.reference_accuracy:.2%}, {p.delta_text(' pt')})")
    if artifact.servable:
        return head + "  ok"
    return head + f"  REFUSED: {artifact.refused_reason}"
