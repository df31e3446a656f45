"""Staging and publishing a model repository for `python -m export.triton`: which --out it may write into, the
model directories staged (and verified) in a temporary directory, and the renames that publish them.

Everything is staged beside the repository, or inside it, hidden, where it is a mount point (a rename from beside it
would cross mounts), then renamed into place. A model that exists already is staged whole (its earlier versions
hard-linked, its kept files copied) and swapped in by one RENAME_EXCHANGE: a reader (a server loading it, Triton
polling) finds the old model directory or the new one, never a version beside a config that does not fit it. A
killed run's staging directory is removed by the next run, which says what the killed run had not published: its
staging directory holds just that.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import runtimes
from export.kserve import ISVC_FILE, ISVC_HEADER, RepositoryError
from export.triton_config import config_pbtxt, labels_text, untouched
from models.bundle import (
    MANIFEST_FILE,
    Artifact,
    BundleError,
    FileEntry,
    Manifest,
    file_entries,
    read_manifest,
    safe_relative_path,
    verify_file,
    verify_files,
    write_manifest,
)
from models.bundle import TRITON_CONFIG_FILE as CONFIG_FILE
from models.bundle import TRITON_LABELS_FILE as LABELS_FILE
from models.io import atomic_write_bytes, exchange, is_mount_point, not_a_file, remove_stale, resolve_path
from models.triton_layout import is_version_name, triton_reads, version_dirs

# Where --out is a mount point (a volume, a PVC: the usual Triton and KServe layout), a rename from beside it into it
# crosses mounts (EXDEV), so the run stages and locks inside it, under these hidden names; it then needs nothing
# above --out (a container's root may be read-only). vitc's server skips hidden directories, Triton does not (it
# would try to load one as a model), so they exist only while a run writes, or after a kill until the next run.
INSIDE_STAGING = ".export-triton."  # + 8 random characters + ".tmp" (tempfile.mkdtemp)
INSIDE_LOCK = ".export-triton.lock"
_INSIDE_LEFTOVER = re.compile(r"\.export-triton\.(?:[a-z0-9_]{8}\.tmp|lock)")
# A staging directory's own entry, made (one mkdir) just before its first rename into the repository: a killed run's
# staging directory with it had begun to publish. The backups of the files and model directories a publish replaces
# go in it. A hidden name: no model is named so (models.bundle.NAME_RE).
_PUBLISHING = ".publishing"
_BACKUP = "old-"  # + random characters (tempfile.mkdtemp): one directory in _PUBLISHING per replaced entry
# The lock file the first releases of this tool (d0d913b to ca5e35d^, e.g. 900a975) made beside each version they
# wrote, `.<version>.lock`, empty (models.io._writer_lock: an O_CREAT'd file for flock), and never removed. Nothing
# uses it now: the model directory is still this tool's, and the file goes when a new version of the model is
# published (`_complete` leaves it out of the directory swapped in).
_EARLIER_LOCK = re.compile(r"\.([0-9]+)\.lock")
# A hard link the file system or the kernel refuses (no links there, protected_hardlinks on another user's file, a
# file at its link limit): the file is copied instead.
_NO_LINK = (errno.EPERM, errno.EMLINK, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)


def check_out(bundle: Path, out: Path, names: Sequence[str]) -> None:
    """Refuse an --out this tool must not write into (RepositoryError, one line): the bundle itself, a directory
    inside it or above it, a non-directory, or a non-empty directory that is not a repository it wrote. In a
    repository of ours, the model directories it will add a version to must be of its own shape too."""
    try:
        src, dst = resolve_path(bundle), resolve_path(out)
    except OSError as exc:  # a symlink loop
        raise RepositoryError(f"--out {out}: {exc.strerror or exc}") from None
    if dst == src or src in dst.parents:
        raise RepositoryError(f"--out {out} is the bundle {bundle} or inside it; pick a directory of its own")
    if dst in src.parents:
        raise RepositoryError(f"--out {out} holds the bundle {bundle}; pick a directory of its own")
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"--out {out} exists and is not a directory")
    if out.is_symlink() and not out.exists():  # a repository is created by renaming a directory to it: not a link
        raise RepositoryError(f"--out {out} is a symbolic link to nothing; create the directory it names, or give "
                              "the path of a directory")
    if not out.exists() or all(own_leftover(e) for e in out.iterdir()):
        return
    isvc = out / ISVC_FILE
    if isvc.is_symlink():  # neither followed (it would write elsewhere) nor taken for a repository's own file
        raise RepositoryError(f"--out {out}: {isvc} is a symbolic link, not a regular file: this tool writes the "
                              f"repository's {ISVC_FILE} itself and follows no link there; replace it with a copy "
                              "of the file it names, or remove it")
    if os.path.lexists(isvc) and not isvc.is_file():
        # A directory (or a FIFO) there is no repository's file, nor an absent one: its rename would fail last.
        raise RepositoryError(f"--out {out}: {isvc} {not_a_file(isvc)}; remove it (this tool writes the "
                              f"repository's {ISVC_FILE})")
    if (why := _not_ours(out)) is not None:
        raise RepositoryError(f"--out {out} is a non-empty directory and not a model repository written by "
                              f"python -m export.triton ({why}); refusing to write into it (pick an empty or new "
                              "directory)")
    for name in names:
        if (why := _foreign_model_dir(out / name)) is not None:
            raise RepositoryError(f"--out {out}: {name}/ is not a model directory of this tool ({why}); "
                                  "refusing to write into it")


def _not_ours(out: Path) -> str | None:
    """Why `out` is not a repository this tool wrote (None: it is one): its inferenceservice.yaml starts with this
    tool's header, or (that file deleted, or its first line removed by an edit or a YAML formatter) every entry is a
    model directory of this tool's shape, or that file, and one of them holds a version this tool wrote."""
    isvc = out / ISVC_FILE
    header: str | None = f"no {ISVC_FILE}"
    if isvc.is_file() and not isvc.is_symlink():
        try:
            with open(isvc, "rb") as f:
                head = f.read(len(ISVC_HEADER))
        except OSError as exc:
            return f"{ISVC_FILE} is unreadable: {exc.strerror or exc}"
        header = None if head == ISVC_HEADER.encode() else f"its {ISVC_FILE} was not written by this tool"
    for marker in (MANIFEST_FILE, "checkpoint.json"):  # a bundle or a checkpoint that was written into before
        if (out / marker).exists():
            return f"it holds {marker}" if header is None else f"{header}, and it holds {marker}"
    if header is None or (why := _not_our_models(out)) is None:
        return None
    return f"{header}, and {why}"


