"""What a runtime plugin's `build` and `version()` give export (tests/plugin_faults_rt.py) is checked when its
artifact is built: a `Built` of the wrong type, files that are not a list of Paths, info that is not JSON or names
a field of the manifest record, a version() that is not one line of text each refuse that artifact alone, in one
"export failed: ..." line naming the runtime, and the other targets ship. The manifest is read back before it is
published, so one the reader refuses never replaces a bundle in --out. The parity gate checks every batch's shape
as the server does, and a build asking for a hub its runtime did not declare says how to declare it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import plugin_faults_rt
import pytest

import models.bundle
import runtimes
from models.bundle import (
    MAX_ARTIFACT_RECORD_BYTES,
    MAX_ARTIFACTS,
    MAX_MANIFEST_BYTES,
    Artifact,
    check_artifact_record,
    check_runtime_version,
    read_manifest,
)
from runtimes.build import Built, check_built

RT = plugin_faults_rt.RUNTIME
ID = "faultrt-fp32"


@pytest.fixture(scope="module")
def registered() -> Iterator[None]:
    runtimes.register(RT)
    runtimes.register(plugin_faults_rt.RUNTIME_HUBLESS)
    runtimes.register(plugin_faults_rt.RUNTIME_IR)
    try:
        yield
    finally:
        for rt in (RT, plugin_faults_rt.RUNTIME_HUBLESS, plugin_faults_rt.RUNTIME_IR):
            runtimes.unregister(rt.name)


@pytest.fixture
def fault(monkeypatch, registered) -> Callable[[str], None]:
    """`fault(mode)`: the plugin misbehaves that way from now on (until the test ends)."""
    monkeypatch.delenv("PLUGIN_FAULT_FILE", raising=False)
    monkeypatch.setenv("PLUGIN_FAULT", "")
    return lambda mode: monkeypatch.setenv("PLUGIN_FAULT", mode)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, micro_checkpoint) -> Path:
    where = tmp_path_factory.mktemp("ckpt")
    micro_checkpoint(where)
    return where / "ckpt"


def _export(checkpoint: Path, out: Path, targets: list[str]):
    from export.bundle import build_bundle

    return build_bundle(checkpoint, out, targets, max_batch=4, parity_samples=16, threads=1, log=lambda _: None)


def _refused(manifest, artifact_id: str = ID) -> str:
    art = next(a for a in manifest.artifacts if a.id == artifact_id)
    assert not art.servable and not art.files
    return art.refused_reason


FILES = "expected a list of pathlib.Path (the artifact's files it wrote into ctx.workdir)"


@pytest.mark.parametrize(("mode", "why"), [
    ("built_none", "TypeError: faultrt build returned NoneType, expected runtimes.build.Built(files, info)"),
    ("info_core", "ValueError: faultrt build returned info keys ['runtime', 'files'] that are the manifest's own "
                  "artifact fields (id, runtime, format, precision, files, "),
    ("info_hint", "ValueError: faultrt build's manifest record: field 'inference_precision' must be a string, got "
                  "int 3"),
    ("version_tuple", "TypeError: faultrt version() returned tuple (1, 2, 0), expected a string (one line of at most "
                      "256 characters)"),
    ("info_huge", "ValueError: faultrt build's manifest record is 17,826,"),
])
def test_a_build_or_version_the_manifest_cannot_hold_refuses_that_artifact_alone(fault, checkpoint, tmp_path, mode,
                                                                                 why):
    """Each exited 0 with a bundle its report, server and next export refused (a version() tuple also broke the
    provenance of every export while the plugin was registered), crashed the export (exit 1, a traceback), or
    blamed the Backend's load; the other targets are kept."""
    fault(mode)
    out = tmp_path / "b"
    m = _export(checkpoint, out, ["onnx", RT.target])
    reason = _refused(m)
    assert reason.startswith(f"export failed: {why}"), reason
    assert "\n" not in reason
    assert [a.id for a in m.servable()] == ["torch-fp32", "onnx-fp32"]
    assert read_manifest(out) == m  # what serve, the report and the next export read
    assert not (out / plugin_faults_rt.FILE).exists()


def test_files_its_format_does_not_take_refuse_that_artifact_alone(fault, checkpoint, tmp_path):
    """Its format's file rule was first applied by the manifest's read-back, which refused the whole export: every
    other artifact, each past its gate, was lost."""
    out = tmp_path / "b"
    m = _export(checkpoint, out, ["onnx", "irfault"])
    assert _refused(m, "irfault-fp32") == (
        "export failed: ValueError: irfault build's manifest record: field 'files' must list exactly one .xml and one "
        ".bin file (format 'openvino-ir'), lists 'faultrt.onnx'")
    assert [a.id for a in m.servable()] == ["torch-fp32", "onnx-fp32"]
    assert read_manifest(out) == m and not (out / plugin_faults_rt.FILE).exists()


