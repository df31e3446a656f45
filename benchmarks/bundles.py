"""The checkpoints and bundles a benchmark runs: the C/P pairs, exported once and cached under exports/bench/.

A pair uses trained checkpoints where the demo produced them (runs/animals-vit_c, runs/animals-vit_p for the
mini pair) or where --checkpoint names them, else a seeded random initialisation with a 10-class head (the
animals classes), which is all a latency measurement needs. Random-init models get a small non-zero head (the
model's own init zeroes it, which would make every logit 0 and INT8 parity trivially perfect).

The benchmark must time the INT8 artifact even where it loses more accuracy than the serving gate allows (1
point): its bundles are exported with the INT8 accuracy gate relaxed, and the report states, from the same
parity numbers, whether the artifact would pass the serving gate. These bundles live in the benchmark cache;
serve the ones `python -m export` builds. A cached bundle is reused only while it matches its checkpoint's
weights hash, holds every wanted target and batch size, and its files verify.

The cache is the benchmark's own, shared by the runs that use it (two CI jobs in one checkout). One run at a time
prepares a model's entry (a lock beside it); another waits for it, up to CACHE_WAIT_SECONDS, then reuses what it
exported or exports itself. A stale entry is exported again with the union of its servable artifacts and the wanted
ones, at the larger batch size, so runs wanting different targets converge on one entry instead of replacing each
other's artifacts, and no run is refused for an artifact its cache holds. An entry whose manifest cannot be read (a
damaged or truncated manifest.json) is exported again as a damaged artifact is; a directory in its place that holds
no manifest.json is not one of the cache's entries, and is refused rather than deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.bundle import ExportConfig
from models.bundle import MANIFEST_FILE, BundleError, Manifest, read_manifest, verify_files
from models.cli import WorkFailed
from models.io import DirectoryBusy, ensure_dir, writer_lock
from runtimes.registry import DEFAULT_TARGETS

# Relative to the directory the benchmark runs in (the checkout for `make bench`), as the demo's runs/ and exports/
# are: never inside an installed package.
DEFAULT_CACHE = Path("exports") / "bench"
DATASET = "animals"
PAIRS: dict[str, tuple[str, str]] = {
    **{size: (f"vit_c_{size}", f"vit_p_{size}") for size in ("1gf", "4gf", "18gf", "36gf", "72gf")},  # the paper's
    "mini": ("vit_c_mini", "vit_p_mini"),
    "micro": ("vit_c_micro", "vit_p_micro"),
}
# Trained checkpoints `make demo` writes; used when present and of the right variant. Their demo bundles are
# reused as they are when fresh (same weights, every needed artifact), else exported into the cache.
TRAINED: dict[str, str] = {"vit_c_mini": "runs/animals-vit_c", "vit_p_mini": "runs/animals-vit_p"}
DEMO_BUNDLES: dict[str, str] = {"vit_c_mini": "exports/animals-vit_c", "vit_p_mini": "exports/animals-vit_p"}
INIT_SEED = 0
# How long a run waits for another run preparing the same model's cache entry (exporting it, mostly): an hour, ample
# for the micro and mini pairs (seconds to minutes) and room for the paper's larger models. A run that dies releases
# the lock at once (flock), so the bound only ends a wait on a run that is alive and stuck.
CACHE_WAIT_SECONDS = 3600.0
WAIT_NOTE_EVERY = 300.0  # seconds between the "still waiting" lines
WAIT_POLL = 0.5


@dataclass(frozen=True)
class PreparedModel:
    """One side of a pair, ready to load: its bundle, manifest and where its weights came from."""

    pair: str
    model: str
    stem: str
    checkpoint: Path
    source: str  # "trained" | "random-init"
    bundle: Path
    manifest: Manifest


def _weights_sha(checkpoint: Path) -> str | None:
    from models.checkpoint import CheckpointError, read_checkpoint_meta

    try:
        return read_checkpoint_meta(checkpoint).weights_sha256
    except CheckpointError:
        return None


def trained_checkpoint(model: str, root: Path = Path()) -> Path | None:
    """The demo's trained checkpoint of `model`, if one exists and really is that variant."""
    from models.checkpoint import CheckpointError, read_checkpoint_meta

    rel = TRAINED.get(model)
    if rel is None:
        return None
    path = root / rel
    try:
        return path if read_checkpoint_meta(path).model == model else None
    except CheckpointError:
        return None