def _not_our_models(out: Path) -> str | None:
    """Why `out` does not hold only model directories of this tool (and its inferenceservice.yaml), one of them
    with a version this tool wrote (None: it does)."""
    written = False
    for entry in sorted(out.iterdir()):
        if (entry.name == ISVC_FILE and entry.is_file() and not entry.is_symlink()) or own_leftover(entry):
            continue
        if entry.is_symlink() or not entry.is_dir():
            return f"it holds {entry.name!r}"
        if (why := _foreign_model_dir(entry)) is not None:
            return f"{entry.name}/ is not a model directory of this tool ({why})"
        written = written or _holds_written_version(entry)
    return None if written else "none of its directories holds a model version written by this tool"


def _holds_written_version(model_dir: Path) -> bool:
    """Whether a version directory of `model_dir` is a bundle of one artifact named after `model_dir`, as
    `stage_model` writes it."""
    for v in version_dirs(model_dir):
        with contextlib.suppress(BundleError, OSError):
            m = read_manifest(model_dir / str(v))
            if m.name == model_dir.name and len(m.artifacts) == 1:
                return True
    return False


def _foreign_model_dir(model_dir: Path) -> str | None:
    """Why an existing `model_dir` is not one this tool wrote (None: it is, or it does not exist): ours hold
    config.pbtxt, labels.txt and numbered version directories, each a bundle (and the first releases' lock files)."""
    if not model_dir.exists() and not model_dir.is_symlink():
        return None
    if model_dir.is_symlink():
        return "a symbolic link; the tool writes its model directories itself"
    if not model_dir.is_dir():
        return "not a directory"
    for entry in model_dir.iterdir():
        if _earlier_lock(entry):
            continue
        if entry.name in (CONFIG_FILE, LABELS_FILE):
            if entry.is_symlink() or not entry.is_file():
                return f"{entry.name} is not a file"
        # A linked version is one Triton loads (version_dirs counts it), but not one this tool wrote: not ours.
        elif is_version_name(entry.name) and entry.is_symlink():
            return f"version {entry.name} is a symbolic link (Triton loads it; this tool writes every version itself)"
        elif not (is_version_name(entry.name) and entry.is_dir()):
            return f"it holds {entry.name!r}{_as_triton_reads(entry)}"
        elif not (entry / MANIFEST_FILE).is_file():
            return f"version {entry.name} is not a bundle"
    return None