@pytest.mark.parametrize(("built", "why"), [
    (([Path("m")], {}), "build returned tuple, expected runtimes.build.Built(files, info)"),
    (Built("m"), f"build returned files as str, {FILES}"),  # type: ignore[arg-type]
    (Built((Path("m"),)), f"build returned files as tuple, {FILES}"),  # type: ignore[arg-type]
    (Built(None), f"build returned files as NoneType, {FILES}"),  # type: ignore[arg-type]
    (Built(["/m"]), "build returned files[0] as str '/m', expected a pathlib.Path"),  # type: ignore[list-item]
    (Built([Path("m")], [("n", 1)]), "build returned info as list, expected a dict"),  # type: ignore[arg-type]
])
def test_check_built_refuses_what_is_not_a_built_of_paths_and_a_dict(built, why):
    with pytest.raises(TypeError) as err:
        check_built("rt", built)
    assert str(err.value) == f"rt {why}"


def test_check_built_keeps_json_info_and_refuses_the_rest():
    assert check_built("rt", Built([Path("m")], {"n": 1})) == Built([Path("m")], {"n": 1})
    with pytest.raises(ValueError, match="^rt build returned info that is not JSON: PosixPath at where, not a JSON"):
        check_built("rt", Built([Path("m")], {"where": Path("m")}))
    with pytest.raises(ValueError, match="^rt build returned info that is not JSON: nan at x, not a finite number"):
        check_built("rt", Built([Path("m")], {"x": float("nan")}))


@pytest.mark.parametrize(("version", "kind", "why"), [
    (None, TypeError, "NoneType None, expected a string (one line of at most 256 characters)"),
    ("1.0\nbuilt by hand", ValueError, "'1.0\\nbuilt by hand', expected one line of at most 256 characters"),
    ("1" * 257, ValueError, "'" + "1" * 79 + ", expected one line of at most 256 characters"),
])
def test_a_version_the_manifest_cannot_record_is_refused(version, kind, why):
    assert check_runtime_version("rt", "1" * 256) == "1" * 256
    with pytest.raises(kind) as err:
        check_runtime_version("rt", version)
    assert str(err.value) == f"rt version() returned {why}"


def test_check_artifact_record_bounds_one_record_to_its_share_of_the_manifest():
    art = Artifact(id="rt-fp32", runtime="rt", format="onnx", precision="fp32", files=(), servable=False,
                   runtime_version="1.0", info={"blob": "x" * (MAX_ARTIFACT_RECORD_BYTES - 1000)})
    check_artifact_record(art)
    assert MAX_ARTIFACT_RECORD_BYTES * MAX_ARTIFACTS * 2 == MAX_MANIFEST_BYTES
    with pytest.raises(ValueError, match=r"^rt build's manifest record is 32,9\d\d bytes of JSON, more than the "
                                         r"32,768 one artifact may take: keep its info short$"):
        check_artifact_record(dataclasses.replace(art, info={"blob": "x" * MAX_ARTIFACT_RECORD_BYTES}))


def test_check_artifact_record_refuses_info_keys_of_the_record_itself():
    art = Artifact(id="rt-fp32", runtime="rt", format="onnx", precision="fp32", files=(), servable=False,
                   runtime_version="1.0", info={"opset": 20})
    check_artifact_record(art)
    with pytest.raises(ValueError, match=r"^rt build returned info keys \['precision'\]"):
        check_artifact_record(dataclasses.replace(art, info={"precision": "int8"}))


@pytest.mark.parametrize("mode", ["subdir_str", "subdir_rows"])
def test_a_refused_builds_directory_goes_with_it_and_the_next_export_replaces_the_bundle(fault, checkpoint, tmp_path,
                                                                                       mode):
    """A build may write into a directory of its own. Refused (by check_built, or by its gate), only its new plain
    files were removed: the directory and the model in it shipped in the bundle, unlisted, and the next export to
    that --out was refused for holding a foreign entry."""
    fault(mode)
    out = tmp_path / "b"
    m = _export(checkpoint, out, ["onnx", RT.target])
    if mode == "subdir_str":  # named in the bundle, not in the temporary directory it was built in (gone by now)
        assert _refused(m) == ("export failed: TypeError: faultrt build returned files[0] as str "
                               f"'{plugin_faults_rt.SUBDIR}/{plugin_faults_rt.FILE}', expected a pathlib.Path")
    _refused(m)
    listed = {f.path for a in m.artifacts for f in a.files}
    assert {p.relative_to(out).as_posix() for p in out.rglob("*")} == {"manifest.json", "golden.npz", *listed}
    fault("subdir")
    m = _export(checkpoint, out, ["onnx", RT.target])
    assert [a.id for a in m.servable()] == ["torch-fp32", "onnx-fp32", ID]
    assert (out / plugin_faults_rt.SUBDIR / plugin_faults_rt.FILE).is_file()


