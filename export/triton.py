"""Bundle -> Triton model repository (+ a KServe InferenceService for it), for when one vitc process is not enough.

`python -m export.triton BUNDLE --out REPO` writes, for every servable artifact Triton can run,

    REPO/<name>-<artifact>/config.pbtxt     max_batch_size, dynamic batching, input/output names, dims and types,
                                            instance group (CPU or GPU), warm-up, labels for classification
    REPO/<name>-<artifact>/labels.txt
    REPO/<name>-<artifact>/<version>/       model.onnx | model.xml + model.bin | model.plan, and a vitc
                                            manifest.json + golden.npz: the version directory is itself a bundle
    REPO/inferenceservice.yaml              KServe InferenceService serving the repository with Triton

so Triton, KServe and `python -m serve --model-repository REPO` all serve the same files. Writing a new version
(`--version N`, default: the next) beside the old ones is how a model is updated in place.

Exit codes: 0 written, 2 bad input (one line).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import runtimes
from models.bundle import (
    MANIFEST_FILE,
    NAME_RULE,
    Artifact,
    BundleError,
    FileEntry,
    Manifest,
    as_name,
    file_entries,
    read_manifest,
    safe_relative_path,
    valid_name,
    verify_file,
    verify_files,
    write_manifest,
)
from models.bundle import (
    TRITON_CONFIG_FILE as CONFIG_FILE,
)
from models.bundle import (
    TRITON_LABELS_FILE as LABELS_FILE,
)
from models.cli import OneLineParser
from models.io import DirectoryBusy, _default_mode, _remove_stale, atomic_write_bytes, writer_lock

ISVC_FILE = "inferenceservice.yaml"
MAX_VERSION = 2**63 - 1  # Triton reads version directories as int64
MAX_INSTANCES = 1024
MAX_QUEUE_DELAY_US = 60_000_000  # a minute: anything longer is a typo, not a batching policy
MAX_URI_CHARS = 2048
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # RFC 1123: a Kubernetes object name
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S+$")
_VERSION_DIR = re.compile(r"^[1-9][0-9]{0,18}$")


class RepositoryError(ValueError):
    """A bad option for the repository or its InferenceService (one line)."""


def model_name(manifest: Manifest, artifact: Artifact) -> str:
    """The repository model name of one artifact: `<bundle name>-<artifact id>`, made valid (older exports kept
    names such as 'my bundle')."""
    return as_name(f"{manifest.name}-{artifact.id}")


def _has_control(value: str) -> bool:
    """Whether `value` holds a control character or a line break (C0, DEL, C1, U+2028/9)."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029" for c in value)


def _text(value: str, what: str) -> str:
    """`value` as a quoted protobuf-text string; control characters are refused, not escaped."""
    if _has_control(value):
        raise BundleError(f"{what} {value[:50]!r} holds a control character")
    return json.dumps(value, ensure_ascii=False)  # only \" and \\ get escaped: valid protobuf text escapes


def config_pbtxt(name: str, manifest: Manifest, artifact: Artifact, *, kind: str, instances: int,
                 max_queue_delay_us: int) -> str:
    """Triton's model configuration (protobuf text format) for one artifact."""
    rt = runtimes.get(artifact.runtime)
    c, h, w = manifest.input.sample_shape
    max_batch = manifest.input.max_batch
    preferred = sorted({b for b in (8, max_batch) if b <= max_batch})
    params = "".join(f"parameters {{ key: {_text(k, 'parameter')} value: "
                     f"{{ string_value: {_text(v, 'parameter')} }} }}\n"
                     for k, v in rt.triton_parameters(artifact).items())
    inp, out = _text(manifest.input.name, "input name"), _text(manifest.output.name, "output name")
    return (
        f"name: {_text(name, 'model name')}\n"
        f'backend: "{rt.triton_backend}"\n'
        f"max_batch_size: {max_batch}\n"
        f"input [{{ name: {inp} data_type: TYPE_FP32 format: FORMAT_NCHW "
        f"dims: [ {c}, {h}, {w} ] }}]\n"
        f"output [{{ name: {out} data_type: TYPE_FP32 dims: [ {manifest.output.classes} ] "
        f'label_filename: "{LABELS_FILE}" }}]\n'
        f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] "
        f"max_queue_delay_microseconds: {max_queue_delay_us} }}\n"
        f"instance_group [{{ count: {instances} kind: KIND_{kind.upper()} }}]\n"
        f"version_policy: {{ latest: {{ num_versions: 1 }} }}\n"
        f'model_warmup [{{ name: "zeros" batch_size: 1 inputs {{ key: {inp} value: '
        f"{{ data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] zero_data: true }} }} }}]\n"
        + params
    )


