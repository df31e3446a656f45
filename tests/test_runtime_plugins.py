"""Runtimes added from outside (VITC_RUNTIMES plugins, a new BUILTIN line, `runtimes.register`) that are broken or
odd: refused in one line naming why, never silently missing, shadowed or a traceback; and an export keeps the
artifacts of the runtimes that did work."""

from __future__ import annotations

import ast
import dataclasses
import errno
import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import fake_runtime
import numpy as np
import pytest
from test_repository_lifecycle import CONFIG as FAKE_CONFIG
from test_repository_lifecycle import add_version

import runtimes
from runtimes import BackendError, registry
from runtimes.build import Built

REPO = Path(__file__).resolve().parents[1]
FAKE = fake_runtime.RUNTIME
# The built-in runtimes, in BUILTIN's order: what every process registers before its plugins (derived, so that a
# new built-in changes no test here).
BUILTINS = tuple(rt for m in registry.BUILTIN if (rt := getattr(sys.modules.get(m), "RUNTIME", None)) is not None
                 and rt in runtimes.runtimes())
BUILTIN_NAMES = ", ".join(rt.name for rt in BUILTINS)
PLUGINS = {  # module -> source: each broken in its own way
    "importerr": "import vitc_no_such_package_xyz\n",
    "noattr": "X = 1\n",
    "notruntime": "RUNTIME = {'name': 'x'}\n",
    "upper": "import dataclasses, fake_runtime\n"
             "RUNTIME = dataclasses.replace(fake_runtime.RUNTIME, name='MyRT', target='myrt')\n",
    "clashname": "import dataclasses, fake_runtime\n"
                 "RUNTIME = dataclasses.replace(fake_runtime.RUNTIME, name='onnxruntime', target='mine')\n",
    "clashtarget": "import dataclasses, fake_runtime\n"
                   "RUNTIME = dataclasses.replace(fake_runtime.RUNTIME, name='myonnx', target='onnx')\n",
}
WHY = {  # what each plugin's refusal says
    "importerr": "VITC_RUNTIMES plugin 'importerr' failed: ModuleNotFoundError: No module named "
                 "'vitc_no_such_package_xyz'",
    "noattr": "VITC_RUNTIMES plugin 'noattr' failed: AttributeError: module 'noattr' has no attribute 'RUNTIME'",
    "notruntime": "VITC_RUNTIMES plugin 'notruntime' failed: TypeError: register takes a runtimes.Runtime, got dict",
    "upper": "VITC_RUNTIMES plugin 'upper' failed: ValueError: runtime 'MyRT': name must be lowercase ASCII letters",
    "clashname": "VITC_RUNTIMES plugin 'clashname' failed: ValueError: runtime 'onnxruntime': its name 'onnxruntime' "
                 "is already registered, by runtime 'onnxruntime'; give it another name",
    "clashtarget": "VITC_RUNTIMES plugin 'clashtarget' failed: ValueError: runtime 'myonnx': its target 'onnx' is "
                   "already registered, by runtime 'onnxruntime'; give it another target",
}


# --- register(): a declaration no stage could use is refused, naming the field -----------------------------------

@pytest.mark.parametrize(("changes", "reason"), [
    ({"name": "MyRT"}, "runtime 'MyRT': name must be lowercase ASCII letters, digits or '_'"),
    ({"target": "ort-basic"}, "target must be lowercase ASCII letters, digits or '_' .* got 'ort-basic'"),
    ({"name": "bad name/with,comma"}, "name must be lowercase"),
    ({"name": "caf\u00e9"}, "name must be lowercase ASCII"),
    ({"packages": "onnxruntime"}, "packages must be a tuple of strings, got str 'onnxruntime'"),
    ({"precisions": "fp32"}, "precisions must be a tuple of strings, got str 'fp32'"),
    ({"devices": ["cpu"]}, "devices must be a tuple of strings, got list"),
    ({"tunes": (1,)}, "tunes must be a tuple of strings"),
    ({"precisions": ("fp8",), "default_precisions": ("fp8",)},
     r"precisions has 'fp8', not one of the precisions export gates \(fp32, fp16, bf16, int8\)"),
    ({"default_precisions": ("fp16",)}, r"default_precisions has 'fp16', not one of its precisions \(fp32\)"),
    ({"default_precisions": ()}, "default_precisions is empty"),
    ({"devices": ("gpu",)}, "devices has 'gpu', not one of the device kinds"),
    ({"variants": (runtimes.Variant("fp32", device="cuda"),)}, "variants has fp32 on cuda"),
    ({"name": "onnxruntime", "target": "mine"},
     "its name 'onnxruntime' is already registered, by runtime 'onnxruntime'; give it another name"),
    ({"name": "myonnx", "target": "onnx"},
     "runtime 'myonnx': its target 'onnx' is already registered, by runtime 'onnxruntime'; give it another target"),
])
def test_register_refuses_a_declaration_no_stage_could_use(changes, reason):
    before = runtimes.names()
    with pytest.raises(ValueError, match=reason) as exc:
        runtimes.register(dataclasses.replace(FAKE, **changes))
    assert "\n" not in str(exc.value)
    assert runtimes.names() == before


