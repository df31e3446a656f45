"""The config.pbtxt and labels.txt that `python -m export.triton` writes for a model, and whether the ones in a
repository are still as it wrote them (a new version regenerates those, and keeps edited ones if they fit it).

`models.tritonconfig` reads what this writes (as vitc's server and the tests do); this module only generates it and
tells an untouched file from an edited one.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import runtimes
from export.kserve import DEFAULT_CPUS, RepositoryError, is_marked, marked
from models import tritonconfig
from models.bundle import TRITON_CONFIG_FILE as CONFIG_FILE
from models.bundle import TRITON_LABELS_FILE as LABELS_FILE
from models.bundle import Artifact, BundleError, Manifest, read_manifest
from models.triton_layout import version_dirs
from models.tritonconfig import MAX_QUEUE_DELAY_US, LabelsError, read_labels

MAX_INSTANCES = 1024


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


# What every release before the hash mark wrote (from the first with export.triton, d0d913b, to f9e9147^), for each
# runtime alike (OpenVINO batched too): rendered again for a version beside it, an unmarked file equal to it byte for
# byte is untouched. Strings were quoted raw until ca5e35d, JSON-escaped since (the same for a plain name).
_UNMARKED_LAYOUT = (
    'name: {name}\nbackend: "{backend}"\nmax_batch_size: {max_batch}\n'
    "input [{{ name: {input} data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ {dims} ] }}]\n"
    'output [{{ name: {output} data_type: TYPE_FP32 dims: [ {classes} ] label_filename: "labels.txt" }}]\n'
    "dynamic_batching {{ preferred_batch_size: [ {preferred} ] max_queue_delay_microseconds: {delay} }}\n"
    "instance_group [{{ count: {count} kind: KIND_{kind} }}]\n"
    "version_policy: {{ latest: {{ num_versions: 1 }} }}\n"
    'model_warmup [{{ name: "zeros" batch_size: 1 inputs {{ key: {input} value: '
    "{{ data_type: TYPE_FP32 dims: [ {dims} ] zero_data: true }} }} }}]\n"
    "{parameters}"
)
_UNMARKED_PARAMETER = "parameters {{ key: {key} value: {{ string_value: {value} }} }}\n"
# OpenVINO's one parameter: the artifact's recorded inference precision (f32 when none), in the backend's names.
_UNMARKED_HINTS = {"fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16"}
_UNMARKED_QUOTES = (lambda s: f'"{s}"', lambda s: json.dumps(s, ensure_ascii=False))


def _unmarked_texts(name: str, manifest: Manifest, count: int, kind: str, delay: int) -> list[str]:
    """The config.pbtxt files the releases before the hash mark wrote for the model `name` of one version's
    `manifest` with the options given; [] for a version they never wrote (not one artifact of a runtime of theirs)."""
    if len(manifest.artifacts) != 1 or (artifact := manifest.artifacts[0]).runtime not in runtimes.names():
        return []
    backend = runtimes.get(artifact.runtime).triton_backend  # the same then (torch had none, and was never written)
    if not backend:
        return []
    c, h, w = manifest.input.sample_shape
    max_batch = manifest.input.max_batch
    params = {}
    if artifact.runtime == "openvino":
        hint = str(artifact.info.get("inference_precision", "f32"))
        params["INFERENCE_PRECISION_HINT"] = _UNMARKED_HINTS.get(hint, "f32")
    return [_UNMARKED_LAYOUT.format(
        name=q(name), backend=backend, max_batch=max_batch, input=q(manifest.input.name),
        output=q(manifest.output.name), dims=f"{c}, {h}, {w}", classes=manifest.output.classes,
        preferred=", ".join(map(str, sorted({b for b in (8, max_batch) if b <= max_batch}))), delay=delay,
        count=count, kind=kind, parameters="".join(_UNMARKED_PARAMETER.format(key=q(k), value=q(v))
                                                   for k, v in params.items()))
        for q in _UNMARKED_QUOTES]


def _written_unmarked(text: str, model_dir: Path) -> bool:
    """Whether `text` is byte for byte the config.pbtxt a release before the hash mark wrote for one of the versions
    of `model_dir` (it rewrote the file with each version), with the instances, kind and delay the text names."""
    group, delay = _WRITTEN_GROUP.search(text), _WRITTEN_DELAY.search(text)
    if group is None or delay is None:
        return False
    for v in reversed(version_dirs(model_dir)):
        with contextlib.suppress(BundleError, OSError):
            manifest = read_manifest(model_dir / str(v))
            # The numbers as those releases printed them (no leading zero): an edit to "0003" is no match.
            if text in _unmarked_texts(model_dir.name, manifest, int(group[1]), group[2], int(delay[1])):
                return True
    return False


def _untouched_text(config: Path) -> str | None:
    """The text of `config` when it is a config.pbtxt this tool wrote and nobody edited since (a new version may
    replace it): marked with its hash, or an earlier release's unmarked one; None otherwise."""
    try:
        with config.open("rb") as f:
            text = f.read(tritonconfig.MAX_CONFIG_BYTES + 1).decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if is_marked(text, _MARK) or _written_unmarked(text, config.parent) else None


