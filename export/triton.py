"""Bundle -> Triton model repository (+ a KServe InferenceService for it), for when one vitc process is not enough.

`python -m export.triton BUNDLE --out REPO` writes, for every servable artifact Triton can run,

    REPO/<name>-<artifact>/config.pbtxt     batching, input/output names, dims and types, instance group (CPU or
                                            GPU), warm-up, labels for classification
    REPO/<name>-<artifact>/labels.txt
    REPO/<name>-<artifact>/<version>/       model.onnx | model.xml + model.bin | model.plan, and a vitc
                                            manifest.json + golden.npz: the version directory is itself a bundle
    REPO/inferenceservice.yaml              KServe InferenceService serving the repository with Triton 24.05 or later

so Triton, KServe and `python -m serve --model-repository REPO` all serve the same files. Writing a new version
(`--version N`, default: the next) beside the old ones is how a model is updated in place: the files this tool
wrote are regenerated, ones edited since (config.pbtxt, labels.txt, inferenceservice.yaml) are kept; a regenerated
config.pbtxt keeps its instance count, kind and queue delay, and the InferenceService its name, storage URI, Triton
release and GPUs, unless they are given again. A TensorRT engine is refused with a Triton release that ships another
TensorRT than the one that built it (`--skip` leaves it out), and so is a release that the engines the repository
serves already cannot load. REPO must be absent, empty, or a repository this tool
wrote (its own inferenceservice.yaml, or only model directories of its own shape holding versions it wrote), and
neither the bundle, nor inside it, nor above it: anything else (a bundle, a checkpoint, a project) is refused. So is a
bundle a server would refuse as edited after export (its golden file, model contract or artifact records), which
Triton, checking none of them, would serve. A REPO that is a mount point (a Docker or Kubernetes volume) is staged
and locked inside itself, in hidden entries that vitc's server skips but a Triton starting meanwhile would try to
load as a model (after a kill, until the next run removes them); anything else is staged beside it.

Exit codes: 0 written, 1 the machine failed (a full disk, out of memory; nothing was written), 2 bad input (one
line).
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import runtimes
from export.kserve import (
    DEFAULT_CPUS,
    DEFAULT_TRITON_VERSION,
    ISVC_FILE,
    MAX_CPUS,
    MAX_GPUS,
    MAX_ISVC_NAME,
    RepositoryError,
    check_isvc_name,
    check_storage_uri,
    inference_service,
    kept_cpu_limit,
    kept_runtime_version,
    plan_service,
    stale_release,
    triton_tag,
)
from export.triton_compat import MIN_TRITON_RELEASE, beyond_min_triton, release, release_rules
from export.triton_config import (
    MAX_INSTANCES,
    caps_threads,
    check_kept,
    check_labels,
    check_served,
    contract_change,
    gpu_models,
    labels_edited,
    past_version,
    previous_options,
    untouched,
)
from export.triton_publish import (
    INSIDE_LOCK,
    INSIDE_STAGING,
    check_out,
    clear_leftovers,
    missing_parents,
    own_leftover,
    publish,
    stage_model,
    stages_inside,
    version_exists,
)
from export.triton_select import choose, model_name, not_refreshed
from models import tritonconfig
from models.bundle import (
    MANIFEST_FILE,
    MAX_NAME_CHARS,
    NAME_RULE,
    Artifact,
    BundleError,
    Manifest,
    name_digest,
    read_manifest,
    valid_name,
)
from models.bundle import (
    TRITON_CONFIG_FILE as CONFIG_FILE,
)
from models.bundle import (
    TRITON_LABELS_FILE as LABELS_FILE,
)
from models.cli import InputError, OneLineParser, command, machine_error, refuse_empty_paths
from models.io import DirectoryBusy, atomic_write_bytes, committing, default_mode, ensure_dir, writer_lock
from models.triton_layout import version_dirs
from models.tritonconfig import MAX_QUEUE_DELAY_US, MAX_VERSION
from runtimes.loader import check_manifest

PROG = "python -m export.triton"
DEFAULT_INSTANCES = 1
DEFAULT_QUEUE_DELAY_US = 2000


def _shortened(manifest: Manifest, artifacts: Sequence[Artifact], names: Sequence[str]) -> str | None:
    """The note for model names cut to Triton's 128 characters (None: none was)."""
    cut = [n for a, n in zip(artifacts, names, strict=True)
           if f"-{name_digest(f'{manifest.name}-{a.id}')}-" in f"-{n}-"]
    if not cut:
        return None
    which = "its model is" if len(cut) == 1 else f"{len(cut)} of its models are"
    return (f"bundle {manifest.name[:40]}... has a {len(manifest.name)}-character name: Triton model names have at "
            f"most {MAX_NAME_CHARS}, so {which} named <bundle name cut>-<hash of the whole name>-<artifact id>, "
            "the artifact id kept whole")