def test_register_still_takes_a_valid_runtime():
    with fake_runtime.registered() as rt:
        assert runtimes.get("fake") is rt and runtimes.by_target("fake") is rt


def test_registering_the_same_runtime_again_does_nothing():
    """It clashed with itself: 'its name is already registered, by runtime <itself>'."""
    with fake_runtime.registered() as rt:
        before = runtimes.names()
        assert runtimes.register(rt) is rt
        assert runtimes.register(dataclasses.replace(rt)) is not rt  # an equal one: the same runtime
        assert runtimes.names() == before and runtimes.get("fake") is rt
        with pytest.raises(ValueError, match="its name 'fake' is already registered, by runtime 'fake'"):
            runtimes.register(dataclasses.replace(rt, version=lambda: "another"))  # not the same one: a clash


SELF_REGISTERING = {  # modules that bring their runtime to the registry twice
    "selfreg": "import dataclasses, fake_runtime\nfrom runtimes.registry import register\n"
               "RUNTIME = register(dataclasses.replace(fake_runtime.RUNTIME, name='selfreg', target='selfreg'))\n",
    "aliaspkg/__init__.py": "from aliaspkg.rt import RUNTIME\n",  # a package re-exporting its module's runtime
    "aliaspkg/rt.py": "import dataclasses, fake_runtime\n"
                      "RUNTIME = dataclasses.replace(fake_runtime.RUNTIME, name='aliasrt', target='aliasrt')\n",
}


