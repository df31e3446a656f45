"""Bundles tampered with by someone who can write into them and re-seal what vitc checks (every listed sha256 and
size, the golden file's records): every file a runtime reads must be listed, verified and inside the bundle, a
manifest that links out of its bundle is not read, a golden file holds only the arrays vitc writes (export.triton
copies those alone, bounded), and listed sizes are bounded before anything is hashed."""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_serve_fixtures import before_digests, micro_bundle

import models.bundle as contract
import runtimes
from models import onnx_wire
from models.bundle import MANIFEST_FILE, BundleError, file_entries, read_manifest, record_sha256, write_manifest
from models.io import sha256_file

pytestmark = [
    pytest.mark.skipif(not (runtimes.get("onnxruntime").installed() and runtimes.get("openvino").installed()),
                       reason="onnxruntime and openvino are needed"),
    pytest.mark.timeout(120),  # a FIFO read by mistake blocks forever: fail instead
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _copy(bundle: Path, tmp_path: Path, name: str = "b") -> Path:
    return Path(shutil.copytree(bundle, tmp_path / name, symlinks=True))


def _raw(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_FILE).read_text())


def _artifact(raw: dict, artifact_id: str) -> dict:
    return next(a for a in raw["artifacts"] if a["id"] == artifact_id)


def _reseal(bundle: Path, raw: dict | None = None) -> None:
    """What an attacker who can write the bundle does after an edit: every listed regular file's size and sha256,
    each artifact's record in the golden file, and the golden file's own entry, recomputed (the checks vitc makes
    on a bundle that is only edited are not what these tests are about)."""
    raw = raw or _raw(bundle)
    for a in raw["artifacts"]:
        for f in a.get("files", []):
            p = bundle / f["path"]
            if p.is_file():
                f.update(sha256=sha256_file(p), bytes=p.stat().st_size)
    golden = bundle / raw["golden"]["file"]["path"]
    with np.load(golden, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for a in raw["artifacts"]:
        arrays[f"record.{a['id']}"] = np.frombuffer(bytes.fromhex(record_sha256(a)), np.uint8)
    np.savez_compressed(golden, **arrays)
    raw["golden"]["file"].update(sha256=sha256_file(golden), bytes=golden.stat().st_size)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))


def _seal_golden(bundle: Path) -> None:
    """The golden file's manifest entry after the file itself was changed."""
    raw = _raw(bundle)
    golden = bundle / raw["golden"]["file"]["path"]
    raw["golden"]["file"].update(sha256=sha256_file(golden), bytes=golden.stat().st_size)
    (bundle / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))


def _load(bundle: Path, runtime: str, precision: str | None = None) -> None:
    runtimes.open_backend(bundle, read_manifest(bundle), runtime, precision).close()


def _report(bundle: Path, capsys) -> tuple[int, str, str]:  # noqa: ANN001 - pytest's capsys
    from export.report import main

    capsys.readouterr()
    code = main([str(bundle)])
    out, err = capsys.readouterr()
    return code, out, err


# -- OpenVINO reads the .bin the manifest lists, and only it ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["link-outside", "fifo"])
def test_an_openvino_ir_that_does_not_list_its_weights_is_refused(bundle, tmp_path, capsys, kind):
    """The manifest listed only the .xml; OpenVINO read the .bin named after it unverified: a link out of the bundle
    was read and served, a FIFO hung the start (and a repository load) forever."""
    b = _copy(bundle, tmp_path)
    raw = _raw(b)
    ov = _artifact(raw, "openvino-fp32")
    ov["files"] = [f for f in ov["files"] if not f["path"].endswith(".bin")]
    (b / "openvino-fp32.bin").unlink()
    if kind == "fifo":
        os.mkfifo(b / "openvino-fp32.bin")
    else:  # nothing there: anything read through it fails loudly
        (b / "openvino-fp32.bin").symlink_to(tmp_path / "outside" / "weights.bin")
    _reseal(b, raw)
    with pytest.raises(BundleError, match=r"must list exactly one \.xml and one \.bin file") as info:
        read_manifest(b)
    assert "\n" not in str(info.value) and "artifacts[" in str(info.value)
    code, _, err = _report(b, capsys)
    assert code == 2 and err.count("\n") == 1 and "must list exactly one .xml and one .bin" in err
    if kind == "link-outside":
        with pytest.raises(BundleError, match="must list exactly one"):
            _load(b, "openvino", "fp32")