def _check_distinct(manifest: Manifest, artifacts: Sequence[Artifact], names: Sequence[str]) -> None:
    """Refuse two artifacts that would become one model name (BundleError naming both; never a repository clash)."""
    seen: dict[str, str] = {}
    for a, n in zip(artifacts, names, strict=True):
        if n in seen:
            raise BundleError(f"artifacts {seen[n]!r} and {a.id!r} of bundle {manifest.name[:60]!r} would both be "
                              f"the Triton model {n!r}; --skip one of them")
        seen[n] = a.id


def _check_release(name: str, artifact: Artifact, tag: str, exported: Sequence[Artifact], *, kept_isvc: bool,
                   notes: list[str]) -> None:
    """RepositoryError when the InferenceService written now runs a Triton release that cannot load this artifact
    (a TensorRT engine another TensorRT built: Triton would exit at start, every model with it); a note when the kept
    one does, or when this cannot tell."""
    if (rules := release_rules(artifact)) is None:
        return
    if (why := rules.cannot_load(artifact, tag)) is not None:
        if kept_isvc:
            notes.append(f"{name}: the kept {ISVC_FILE} runs Triton {tag}, which cannot load it: {why}; edit its "
                         f"runtimeVersion, or pass --replace-isvc with {rules.advice(artifact)}")
            return
        leave = f", or --skip {artifact.id} to leave the model out" if len(exported) > 1 else ""
        raise RepositoryError(f"{name}: Triton {tag} cannot load it: {why}; pass {rules.advice(artifact)}{leave}")
    if (unknown := rules.cannot_tell(artifact, tag)) is not None:
        notes.append(f"{name}: {unknown}")


def _served_versions(model_dir: Path, new_version: int | None, *, generated: bool) -> list[int]:
    """The versions of `model_dir` that Triton loads once `new_version` (None: none) is written beside them: those its
    config's version_policy selects (the generated config's, latest 1, where `generated`; Triton's default, latest 1,
    for a config this cannot read)."""
    versions = sorted({*version_dirs(model_dir), *([new_version] if new_version else [])})
    policy = tritonconfig.VersionPolicy()
    if not generated:
        with contextlib.suppress(tritonconfig.ConfigError, OSError):
            # None: no config.pbtxt (a model being copied in, or one left to Triton's defaults)
            if (cfg := tritonconfig.read(model_dir)) is not None:
                policy = cfg.version_policy
    if policy.kind == "specific":
        return [v for v in versions if v in policy.versions]
    return versions if policy.kind == "all" else versions[-policy.num_versions:]