def untouched(config: Path) -> bool:
    """Whether `config` is a config.pbtxt this tool wrote and nobody edited since."""
    return _untouched_text(config) is not None


def previous_options(config: Path) -> dict[str, str | int]:
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


def caps_threads(model_dir: Path) -> bool:
    """Whether the model directory's config.pbtxt caps its runtime's CPU threads (as this tool writes for KIND_CPU)."""
    keys = {runtimes.get(name).triton_threads for name in runtimes.names()} - {None}
    try:
        config = tritonconfig.read(model_dir)
    except (tritonconfig.ConfigError, OSError, ValueError):
        return False
    return config is not None and bool(keys & set(config.parameters))


def served_version(model_dir: Path) -> int | None:
    """The version of `model_dir` served now (vitc serves the newest its config.pbtxt's version_policy selects;
    Triton's default, latest 1, without the file); None when it has none, or its config.pbtxt cannot be read."""
    try:
        versions = version_dirs(model_dir)
        config = tritonconfig.read(model_dir) if versions else None
    except (tritonconfig.ConfigError, OSError, ValueError):
        return None
    policy = config.version_policy if config is not None else tritonconfig.VersionPolicy()
    return max((v for v in policy.loads(versions) if v in versions), default=None)


def contract_change(model_dir: Path, manifest: Manifest, version: int) -> str | None:
    """A note when the new `version` (of `manifest`) takes other input dims, a smaller batch, or answers other classes
    than the version of `model_dir` served now: every client must change with it; None when nothing a client sees
    changes (or nothing is served now)."""
    if (served := served_version(model_dir)) is None or served == version:
        return None
    try:
        old = read_manifest(model_dir / str(served))
    except (BundleError, OSError):  # not loadable now: no client relies on it
        return None
    changes = []
    if old.input.sample_shape != manifest.input.sample_shape:
        changes.append(f"input dims {list(old.input.sample_shape)} -> {list(manifest.input.sample_shape)}")
    if manifest.input.max_batch < old.input.max_batch:
        changes.append(f"max batch {old.input.max_batch} -> {manifest.input.max_batch}")
    if old.output.classes != manifest.output.classes:
        changes.append(f"{old.output.classes} -> {manifest.output.classes} classes")
    elif differ := [i for i, (a, b) in enumerate(zip(old.class_names, manifest.class_names, strict=True)) if a != b]:
        i = differ[0]
        changes.append(f"{len(differ)} class names (class {i}: {old.class_names[i][:40]!r} -> "
                       f"{manifest.class_names[i][:40]!r})")
    if not changes:
        return None
    return (f"{model_dir.name}: version {version} changes what clients send and read, against version {served} "
            f"served now: {'; '.join(changes)}; every client of the model must change with it")