def test_a_plugin_registered_twice_is_served_not_refused_as_its_own_clash(tmp_path):
    for path, text in SELF_REGISTERING.items():
        file = tmp_path / (path if path.endswith(".py") else f"{path}.py")
        file.parent.mkdir(exist_ok=True)
        file.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITC_")}
    env.update(VITC_RUNTIMES="selfreg,aliaspkg.rt,aliaspkg", PYTHONPATH=f"{tmp_path}:{REPO / 'tests'}:{REPO}")
    code = ("from runtimes import registry\n"
            "print(registry.load_failures() or 'none')\n"
            "for name in ('selfreg', 'aliasrt'):\n"
            "    print(registry.pick(name).target, registry.shadowed('target', name))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines() == ["none", "selfreg None", "aliasrt None"], r.stdout + r.stderr


# --- broken plugins: every "unknown backend/target" says why; a clash is refused, not shadowed --------------------

def _plugins(tmp_path: Path, *modules: str) -> dict[str, str]:
    """Environment for a CLI subprocess that loads `modules` (written to tmp_path) through VITC_RUNTIMES."""
    for m in modules:
        (tmp_path / f"{m}.py").write_text(PLUGINS[m])
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITC_")}
    return {**env, "VITC_RUNTIMES": ",".join(modules), "PYTHONPATH": f"{tmp_path}:{REPO / 'tests'}:{REPO}"}


def _refused(args: list[str], env: dict[str, str], cwd: Path = REPO) -> str:
    """The one stderr line of a command that must refuse its arguments (exit 2)."""
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    return lines[0]


BROKEN = ("importerr", "noattr", "notruntime", "upper", "clashname", "clashtarget")


@pytest.mark.parametrize(("args", "unknown"), [
    (["-m", "serve", "--model", "nowhere", "--backend", "importerr"], f"unknown backend; known: {BUILTIN_NAMES}; "),
    (["-m", "export", "--checkpoint", "nowhere", "--out", "nowhere-out", "--targets", "myrt"],
     f"unknown target 'myrt'; known: {BUILTINS[0].target}, "),
    (["benchmarks/latency.py", "--targets", "myonnx-fp32"], "unknown target 'myonnx-fp32'; known: all, "),
])
def test_unknown_backend_and_target_refusals_say_why_each_plugin_is_missing(tmp_path, args, unknown):
    line = _refused(args, _plugins(tmp_path, *BROKEN))
    assert unknown in line
    for why in WHY.values():
        assert why in line, (why, line)


@pytest.mark.parametrize(("args", "refusal"), [
    # The server's default backend, which runs the bundles given, is the name the plugin claimed: checked too, not
    # served in the plugin's place.
    (["-m", "serve", "--model", "nowhere"], "--backend (VITC_BACKEND): 'onnxruntime' is also the name of a runtime "
                                            "that could not be registered: " + WHY["clashname"]),
    (["-m", "serve", "--model-dir", "nowhere"], "'onnxruntime' is also the name of a runtime that could not be "
                                                "registered: " + WHY["clashname"]),
    (["-m", "serve", "--model", "nowhere", "--backend", "onnxruntime"], "'onnxruntime' is also the name of a runtime "
                                                                        "that could not be registered"),
    # The export's default targets (onnx, openvino) hold the target the other plugin claimed.
    (["-m", "export", "--checkpoint", "nowhere", "--out", "nowhere-out"],
     "error: target 'onnx': 'onnx' is also the target of a runtime that could not be registered: "
     + WHY["clashtarget"]),
    # (Sized so that, were it not refused, it would time the wrong runtime quickly and write into tmp_path only.)
    (["benchmarks/latency.py", "--targets", "onnxruntime-fp32", "--quick", "--pairs", "micro", "--cell-seconds",
      "0.05", "--no-plots", "--no-progress", "--cache", "{tmp}/cache", "--out", "{tmp}/results"],
     "target 'onnxruntime-fp32': 'onnxruntime' is also the name of a runtime that could not be registered: "
     + WHY["clashname"]),
])
def test_a_name_or_target_a_failed_plugin_claimed_is_refused_not_shadowed(tmp_path, args, refusal):
    args = [a.format(tmp=tmp_path) for a in args]
    assert refusal in _refused(args, _plugins(tmp_path, "clashname", "clashtarget"))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()


@pytest.fixture
def failed_plugin(tmp_path, monkeypatch) -> Iterator[Callable[[str, str], str]]:
    """Load a plugin module in this process as VITC_RUNTIMES does at start (it must fail): its reason; the
    registry's record of it is undone after the test."""
    monkeypatch.setattr(registry, "_PLUGIN_ERRORS", dict(registry._PLUGIN_ERRORS))
    monkeypatch.setattr(registry, "_CLASHES", dict(registry._CLASHES))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = []

    def load(module: str, source: str) -> str:
        (tmp_path / f"{module}.py").write_text(source)
        importlib.invalidate_caches()
        loaded.append(module)
        before = runtimes.names()
        registry._load(module, f"{registry.PLUGINS_ENV} plugin")
        assert runtimes.names() == before, "the plugin was meant to fail"
        return registry._PLUGIN_ERRORS[module]

    yield load
    for module in loaded:
        sys.modules.pop(module, None)


CLAIMS_ORT = ("import dataclasses, fake_runtime\n"
              "RUNTIME = dataclasses.replace(fake_runtime.RUNTIME, name='onnxruntime', target='claimort')\n")
CLAIMS_FAKE = ("import dataclasses, fake_runtime\n"
               "RUNTIME = dataclasses.replace(fake_runtime.RUNTIME, target='claimfake')\n")


def _fake_repository(root: Path) -> Path:
    """A repository of one model, 'fake' version 1, whose artifact picks the fake runtime."""
    add_version(root, "fake", "1")
    (root / "fake" / "config.pbtxt").write_text(FAKE_CONFIG)
    return root


def test_a_repository_alone_is_not_refused_for_a_plugin_that_claimed_the_default_backend(tmp_path, failed_plugin):
    """No repository model runs on the unused default --backend: it was refused for it, naming --backend, which
    may not be given with --model-repository."""
    from serve.registry import load_models
    from serve.settings import Settings

    why = failed_plugin("claimort", CLAIMS_ORT)
    assert why.endswith("its name 'onnxruntime' is already registered, by runtime 'onnxruntime'; give it another name")
    repo = _fake_repository(tmp_path / "repo")
    with fake_runtime.registered():
        models = load_models(Settings(model_repository=repo))
        try:
            assert list(models) == ["fake"] and not models.skipped
        finally:
            models["fake"].backend.close()
        # Bundles run on the default backend: there it is still refused, bundles beside the repository included.
        bundle = fake_runtime.write_bundle(tmp_path / "b")
        for given in ({"models": [str(bundle)]}, {"model_dir": tmp_path}, {"models": [str(bundle)],
                                                                             "model_repository": repo}):
            with pytest.raises(ValueError, match="'onnxruntime' is also the name of a runtime that could not be "
                                                 "registered: " + re.escape(why)):
                Settings(**given)


def test_a_model_whose_runtime_a_failed_plugin_claimed_is_refused_not_served_by_the_other(tmp_path, failed_plugin):
    from serve.errors import ServeError
    from serve.registry import ModelSource, load_model
    from serve.settings import Settings

    repo = _fake_repository(tmp_path / "repo")
    bundle = fake_runtime.write_bundle(tmp_path / "b")
    with fake_runtime.registered():
        why = failed_plugin("claimfake", CLAIMS_FAKE)
        refusal = "'fake' is also the name of a runtime that could not be registered: " + why
        with pytest.raises(BackendError, match=re.escape(refusal)):
            registry.pick("fake")
        assert registry.pick("onnxruntime") is runtimes.get("onnxruntime")  # what no plugin claimed still runs
        # A repository model whose artifact picks it: refused, with the reason (it was served by the built-in).
        with pytest.raises(ServeError, match=re.escape(refusal)):
            load_model(ModelSource(repo / "fake", "fake", repository=True), Settings(model_repository=repo))
        # A bundle server given --backend fake: refused at start.
        with pytest.raises(ValueError, match=re.escape(refusal)):
            Settings(models=[str(bundle)], backend="fake")
        # And every caller that opens a model by runtime name (the benchmarks, export.report --served).
        from models.bundle import read_manifest

        with pytest.raises(BackendError, match=re.escape(refusal)):
            runtimes.open_backend(bundle, read_manifest(bundle), "fake")


def test_a_repository_server_starts_lists_the_model_a_failed_plugin_claimed_unavailable_and_says_why(tmp_path):
    """The reported start: a repository alone was refused for the unused default --backend, and a model whose
    runtime a failed plugin claimed was served by the other, without a word."""
    import httpx
    from test_serve_fixtures import start_server

    plugins = {"claimort": CLAIMS_ORT, "claimfake": CLAIMS_FAKE,
               "okfake": "import dataclasses, fake_runtime\n"
                         "RUNTIME = dataclasses.replace(fake_runtime.RUNTIME, name='okfake', target='okfake')\n"}
    for module, text in plugins.items():
        (tmp_path / f"{module}.py").write_text(text)
    repo = _fake_repository(tmp_path / "repo")
    add_version(repo, "other", "1", runtime="okfake")  # no config.pbtxt: a runtime that did register serves it
    env = {"VITC_RUNTIMES": "fake_runtime,claimort,claimfake,okfake",
           "PYTHONPATH": f"{tmp_path}:{REPO / 'tests'}:{REPO}"}
    # Not ready by default (strict readiness, as Triton: a model it knows serves nothing): started without it.
    with start_server(["--model-repository", str(repo), "--no-strict-readiness"], tmp_path / "server.log",
                      env) as server:
        entries = {e["name"]: e for e in httpx.post(f"{server.url}/v2/repository/index").json()}
        assert entries["other"]["state"] == "READY"
        assert entries["fake"]["state"] == "UNAVAILABLE"
        assert "'fake' is also the name of a runtime that could not be registered: VITC_RUNTIMES plugin " \
               "'claimfake' failed" in entries["fake"]["reason"]
        warned = [ln for ln in server.logs().splitlines() if "runtime modules that could not be registered" in ln]
        assert len(warned) == 1 and "'claimort' failed" in warned[0] and "'claimfake' failed" in warned[0]


def test_every_benchmark_target_is_checked_for_a_plugin_that_claimed_its_runtime(tmp_path):
    code = ("from benchmarks.runners import parse_targets\n"
            "try:\n    parse_targets('all')\nexcept ValueError as exc:\n    print(exc)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_plugins(tmp_path, "clashname"),
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("target 'onnxruntime-fp32': 'onnxruntime' is also the name of a runtime"), r


def test_a_working_plugin_and_the_builtins_still_serve_beside_broken_ones(tmp_path):
    """A broken plugin takes neither the built-in runtimes nor a working plugin down."""
    env = _plugins(tmp_path, "importerr", "noattr")
    env["VITC_RUNTIMES"] += ",fake_runtime"
    code = "import runtimes; print(','.join(runtimes.names()))"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    want = ",".join([*(rt.name for rt in BUILTINS), "fake"])
    assert r.returncode == 0 and r.stdout.strip() == want, r.stderr


# --- a broken module in BUILTIN (README's "Adding a runtime", step 2) ----------------------------------------------

BUILTIN_MODULES = {
    "brokenimp": "import vitc_no_such_package_xyz\n",
    "noattrrt": "X = 1\n",
    "clashrt": "import dataclasses\nfrom runtimes.onnxruntime import RUNTIME as ORT\n"
               "RUNTIME = dataclasses.replace(ORT, name='onnxruntime2')\n",
}


@pytest.fixture
def broken_builtins(tmp_path) -> tuple[Path, dict[str, str]]:
    """A copy of the runtimes package whose BUILTIN lists three broken modules, first on the path (run from tmp)."""
    root = tmp_path / "site"
    shutil.copytree(REPO / "runtimes", root / "runtimes", ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "runtimes" / "registry.py"
    lines = path.read_text().splitlines(keepends=True)
    # Three more modules at the end of BUILTIN, however its statement is written: one more, after it.
    end = next(node.end_lineno for node in ast.parse("".join(lines)).body if isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "BUILTIN" for t in node.targets))
    lines.insert(end, f"BUILTIN = (*BUILTIN, {', '.join(repr(f'runtimes.{m}') for m in BUILTIN_MODULES)})\n")
    path.write_text("".join(lines))
    for name, text in BUILTIN_MODULES.items():
        (root / "runtimes" / f"{name}.py").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITC_")}
    return tmp_path, {**env, "PYTHONPATH": f"{root}:{REPO}"}


def test_a_broken_builtin_module_is_one_line_naming_it_not_a_traceback(broken_builtins):
    cwd, env = broken_builtins
    line = _refused(["-m", "serve", "--model", "nowhere", "--backend", "brokenimp"], env, cwd)
    assert f"unknown backend; known: {BUILTIN_NAMES};" in line
    assert ("built-in runtime module 'runtimes.brokenimp' failed: ModuleNotFoundError: No module named "
            "'vitc_no_such_package_xyz'") in line
    assert ("built-in runtime module 'runtimes.noattrrt' failed: AttributeError: module 'runtimes.noattrrt' has no "
            "attribute 'RUNTIME'") in line
    assert ("built-in runtime module 'runtimes.clashrt' failed: ValueError: runtime 'onnxruntime2': its target "
            "'onnx' is already registered, by runtime 'onnxruntime'; give it another target") in line
    line = _refused(["-m", "export", "--checkpoint", "nowhere", "--out", "o", "--targets", "onnx"], env, cwd)
    assert line.startswith("python -m export: error: target 'onnx': 'onnx' is also the target of a runtime that "
                           "could not be registered: built-in runtime module 'runtimes.clashrt' failed"), line


# --- export: one runtime's own OSError refuses its artifact; the machine's stops the export; max_batch -----------

def _raising(exc: BaseException):
    def load(spec):
        raise exc
    return load


def _nobuild(ctx, precision: str) -> Built:
    return Built([ctx.workdir / "missing.npy"], {})  # a file it says it wrote and did not


_MODELS: dict[str, object] = {}  # workdir -> the torch model its "small" artifact runs (in-process only)


def _small_build(ctx, precision: str) -> Built:
    out = ctx.workdir / "small.txt"
    out.write_text("the export's own model\n")
    _MODELS[str(ctx.workdir)] = ctx.model
    return Built([out], {})


class SmallBatchBackend:
    """torch fp32 itself (so it passes the gate), but at most 4 rows per call, as a native runtime may be."""

    runtime, precision, device, max_batch, parallelism = "small", "fp32", "cpu", 4, 1

    def __init__(self, spec) -> None:
        self.model = _MODELS[str(spec.file(".txt").parent)]

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if len(batch) > self.max_batch:
            raise BackendError(f"a batch of {len(batch)} rows exceeds this backend's max batch {self.max_batch}")
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(batch))).numpy().astype(np.float32)

    def describe(self) -> dict[str, str]:
        return {"inference_precision": "fp32"}

    def close(self) -> None:
        self.model = None