def _check_served_releases(out: Path, tag: str, *, was: str | None, writing: dict[str, int], replace_config: bool,
                           notes: list[str]) -> None:
    """Check the artifacts the repository serves already (its TensorRT engines) against Triton `tag`, the release
    the InferenceService written now runs (`was`: the one it ran): RepositoryError when that release cannot load one
    (Triton would exit at start, every model with it); a note when it ran it already, or when this cannot tell.
    `writing` maps the models written now to their new version, checked on their own."""
    if not out.is_dir():
        return
    for model_dir in sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink()):
        new = writing.get(model_dir.name)
        generated = new is not None and (replace_config or not (model_dir / CONFIG_FILE).is_file()
                                         or untouched(model_dir / CONFIG_FILE))
        for v in _served_versions(model_dir, new, generated=generated):
            if v == new:
                continue
            try:
                manifest = read_manifest(model_dir / str(v))
            except (BundleError, OSError):  # not loadable anyway, and nothing this run changes
                continue
            for artifact in (a for a in manifest.artifacts if a.runtime in runtimes.names()):
                if (rules := release_rules(artifact)) is None:
                    continue
                # Unchanged for the artifact when the release it ran loads the same ones (ships the same TensorRT):
                # what fails to load failed already.
                same = was is not None and (was == tag or rules.same(was, tag))
                where = f"{model_dir.name} (version {v}, in the repository)"
                if (why := rules.cannot_load(artifact, tag)) is not None:
                    fix = (f"pass {rules.advice(artifact)} to keep a release that loads it, or first write a "
                           f"new version of {model_dir.name} {rules.loaded_by(tag)}, or remove {model_dir}")
                    if same:  # this run breaks nothing that worked: said, not refused
                        notes.append(f"{where}: Triton {tag}, which the repository runs already, cannot load it: "
                                     f"{why}; {fix}")
                        continue
                    raise RepositoryError(f"{where}: Triton {tag}, which the {ISVC_FILE} written now would run, "
                                          f"cannot load it: {why}; {fix}")
                if not same and (unknown := rules.cannot_tell(artifact, tag)) is not None:
                    notes.append(f"{where}: {unknown}")


def check_options(*, version: int | None, kind: str | None, instances: int | None, max_queue_delay_us: int | None,
                  storage_uri: str | None, isvc_name: str | None, triton_version: str | None = None,
                  gpus: int | None = None, cpus: int | None = None) -> None:
    """Refuse options that Triton or Kubernetes would reject, or that would inject text into the files written."""
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise RepositoryError(f"--version must be in 1..{MAX_VERSION} (Triton's int64), got {version}")
    if kind not in (None, "cpu", "gpu"):
        raise RepositoryError(f"--kind must be cpu or gpu, got {kind!r}")
    if instances is not None and not 1 <= instances <= MAX_INSTANCES:
        raise RepositoryError(f"--instances must be in 1..{MAX_INSTANCES}, got {instances}")
    if max_queue_delay_us is not None and not 0 <= max_queue_delay_us <= MAX_QUEUE_DELAY_US:
        raise RepositoryError(f"--max-queue-delay-us must be in 0..{MAX_QUEUE_DELAY_US}, got {max_queue_delay_us}")
    if gpus is not None and not 0 <= gpus <= MAX_GPUS:
        raise RepositoryError(f"--gpus must be in 0..{MAX_GPUS}, got {gpus}")
    if cpus is not None and not 1 <= cpus <= MAX_CPUS:
        raise RepositoryError(f"--cpus must be in 1..{MAX_CPUS}, got {cpus}")
    if storage_uri is not None:
        check_storage_uri(storage_uri)
    if isvc_name is not None:
        check_isvc_name(isvc_name)
    if triton_version is not None:
        triton_tag(triton_version)


def _next_version(model_dir: Path) -> int:
    """The version after the highest of `model_dir` (1 for a new model); RepositoryError when that is MAX_VERSION."""
    latest = max(version_dirs(model_dir), default=0)
    if latest >= MAX_VERSION:
        raise RepositoryError(f"{model_dir}: there is no next version: {past_version(model_dir, latest)}")
    return latest + 1


def _model_dir_name(manifest: Manifest, artifact: Artifact) -> str:
    name = model_name(manifest, artifact)
    if not valid_name(name):  # checked again here: it becomes a directory name under --out
        raise BundleError(f"model name {name!r} is not a valid repository model name ({NAME_RULE})")
    return name