def inference_service(name: str, storage_uri: str, gpus: int) -> str:
    """A KServe InferenceService (serving.kserve.io/v1beta1) running Triton on the repository."""
    resources = ("        requests: {cpu: \"2\", memory: 2Gi}\n"
                 f"        limits: {{cpu: \"4\", memory: 8Gi{', nvidia.com/gpu: ' + str(gpus) if gpus else ''}}}\n")
    return (
        "# Generated by `python -m export.triton`: Triton serving this model repository on KServe.\n"
        "# Upload the repository to the storage URI below (S3, GCS or a PVC) before applying this manifest.\n"
        "apiVersion: serving.kserve.io/v1beta1\n"
        "kind: InferenceService\n"
        "metadata:\n"
        f"  name: {name}\n"  # a checked DNS label: nothing to quote
        "spec:\n"
        "  predictor:\n"
        "    model:\n"
        "      modelFormat:\n"
        "        name: triton\n"
        "      protocolVersion: v2\n"
        f"      storageUri: {json.dumps(storage_uri)}\n"  # a JSON string is a YAML double-quoted scalar
        "      args: [\"--strict-model-config=true\"]\n"
        "      resources:\n" + resources
    )


def check_options(*, version: int | None, kind: str | None, instances: int, max_queue_delay_us: int,
                  storage_uri: str | None, isvc_name: str | None) -> None:
    """Refuse options that Triton or Kubernetes would reject, or that would inject text into the files written."""
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise RepositoryError(f"--version must be in 1..{MAX_VERSION} (Triton's int64), got {version}")
    if kind not in (None, "cpu", "gpu"):
        raise RepositoryError(f"--kind must be cpu or gpu, got {kind!r}")
    if not 1 <= instances <= MAX_INSTANCES:
        raise RepositoryError(f"--instances must be in 1..{MAX_INSTANCES}, got {instances}")
    if not 0 <= max_queue_delay_us <= MAX_QUEUE_DELAY_US:
        raise RepositoryError(f"--max-queue-delay-us must be in 0..{MAX_QUEUE_DELAY_US}, got {max_queue_delay_us}")
    if storage_uri is not None:
        _check_storage_uri(storage_uri)
    if isvc_name is not None and not DNS_LABEL.fullmatch(isvc_name):
        raise RepositoryError(f"--isvc-name {isvc_name!r} is not a Kubernetes name (RFC 1123 label: 1..63 of a-z "
                              "0-9 -, starting and ending with a letter or digit)")


def _check_storage_uri(uri: str) -> None:
    if len(uri) > MAX_URI_CHARS or not _URI.fullmatch(uri) or not uri.isprintable():
        raise RepositoryError(f"--storage-uri {uri[:100]!r} must be scheme://location (s3://, gs://, pvc://, ...) "
                              f"of at most {MAX_URI_CHARS} characters, without whitespace or control characters")


def isvc_default_name(manifest: Manifest) -> str:
    """`vitc-<bundle name>` made a Kubernetes name."""
    return re.sub(r"[^a-z0-9-]+", "-", f"vitc-{manifest.name}".lower())[:63].rstrip("-")


def _next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.fullmatch(p.name)] \
        if model_dir.is_dir() else []
    return max(versions, default=0) + 1


def _triton_artifacts(manifest: Manifest) -> list[Artifact]:
    """The servable artifacts Triton has a backend for (torch safetensors: Triton's PyTorch backend needs
    TorchScript)."""
    return [a for a in manifest.servable() if a.runtime in runtimes.names()
            and runtimes.get(a.runtime).triton_backend is not None]


