"""Bad input to `python -m export`, `export.triton` and `export.report`: exit 2 with one line, nothing outside the
output touched, nothing half-written, no user file deleted."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle, one_line

from export import cli, report, triton, triton_config, triton_publish, triton_select
from export.bundle import build_bundle
from models.bundle import read_manifest
from models.io import DirectoryBusy, writer_lock

EXPORT = ("--targets", "torch", "--max-batch", "4", "--parity-samples", "16", "--threads", "1")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """vit_c_micro with onnx and openvino artifacts (two Triton models), built once per session."""
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(bundle) -> Path:
    return bundle.parent / "ckpt"


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for directories)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def _export(capsys, checkpoint: Path, out: Path, *extra: str) -> tuple[int, str]:  # noqa: ANN001
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT, *extra])
    return rc, capsys.readouterr().err


# --- python -m export -------------------------------------------------------------------------------------


def test_export_never_replaces_a_directory_that_holds_more_than_a_bundle(checkpoint, bundle, tmp_path, capsys):
    foreign = tmp_path / "project"
    (foreign / "src").mkdir(parents=True)
    (foreign / "sub" / "deep").mkdir(parents=True)
    (foreign / "manifest.json").write_text('{"name": "my web app"}')
    (foreign / "src" / "code.py").write_text("print('keep me')")
    (foreign / "notes.txt").write_text("keep me")
    before = _tree(foreign)
    rc, err = _export(capsys, checkpoint, foreign)
    assert rc == 2 and "not a bundle" in err and "not a vitc-bundle manifest" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert _tree(foreign) == before

    for extra in ("notes.txt", "sub/"):  # a real bundle, plus something of the user's
        out = shutil.copytree(bundle, tmp_path / f"bundle-{extra.strip('/')}")
        (out / extra).mkdir() if extra.endswith("/") else (out / extra).write_text("mine")
        before = _tree(out)
        rc, err = _export(capsys, checkpoint, out)
        assert rc == 2 and f"also holds {extra.strip('/')!r}" in err, err
        assert _tree(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "lock or temporary left behind"


def test_export_replaces_a_genuine_bundle_and_leaves_no_lock_file(checkpoint, bundle, tmp_path, capsys):
    out = shutil.copytree(bundle, tmp_path / "b")
    rc, err = _export(capsys, checkpoint, out, "--replace")
    assert rc == 0, err
    assert [a.id for a in read_manifest(out).artifacts] == ["torch-fp32"]
    rc, err = _export(capsys, checkpoint, tmp_path / "fresh")
    assert rc == 0, err
    rc, err = _export(capsys, tmp_path / "no-such-checkpoint", tmp_path / "failed")
    assert rc == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "fresh"]


def test_a_file_added_to_the_bundle_during_the_export_is_not_deleted(checkpoint, bundle, tmp_path):
    from runtimes import ExportError

    out = shutil.copytree(bundle, tmp_path / "b")
    before = (out / "manifest.json").read_bytes()

    def user_saves_a_file(msg: str) -> None:
        if msg.startswith("torch-fp32"):
            (out / "notes.txt").write_text("written while the export ran")

    with pytest.raises(ExportError, match="also holds 'notes.txt'"):
        build_bundle(checkpoint, out, ["torch"], max_batch=4, parity_samples=8, threads=1, log=user_saves_a_file,
                     drop_artifacts=True)
    assert (out / "notes.txt").read_text() == "written while the export ran"
    assert (out / "manifest.json").read_bytes() == before


def test_the_writer_lock_still_excludes_a_second_writer_and_is_removed_after(tmp_path):
    target = tmp_path / "b"
    lock = tmp_path / ".b.lock"
    with writer_lock(target):
        assert lock.exists()
        with pytest.raises(DirectoryBusy, match="another process is writing"), writer_lock(target):
            pass
        stale = os.open(lock, os.O_RDWR)  # a writer that opened the file but has not locked it yet
    assert not lock.exists()
    try:
        from models.io import same_file

        with writer_lock(target):  # a new lock file: the stale writer's lock would be on the deleted one
            assert not same_file(stale, lock)  # ... which it detects, and starts over
            with pytest.raises(DirectoryBusy):
                with writer_lock(target):
                    pass
    finally:
        os.close(stale)
    assert not lock.exists()


@pytest.mark.parametrize("targets", ["", ",,,", " , "])
def test_an_empty_target_list_is_refused(checkpoint, tmp_path, capsys, targets):
    with pytest.raises(SystemExit) as info:
        cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--targets", targets])
    assert info.value.code == 2 and "--targets names nothing" in one_line(capsys)
    with pytest.raises(SystemExit) as info:
        cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), "--precision", targets],
                 family="onnx")
    assert info.value.code == 2 and "--precision names nothing" in one_line(capsys)
    assert not list(tmp_path.iterdir())


def test_a_parity_dataset_of_another_task_is_refused(checkpoint, tmp_path, capsys):
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "b"), *EXPORT, "--dataset", "mnist"])
    assert rc == 2 and "class names differ from the checkpoint's" in one_line(capsys)
    assert not list(tmp_path.iterdir())


def test_the_bundle_name_is_always_a_valid_model_name(checkpoint, tmp_path, capsys):
    out = tmp_path / "my bündle (v2)"
    rc, err = _export(capsys, checkpoint, out)
    assert rc == 0, err
    assert read_manifest(out).name == "my-b-ndle-v2"
    rc = cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "c"), *EXPORT, "--name", "../up"])
    assert rc == 2 and "--name '../up' is not a valid model name" in one_line(capsys)
    assert not (tmp_path / "c").exists()


# --- python -m export.triton ---------------------------------------------------------------------------------


def _hostile(bundle: Path, tmp_path: Path, edit) -> Path:  # noqa: ANN001
    copy = shutil.copytree(bundle, tmp_path / "hostile")
    doc = json.loads((copy / "manifest.json").read_text())
    edit(doc)
    (copy / "manifest.json").write_text(json.dumps(doc))
    return copy


def _golden_path(d: dict) -> None:
    d["golden"]["file"]["path"] = "../../victim.txt"


def _artifact_path(d: dict) -> None:
    d["artifacts"][1]["files"][0]["path"] = "../../victim.txt"


def _name(d: dict) -> None:
    d["name"] = "../escaped"


def _artifact_id(d: dict) -> None:
    d["artifacts"][1]["id"] = "x/../../../idescaped"


@pytest.mark.parametrize("edit", [_golden_path, _artifact_path, _name, _artifact_id])
def test_triton_never_reads_or_writes_outside_the_bundle_and_the_repository(bundle, tmp_path, capsys, edit):
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    victim = tmp_path / "a" / "victim.txt"  # what "../../victim.txt" names from the bundle
    victim.write_text("victim")
    hostile = _hostile(bundle, root, edit)
    before = _tree(tmp_path)
    assert triton.main([str(hostile), "--out", str(root / "repo")]) == 2
    assert "must be" in one_line(capsys)
    assert _tree(tmp_path) == before  # the victim unchanged, nothing new anywhere


def test_triton_converts_an_older_bundle_whose_name_is_not_a_model_name(bundle, tmp_path):
    # Earlier exports kept the --out directory's name as it was ("my bundle"): the repository name is made valid.
    older = _hostile(bundle, tmp_path, lambda d: d.update(name="my bundle"))
    written = triton.write_repository(older, tmp_path / "repo")
    assert written and all(p.parent.name.startswith("my-bundle-") for p in written), written


def test_triton_refuses_a_tampered_golden_file(bundle, tmp_path, capsys):
    hostile = shutil.copytree(bundle, tmp_path / "hostile")
    golden = hostile / read_manifest(hostile).golden.file.path
    data = bytearray(golden.read_bytes())
    data[len(data) // 2] ^= 0xFF
    golden.write_bytes(bytes(data))
    assert triton.main([str(hostile), "--out", str(tmp_path / "repo")]) == 2
    err = one_line(capsys)
    assert "golden file" in err and "does not match its sha256" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile"]


@pytest.mark.parametrize(("args", "says"), [
    (["--isvc-name", "x\ny: injected"], "is not a Kubernetes name"),
    (["--isvc-name", "Vitc_Micro"], "is not a Kubernetes name"),
    (["--isvc-name", "a" * 64], "is not a Kubernetes name"),
    (["--storage-uri", "s3://b\n  evil: 1"], "--storage-uri"),
    (["--storage-uri", "s3://b evil"], "--storage-uri"),
    (["--storage-uri", "models"], "scheme://location"),
    (["--version", str(2**63)], "--version must be in 1..9223372036854775807"),
    (["--version", "0"], "--version must be in"),
    (["--instances", str(10**12)], "--instances must be in 1..1024"),
    (["--instances", "0"], "--instances must be in"),
    (["--max-queue-delay-us", "-1"], "--max-queue-delay-us must be in"),
])
def test_triton_options_that_would_inject_or_overflow_are_refused(bundle, tmp_path, capsys, args, says):
    with pytest.raises(SystemExit) as info:
        triton.main([str(bundle), "--out", str(tmp_path / "repo"), *args])
    assert info.value.code == 2 and says in one_line(capsys)
    assert not list(tmp_path.iterdir())


def test_the_storage_uri_is_quoted_in_the_inference_service(bundle, tmp_path):
    import yaml

    uri = "s3://bucket/a'b\"c#d:{e}[f]"
    triton.write_repository(bundle, tmp_path / "repo", storage_uri=uri, isvc_name="my-model")
    isvc = yaml.safe_load((tmp_path / "repo" / triton.ISVC_FILE).read_text())
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == uri
    assert isvc["metadata"]["name"] == "my-model"
    assert set(isvc) == {"apiVersion", "kind", "metadata", "spec"}


def test_a_failing_triton_write_leaves_nothing_behind(bundle, tmp_path, capsys):
    # The second model's file is corrupt: the first one must not have been written either.
    hostile = shutil.copytree(bundle, tmp_path / "hostile")
    m = read_manifest(hostile)
    models = triton_select.choose(m, (), [])
    assert len(models) >= 2
    (hostile / models[-1].files[0].path).write_bytes(b"corrupt")
    repo = tmp_path / "repo"
    assert triton.main([str(hostile), "--out", str(repo)]) == 2
    assert "(tampered or corrupt)" in one_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile"]

    # An existing repository stays byte for byte as it was.
    triton.write_repository(bundle, repo)
    before = _tree(repo)
    assert triton.main([str(hostile), "--out", str(repo), "--instances", "3"]) == 2
    capsys.readouterr()
    assert _tree(repo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostile", "repo"]


def test_a_failure_while_publishing_is_undone(bundle, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    triton.write_repository(bundle, repo)
    before = _tree(repo)
    calls = []
    real = triton_publish._replace_file

    def fail_on_the_inference_service(src: Path, dst: Path, staging: Path):  # noqa: ANN202
        if dst.name == triton.ISVC_FILE:  # the last step: the models' new configs are in place by now
            calls.extend(p.read_text() for p in repo.glob(f"*/{triton.CONFIG_FILE}"))
            raise OSError(28, "No space left on device")
        return real(src, dst, staging)

    monkeypatch.setattr(triton_publish, "_replace_file", fail_on_the_inference_service)
    with pytest.raises(OSError, match="No space left"):
        triton.write_repository(bundle, repo, instances=2, replace_config=True)
    assert calls and all("count: 2" in text for text in calls), calls  # published, then undone
    assert _tree(repo) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


# --- python -m export.report ---------------------------------------------------------------------------------


def test_report_png_path_is_checked_before_any_work(bundle, tmp_path, capsys):
    a_dir = tmp_path / "charts"
    a_dir.mkdir()
    (tmp_path / "dir.png").mkdir()
    cases = [(tmp_path / "x.weird", "must end in .png"), (a_dir, "must end in .png"),
             (tmp_path / "dir.png", "is a directory"), (tmp_path / "missing" / "x.png", "does not exist")]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "x.png", "cannot write"))
    if Path("/sys").is_dir():
        cases.append((Path("/sys/x.png"), "cannot write"))
    for path, says in cases:
        with pytest.raises(SystemExit) as info:
            report.main([str(bundle), "--png", str(path)])
        assert info.value.code == 2 and says in one_line(capsys), path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["charts", "dir.png", *(["locked"] if os.geteuid()
                                                                                       else [])])
    assert not list(a_dir.iterdir())
    assert report.main([str(bundle), "--markdown", "--png", str(a_dir / "ok.png")]) == 0
    out, err = capsys.readouterr()
    assert f"plot: {a_dir / 'ok.png'}" in err and "plot:" not in out  # `--markdown > table.md` holds only Markdown
    assert (a_dir / "ok.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("samples", ["0", "-1"])
def test_report_served_samples_must_be_positive(bundle, capsys, samples):
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(SystemExit) as info:
        report.main([str(bundle), "--served", "--samples", samples])
    assert info.value.code == 2 and "--samples must be at least 1" in one_line(capsys)
    assert (bundle / "manifest.json").read_bytes() == before


def test_manifest_strings_cannot_break_the_config_or_the_labels(bundle, tmp_path, capsys):
    def newline_in_a_class(d: dict) -> None:
        d["class_names"][3] = "cat\ndog"

    hostile = _hostile(bundle, tmp_path, newline_in_a_class)
    assert triton.main([str(hostile), "--out", str(tmp_path / "repo")]) == 2
    err = one_line(capsys)  # refused when the manifest is read, or at the latest before labels.txt is written
    assert "labels.txt would be misaligned" in err or "class_names[3]' must be" in err, err
    assert not (tmp_path / "repo").exists()
    m = read_manifest(bundle)
    quoted = replace(m, input=replace(m.input, name='in"put'))
    art = triton_select.choose(m, (), [])[0]
    text = triton_config.config_pbtxt("micro", quoted, art, kind="cpu", instances=1, max_queue_delay_us=0)
    assert 'name: "in\\"put" data_type' in text and 'key: "in\\"put"' in text