def _instance_kinds(manifest: Manifest, artifacts: Sequence[Artifact], kind: str | None,
                    previous: dict[str, dict[str, str | int]], notes: list[str]) -> dict[str, str]:
    """Instance group kind ("cpu" or "gpu") per artifact id: `kind`, else the one of its previous config.pbtxt (in
    `previous`, by artifact id), where the artifact's runtime runs there, else the device it runs on (Triton's
    OpenVINO backend refuses KIND_GPU, the TensorRT one KIND_CPU); each such exception is explained in `notes`.
    RepositoryError when no artifact can honour `kind`."""
    kinds = {}
    for a in artifacts:
        rt = runtimes.get(a.runtime)
        runs = {"cpu": "cpu" in rt.devices, "gpu": "cuda" in rt.devices}
        wanted = kind or previous[a.id].get("kind")
        kinds[a.id] = wanted if isinstance(wanted, str) and runs[wanted] else ("cpu" if runs["cpu"] else "gpu")
        if isinstance(wanted, str) and kinds[a.id] != wanted:
            whose = "" if kind else f" as its previous {CONFIG_FILE} had"
            notes.append(f"{model_name(manifest, a)}: KIND_{kinds[a.id].upper()}, not KIND_{wanted.upper()}{whose}: "
                         f"Triton's {rt.triton_backend} backend runs it on the {kinds[a.id].upper()} only")
    if kind is not None and kind not in kinds.values():
        held = sorted({a.runtime for a in artifacts})
        which = f"{' and '.join(held)} {'artifact does' if len(held) == 1 else 'artifacts do'}"
        raise RepositoryError(f"--kind {kind}: no model of bundle {manifest.name!r} runs on the {kind.upper()} in "
                              f"Triton (its {which} not)")
    return kinds


def check_writable(out: Path) -> None:
    """RepositoryError unless the run can write where it writes, tried before any work (a temporary file made and
    removed, so a read-only file system or a closed directory is bad input, not a machine failing after the work):
    inside `out` where `out` is a mount point (it stages there, and needs nothing above it), else the nearest
    existing directory above `out`, where it locks and stages, and `out` itself when it exists (the new models are
    renamed into it)."""
    if stages_inside(out):
        places = [out]
    else:
        above = next((p for p in out.parents if os.path.lexists(p)), None)
        # A file on the way is not this check's to name: creating the directories says why it fails.
        places = [p for p in (above, out) if p is not None and p.is_dir()]
    for place in places:
        try:
            with tempfile.TemporaryFile(dir=place):
                pass
        except OSError as exc:
            raise RepositoryError(f"--out {out}: cannot write in {place}: {exc.strerror or exc} (nothing was "
                                  "written)") from None