def _earlier_lock(entry: Path) -> bool:
    """Whether the model directory's `entry` is the lock file an earlier release left beside a version it wrote:
    named `.<version>.lock`, a regular file (not a link), empty."""
    if (m := _EARLIER_LOCK.fullmatch(entry.name)) is None or not is_version_name(m[1]):
        return False
    try:
        st = entry.lstat()
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _as_triton_reads(entry: Path) -> str:
    """How Triton reads a directory named like no version ("5.bak" is version 5 to it, whose backend then opens
    "5/"), said as the server's refusal of such a model says it; "" for one Triton skips, or a file."""
    version = triton_reads(entry.name) if entry.is_dir() else None
    if version is None or str(version) == entry.name:
        return ""
    return f", which Triton reads as version {version}: rename or remove it"


def stages_inside(out: Path) -> bool:
    """Whether a run into `out` stages and locks inside it (the directory it names, a link followed, is a mount
    point), not beside it."""
    try:
        return out.is_dir() and is_mount_point(resolve_path(out))
    except OSError:  # a symlink loop: check_out refuses it
        return False


def own_leftover(entry: Path) -> bool:
    """Whether `entry` of a repository is the staging directory or lock file of a run that stages inside it."""
    return _INSIDE_LEFTOVER.fullmatch(entry.name) is not None


def clear_leftovers(out: Path, *, inside: bool) -> str | None:
    """Remove the staging directories that killed runs into `out` left (beside it, or in it where runs stage
    `inside`; the lock file stays: the caller holds it). Returns the note that says what they did to the repository;
    None when there is nothing to say: nothing was left, or nothing unpublished (a publish that had finished, killed
    before it removed its staging directory), after which this run is like any other."""
    if inside:
        found = [e for e in out.iterdir()
                 if e.name != INSIDE_LOCK and own_leftover(e) and e.is_dir() and not e.is_symlink()]
    else:  # the names models.io.remove_stale removes: tempfile.mkdtemp's, as the staging was made
        own = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp")
        found = [e for e in out.parent.iterdir() if own.fullmatch(e.name) and e.is_dir() and not e.is_symlink()]
    for staging in found:
        _put_back_missing(staging, out)
    left = {_unpublished(e, out) for e in found}
    if inside:
        for entry in found:
            shutil.rmtree(entry, ignore_errors=True)
    else:
        remove_stale(out)
    if "some" in left:
        return (f"{out}: a publish into it was stopped before it finished (killed): its staging directory was "
                "removed; models it had published keep that version, and this run adds the next version of each of "
                "its own")
    if "all" in left:
        return f"{out}: a run into it was killed before it published anything: its staging directory was removed"
    return None


def _put_back_missing(staging: Path, out: Path) -> None:
    """Put back the old model directories a killed run had moved aside (between the two renames of a swap without
    RENAME_EXCHANGE) whose place in `out` it left empty."""
    backups = staging / _PUBLISHING
    if not backups.is_dir() or backups.is_symlink():
        return
    for kept in backups.glob(f"{_BACKUP}*/*"):
        if kept.is_dir() and not kept.is_symlink() and not os.path.lexists(out / kept.name):
            os.rename(kept, out / kept.name)


def _unpublished(staging: Path, out: Path) -> str | None:
    """What the killed run that left `staging` had not published: "all" (it was still staging), "some" (it had
    begun to publish), or None: nothing (it had published everything, and only the removal of `staging` was left; or
    it had staged no file yet). `publish` drops from `staging` what it keeps before its first rename, so a file left
    there, besides the backups in its `_PUBLISHING` directory and an old model directory just swapped out of `out`,
    is one it had not published."""
    try:
        left = [e for e in staging.iterdir() if e.name != _PUBLISHING and not _swapped_out(e, out)]
        if not any(_is_or_holds_file(e) for e in left):
            return None
        return "some" if (staging / _PUBLISHING).is_dir() else "all"
    except OSError:
        return "some"  # cannot tell: the note that assumes least


def _swapped_out(entry: Path, out: Path) -> bool:
    """Whether a staging directory's `entry` is the old model directory a publish swapped out of `out` (it lies where
    the staged one was until it joins the backups): the staged one holds a version its model in `out` lacks, the old
    one none."""
    if entry.is_symlink() or not entry.is_dir() or not (out / entry.name).is_dir():
        return False
    return set(version_dirs(entry)) <= set(version_dirs(out / entry.name))


def _is_or_holds_file(entry: Path) -> bool:
    """Whether `entry` is a file (anything but a directory), or a directory holding one at any depth."""
    return entry.is_symlink() or not entry.is_dir() or any(_is_or_holds_file(e) for e in entry.iterdir())


def missing_parents(out: Path) -> list[Path]:
    """The ancestors of `out` that do not exist yet, deepest first."""
    return [p for p in out.absolute().parents if not p.exists()]