def test_openvino_is_handed_the_listed_weights_not_the_file_named_after_the_xml(bundle, tmp_path, capsys):
    """The weights are the verified .bin of the file list, whatever its name; a file beside the .xml under the .bin
    name is not read (here a link to nothing outside the bundle: reading it would fail the load)."""
    b = _copy(bundle, tmp_path)
    raw = _raw(b)
    ov = _artifact(raw, "openvino-fp32")
    (b / "openvino-fp32.bin").rename(b / "fp32-weights.bin")
    (b / "openvino-fp32.bin").symlink_to(tmp_path / "outside" / "weights.bin")
    next(f for f in ov["files"] if f["path"].endswith(".bin"))["path"] = "fp32-weights.bin"
    _reseal(b, raw)  # the records leave paths out: only the manifest changed
    _load(b, "openvino", "fp32")
    assert _report(b, capsys)[0] == 0


def test_an_openvino_xml_that_is_not_ir_is_refused(bundle, tmp_path, capsys):
    """OpenVINO opened an ONNX model saved under the .xml name with its ONNX frontend (which reads external data the
    manifest does not list): the format the manifest names is enforced."""
    b = _copy(bundle, tmp_path)
    shutil.copyfile(b / "model.onnx", b / "openvino-fp32.xml")
    _reseal(b)
    with pytest.raises(BundleError, match="openvino-fp32.xml is not OpenVINO IR XML") as info:
        _load(b, "openvino", "fp32")
    assert "\n" not in str(info.value)
    code, out, _ = _report(b, capsys)
    line = next(line for line in out.splitlines() if line.startswith("openvino-fp32"))
    assert code == 2 and "CORRUPT: artifact 'openvino-fp32'" in line and "is not OpenVINO IR XML" in line


# -- ONNX external data must be listed -------------------------------------------------------------------------------


def _external_tensor(b: Path, location: str) -> None:
    """model.onnx with its largest raw initializer moved, unchanged, into the file `location` beside it."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(b / "model.onnx"))
    tensor = max((t for t in model.graph.initializer if t.raw_data), key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    (b / location).write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(data)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    (b / "model.onnx").write_bytes(model.SerializeToString())


def test_onnx_external_data_the_manifest_does_not_list_is_refused(bundle, tmp_path, capsys):
    """A file listed nowhere decided the weights: served (the golden check alone would notice a change, not a
    backdoor that spares the 8 golden images), and export.report called it servable."""
    b = _copy(bundle, tmp_path)
    _external_tensor(b, "weights.data")
    _reseal(b)
    with pytest.raises(BundleError, match="model.onnx takes tensor data from 'weights.data', which the manifest "
                                          "does not list") as info:
        _load(b, "onnxruntime")
    assert "\n" not in str(info.value)
    code, out, err = _report(b, capsys)
    line = next(line for line in out.splitlines() if line.startswith("onnx-fp32"))
    assert code == 2 and "CORRUPT" in line and "weights.data" in line and err.count("\n") == 1
    # Listed (and so verified), the same file is fine.
    raw = _raw(b)
    _artifact(raw, "onnx-fp32")["files"].append({"path": "weights.data", "sha256": "0" * 64, "bytes": 0})
    _reseal(b, raw)
    _load(b, "onnxruntime")
    assert _report(b, capsys)[0] == 0


def test_the_onnx_walk_finds_external_data_in_subgraphs_and_functions(tmp_path):
    """The serving install has no onnx package: the manifest's check walks the protobuf itself, as onnx reads it."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def external(t: TensorProto, location: str) -> TensorProto:
        t.data_location = TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", location
        return t

    const = helper.make_node("Constant", [], ["c"], value=external(numpy_helper.from_array(np.ones(2, np.float32)),
                                                                   "in-subgraph"))
    branch = helper.make_graph([const], "then", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              initializer=[external(numpy_helper.from_array(np.ones(3, np.float32), "w"), "init")])
    model = helper.make_model(graph)
    fn = helper.make_function("d", "f", [], ["o"], [helper.make_node(
        "Constant", [], ["o"], value=external(numpy_helper.from_array(np.ones(1, np.float32)), "in-function"))],
        [helper.make_opsetid("", 20)])
    model.functions.append(fn)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert onnx_wire.onnx_external_locations(path) == {"init", "in-subgraph", "in-function"}
    path.write_bytes(model.SerializeToString()[:-3])
    with pytest.raises(ValueError, match="runs past"):
        onnx_wire.onnx_external_locations(path)