ODD = (
    dataclasses.replace(FAKE, name="liberr", target="liberr", load=_raising(
        OSError("libmyaccel.so.3: cannot open shared object file: No such file or directory"))),
    dataclasses.replace(FAKE, name="nobuild", target="nobuild", build=_nobuild),
    dataclasses.replace(FAKE, name="small", target="small", build=_small_build, load=SmallBatchBackend, tunes=()),
)


@pytest.fixture
def odd():
    for rt in ODD:
        runtimes.register(rt)
    try:
        yield
    finally:
        for rt in ODD:
            runtimes.unregister(rt.name)


def test_a_runtimes_own_oserror_refuses_its_artifact_and_the_others_are_kept(odd, tmp_path, micro_checkpoint):
    from export.bundle import build_bundle

    lines: list[str] = []
    m = build_bundle(micro_checkpoint(tmp_path), tmp_path / "b", ["liberr", "nobuild", "small"], max_batch=8,
                     parity_samples=16, threads=1, log=lines.append)
    arts = {a.id: a for a in m.artifacts}
    assert list(arts) == ["torch-fp32", "liberr-fp32", "nobuild-fp32", "small-fp32"]
    assert "libmyaccel.so.3: cannot open shared object file" in arts["liberr-fp32"].refused_reason
    assert "FileNotFoundError" in arts["nobuild-fp32"].refused_reason
    assert not arts["liberr-fp32"].servable and not arts["nobuild-fp32"].servable
    assert any(ln.startswith("liberr-fp32") and "REFUSED" in ln for ln in lines), lines
    # The parity gate runs the batches the backend takes (its max batch 4, below the export's 8), as a server would.
    small = arts["small-fp32"]
    assert small.servable, small.refused_reason
    assert max(small.parity.batch_sizes) == 4
    assert arts["torch-fp32"].servable and (tmp_path / "b" / "small.txt").is_file()


@pytest.mark.parametrize(("exc", "stops"), [
    (OSError(errno.ENOSPC, "No space left on device"), "OSError: [Errno 28] No space left on device"),
    (OSError(errno.EFBIG, "File too large"), "OSError: [Errno 27] File too large"),
    # A runtime's own error wrapping the full disk: still the machine's.
    (RuntimeError("cannot save the engine"), "OSError: [Errno 122] Disk quota exceeded"),
])
def test_a_full_disk_in_one_runtime_still_stops_the_export(tmp_path, exc, stops, micro_checkpoint):
    from export.bundle import ExportIOError, build_bundle

    if isinstance(exc, RuntimeError):
        exc.__cause__ = OSError("write failed")
        exc.__cause__.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    rt = dataclasses.replace(FAKE, name="full", target="full", load=_raising(exc))
    runtimes.register(rt)
    try:
        with pytest.raises(ExportIOError, match=f"^full-fp32: {re.escape(stops)}"):
            build_bundle(micro_checkpoint(tmp_path), tmp_path / "b", ["full"], max_batch=4, parity_samples=8, threads=1,
                         log=lambda _: None)
    finally:
        runtimes.unregister("full")
    assert not (tmp_path / "b").exists()
