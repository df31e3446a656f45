"""A manifest edited after export is refused everywhere vitc reads it, export.triton included (it published
relabelled classes and edited parity numbers for Triton, which checks none of it), and deleting the manifest's
golden record does not pass it off as a bundle from before golden inputs existed (that turned every check off)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from test_serve_fixtures import animal_pngs, micro_bundle

import runtimes
from models.bundle import MANIFEST_FILE, BundleError, read_manifest

pytestmark = [
    pytest.mark.skipif(not runtimes.get("onnxruntime").installed(), reason="onnxruntime is not installed"),
    pytest.mark.timeout(300),
]

EDITED = "manifest.json was edited after export"
NO_GOLDEN = f"{EDITED}: it has provenance but no golden record"
UNLISTED = f"{EDITED}: golden.npz is present but the manifest does not list it"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory, ("onnx",))


def _edited(src: Path, dest: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the bundle (or version directory) `src` at `dest` whose manifest.json `edit` changed by hand."""
    shutil.copytree(src, dest)
    raw = json.loads((dest / MANIFEST_FILE).read_text())
    edit(raw)
    (dest / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))
    return dest


def _relabel(raw: dict) -> None:
    raw["class_names"].reverse()


def _parity(raw: dict) -> None:
    onnx = next(a for a in raw["artifacts"] if a["id"] == "onnx-fp32")
    onnx["parity"]["max_abs_err"] = 1e-9


def _unsealed(raw: dict) -> None:
    """Relabelled, then the golden record that would have told deleted (provenance kept)."""
    _relabel(raw)
    del raw["golden"]


def _unsealed_no_provenance(raw: dict) -> None:
    """As `_unsealed`, provenance deleted too: golden.npz, still in the bundle, gives it away."""
    _unsealed(raw)
    del raw["provenance"]


def _pre_golden(raw: dict) -> None:
    """What vitc wrote before golden inputs and provenance existed (8ebbaa5)."""
    del raw["golden"], raw["provenance"]


def _old_bundle(bundle: Path, dest: Path) -> Path:
    old = _edited(bundle, dest, _pre_golden)
    (old / "golden.npz").unlink()
    return old


def _report(path: Path, capsys) -> tuple[int, str, str]:  # noqa: ANN001 - pytest's capsys
    from export.report import main

    capsys.readouterr()
    code = main([str(path)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("edit, reason", [
    (_relabel, f"{EDITED}: its class names"),
    (_parity, f"{EDITED}: artifact 'onnx-fp32' (its parity numbers"),
    (_unsealed, NO_GOLDEN),
    (_unsealed_no_provenance, UNLISTED),
], ids=["relabelled", "parity-number", "golden-deleted", "golden-and-provenance-deleted"])
def test_export_triton_refuses_what_a_server_refuses_and_writes_nothing(bundle, tmp_path, capsys, edit, reason):
    from export import triton

    edited = _edited(bundle, tmp_path / "b", edit)
    for out in (tmp_path / "new" / "repo", tmp_path / "existing"):  # a new repository, and a version added to one
        if out.name == "existing":
            assert triton.main([str(bundle), "--out", str(out)]) == 0
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        capsys.readouterr()
        assert triton.main([str(edited), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and reason in err, err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, nothing left
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in (tmp_path / "existing" / "micro-onnx-fp32").iterdir() if p.is_dir()) == ["1"]


def test_export_triton_still_publishes_a_bundle_from_before_golden_inputs(bundle, tmp_path, capsys):
    from export import triton

    old = _old_bundle(bundle, tmp_path / "old")
    assert triton.main([str(old), "--out", str(tmp_path / "repo")]) == 0, capsys.readouterr().err
    version = tmp_path / "repo" / "micro-onnx-fp32" / "1"
    assert read_manifest(version).golden is None and not (version / "golden.npz").exists()
    assert _report(version, capsys)[0] == 0
    runtimes.open_backend(version, read_manifest(version), "onnxruntime").close()


@pytest.mark.parametrize("edit, reason", [(_unsealed, NO_GOLDEN), (_unsealed_no_provenance, UNLISTED)],
                         ids=["golden-deleted", "golden-and-provenance-deleted"])
def test_a_deleted_golden_record_is_refused_at_load_and_in_the_report(bundle, tmp_path, capsys, edit, reason):
    from serve.errors import ServeError
    from serve.registry import load_model
    from serve.settings import Settings

    edited = _edited(bundle, tmp_path / "b", edit)
    with pytest.raises(BundleError, match=reason) as info:
        runtimes.open_backend(edited, read_manifest(edited), "onnxruntime")
    assert "\n" not in str(info.value)
    with pytest.raises(ServeError, match=reason):  # a server's start: one line, exit 2
        load_model(str(edited), Settings(model_control_mode="explicit", models=[str(edited)], access_log=False))
    code, out, err = _report(edited, capsys)
    assert code == 2 and f"CORRUPT: {reason}" in out
    assert err.strip() == f"python -m export.report: error: corrupt, will not load: {edited}: golden"


def test_a_bundle_from_before_golden_inputs_still_loads_and_reports(bundle, tmp_path, capsys):
    old = _old_bundle(bundle, tmp_path / "old")
    runtimes.open_backend(old, read_manifest(old), "onnxruntime").close()
    code, out, _ = _report(old, capsys)
    assert code == 0 and "CORRUPT" not in out and "provenance: not recorded" in out


def test_hot_reload_of_a_version_without_its_golden_record_is_a_400_and_the_old_version_serves_on(bundle, tmp_path):
    from fastapi.testclient import TestClient

    from export.triton import write_repository
    from serve.app import create_app
    from serve.settings import Settings

    repo = tmp_path / "repo"
    write_repository(bundle, repo)
    name = "micro-onnx-fp32"
    png = animal_pngs(1)[0]
    settings = Settings(model_control_mode="explicit", model_repository=repo, access_log=False, graceful_timeout_s=5)
    with TestClient(create_app(settings)) as c:
        def top() -> list[str]:
            r = c.post(f"/v1/models/{name}/classify?top_k=3", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            return [p["label"] for p in r.json()["predictions"]]

        served = top()
        for version, (edit, reason) in enumerate([(_unsealed, NO_GOLDEN), (_unsealed_no_provenance, UNLISTED)], 2):
            _edited(repo / name / "1", repo / name / str(version), edit)
            r = c.post(f"/v2/repository/models/{name}/load")
            assert r.status_code == 400 and reason in r.json()["error"], r.text
            assert c.get(f"/v2/models/{name}").json()["versions"] == ["1"]
            assert top() == served