def gpu_models(out: Path, generated: dict[str, str]) -> list[str]:
    """The models of the repository `out` that run a KIND_GPU instance group (their pod needs a GPU) once this run
    writes: those in `generated` (name -> the kind of the config.pbtxt generated for them now) by that kind, the
    others by their config.pbtxt (one that cannot be read asks for none)."""
    found = [name for name, kind in generated.items() if kind == "gpu"]
    others = sorted(d for d in out.iterdir() if d.name not in generated and not d.name.startswith(".")
                    and d.is_dir() and not d.is_symlink()) if out.is_dir() else []
    for model_dir in others:
        with contextlib.suppress(tritonconfig.ConfigError, OSError, ValueError):
            if (config := tritonconfig.read(model_dir)) is not None and "KIND_GPU" in config.instance_kinds:
                found.append(model_dir.name)
    return sorted(found)


def check_kept(model_dir: Path, manifest: Manifest, artifact: Artifact, version: int) -> str | None:
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
    serve it, nor vitc (which serves the newest, or the highest listed), so labels.txt is left as it is; None when it
    does."""
    versions = sorted({version, *version_dirs(model_dir)})
    if policy.kind == "specific":
        if version in policy.versions:
            return None
        what, fix = f"specific {{ versions: [ {', '.join(map(str, policy.versions))} ] }}", "add it to the policy"
    elif policy.kind == "latest" and version in versions[-policy.num_versions:]:
        return None
    elif policy.kind == "latest":
        what = f"latest {{ num_versions: {policy.num_versions} }} (newer versions exist)"
        fix = past_version(model_dir, versions[-1])
    else:
        return None
    existing = version_dirs(model_dir)
    served = max((v for v in policy.loads(existing) if v in existing), default=None)
    return (f"{model_dir / CONFIG_FILE} is kept, and its version_policy {what} does not select the new version "
            f"{version}: neither Triton nor vitc will serve it{'' if served is None else f' (they serve {served})'}, "
            f"and {LABELS_FILE} is left as it is; {fix}")


def past_version(model_dir: Path, newest: int) -> str:
    """How to write a version the latest policy serves, `newest` being the model's newest: a --version above it;
    none is above Triton's int64 maximum, and one below it is never served, so that version must go first."""
    if newest >= tritonconfig.MAX_VERSION:
        return (f"version {newest} is the highest Triton reads (int64): no version can follow it, and one below it is "
                f"never served; remove {model_dir / str(newest)} to write another")
    return f"pass a --version above {newest} (or none: the next)"


def check_served(model_dir: Path, version: int) -> None:
    """RepositoryError (nothing written) when the config.pbtxt generated for `version` (latest { num_versions: 1 })
    would not select it, a newer version being there: config.pbtxt and labels.txt would then describe a version
    neither Triton nor vitc serves, beside the one they serve (which they would refuse to load, its input changed)."""
    newest = max(version_dirs(model_dir), default=0)
    if newest > version:
        raise RepositoryError(f"{model_dir.name}: version {version} would never be served: the {CONFIG_FILE} "
                              f"generated for it serves the latest version, which is {newest}, so it and "
                              f"{LABELS_FILE} would describe a version not served; {past_version(model_dir, newest)}")


def labels_text(class_names: Sequence[str]) -> bytes:
    """The labels.txt this tool writes: one class name a line, in output order."""
    return ("\n".join(class_names) + "\n").encode()


def labels_edited(model_dir: Path, manifest: Manifest) -> bool:
    """Whether the model's labels.txt was edited since this tool wrote it (it matches none that the class names of
    the new version or of a version already there make): a new version keeps it. RepositoryError (nothing written)
    when such a file does not hold one label per class of the new version, as Triton and vitc's server read it
    (`tritonconfig.read_labels`): Triton would misname the classes."""
    path = model_dir / LABELS_FILE
    if not path.is_file():
        return False
    with path.open("rb") as f:
        raw = f.read(tritonconfig.MAX_LABELS_BYTES + 1)
    if raw == labels_text(manifest.class_names):
        return False
    for v in version_dirs(model_dir):
        with contextlib.suppress(BundleError, OSError):
            if raw == labels_text(read_manifest(model_dir / str(v)).class_names):
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


def check_labels(manifest: Manifest) -> None:
    """labels.txt is one class per line: a name holding a line break would shift every label after it."""
    for n in manifest.class_names:
        if _has_control(n):
            raise BundleError(f"class name {n[:50]!r} holds a control character; labels.txt would be misaligned")