def _model_dir_name(manifest: Manifest, artifact: Artifact) -> str:
    name = model_name(manifest, artifact)
    if not valid_name(name):  # checked again here: it becomes a directory name under --out
        raise BundleError(f"model name {name!r} is not a valid repository model name ({NAME_RULE})")
    return name


def write_repository(bundle: str | Path, out: str | Path, *, version: int | None = None, kind: str | None = None,
                     instances: int = 1, max_queue_delay_us: int = 2000, storage_uri: str | None = None,
                     isvc_name: str | None = None) -> list[Path]:
    """Add every Triton-servable artifact of `bundle` to the repository `out`; returns the version directories.

    Everything is built and verified in a temporary directory beside `out`, then renamed into place: on any error
    nothing is written (BundleError, RepositoryError, DirectoryBusy, OSError). An existing version is never
    overwritten.
    """
    check_options(version=version, kind=kind, instances=instances, max_queue_delay_us=max_queue_delay_us,
                  storage_uri=storage_uri, isvc_name=isvc_name)
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    artifacts = _triton_artifacts(manifest)
    if not artifacts:
        raise BundleError(f"bundle {manifest.name!r} has no artifact Triton can serve "
                          f"(servable: {', '.join(a.id for a in manifest.servable()) or 'none'})")
    if out.exists() and not out.is_dir():
        raise RepositoryError(f"--out {out} exists and is not a directory")
    storage_uri = storage_uri or f"pvc://vitc-models/{urllib.parse.quote(out.resolve().name, safe='')}"
    _check_storage_uri(storage_uri)
    isvc_name = isvc_name or isvc_default_name(manifest)
    check_options(version=None, kind=None, instances=1, max_queue_delay_us=0, storage_uri=None, isvc_name=isvc_name)
    _check_labels(manifest)
    devices = {a.id: kind or ("gpu" if "cpu" not in runtimes.get(a.runtime).devices else "cpu") for a in artifacts}
    gpus = instances if "gpu" in devices.values() else 0
    created = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with writer_lock(out):
            _remove_stale(out)  # a killed run's staging directory
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            try:
                os.chmod(staging, _default_mode(0o777))
                plan = []
                for artifact in artifacts:
                    name = _model_dir_name(manifest, artifact)
                    v = version or _next_version(out / name)
                    if v > MAX_VERSION:
                        raise BundleError(f"{out / name} has no version left below {MAX_VERSION}")
                    if (out / name / str(v)).exists():  # checked again, under the lock, when published
                        raise _exists(out / name / str(v))
                    _stage_model(bundle, manifest, artifact, staging / name, v, kind=devices[artifact.id],
                                 instances=instances, max_queue_delay_us=max_queue_delay_us)
                    plan.append((name, v))
                atomic_write_bytes(staging / ISVC_FILE, inference_service(isvc_name, storage_uri, gpus).encode())
                return _publish(staging, out, plan)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for d in created:  # the parents this call made, deepest first: only while still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _missing_parents(out: Path) -> list[Path]:
    """The ancestors of `out` that do not exist yet, deepest first."""
    return [p for p in out.absolute().parents if not p.exists()]


def _check_labels(manifest: Manifest) -> None:
    """labels.txt is one class per line: a name holding a line break would shift every label after it."""
    for n in manifest.class_names:
        if _has_control(n):
            raise BundleError(f"class name {n[:50]!r} holds a control character; labels.txt would be misaligned")


def _stage_model(bundle: Path, manifest: Manifest, artifact: Artifact, model_dir: Path, version: int, *,
                 kind: str, instances: int, max_queue_delay_us: int) -> None:
    """Write one model directory (config, labels, one verified version) under the staging directory."""
    target = model_dir / str(version)
    target.mkdir(parents=True)
    copies = _version_files(bundle, manifest, artifact)
    for dst, (src, entry) in copies.items():
        (target / dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target / dst)
        if file_entries(target, [target / dst])[0] != replace(entry, path=dst):  # the source changed mid-copy
            raise BundleError(f"{src} changed while it was copied; run again")
    files = file_entries(target, [target / dst for dst, (_, e) in copies.items() if e in artifact.files])
    # The golden file keeps its path and (checked) content: the manifest's entry for it stays true.
    write_manifest(target, replace(manifest, name=model_dir.name, artifacts=(replace(artifact, files=files),)))
    atomic_write_bytes(model_dir / CONFIG_FILE, config_pbtxt(
        model_dir.name, manifest, artifact, kind=kind, instances=instances, max_queue_delay_us=max_queue_delay_us
    ).encode())
    atomic_write_bytes(model_dir / LABELS_FILE, ("\n".join(manifest.class_names) + "\n").encode())


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


