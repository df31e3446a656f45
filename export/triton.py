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
load as a model; anything else is staged beside it.

Exit codes: 0 written, 1 the machine failed (a full disk, out of memory; nothing was written), 2 bad input (one
line).
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import runtimes
from export.kserve import (
    DEFAULT_CPUS,
    DEFAULT_TRITON_VERSION,
    ISVC_FILE,
    ISVC_HEADER,
    MAX_CPUS,
    MAX_GPUS,
    MAX_ISVC_NAME,
    RepositoryError,
    check_isvc_name,
    check_storage_uri,
    inference_service,
    is_marked,
    kept_cpu_limit,
    kept_runtime_version,
    marked,
    plan_service,
    stale_release,
    triton_tag,
)
from export.triton_compat import MIN_TRITON_RELEASE, beyond_min_triton, release, release_rules
from models import tritonconfig
from models.bundle import (
    MANIFEST_FILE,
    MAX_NAME_CHARS,
    NAME_RULE,
    Artifact,
    BundleError,
    FileEntry,
    Manifest,
    as_name,
    file_entries,
    name_digest,
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
from models.cli import InputError, OneLineParser, command, machine_error, refuse_empty_paths
from models.io import (
    DirectoryBusy,
    atomic_write_bytes,
    committing,
    default_mode,
    ensure_dir,
    is_mount_point,
    not_a_file,
    remove_stale,
    resolve_path,
    writer_lock,
)
from models.triton_layout import is_version_name, version_dirs
from models.tritonconfig import MAX_QUEUE_DELAY_US, MAX_VERSION, LabelsError, read_labels
from runtimes.loader import check_manifest

PROG = "python -m export.triton"
MAX_INSTANCES = 1024
DEFAULT_INSTANCES = 1
DEFAULT_QUEUE_DELAY_US = 2000
# Where --out is a mount point (a volume, a PVC: the usual Triton and KServe layout), a rename from beside it into it
# crosses mounts (EXDEV), so the run stages and locks inside it, under these hidden names; it then needs nothing
# above --out (a container's root may be read-only). vitc's server skips hidden directories, Triton does not (it
# would try to load one as a model), so they exist only while a run writes, or after a kill until the next run.
_INSIDE_STAGING = ".export-triton."  # + 8 random characters + ".tmp" (tempfile.mkdtemp)
_INSIDE_LOCK = ".export-triton.lock"
_INSIDE_LEFTOVER = re.compile(r"\.export-triton\.(?:[a-z0-9_]{8}\.tmp|lock)")


def model_name(manifest: Manifest, artifact: Artifact) -> str:
    """The repository model name of one artifact: `<bundle name>-<artifact id>`, made valid (older exports kept
    names such as 'my bundle'); past 128 characters the bundle name is cut and a hash of the whole added, the
    artifact id kept whole (`as_name`)."""
    return as_name(f"{manifest.name}-", artifact.id)


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


def _has_control(value: str) -> bool:
    """Whether `value` holds a control character or a line break (C0, DEL, C1, U+2028/9)."""
    return any(ord(c) < 32 or 127 <= ord(c) < 160 or c in "\u2028\u2029" for c in value)


def _text(value: str, what: str) -> str:
    """`value` as a quoted protobuf-text string; control characters are refused, not escaped."""
    if _has_control(value):
        raise BundleError(f"{what} {value[:50]!r} holds a control character")
    return json.dumps(value, ensure_ascii=False)  # only \" and \\ get escaped: valid protobuf text escapes


def config_pbtxt(name: str, manifest: Manifest, artifact: Artifact, *, kind: str, instances: int,
                 max_queue_delay_us: int, cpus: int | None = DEFAULT_CPUS) -> str:
    """Triton's model configuration (protobuf text format) for one artifact. On the CPU its instances share the pod's
    `cpus` (the CPU limit; None: no limit known) as threads."""
    rt = runtimes.get(artifact.runtime)
    backend = rt.triton_backend
    threads = ""
    if kind == "cpu" and cpus is not None and rt.triton_threads is not None:
        # OpenVINO's backend compiles one model that the instances share: its threads are the model's, in as many
        # streams as instances (each stream runs one request); onnxruntime's are each instance's own session's.
        params = {rt.triton_threads: cpus if rt.triton_threads_shared else max(1, cpus // instances)}
        if rt.triton_streams is not None and instances > 1:
            params[rt.triton_streams] = min(instances, cpus)
        threads = (f"# The pod's {cpus} CPUs (the InferenceService's limit, --cpus) shared by the instances: a\n"
                   "# runtime otherwise starts a thread per core of the node, throttled under the pod's CPU quota.\n"
                   "parameters [" + ", ".join(f'{{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                                              for k, v in params.items()) + "]\n")
    c, h, w = manifest.input.sample_shape
    classes = manifest.output.classes
    inp, out = _text(manifest.input.name, "input name"), _text(manifest.output.name, "output name")
    if rt.triton_fixed_batch:  # Triton's layout without a batch dimension: each request runs alone, at its own
        # batch size (Triton's dynamic batcher does not combine them), the IR's dynamic batch an explicit -1.
        # No FORMAT_NCHW: Triton refuses it on an input of 4 dims. The warm-up request is one image, batch dim given.
        batching, layout = "max_batch_size: 0\n", ""
        in_dims, out_dims, warm_dims = f"-1, {c}, {h}, {w}", f"-1, {classes}", f"1, {c}, {h}, {w}"
    else:
        max_batch = manifest.input.max_batch
        preferred = sorted({b for b in (8, max_batch) if b <= max_batch})
        batching = (f"max_batch_size: {max_batch}\n"
                    f"dynamic_batching {{ preferred_batch_size: [ {', '.join(map(str, preferred))} ] "
                    f"max_queue_delay_microseconds: {max_queue_delay_us} }}\n")
        layout = " format: FORMAT_NCHW"
        in_dims, out_dims, warm_dims = f"{c}, {h}, {w}", f"{classes}", f"{c}, {h}, {w}"
    return marked(
        f"name: {_text(name, 'model name')}\n"
        f'backend: "{backend}"\n'
        + batching +
        f"input [{{ name: {inp} data_type: TYPE_FP32{layout} dims: [ {in_dims} ] }}]\n"
        f"output [{{ name: {out} data_type: TYPE_FP32 dims: [ {out_dims} ] "
        f'label_filename: "{LABELS_FILE}" }}]\n'
        f"instance_group [{{ count: {instances} kind: KIND_{kind.upper()} }}]\n"
        f"version_policy: {{ latest: {{ num_versions: 1 }} }}\n"
        + threads +
        f'model_warmup [{{ name: "zeros" batch_size: 1 inputs {{ key: {inp} value: '
        f"{{ data_type: TYPE_FP32 dims: [ {warm_dims} ] zero_data: true }} }} }}]\n"
        + rt.triton_note,
        _MARK,
    )


_MARK = "# written by python -m export.triton (edit freely: an edited file is kept); sha256 of the rest: "


# The lines of what this tool writes that hold its options (read back from an untouched file only).
_WRITTEN_GROUP = re.compile(r"^instance_group \[\{ count: ([0-9]{1,4}) kind: KIND_(CPU|GPU) \}\]$", re.MULTILINE)
_WRITTEN_DELAY = re.compile(r"^dynamic_batching \{ .* max_queue_delay_microseconds: ([0-9]{1,8}) \}$", re.MULTILINE)


def _untouched_text(config: Path) -> str | None:
    """The text of `config` when it is a config.pbtxt this tool wrote and nobody edited since (a new version may
    replace it); None otherwise."""
    try:
        with config.open("rb") as f:
            text = f.read(tritonconfig.MAX_CONFIG_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if is_marked(text, _MARK) else None


def _untouched(config: Path) -> bool:
    """Whether `config` is a config.pbtxt this tool wrote and nobody edited since."""
    return _untouched_text(config) is not None


def _previous_options(config: Path) -> dict[str, str | int]:
    """The kind ("cpu" or "gpu"), instance count and queue delay an untouched config.pbtxt was written with (none
    for an edited or absent one): regenerated for a new version, it keeps them unless they are given again."""
    text = _untouched_text(config)
    found: dict[str, str | int] = {}
    if text is None:
        return found
    if (m := _WRITTEN_GROUP.search(text)) is not None and 1 <= int(m[1]) <= MAX_INSTANCES:
        found["instances"], found["kind"] = int(m[1]), m[2].lower()
    if (m := _WRITTEN_DELAY.search(text)) is not None and int(m[1]) <= MAX_QUEUE_DELAY_US:
        found["max_queue_delay_us"] = int(m[1])
    return found


def _caps_threads(model_dir: Path) -> bool:
    """Whether the model directory's config.pbtxt caps its runtime's CPU threads (as this tool writes for KIND_CPU)."""
    keys = {runtimes.get(name).triton_threads for name in runtimes.names()} - {None}
    try:
        config = tritonconfig.read(model_dir)
    except (tritonconfig.ConfigError, OSError, ValueError):
        return False
    return config is not None and bool(keys & set(config.parameters))


def _check_kept(model_dir: Path, manifest: Manifest, artifact: Artifact, version: int) -> str | None:
    """RepositoryError (nothing written) when the edited config.pbtxt that a new version keeps does not fit that
    version: a repository that vitc and Triton would then refuse to serve. Returns a warning when its version_policy
    does not select the new version (None otherwise)."""
    rt = runtimes.get(artifact.runtime)
    c, h, w = manifest.input.sample_shape
    try:
        config = tritonconfig.read(model_dir)
        if config is None:
            return None
        config.check(name=model_dir.name, platform=rt.triton_platform, backend=rt.triton_backend,
                     input=tritonconfig.Tensor(manifest.input.name, "TYPE_FP32", (c, h, w)),
                     output=tritonconfig.Tensor(manifest.output.name, "TYPE_FP32", (manifest.output.classes,)),
                     rules=rt.triton_rules(runtimes.runtimes()))
        if config.max_batch_size is not None and config.max_batch_size > manifest.input.max_batch:
            raise tritonconfig.ConfigError(f"max_batch_size {config.max_batch_size} is more than the new version "
                                           f"was exported for ({manifest.input.max_batch})")
        # The layout earlier versions of this tool wrote for OpenVINO: Triton fails its batch-1 warm-up, so the
        # load, and would refuse every request of another batch size.
        if rt.triton_fixed_batch and config.max_batch_size and (
                config.parameters.get("ENABLE_BATCH_PADDING", "").lower() != "yes"):  # as the backend reads it
            raise tritonconfig.ConfigError(
                f"max_batch_size {config.max_batch_size}: Triton's {rt.triton_backend} backend fixes the batch at "
                "max_batch_size and refuses every other batch size, the batch-1 warm-up included (unless the "
                "parameter ENABLE_BATCH_PADDING is YES); write max_batch_size: 0 with input dims "
                f"[ -1, {c}, {h}, {w} ] and output dims [ -1, {manifest.output.classes} ] (warm-up dims "
                f"[ 1, {c}, {h}, {w} ]), without dynamic_batching or FORMAT_NCHW")
    except tritonconfig.ConfigError as exc:
        raise RepositoryError(f"{model_dir / CONFIG_FILE} differs from what this tool writes (edited, or written by an "
                              f"older version of it), so a new version keeps it, but it does not fit that version: "
                              f"{exc}; fix it, or pass --replace-config to regenerate it") from None
    return _unselected(model_dir, config.version_policy, version)


def _unselected(model_dir: Path, policy: tritonconfig.VersionPolicy, version: int) -> str | None:
    """A warning when `policy` (a kept config's) does not select `version`, about to be written: Triton would never
    serve it, nor vitc (which serves the newest, or the highest listed); None when it does."""
    versions = sorted({version, *version_dirs(model_dir)})
    if policy.kind == "specific":
        if version in policy.versions:
            return None
        what = f"specific {{ versions: [ {', '.join(map(str, policy.versions))} ] }}"
    elif policy.kind == "latest" and version in versions[-policy.num_versions:]:
        return None
    elif policy.kind == "latest":
        what = f"latest {{ num_versions: {policy.num_versions} }} (newer versions exist)"
    else:
        return None
    return (f"{model_dir / CONFIG_FILE} is kept, and its version_policy {what} does not select the new version "
            f"{version}: neither Triton nor vitc will serve it; add it to the policy, or pass --replace-config")


def _labels(class_names: Sequence[str]) -> bytes:
    """The labels.txt this tool writes: one class name a line, in output order."""
    return ("\n".join(class_names) + "\n").encode()


def _labels_edited(model_dir: Path, manifest: Manifest) -> bool:
    """Whether the model's labels.txt was edited since this tool wrote it (it matches none that the class names of
    the new version or of a version already there make): a new version keeps it. RepositoryError (nothing written)
    when such a file does not hold one label per class of the new version, as Triton and vitc's server read it
    (`tritonconfig.read_labels`): Triton would misname the classes."""
    path = model_dir / LABELS_FILE
    if not path.is_file():
        return False
    with path.open("rb") as f:
        raw = f.read(tritonconfig.MAX_LABELS_BYTES + 1)
    if raw == _labels(manifest.class_names):
        return False
    for v in version_dirs(model_dir):
        with contextlib.suppress(BundleError, OSError):
            if raw == _labels(read_manifest(model_dir / str(v)).class_names):
                return False
    classes = manifest.output.classes
    try:
        read_labels(raw, classes)
    except LabelsError as exc:
        holds = str(exc) if exc.lines is None else f"holds {exc.lines} labels"
        raise RepositoryError(f"{path} differs from what this tool writes (edited), so a new version keeps it, but "
                              f"it does not fit that version: it {holds}, the model has {classes} classes; fix it, "
                              "or pass --replace-config to regenerate it") from None
    return True


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
                                         or _untouched(model_dir / CONFIG_FILE))
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
    if gpus is not None and not 1 <= gpus <= MAX_GPUS:
        raise RepositoryError(f"--gpus must be in 1..{MAX_GPUS}, got {gpus}")
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
        raise RepositoryError(f"{model_dir} holds version {latest}, the highest Triton reads (int64): there is no "
                              "next version; pass --version with a free one, or remove that version")
    return latest + 1


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
    artifacts = _triton_artifacts(manifest)
    if unknown := sorted(set(skip) - {a.id for a in artifacts}):
        raise RepositoryError(f"--skip {', '.join(map(repr, unknown))[:200]}: bundle {manifest.name!r} has no such "
                              f"artifact Triton can serve ({', '.join(a.id for a in artifacts) or 'none'})")
    if not artifacts:
        raise BundleError(f"bundle {manifest.name!r} has no artifact Triton can serve "
                          f"(servable: {', '.join(a.id for a in manifest.servable()) or 'none'})")
    if not (chosen := [a for a in artifacts if a.id not in skip]):
        raise RepositoryError(f"--skip leaves out every artifact of bundle {manifest.name!r} Triton can serve "
                              f"({', '.join(a.id for a in artifacts)}): nothing to write")
    artifacts = chosen
    names = [_model_dir_name(manifest, a) for a in artifacts]
    _check_distinct(manifest, artifacts, names)
    check_out(bundle, out, names)
    _check_labels(manifest)
    # What a server checks before it trusts these artifacts (the golden file, the contract, their records): a
    # manifest edited after export (relabelled, a parity number changed) is refused here, not published for Triton,
    # which checks none of it.
    check_manifest(bundle, manifest, [a.id for a in artifacts], "golden file")
    created = _missing_parents(out)
    notes = notes if notes is not None else []
    if (cut := _shortened(manifest, artifacts, names)) is not None:
        notes.append(cut)
    try:
        ensure_dir(out.parent)
        inside = _stages_inside(out)
        with writer_lock(out, out / _INSIDE_LOCK if inside else None):
            if _remove_inside_leftovers(out) if inside else remove_stale(out):  # a killed run's staging directory
                notes.append(f"{out}: a publish into it was stopped before it finished (killed): its staging "
                             "directory was removed; models it had published keep that version, and this run adds "
                             "the next version of each of its own")
            check_out(bundle, out, names)  # again, under the lock: another writer may have been first
            previous = {a.id: _previous_options(out / n / CONFIG_FILE) for a, n in zip(artifacts, names, strict=True)}
            devices = _instance_kinds(manifest, artifacts, kind, previous, notes)
            had_isvc = (out / ISVC_FILE).exists() or (out / ISVC_FILE).is_symlink()
            was_cpus = kept_cpu_limit(out / ISVC_FILE) if had_isvc else None
            was = kept_runtime_version(out / ISVC_FILE) if had_isvc else None  # the release the repository runs
            had_models = out.is_dir() and any(p.is_dir() and not _own_leftover(p) for p in out.iterdir())
            service = plan_service(out, manifest, storage_uri=storage_uri, isvc_name=isvc_name,
                                   triton_version=triton_version, gpus=gpus, needs_gpu="gpu" in devices.values(),
                                   kind_gpu=kind == "gpu", replace_isvc=replace_isvc, cpus=cpus)
            # The release the repository's InferenceService runs: the one written now, else the kept file's.
            tag = service.runtime_version if service is not None else kept_runtime_version(out / ISVC_FILE)
            if service is not None:  # the engines already there must load in the release it now names
                _check_served_releases(out, service.runtime_version, was=was, replace_config=replace_config,
                                       writing={n: version or _next_version(out / n) for n in names}, notes=notes)
            # The CPU limit the CPU models' threads share: the one written now, else the kept file's (none: no cap).
            pod_cpus = service.cpus if service is not None else kept_cpu_limit(out / ISVC_FILE)
            staging = Path(tempfile.mkdtemp(prefix=_INSIDE_STAGING if inside else f".{out.name}.", suffix=".tmp",
                                            dir=out if inside else out.parent))
            try:
                os.chmod(staging, default_mode(0o777))
                plan = []
                keep_labels: set[str] = set()
                for artifact in artifacts:
                    name = _model_dir_name(manifest, artifact)
                    v = version or _next_version(out / name)
                    if (out / name / str(v)).exists():  # checked again, under the lock, when published
                        raise _exists(out / name / str(v))
                    if not replace_config and not _untouched(out / name / CONFIG_FILE):
                        if (unselected := _check_kept(out / name, manifest, artifact, v)) is not None:
                            notes.append(unselected)
                    if not replace_config and _labels_edited(out / name, manifest):
                        keep_labels.add(name)
                    was = previous[artifact.id]
                    _stage_model(bundle, manifest, artifact, staging / name, v, kind=devices[artifact.id],
                                 instances=instances if instances is not None
                                 else int(was.get("instances", DEFAULT_INSTANCES)),
                                 max_queue_delay_us=max_queue_delay_us if max_queue_delay_us is not None
                                 else int(was.get("max_queue_delay_us", DEFAULT_QUEUE_DELAY_US)), cpus=pod_cpus)
                    if service is not None and release(service.runtime_version) == release(MIN_TRITON_RELEASE) and (
                            why := beyond_min_triton(staging / name / str(v), artifact)):
                        raise RepositoryError(f"{name}: Triton {service.runtime_version} cannot load it: {why}; "
                                              "pass --triton-version with a newer release that does")
                    if tag is not None:
                        _check_release(name, artifact, tag, artifacts, kept_isvc=service is None, notes=notes)
                    plan.append((name, v))
                if service is not None:
                    atomic_write_bytes(staging / ISVC_FILE, inference_service(service).encode())
                # The commit point: once publishing starts it ends, and the staging directory goes, before a
                # Ctrl-C is let through (it would report "interrupted" for published versions).
                with committing(f"the new versions in {out}"):
                    try:
                        written = _publish(staging, out, plan, replace_config, kept, keep_labels)
                    finally:
                        shutil.rmtree(staging, ignore_errors=True)
                if service is not None and was_cpus is not None and service.cpus != was_cpus:
                    others = sorted(d.name for d in out.iterdir() if d.is_dir() and d.name not in names
                                    and not d.name.startswith(".") and _caps_threads(d))
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
    if not out.exists() or all(_own_leftover(e) for e in out.iterdir()):
        return
    isvc = out / ISVC_FILE
    if os.path.lexists(isvc) and not isvc.is_symlink() and not isvc.is_file():  # a link is replaced, not followed
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
        if (entry.name == ISVC_FILE and entry.is_file() and not entry.is_symlink()) or _own_leftover(entry):
            continue
        if entry.is_symlink() or not entry.is_dir():
            return f"it holds {entry.name!r}"
        if (why := _foreign_model_dir(entry)) is not None:
            return f"{entry.name}/ is not a model directory of this tool ({why})"
        written = written or _holds_written_version(entry)
    return None if written else "none of its directories holds a model version written by this tool"


def _holds_written_version(model_dir: Path) -> bool:
    """Whether a version directory of `model_dir` is a bundle of one artifact named after `model_dir`, as
    `_stage_model` writes it."""
    for v in version_dirs(model_dir):
        with contextlib.suppress(BundleError, OSError):
            m = read_manifest(model_dir / str(v))
            if m.name == model_dir.name and len(m.artifacts) == 1:
                return True
    return False


def _foreign_model_dir(model_dir: Path) -> str | None:
    """Why an existing `model_dir` is not one this tool wrote (None: it is, or it does not exist): ours hold
    config.pbtxt, labels.txt and numbered version directories, each a bundle."""
    if not model_dir.exists() and not model_dir.is_symlink():
        return None
    if model_dir.is_symlink():
        return "a symbolic link; the tool writes its model directories itself"
    if not model_dir.is_dir():
        return "not a directory"
    for entry in model_dir.iterdir():
        if entry.name in (CONFIG_FILE, LABELS_FILE):
            if entry.is_symlink() or not entry.is_file():
                return f"{entry.name} is not a file"
        # A linked version is one Triton loads (version_dirs counts it), but not one this tool wrote: not ours.
        elif not (is_version_name(entry.name) and entry.is_dir() and not entry.is_symlink()):
            return f"it holds {entry.name!r}"
        elif not (entry / MANIFEST_FILE).is_file():
            return f"version {entry.name} is not a bundle"
    return None


def _stages_inside(out: Path) -> bool:
    """Whether a run into `out` stages and locks inside it (the directory it names, a link followed, is a mount
    point), not beside it."""
    try:
        return out.is_dir() and is_mount_point(resolve_path(out))
    except OSError:  # a symlink loop: check_out refuses it
        return False


def _own_leftover(entry: Path) -> bool:
    """Whether `entry` of a repository is the staging directory or lock file of a run that stages inside it."""
    return _INSIDE_LEFTOVER.fullmatch(entry.name) is not None


def _remove_inside_leftovers(out: Path) -> bool:
    """Remove the staging directories that killed runs left inside `out` (its lock file stays: the caller holds
    it); whether there were any."""
    found = [e for e in out.iterdir()
             if e.name != _INSIDE_LOCK and _own_leftover(e) and e.is_dir() and not e.is_symlink()]
    for entry in found:
        shutil.rmtree(entry, ignore_errors=True)
    return bool(found)


def _missing_parents(out: Path) -> list[Path]:
    """The ancestors of `out` that do not exist yet, deepest first."""
    return [p for p in out.absolute().parents if not p.exists()]


def _check_labels(manifest: Manifest) -> None:
    """labels.txt is one class per line: a name holding a line break would shift every label after it."""
    for n in manifest.class_names:
        if _has_control(n):
            raise BundleError(f"class name {n[:50]!r} holds a control character; labels.txt would be misaligned")


def _stage_model(bundle: Path, manifest: Manifest, artifact: Artifact, model_dir: Path, version: int, *,
                 kind: str, instances: int, max_queue_delay_us: int, cpus: int | None) -> None:
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
    golden = manifest.golden
    if golden is not None:  # this version's golden file records this artifact alone (a record never listed is an edit)
        golden = replace(golden, file=_golden_of(target, golden.file.path, manifest, artifact.id))
    write_manifest(target, replace(manifest, name=model_dir.name, artifacts=(replace(artifact, files=files),),
                                   golden=golden))
    atomic_write_bytes(model_dir / CONFIG_FILE, config_pbtxt(
        model_dir.name, manifest, artifact, kind=kind, instances=instances, max_queue_delay_us=max_queue_delay_us,
        cpus=cpus).encode())
    atomic_write_bytes(model_dir / LABELS_FILE, _labels(manifest.class_names))


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


def _publish(staging: Path, out: Path, plan: list[tuple[str, int]], replace_config: bool,
             kept: list[Path], keep_labels: set[str]) -> list[Path]:
    """Rename the staged models (and the InferenceService, if staged) into `out`; undone if any step fails. An
    existing model's config.pbtxt that differs from the generated one is kept (and listed in `kept`) unless
    `replace_config`, and so is the labels.txt of the models in `keep_labels`."""
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
                if name in keep_labels:  # edited by hand: the classification answers are the user's
                    kept.append(dst / LABELS_FILE)
                else:
                    undo.append(_replace_file(src / LABELS_FILE, dst / LABELS_FILE, staging))
                generated = (src / CONFIG_FILE).read_bytes()
                if (replace_config or not (dst / CONFIG_FILE).is_file() or _untouched(dst / CONFIG_FILE)
                        or (dst / CONFIG_FILE).read_bytes() == generated.partition(b"\n")[2]):
                    # Ours and untouched, or what an older version of this tool wrote (no hash line) and the same.
                    undo.append(_replace_file(src / CONFIG_FILE, dst / CONFIG_FILE, staging))
                elif (dst / CONFIG_FILE).read_bytes() != generated:
                    # The model's configuration is the user's once written (vitc and Triton both batch by it):
                    # a new version keeps an edited one.
                    kept.append(dst / CONFIG_FILE)
            written.append(dst / str(v))
        if (staging / ISVC_FILE).exists():  # not when the repository's edited one is kept
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
                                         "no whitespace (default: the repository's, else pvc://vitc-models/<repo dir>)")
    p.add_argument("--isvc-name", help=f"InferenceService name: 1..{MAX_ISVC_NAME} of a-z 0-9 -, starting with a "
                                       "letter (default: the repository's, else vitc-<bundle name>)")
    p.add_argument("--triton-version", help="Triton image tag the InferenceService runs, YY.MM[-suffix], "
                                            f"{MIN_TRITON_RELEASE} or later (default: the "
                                            f"repository's, else {DEFAULT_TRITON_VERSION})")
    p.add_argument("--gpus", type=int, help=f"GPUs the InferenceService asks for, 1..{MAX_GPUS} (default: the "
                                            "repository's, else 1 when a model runs on the GPU)")
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
    if Path(args.out) / ISVC_FILE not in kept:
        print(f"wrote {Path(args.out) / ISVC_FILE}")
    return 0


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
