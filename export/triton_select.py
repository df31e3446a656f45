"""Which artifacts of a bundle `python -m export.triton` writes as models, and what it says about the others: those
the export's gate refused, those `--skip` leaves out, and the models an earlier export of a bundle of the same name
left in the repository that this one does not refresh (they keep serving what they served).
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Sequence
from pathlib import Path

import runtimes
from export.kserve import RepositoryError
from export.triton_config import served_version
from models.bundle import Artifact, BundleError, Manifest, as_name, read_manifest

MAX_REASON_CHARS = 200  # of a refusal reason quoted in a note: the manifest holds it whole


def model_name(manifest: Manifest, artifact: Artifact | str) -> str:
    """The repository model name of one artifact (or artifact id): `<bundle name>-<artifact id>`, made valid (older
    exports kept names such as 'my bundle'); past 128 characters the bundle name is cut and a hash of the whole
    added, the artifact id kept whole (`as_name`)."""
    return as_name(f"{manifest.name}-", artifact if isinstance(artifact, str) else artifact.id)


def _has_backend(artifact: Artifact) -> bool:
    """Whether Triton has a backend for the artifact's runtime (not torch safetensors: its PyTorch backend needs
    TorchScript)."""
    return artifact.runtime in runtimes.names() and runtimes.get(artifact.runtime).triton_backend is not None


def refused(manifest: Manifest) -> dict[str, Artifact]:
    """The artifacts Triton could run that the export's gate refused, by id."""
    return {a.id: a for a in manifest.artifacts if not a.servable and _has_backend(a)}


def _why_refused(artifact: Artifact) -> str:
    reason = (artifact.refused_reason or "no reason recorded")[:MAX_REASON_CHARS]
    return f"the export's parity gate refused it ({reason})"


def choose(manifest: Manifest, skip: Collection[str], notes: list[str]) -> list[Artifact]:
    """The artifacts to write: every servable one Triton can run but those in `skip`; a note for each the export's
    gate refused (not exported; skipping one is allowed). RepositoryError for a `skip` the bundle does not list, or
    one that leaves nothing; BundleError when the bundle has nothing Triton can serve."""
    servable = [a for a in manifest.servable() if _has_backend(a)]
    gated = refused(manifest)
    others = f"; refused at export: {', '.join(gated)}" if gated else ""
    if unknown := sorted(set(skip) - {a.id for a in servable} - set(gated)):
        raise RepositoryError(f"--skip {', '.join(map(repr, unknown))[:200]}: bundle {manifest.name!r} has no such "
                              f"artifact Triton can serve ({', '.join(a.id for a in servable) or 'none'}{others})")
    for a in gated.values():
        notes.append(f"{a.id} of bundle {manifest.name!r} is not exported: {_why_refused(a)}")
    if not servable:
        raise BundleError(f"bundle {manifest.name!r} has no artifact Triton can serve "
                          f"(servable: {', '.join(a.id for a in manifest.servable()) or 'none'}{others})")
    if not (chosen := [a for a in servable if a.id not in skip]):
        raise RepositoryError(f"--skip leaves out every artifact of bundle {manifest.name!r} Triton can serve "
                              f"({', '.join(a.id for a in servable)}): nothing to write")
    return chosen


def not_refreshed(out: Path, manifest: Manifest, written: Sequence[str], skip: Collection[str]) -> list[str]:
    """Notes for the models of the repository `out` that an earlier export of a bundle of this name wrote (their
    newest version is a bundle of one artifact whose model name this bundle gives) and this one, not writing them,
    leaves serving what they served: a refused, skipped or absent artifact's model is not this bundle's."""
    if not out.is_dir():
        return []
    gated, notes = refused(manifest), []
    for model_dir in sorted(out.iterdir()):
        if model_dir.name in written or model_dir.name.startswith(".") or model_dir.is_symlink() \
                or not model_dir.is_dir() or (served := served_version(model_dir)) is None:
            continue
        with contextlib.suppress(BundleError, OSError):
            artifacts = read_manifest(model_dir / str(served)).artifacts
            if len(artifacts) != 1 or model_name(manifest, artifacts[0].id) != model_dir.name:
                continue
            a = artifacts[0].id
            why = (_why_refused(gated[a]) if a in gated else "--skip left it out" if a in skip
                   else f"bundle {manifest.name!r} has no {a}")
            notes.append(f"{model_dir.name}: not refreshed by this export ({why}): it still serves version {served}, "
                         f"from an earlier export of a bundle named {manifest.name!r}")
    return notes