def test_a_builds_numpy_scalars_and_integer_keys_are_kept_as_json(fault, checkpoint, tmp_path):
    fault("info_scalars")
    m = _export(checkpoint, tmp_path / "b", [RT.target])
    art = next(a for a in m.artifacts if a.id == ID)
    assert art.servable and {k: art.info[k] for k in ("threads", "scale", "7")} == {"threads": 2, "scale": 0.5,
                                                                                     "7": "seven"}
    assert read_manifest(tmp_path / "b") == m


@pytest.fixture
def unreadable_manifest(monkeypatch) -> Callable[[], None]:
    """`unreadable_manifest()`: export's manifest writer and its reader disagree from now on (the manifest written is
    past the reader's 16 MiB bound), what the read-back is the last defence against once each record passed."""
    import export.bundle

    def write_manifest(bundle: Path, manifest: models.bundle.Manifest) -> Path:
        path = models.bundle.write_manifest(bundle, manifest)
        with open(path, "a") as f:
            f.write(" " * MAX_MANIFEST_BYTES)
        return path

    return lambda: monkeypatch.setattr(export.bundle, "write_manifest", write_manifest)


def test_a_refusal_the_manifest_could_not_hold_is_cut_to_one_line_it_holds(fault, checkpoint, tmp_path):
    """A build's error of 128 Ki characters naming a file with an undecodable byte: the refused_reason it made was
    past the reader's bounds, and the read-back refused the export of every other artifact."""
    from models.bundle import MAX_TEXT_CHARS

    fault("raise_long")
    out = tmp_path / "b"
    m = _export(checkpoint, out, ["onnx", RT.target])
    reason = _refused(m)
    assert reason.startswith("export failed: ValueError: cannot convert w\\udcff.bin: xxx")
    assert len(reason) == MAX_TEXT_CHARS and reason.endswith("x...")
    assert [a.id for a in m.servable()] == ["torch-fp32", "onnx-fp32"]
    assert read_manifest(out) == m


def test_a_manifest_that_does_not_read_back_never_replaces_the_bundle_in_out(checkpoint, tmp_path,
                                                                             unreadable_manifest):
    """The export stops in one line and the bundle it would have replaced stays."""
    from export.bundle import ExportError

    out = tmp_path / "b"
    _export(checkpoint, out, ["onnx"])
    before = read_manifest(out)
    unreadable_manifest()
    with pytest.raises(ExportError) as err:
        _export(checkpoint, out, ["onnx"])
    # Not the reader's "; re-export the bundle": this was the export.
    assert str(err.value) == (f"export failed: the manifest written does not read back, so {out} was left as it "
                              "was: corrupt manifest manifest.json: larger than 16 MiB")
    assert read_manifest(out) == before
    with pytest.raises(ExportError) as err:
        _export(checkpoint, tmp_path / "new", ["onnx"])
    assert str(err.value).startswith(f"export failed: the manifest written does not read back, so nothing was "
                                     f"written to {tmp_path / 'new'}: corrupt manifest manifest.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary left beside it


def test_a_backend_answering_too_few_rows_fails_the_gate_with_the_servers_shape_message(fault, checkpoint, tmp_path):
    """numpy's "operands could not be broadcast together" was the reason; the warm-up's one row passes, so the gate
    is where it shows."""
    fault("rows")
    reason = _refused(_export(checkpoint, tmp_path / "b", [RT.target]))
    assert reason == "export failed: BackendError: backend returned shape (1, 10), expected (4, 10) float32"


def test_a_build_asking_for_a_hub_its_runtime_does_not_declare_says_to_declare_it(fault, checkpoint, tmp_path):
    m = _export(checkpoint, tmp_path / "b", ["hubless"])
    assert _refused(m, "hubless-fp32") == ("no ONNX hub was exported for this bundle: a runtime whose build calls "
                                           "ctx.hub_onnx() must declare needs_hub=True in its Runtime(...)")