def _publish(staging: Path, out: Path, plan: list[tuple[str, int]]) -> list[Path]:
    """Rename the staged models (and the InferenceService) into `out`; undone if any step fails."""
    if not out.exists():  # a new repository: one rename
        os.rename(staging, out)
        return [out / name / str(v) for name, v in plan]
    undo: list[Callable[[], None]] = []
    try:
        written = []
        for name, v in plan:
            src, dst = staging / name, out / name
            if not dst.exists():
                os.rename(src, dst)
                undo.append(lambda d=dst: shutil.rmtree(d))
            else:
                if (dst / str(v)).exists():
                    raise _exists(dst / str(v))
                os.rename(src / str(v), dst / str(v))
                undo.append(lambda d=dst / str(v): shutil.rmtree(d))
                for f in (CONFIG_FILE, LABELS_FILE):
                    undo.append(_replace_file(src / f, dst / f, staging))
            written.append(dst / str(v))
        undo.append(_replace_file(staging / ISVC_FILE, out / ISVC_FILE, staging))
        return written
    except BaseException:
        for step in reversed(undo):
            with contextlib.suppress(OSError):
                step()
        raise


def _exists(version_dir: Path) -> BundleError:
    return BundleError(f"{version_dir} already exists; versions are never overwritten (pass another --version)")


def _replace_file(src: Path, dst: Path, staging: Path) -> Callable[[], None]:
    """Atomically replace `dst` by `src`; returns what puts the old `dst` back (or removes the new one)."""
    backup = Path(tempfile.mkdtemp(prefix="old-", dir=staging)) / dst.name
    had = dst.exists()
    if had:
        shutil.copy2(dst, backup)
    os.replace(src, dst)
    return (lambda: os.replace(backup, dst)) if had else (lambda: dst.unlink())


def main(argv: Sequence[str] | None = None) -> int:
    p = OneLineParser(prog="python -m export.triton", description=__doc__.splitlines()[0],
                      epilog="Serve it: tritonserver --model-repository REPO, kubectl apply -f "
                             f"REPO/{ISVC_FILE}, or python -m serve --model-repository REPO.")
    p.add_argument("bundle", help="bundle directory (python -m export writes one)")
    p.add_argument("--out", required=True, help="model repository directory (created or added to)")
    p.add_argument("--version", type=int, help=f"version number to write, 1..{MAX_VERSION} (default: the next one)")
    p.add_argument("--kind", choices=("cpu", "gpu"), help="instance group kind (default: by runtime)")
    p.add_argument("--instances", type=int, default=1, help=f"model instances per device, 1..{MAX_INSTANCES} [1]")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help=f"dynamic batching delay, 0..{MAX_QUEUE_DELAY_US} [2000]")
    p.add_argument("--storage-uri", help="where the repository will live, for the InferenceService: scheme://location, "
                                         "no whitespace (default pvc://vitc-models/<repo dir>)")
    p.add_argument("--isvc-name", help="InferenceService name, a Kubernetes name: a-z 0-9 -, at most 63 "
                                       "(default vitc-<bundle name>)")
    args = p.parse_args(argv)
    try:
        written = write_repository(args.bundle, args.out, version=args.version, kind=args.kind,
                                   instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                                   storage_uri=args.storage_uri, isvc_name=args.isvc_name)
    except (BundleError, DirectoryBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RepositoryError as exc:
        p.error(str(exc))
    except OSError as exc:
        print(f"error: cannot write {args.out}: {exc.strerror or exc} (nothing was written)", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path} (a bundle too: {MANIFEST_FILE})")
    print(f"wrote {Path(args.out) / ISVC_FILE}")
    return 0


if __name__ == "__main__":
    from models.cli import run

    run(main, "python -m export.triton")