# -- manifest.json links out of the bundle ---------------------------------------------------------------------------


def test_a_manifest_that_links_out_of_its_bundle_is_not_read(bundle, tmp_path, capsys):
    """Its parse error quoted the linked file back (over HTTP too, for a repository version): "field 'format' is
    'TOPSECRET-abc123'"."""
    b = _copy(bundle, tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text('{"format": "TOPSECRET-abc123"}')
    (b / MANIFEST_FILE).unlink()
    (b / MANIFEST_FILE).symlink_to(secret)
    with pytest.raises(BundleError, match="links to a file outside the bundle directory") as info:
        read_manifest(b)
    assert "TOPSECRET" not in str(info.value) and "\n" not in str(info.value)
    code, out, err = _report(b, capsys)
    assert code == 2 and "TOPSECRET" not in out + err and "links to a file outside" in err
    # A link that stays inside the bundle reads as before.
    (b / "meta").mkdir()
    shutil.copyfile(bundle / MANIFEST_FILE, b / "meta" / "real.json")
    (b / MANIFEST_FILE).unlink()
    (b / MANIFEST_FILE).symlink_to("meta/real.json")
    assert read_manifest(b).name == read_manifest(bundle).name


def test_a_repository_version_whose_manifest_links_out_is_refused_over_http_without_its_content(bundle, tmp_path):
    from fastapi.testclient import TestClient

    from export.triton import write_repository
    from serve.app import create_app
    from serve.settings import Settings

    repo = tmp_path / "repo"
    write_repository(bundle, repo)
    for name in [p.name for p in repo.iterdir() if p.is_dir() and p.name != "micro-onnx-fp32"]:
        shutil.rmtree(repo / name)  # one model is enough
    secret = tmp_path / "secret.json"
    secret.write_text('{"format": "TOPSECRET-abc123"}')
    settings = Settings(model_control_mode="explicit", model_repository=repo, access_log=False, graceful_timeout_s=5)
    with TestClient(create_app(settings)) as c:
        version = repo / "micro-onnx-fp32" / "2"
        shutil.copytree(repo / "micro-onnx-fp32" / "1", version)
        (version / MANIFEST_FILE).unlink()
        (version / MANIFEST_FILE).symlink_to(secret)
        r = c.post("/v2/repository/models/micro-onnx-fp32/load")
        assert r.status_code == 400, r.text
        assert "links to a file outside the bundle directory" in r.json()["error"] and "TOPSECRET" not in r.text


# -- golden.npz: only the arrays vitc writes, copied bounded --------------------------------------------------------


def _add_member(b: Path, name: str, write) -> None:  # noqa: ANN001 - a function of the member's file object
    with warnings.catch_warnings(), zipfile.ZipFile(b / "golden.npz", "a", compression=zipfile.ZIP_DEFLATED,
                                                    compresslevel=1) as z:
        warnings.simplefilter("ignore")  # zipfile's "Duplicate name": that is the point of one case
        with z.open(name, "w", force_zip64=False) as f:
            write(f)
    _seal_golden(b)


def _zeros(size: int):  # noqa: ANN202 - a writer for _add_member
    """A .npy of `size` zero bytes: deflated, a few hundred KB that np.load allocates whole."""
    from numpy.lib import format as npy

    def write(f) -> None:  # noqa: ANN001
        npy.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
        chunk = bytes(1 << 22)
        for _ in range(size // len(chunk)):
            f.write(chunk)
    return write


def _object_array(f) -> None:  # noqa: ANN001
    np.lib.format.write_array(f, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("member, write", [
    ("bomb0.npy", _zeros(64 << 20)),
    ("evil.npy", _object_array),
    ("pixels.npy", None),  # a second, well-formed 'pixels': which one a reader takes is up to its zip library
], ids=["zip-bomb", "object-array", "duplicate"])
def test_a_golden_file_with_arrays_vitc_never_writes_is_refused_everywhere(bundle, tmp_path, capsys, member, write):
    """export.triton loaded every member whole and copied it into every version directory (a 26 MB zip bomb took
    5.9 GB; an object array was a traceback), while serve and export.report accepted the file."""
    from export import triton

    b = _copy(bundle, tmp_path)
    if write is None:
        with np.load(b / "golden.npz", allow_pickle=False) as z:
            pixels = z["pixels"][::-1].copy()
        write = lambda f: np.lib.format.write_array(f, pixels)  # noqa: E731
    _add_member(b, member, write)
    out = tmp_path / "repo"
    capsys.readouterr()
    assert triton.main([str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and member in err, err
    assert not out.exists()
    code, report, err = _report(b, capsys)
    assert code == 2 and f"CORRUPT: golden inputs 'golden.npz': it holds '{member}'" in report
    with pytest.raises(BundleError, match=f"it holds '{member}'"):
        _load(b, "onnxruntime")


def test_a_version_directory_keeps_its_own_golden_arrays_and_older_golden_files_still_copy(bundle, tmp_path,
                                                                                             capsys):
    """What export.triton copies: this artifact's arrays alone (as before), read through the bounded reader; a golden
    file of an earlier vitc (pixels and logits only) still makes a repository."""
    from export import triton

    assert triton.main([str(bundle), "--out", str(tmp_path / "repo")]) == 0
    version = tmp_path / "repo" / "micro-openvino-fp32" / "1"
    with zipfile.ZipFile(version / "golden.npz") as z:
        names = sorted(z.namelist())
    sources = [n for n in names if n.startswith("source.")]
    assert names == sorted(["pixels.npy", "logits.npy", "contract.npy", "origin.npy", "record.openvino-fp32.npy",
                            "outputs.openvino-fp32.npy", *sources]) and sources
    _load(version, "openvino", "fp32")  # model.xml and model.bin, as Triton's backend names them
    old = _copy(bundle, tmp_path, "old")
    with np.load(old / "golden.npz", allow_pickle=False) as z:
        np.savez_compressed(old / "golden.npz", pixels=z["pixels"], logits=z["logits"])
    write_manifest(old, before_digests(read_manifest(old), file_entries(old, [old / "golden.npz"])[0]))
    capsys.readouterr()
    assert triton.main([str(old), "--out", str(tmp_path / "old-repo")]) == 0, capsys.readouterr().err
    assert _report(tmp_path / "old-repo" / "micro-onnx-fp32" / "1", capsys)[0] == 0


# -- listed sizes are bounded before anything is hashed -------------------------------------------------------------


def test_listed_sizes_are_bounded_before_anything_is_hashed(bundle, tmp_path):
    """A sparse 8 GiB golden file listed at its size (and sha256) was hashed in full at every start and load before
    its 512 MiB bound was checked: 25 s each time, a sparse terabyte costing its writer nothing."""
    b = _copy(bundle, tmp_path)
    raw = _raw(b)
    raw["golden"]["file"]["bytes"] = 8 << 30
    (b / MANIFEST_FILE).write_text(json.dumps(raw))
    bound = f"must be non-negative, at most {runtimes.loader.MAX_GOLDEN_BYTES:,}, got 8589934592"
    with pytest.raises(BundleError, match=f"'golden.file.bytes' {bound}"):
        read_manifest(b)
    raw = _raw(bundle)
    _artifact(raw, "onnx-fp32")["files"][0]["bytes"] = 1 << 40
    (b / MANIFEST_FILE).write_text(json.dumps(raw))
    bound = f"must be non-negative, at most {contract.MAX_ARTIFACT_FILE_BYTES:,}"
    with pytest.raises(BundleError, match=rf"'artifacts\[\d+\].files\[0\].bytes' {bound}"):
        read_manifest(b)