def random_init_checkpoint(model: str, cache: Path) -> Path:
    """A seeded random-init checkpoint of `model` with an animals head (written once, then reused)."""
    out = cache / f"init-{model}"
    if _weights_sha(out) is not None:
        return out
    import torch

    from data.datasets import ANIMAL_CLASSES, default_preprocessing
    from models.checkpoint import save_checkpoint
    from models.registry import build_model

    torch.manual_seed(INIT_SEED)
    net = build_model(model, num_classes=len(ANIMAL_CLASSES))
    torch.nn.init.normal_(net.head.weight, std=0.02)  # non-constant logits, so parity numbers mean something
    save_checkpoint(
        out, net, class_names=list(ANIMAL_CLASSES), preprocessing=default_preprocessing(DATASET, net.cfg.image_size),
        extra={"dataset": DATASET, "epochs": 0, "note": f"random init (seed {INIT_SEED}) for latency benchmarks"},
    )
    return out


def _fresh(bundle: Path, checkpoint: Path, targets: Sequence[str], max_batch: int) -> Manifest | None:
    """The cached bundle's manifest if it can be reused as is, else None."""
    try:
        manifest = read_manifest(bundle)
        if manifest.source.sha256 != _weights_sha(checkpoint) or manifest.input.max_batch < max_batch:
            return None
        if not set(expand_targets(targets)) <= {a.id for a in manifest.artifacts}:
            return None
        for artifact in manifest.servable():
            verify_files(bundle, artifact)
        return manifest
    except (BundleError, ValueError):
        return None


def unreadable_entry(bundle: Path) -> str | None:
    """Why the cache entry at `bundle` is one of the cache's own that cannot be read (its manifest.json is there, a
    file, and refused), or None: absent, readable, or not an entry (a link, or a directory without a manifest)."""
    manifest = bundle / MANIFEST_FILE
    if bundle.is_symlink() or not bundle.is_dir() or manifest.is_symlink() or not manifest.is_file():
        return None
    try:
        read_manifest(bundle)
    except BundleError as exc:
        return str(exc)
    return None


def discard_entry(bundle: Path) -> bool:
    """Move the cache entry at `bundle` out of the way and delete it; whether it is gone. Renamed first, to the name
    of an export's unfinished temporary (`.<name>.<8 characters>.tmp`): a run killed while deleting it leaves that,
    which the next export of the entry removes, never a half-deleted entry in its place."""
    aside = Path(tempfile.mkdtemp(prefix=f".{bundle.name}.", suffix=".tmp", dir=bundle.parent))
    try:
        os.replace(bundle, aside)  # onto the empty directory: one rename
    except OSError:  # a mount point, a permission: left as it is, and the export says why it cannot replace it
        aside.rmdir()
        return False
    shutil.rmtree(aside, ignore_errors=True)
    return True


def expand_targets(targets: Sequence[str]) -> list[str]:
    """Artifact ids ("onnx-fp32", ...) a list of export targets produces, torch included."""
    from export.targets import parse_targets

    return [t.id for t in parse_targets(["torch", *targets])]


def _relaxed_int8() -> dict[str, Any]:
    """Parity gates for benchmark bundles: INT8 keeps finiteness and batch invariance, not the accuracy limits
    (fp32 and fp16 keep their strict gates)."""
    from dataclasses import replace

    from export.parity import INT8_TOLERANCE

    return {"int8": replace(INT8_TOLERANCE, min_top1_agreement=0.0, max_accuracy_drop=1.0)}