def write_repository(bundle: str | Path, out: str | Path, *, version: int | None = None, kind: str | None = None,
                     instances: int | None = None, max_queue_delay_us: int | None = None,
                     storage_uri: str | None = None, isvc_name: str | None = None, triton_version: str | None = None,
                     gpus: int | None = None, cpus: int | None = None, skip: Sequence[str] = (),
                     replace_config: bool = False, replace_isvc: bool = False, kept: list[Path] | None = None,
                     notes: list[str] | None = None) -> list[Path]:
    """Add every Triton-servable artifact of `bundle` to the repository `out`; returns the version directories.

    A model directory that exists already keeps its config.pbtxt when it differs from the generated one (edited by
    hand: vitc and Triton batch by it), unless `replace_config`, and an untouched one keeps its kind, instance count
    and queue delay unless given (a new model gets the runtime's device, DEFAULT_INSTANCES and
    DEFAULT_QUEUE_DELAY_US); the repository keeps an edited inferenceservice.yaml unless `replace_isvc`, and an
    untouched one keeps its name, storage URI, Triton release and GPU count unless given. The kept files are appended
    to `kept`; models whose runtime cannot run on `kind` (or on their previous kind) get the device it runs on,
    explained in `notes`, as is a kept config.pbtxt that does not select the new version. A labels.txt edited since
    it was written is kept too, unless `replace_config`. The artifacts whose ids are in `skip` are left out.

    Everything is built and verified in a temporary directory beside `out` (inside it, hidden, where `out` is a
    mount point: a rename from beside it would cross mounts), then renamed into place: on any error nothing is
    written (BundleError, RepositoryError, DirectoryBusy, OSError). An existing version is never overwritten.
    """
    check_options(version=version, kind=kind, instances=instances, max_queue_delay_us=max_queue_delay_us,
                  storage_uri=storage_uri, isvc_name=isvc_name, triton_version=triton_version, gpus=gpus,
                  cpus=cpus)
    bundle, out = Path(bundle), Path(os.path.abspath(out))  # `--out .`: staging goes beside it, not into it
    kept = kept if kept is not None else []
    manifest = read_manifest(bundle)
    notes = notes if notes is not None else []
    artifacts = choose(manifest, skip, notes)
    names = [_model_dir_name(manifest, a) for a in artifacts]
    _check_distinct(manifest, artifacts, names)
    check_out(bundle, out, names)
    check_writable(out)
    check_labels(manifest)
    # What a server checks before it trusts these artifacts (the golden file, the contract, their records): a
    # manifest edited after export (relabelled, a parity number changed) is refused here, not published for Triton,
    # which checks none of it.
    check_manifest(bundle, manifest, [a.id for a in artifacts], "golden file")
    created = missing_parents(out)
    if (cut := _shortened(manifest, artifacts, names)) is not None:
        notes.append(cut)
    try:
        ensure_dir(out.parent)
        inside = stages_inside(out)
        with writer_lock(out, out / INSIDE_LOCK if inside else None):
            if (cleared := clear_leftovers(out, inside=inside)) is not None:  # a killed run's staging directory
                notes.append(cleared)
            check_out(bundle, out, names)  # again, under the lock: another writer may have been first
            previous = {a.id: previous_options(out / n / CONFIG_FILE) for a, n in zip(artifacts, names, strict=True)}
            devices = _instance_kinds(manifest, artifacts, kind, previous, notes)
            had_isvc = (out / ISVC_FILE).exists() or (out / ISVC_FILE).is_symlink()
            was_cpus = kept_cpu_limit(out / ISVC_FILE) if had_isvc else None
            was = kept_runtime_version(out / ISVC_FILE) if had_isvc else None  # the release the repository runs
            had_models = out.is_dir() and any(p.is_dir() and not own_leftover(p) for p in out.iterdir())
            # The models whose config.pbtxt is generated now (not an edited one kept), with their kind.
            generated = {n: devices[a.id] for a, n in zip(artifacts, names, strict=True)
                         if replace_config or not (out / n / CONFIG_FILE).is_file() or untouched(out / n / CONFIG_FILE)}
            service = plan_service(out, manifest, storage_uri=storage_uri, isvc_name=isvc_name,
                                   triton_version=triton_version, gpus=gpus,
                                   gpu_models=gpu_models(out, generated),
                                   kind_gpu=kind == "gpu", replace_isvc=replace_isvc, cpus=cpus,
                                   notes=notes)
            # The release the repository's InferenceService runs: the one written now, else the kept file's.
            tag = service.runtime_version if service is not None else kept_runtime_version(out / ISVC_FILE)
            if service is not None:  # the engines already there must load in the release it now names
                _check_served_releases(out, service.runtime_version, was=was, replace_config=replace_config,
                                       writing={n: version or _next_version(out / n) for n in names}, notes=notes)
            # The CPU limit the CPU models' threads share: the one written now, else the kept file's (none: no cap).
            pod_cpus = service.cpus if service is not None else kept_cpu_limit(out / ISVC_FILE)
            staging = Path(tempfile.mkdtemp(prefix=INSIDE_STAGING if inside else f".{out.name}.", suffix=".tmp",
                                            dir=out if inside else out.parent))
            try:
                os.chmod(staging, default_mode(0o777))
                plan = []
                keep_labels: set[str] = set()
                for artifact in artifacts:
                    name = _model_dir_name(manifest, artifact)
                    v = version or _next_version(out / name)
                    if (out / name / str(v)).exists():  # checked again, under the lock, when published
                        raise version_exists(out / name / str(v))
                    unselected = None
                    if name in generated:  # its config.pbtxt is written for v
                        check_served(out / name, v)
                    elif (unselected := check_kept(out / name, manifest, artifact, v)) is not None:
                        notes.append(unselected)
                    if unselected is None and (changed := contract_change(out / name, manifest, v)) is not None:
                        notes.append(changed)
                    if not replace_config and labels_edited(out / name, manifest):
                        keep_labels.add(name)
                    was = previous[artifact.id]
                    stage_model(bundle, manifest, artifact, staging / name, v, kind=devices[artifact.id],
                                instances=instances if instances is not None
                                else int(was.get("instances", DEFAULT_INSTANCES)),
                                max_queue_delay_us=max_queue_delay_us if max_queue_delay_us is not None
                                else int(was.get("max_queue_delay_us", DEFAULT_QUEUE_DELAY_US)), cpus=pod_cpus,
                                # labels.txt describes the version served: not one the kept policy leaves unserved
                                labels=name not in keep_labels and unselected is None)
                    if service is not None and release(service.runtime_version) == release(MIN_TRITON_RELEASE) and (
                            why := beyond_min_triton(staging / name / str(v), artifact)):
                        raise RepositoryError(f"{name}: Triton {service.runtime_version} cannot load it: {why}; "
                                              "pass --triton-version with a newer release that does")
                    if tag is not None:
                        _check_release(name, artifact, tag, artifacts, kept_isvc=service is None, notes=notes)
                    plan.append((name, v))
                if service is not None:
                    # UTF-8, as kubectl reads it: a storage URI may hold any character (S3 keys, a PVC's directories).
                    atomic_write_bytes(staging / ISVC_FILE, inference_service(service).encode("utf-8"))
                # The commit point: once publishing starts it ends, and the staging directory goes, before a
                # Ctrl-C is let through (it would report "interrupted" for published versions).
                with committing(f"the new versions in {out}"):
                    try:
                        written = publish(staging, out, plan, replace_config, kept, keep_labels)
                    finally:
                        shutil.rmtree(staging, ignore_errors=True)
                notes.extend(not_refreshed(out, manifest, names, skip))
                if service is not None and was_cpus is not None and service.cpus != was_cpus:
                    others = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name not in names
                                    and not d.name.startswith(".") and caps_threads(d))
                    if others:
                        notes.append(f"{', '.join(others[:10])}{' ...' if len(others) > 10 else ''}: "
                                     f"config.pbtxt still caps threads for {was_cpus} CPUs, not the pod's "
                                     f"{service.cpus} now; export a new version of each (or edit the thread "
                                     "parameters)")
                if service is None:
                    kept.append(out / ISVC_FILE)
                elif had_models and not had_isvc:
                    notes.append(f"{out / ISVC_FILE}: the repository had none, so it was written with the name "
                                 f"{service.name} and the storage URI {service.storage_uri} (--isvc-name and "
                                 "--storage-uri set them)")
                return written
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        for d in created:  # the parents this call made, deepest first: only while still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """Write (or add to) the model repository; InputError or WorkFailed for one line on stderr."""
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0],
                      epilog="Serve it: tritonserver --model-repository REPO --disable-auto-complete-config (Triton "
                             f"{MIN_TRITON_RELEASE} or later), kubectl apply -f REPO/{ISVC_FILE}, "
                             "or python -m serve --model-repository REPO.")
    p.add_argument("bundle", help="bundle directory (python -m export writes one)")
    p.add_argument("--out", required=True, help="model repository directory (created or added to)")
    p.add_argument("--version", type=int, help=f"version number to write, 1..{MAX_VERSION} (default: the next one)")
    p.add_argument("--kind", choices=("cpu", "gpu"),
                   help="instance group kind, for the models whose runtime runs there (default: the model's "
                        "previous config.pbtxt's, else by runtime; OpenVINO stays on the CPU, TensorRT on the GPU)")
    p.add_argument("--instances", type=int,
                   help=f"model instances on the CPU, or on each GPU, 1..{MAX_INSTANCES} (default: the model's "
                        f"previous config.pbtxt's, else {DEFAULT_INSTANCES})")
    p.add_argument("--max-queue-delay-us", type=int,
                   help=f"dynamic batching delay, 0..{MAX_QUEUE_DELAY_US} (OpenVINO models are not batched; default: "
                        f"the model's previous config.pbtxt's, else {DEFAULT_QUEUE_DELAY_US})")
    p.add_argument("--storage-uri", help="where the repository will live, for the InferenceService: scheme://location, "
                                         "no whitespace but spaces in a pvc:// path, written as given (default: the "
                                         "repository's, else pvc://vitc-models/<repo dir>, the name as it is)")
    p.add_argument("--isvc-name", help=f"InferenceService name: 1..{MAX_ISVC_NAME} of a-z 0-9 -, starting with a "
                                       "letter (default: the repository's, else vitc-<bundle name>)")
    p.add_argument("--triton-version", help="Triton image tag the InferenceService runs, YY.MM[-py3 or -py3-igpu], "
                                            f"{MIN_TRITON_RELEASE} or later (default: the "
                                            f"repository's, else {DEFAULT_TRITON_VERSION})")
    p.add_argument("--gpus", type=int, help=f"GPUs the InferenceService asks for, 0..{MAX_GPUS} (default, "
                                            "while a model runs on KIND_GPU: the repository's, else 1; otherwise 0)")
    p.add_argument("--cpus", type=int, help=f"CPU limit of the InferenceService's pod, 1..{MAX_CPUS}, shared as "
                                            "threads by each CPU model's instances (default: the repository's, else "
                                            f"{DEFAULT_CPUS})")
    p.add_argument("--skip", action="append", default=[], metavar="ARTIFACT",
                   help="an artifact id of the bundle to leave out, such as tensorrt-fp16 (repeat, or separate with "
                        "commas; default: every artifact Triton can serve)")
    p.add_argument("--replace-config", action="store_true",
                   help="regenerate an existing model's config.pbtxt and labels.txt (default: edited ones are kept)")
    p.add_argument("--replace-isvc", action="store_true",
                   help=f"regenerate the repository's {ISVC_FILE} (default: an edited one is kept)")
    args = p.parse_args(argv)
    refuse_empty_paths(p, (("bundle", args.bundle, "give the bundle directory python -m export wrote"),
                           ("--out", args.out, "give the model repository directory")))
    kept: list[Path] = []
    notes: list[str] = []
    try:
        written = write_repository(args.bundle, args.out, version=args.version, kind=args.kind,
                                   instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                                   storage_uri=args.storage_uri, isvc_name=args.isvc_name,
                                   triton_version=args.triton_version, gpus=args.gpus, cpus=args.cpus,
                                   skip=[i for v in args.skip for i in v.split(",") if i],
                                   replace_config=args.replace_config, replace_isvc=args.replace_isvc, kept=kept,
                                   notes=notes)
    except (BundleError, DirectoryBusy) as exc:
        raise InputError(str(exc)) from None
    except RepositoryError as exc:  # about --out, as the parser's own errors are
        p.error(str(exc))
    except OSError as exc:  # a full disk or an I/O error is the machine failing (exit 1), anything else the --out
        # Without the file name: for a failed copy Python names the source, not the file that filled the disk.
        if failed := machine_error(OSError(exc.errno, exc.strerror), f"nothing was written to {args.out}"):
            raise failed from None
        raise InputError(f"cannot write {args.out}: {exc.strerror or exc} (nothing was written)") from None
    for path in written:
        print(f"wrote {path} (a bundle too: {MANIFEST_FILE})")
    for note in notes:
        print(f"note: {note}")
    for path in kept:
        if path.name == LABELS_FILE:
            print(f"kept {path}: it differs from the labels this tool wrote (edited); --replace-config regenerates it")
        elif path.name != ISVC_FILE:
            print(f"kept {path}: it differs from what this tool writes (edited, or written with other options); "
                  "--replace-config regenerates it")
        elif (stale := stale_release(path)) is not None:  # the user's file, but applied it serves nothing
            print(f"kept {path}: it differs from what this tool writes (edited, or written by an older version of "
                  f"it), and {stale}; set runtimeVersion: \"{DEFAULT_TRITON_VERSION}\" in it, or pass --replace-isvc "
                  "to regenerate it")
        else:
            print(f"kept {path}: it differs from what this tool writes (edited, or written by an older version of "
                  "it); --replace-isvc regenerates it")
    if Path(os.path.abspath(args.out)) / ISVC_FILE not in kept:  # as write_repository names it (`--out repo/`)
        print(f"wrote {Path(args.out) / ISVC_FILE}")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