def stage_model(bundle: Path, manifest: Manifest, artifact: Artifact, model_dir: Path, version: int, *,
                kind: str, instances: int, max_queue_delay_us: int, cpus: int | None, labels: bool = True) -> None:
    """Write one model directory (config, labels unless not `labels`, one verified version) under the staging
    directory."""
    target = model_dir / str(version)
    target.mkdir(parents=True)
    copies = _version_files(bundle, manifest, artifact)
    for dst, (src, entry) in copies.items():
        (target / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target / dst)
        if file_entries(target, [target / dst])[0] != replace(entry, path=dst):  # the source changed mid-copy
            raise BundleError(f"{src} changed while it was copied; run again")
    files = file_entries(target, [target / dst for dst, (_, e) in copies.items() if e in artifact.files])
    golden = manifest.golden
    if golden is not None:  # this version's golden file records this artifact alone (a record never listed is an edit)
        golden = replace(golden, file=_golden_of(target, golden.file.path, manifest, artifact.id))
    write_manifest(target, replace(manifest, name=model_dir.name, artifacts=(replace(artifact, files=files),),
                                   golden=golden))
    atomic_write_bytes(model_dir / CONFIG_FILE, config_pbtxt(
        model_dir.name, manifest, artifact, kind=kind, instances=instances, max_queue_delay_us=max_queue_delay_us,
        cpus=cpus).encode())
    if labels:  # else the model directory's own labels.txt is kept (`_complete`)
        atomic_write_bytes(model_dir / LABELS_FILE, labels_text(manifest.class_names))


def _golden_of(target: Path, path: str, manifest: Manifest, artifact_id: str) -> FileEntry:
    """Rewrite the copied golden file with the arrays of this artifact alone (not the other artifacts' outputs and
    records), each read bounded and checked as a server reads it; its new manifest entry."""
    import numpy as np

    from runtimes.loader import golden_arrays

    golden = target / path
    kept = golden_arrays(golden, manifest, artifact_id)  # BundleError for a member no golden file holds
    tmp = golden.with_name(golden.name + ".tmp.npz")
    np.savez_compressed(tmp, **kept)
    os.replace(tmp, golden)
    return file_entries(target, [golden])[0]


def _version_files(bundle: Path, manifest: Manifest, artifact: Artifact) -> dict[str, tuple[Path, FileEntry]]:
    """Version-relative destination -> (verified source, its manifest entry): the artifact's files under the names
    Triton's backend expects, and the golden file. Every source is checked (inside the bundle, size, sha256)."""
    renames = dict(runtimes.get(artifact.runtime).triton_files)
    out: dict[str, tuple[Path, FileEntry]] = {}
    sources = list(zip(verify_files(bundle, artifact), artifact.files, strict=True))
    if manifest.golden is not None:
        sources.append((verify_file(bundle, manifest.golden.file, "golden file"), manifest.golden.file))
    for src, entry in sources:
        is_golden = manifest.golden is not None and entry is manifest.golden.file
        dst = entry.path if is_golden else next((n for sfx, n in renames.items() if src.name.endswith(sfx)), src.name)
        if not safe_relative_path(dst) or dst in out or dst == MANIFEST_FILE:
            raise BundleError(f"artifact {artifact.id!r}: two files would be copied to {dst!r}")
        out[dst] = (src, entry)
    return out