@contextlib.contextmanager
def cache_lock(cache: Path, model: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold `model`'s lock in `cache` (`.<model>.bench.lock`) while this run prepares its entry. When another run
    holds it, say so and wait (a line every WAIT_NOTE_EVERY); after CACHE_WAIT_SECONDS, WorkFailed (exit 1)."""
    ensure_dir(cache)
    held = contextlib.ExitStack()
    started = time.monotonic()
    next_note = 0.0
    while True:
        try:
            held.enter_context(writer_lock(cache / f"{model}.bench"))
            break
        except DirectoryBusy:  # flock is released when its holder exits, killed or not: a held lock is a live run
            waited = time.monotonic() - started
            if waited >= CACHE_WAIT_SECONDS:
                raise WorkFailed(
                    f"another benchmark run has been preparing {model} in the bundle cache {cache} for "
                    f"{waited / 60:.0f} min: retry when it finishes, or give another --cache") from None
            if waited >= next_note:
                so_far = f", {waited / 60:.0f} min so far" if waited >= 60 else ""
                log(f"note: another benchmark run is preparing {model} in the bundle cache {cache}; waiting for it "
                    f"(at most {CACHE_WAIT_SECONDS / 60:.0f} min{so_far}), then reusing what it exported")
                next_note = waited + WAIT_NOTE_EVERY
            time.sleep(WAIT_POLL)
    if next_note:
        log(f"note: the other run is done with {model} after {time.monotonic() - started:.0f} s of waiting")
    with held:
        yield


def _cached_extra(bundle: Path, wanted: Sequence[str], max_batch: int) -> tuple[list[str], int]:
    """The servable artifacts of the bundle cached at `bundle` that `wanted` lacks and this machine can build again,
    and the larger of its batch size and `max_batch`: what an export replacing it keeps."""
    from export.targets import missing_converters, parse_targets
    from runtimes import BackendError, ExportError

    try:
        manifest = read_manifest(bundle)
    except (BundleError, OSError, ValueError):
        return [], max_batch
    have = set(expand_targets(wanted))
    keep = []
    for artifact in manifest.servable():
        if artifact.id in have:
            continue
        try:  # an artifact id this vitc no longer knows, a runtime not installed here, a GPU one on a CPU machine
            (target,) = parse_targets([artifact.id])
            target.runtime.require(target.runtime.export_device)
        except (ExportError, BackendError, ValueError):
            continue
        if not missing_converters([target]):
            keep.append(artifact.id)
    return keep, max(max_batch, manifest.input.max_batch)


def prepare_model(
    pair: str,
    model: str,
    *,
    cache: Path = DEFAULT_CACHE,
    targets: Sequence[str] = DEFAULT_TARGETS,
    max_batch: int = ExportConfig.max_batch,
    parity_samples: int | None = ExportConfig.parity_samples,
    calibration_samples: int = ExportConfig.calibration_samples,
    root: Path = Path(),
    checkpoint: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> PreparedModel:
    """Checkpoint -> bundle under `cache`, exported only when the cache is stale.

    The checkpoint is `checkpoint` when given, else the demo's trained one, else a seeded random init. The cache
    entry is prepared under `cache_lock`; a stale one is exported again with its own servable artifacts kept.
    """
    from export.bundle import build

    given = checkpoint is not None
    checkpoint = checkpoint or trained_checkpoint(model, root)
    source = "trained" if checkpoint else "random-init"
    demo = root / DEMO_BUNDLES[model] if source == "trained" and model in DEMO_BUNDLES else None
    if demo is not None and checkpoint is not None and (
            manifest := _fresh(demo, checkpoint, targets, max_batch)) is not None:
        return PreparedModel(pair, model, manifest.stem, checkpoint, source, demo, manifest)
    with cache_lock(cache, model, log or (lambda msg: print(msg, file=sys.stderr))):
        if checkpoint is None:
            checkpoint = random_init_checkpoint(model, cache)
        # A checkpoint given by path gets a cache entry of its own (named by its weights), so no two share one.
        bundle = cache / (f"{model}-{(_weights_sha(checkpoint) or 'unknown')[:12]}" if given else f"{model}-{source}")
        manifest = _fresh(bundle, checkpoint, targets, max_batch)
        if manifest is None:
            if source == "random-init":  # accuracy means nothing there: fewer images make the one-time export quicker
                parity_samples, calibration_samples = min(parity_samples or 128, 128), min(calibration_samples, 64)
            # The entry is the cache's own (README): one whose manifest cannot be read is exported again, as one
            # with a damaged artifact is, instead of refusing every run until someone deletes it by hand.
            if (damaged := unreadable_entry(bundle)) is not None and discard_entry(bundle) and log:
                log(f"note: the cached {bundle} could not be read ({damaged}); exporting it again")
            kept, batch = _cached_extra(bundle, targets, max_batch)
            if log:
                also = f" (keeping the cached {', '.join(kept)})" if kept else ""
                log(f"exporting {model} ({source}) to {bundle}{also} ...")
            # The entry is the benchmark's own: replace it even where an artifact it served is refused this time
            # (listed with its reason, which the report shows) or cannot be built here (a GPU one on a CPU machine).
            manifest = build(ExportConfig(
                checkpoint, bundle, (*targets, *kept), name=f"{model}-{source}", max_batch=batch,
                parity_samples=parity_samples, calibration_samples=calibration_samples,  # the checkpoint's dataset
                tolerances=_relaxed_int8(), drop_artifacts=True,
                log=log or (lambda _msg: None),
            ))
    return PreparedModel(pair, model, manifest.stem, checkpoint, source, bundle, manifest)


def int8_parity(manifest: Manifest, runtime: str = "openvino") -> dict[str, Any] | None:
    """The INT8 artifact's parity vs torch fp32 (accuracy delta, agreement) and the serving gate's verdict."""
    from export.parity import INT8_TOLERANCE, gate

    artifact = manifest.artifact(runtime, "int8")
    if artifact is None:
        return None
    parity = artifact.parity.to_dict() if artifact.parity else {}
    keys = ("accuracy", "reference_accuracy", "accuracy_delta", "top1_agreement", "max_abs_err", "max_rel_err",
            "val_samples", "dataset")
    out = {k: parity.get(k) for k in keys}
    failures = gate(artifact.parity, INT8_TOLERANCE) if artifact.parity else ["no parity record"]
    out.update(timed=artifact.servable, passes_serving_gate=not failures, serving_gate_failures=failures,
               refused_reason=artifact.refused_reason)
    return out



if __name__ == "__main__":
    from benchmarks.library import library_module

    library_module(__spec__)