def publish(staging: Path, out: Path, plan: list[tuple[str, int]], replace_config: bool,
            kept: list[Path], keep_labels: set[str]) -> list[Path]:
    """Rename the staged models (and the InferenceService, if staged) into `out`; undone if any step fails. An
    existing model's config.pbtxt that differs from the generated one is kept (and listed in `kept`) unless
    `replace_config`, and so is the labels.txt of the models in `keep_labels`. An existing model directory is
    replaced whole, in one step where the file system can (`_swap_model`)."""
    if not out.exists():  # a new repository: one rename
        os.rename(staging, out)
        return [out / name / str(v) for name, v in plan]
    # What each existing model keeps is decided, and dropped from the staging directory, before the first rename:
    # the staging directory then holds only what is still to be published (what a killed run left says how far it
    # got, `_unpublished`).
    for name, v in plan:
        src, dst = staging / name, out / name
        if not dst.exists():
            continue
        if (dst / str(v)).exists():
            raise version_exists(dst / str(v))
        if name in keep_labels:  # edited by hand: the classification answers are the user's (not staged)
            kept.append(dst / LABELS_FILE)
        generated = (src / CONFIG_FILE).read_bytes()
        if not (replace_config or not (dst / CONFIG_FILE).is_file() or untouched(dst / CONFIG_FILE)
                or (dst / CONFIG_FILE).read_bytes() == generated.partition(b"\n")[2]):
            # Neither ours and untouched, nor what an older version of this tool wrote (no hash line) and the same.
            if (dst / CONFIG_FILE).read_bytes() != generated:
                # The model's configuration is the user's once written (vitc and Triton both batch by it): a new
                # version keeps an edited one.
                kept.append(dst / CONFIG_FILE)
            (src / CONFIG_FILE).unlink()
        _complete(src, dst)
    done = staging / _PUBLISHING
    os.mkdir(done)
    undo: list[Callable[[], None]] = []
    try:
        written = []
        for name, v in plan:
            src, dst = staging / name, out / name
            if not dst.exists():
                os.rename(src, dst)
                undo.append(lambda d=dst: shutil.rmtree(d))
            else:
                undo.append(_swap_model(src, dst, done))
            written.append(dst / str(v))
        if (staging / ISVC_FILE).exists():  # not when the repository's edited one is kept
            undo.append(_replace_file(staging / ISVC_FILE, out / ISVC_FILE, done))
        return written
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(OSError):
                step()
        raise


def version_exists(version_dir: Path) -> BundleError:
    """The refusal of a version directory that is there already."""
    return BundleError(f"{version_dir} already exists; versions are never overwritten (pass another --version)")


def _complete(staged: Path, model_dir: Path) -> None:
    """Make the staged model directory whole: what it lacks of the existing `model_dir` (its earlier versions, and
    the config.pbtxt and labels.txt kept; not an earlier release's lock file) is hard-linked or copied into it, so
    that it can replace `model_dir`."""
    for entry in model_dir.iterdir():
        if os.path.lexists(staged / entry.name):  # the new version, or a generated file that replaces the old one
            continue
        if _earlier_lock(entry):  # an earlier release's, used by nothing now: not carried over
            continue
        if entry.is_dir() and not entry.is_symlink():
            _link_tree(entry, staged / entry.name)
        else:  # a kept file: a copy of its own (the user edits it in place; the old directory is discarded)
            shutil.copy2(entry, staged / entry.name, follow_symlinks=False)
    shutil.copymode(model_dir, staged)


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate the directory `src` as `dst`, each file hard-linked (no space taken: an engine is hundreds of MB; a
    backend holding one open reads the same file), or copied where the file system links none."""
    os.mkdir(dst)
    for entry in src.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            _link_tree(entry, dst / entry.name)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), dst / entry.name)
        else:
            try:
                os.link(entry, dst / entry.name)
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
                shutil.copy2(entry, dst / entry.name)
    shutil.copystat(src, dst, follow_symlinks=False)  # last: adding its entries changed its times


def _swap_model(src: Path, dst: Path, backups: Path) -> Callable[[], None]:
    """Replace the model directory `dst` by the whole staged one `src`, the old one kept under `backups`; returns
    what puts the old one back. In one step (RENAME_EXCHANGE): a reader finds the old directory or the new one, each
    config.pbtxt beside the versions it was written for. Where the file system cannot, in two renames, between which
    `dst` is missing: after a kill there, the next run puts it back (`clear_leftovers`)."""
    swapped = exchange(src, dst)
    backup = Path(tempfile.mkdtemp(prefix=_BACKUP, dir=backups)) / dst.name
    if swapped:
        os.rename(src, backup)  # the old directory, now where the staged one was
        return lambda: _put_back(backup, dst)
    os.rename(dst, backup)
    try:
        os.rename(src, dst)
    except BaseException:
        if not os.path.lexists(dst):  # the rename failed (not an interruption after it)
            os.rename(backup, dst)
        raise
    return lambda: _put_back(backup, dst)


def _put_back(backup: Path, dst: Path) -> None:
    """Undo `_swap_model`: the old model directory `backup` in place of the new `dst` again."""
    if exchange(backup, dst):
        return
    shutil.rmtree(dst)
    os.rename(backup, dst)


def _replace_file(src: Path, dst: Path, backups: Path) -> Callable[[], None]:
    """Atomically replace `dst` by `src`, a copy of the old `dst` kept under `backups`; returns what puts the old
    `dst` back (or removes the new one)."""
    backup = Path(tempfile.mkdtemp(prefix=_BACKUP, dir=backups)) / dst.name
    had = dst.exists()
    if had:
        shutil.copy2(dst, backup)
    os.replace(src, dst)
    return (lambda: os.replace(backup, dst)) if had else (lambda: dst.unlink())
