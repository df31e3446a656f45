"""Where `--out` cannot be used, and when the machine or the user stops a write, `python -m export`, `export.triton`,
`export.report` and `python -m train` say so in one line with the right exit code:

- a symlink loop or a file in the path of --out: exit 2 naming the real reason (not a traceback, not "File exists");
- `python -m export --out LINK`: refused (the swap would replace the link, not the bundle it points to);
- a full disk: exit 1 (the machine failed, not the input);
- Ctrl-C once the output is being put in place: the write is finished, cleaned up, and reported, not "interrupted".
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle, one_line

import models.io
from export import cli, report, served, triton
from train.__main__ import main as train_main

EXPORT = ("--targets", "torch", "--max-batch", "4", "--parity-samples", "16", "--threads", "1")
TINY = ["--dataset", "digits", "--epochs", "1", "--train-subset", "32", "--val-subset", "16", "--batch-size", "16",
        "--threads", "1", "--model", "vit_c_micro"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """vit_c_micro with onnx and openvino artifacts, shared with the other export tests."""
    return micro_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def checkpoint(bundle) -> Path:
    return bundle.parent / "ckpt"


def _code(run, *args) -> int:  # noqa: ANN001, ANN002
    """A CLI main's exit code, argparse's exits and a Ctrl-C (130: it must not end the test session) included."""
    try:
        return run(*args)
    except SystemExit as exc:
        return exc.code
    except KeyboardInterrupt:
        return 130


def _bad_outs(tmp_path: Path) -> list[tuple[Path, str]]:
    """--out values that cannot be directories, with the reason each must be reported with."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "afile").write_text("a file\n")
    return [(tmp_path / "loop1", "symbolic link"), (tmp_path / "loop1" / "sub", "Too many levels of symbolic links"),
            (tmp_path / "afile" / "sub", "Not a directory")]


def test_export_and_triton_name_why_out_cannot_be_a_directory(bundle, checkpoint, tmp_path, capsys):
    for out, says in _bad_outs(tmp_path):
        assert _code(cli.main, ["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT]) == 2, out
        assert says in one_line(capsys), out
        assert _code(triton.main, [str(bundle), "--out", str(out)]) == 2, out
        err = one_line(capsys)
        assert ("Too many levels of symbolic links" if out.name == "loop1" else says) in err, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "loop1", "loop2"]  # no lock or temp left


def test_train_names_why_out_cannot_be_a_directory(tmp_path, capsys, train_cli):
    for out, says in _bad_outs(tmp_path):
        code, _, err = train_cli(train_main, [*TINY, "--out", str(out)], capsys)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert ("Too many levels of symbolic links" if out.name == "loop1" else says) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "loop1", "loop2"]


def test_export_refuses_an_out_that_is_a_symlink(bundle, checkpoint, tmp_path, capsys):
    real = shutil.copytree(bundle, tmp_path / "real")
    link = tmp_path / "current"
    link.symlink_to(real)
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    assert _code(cli.main, ["--checkpoint", str(checkpoint), "--out", str(link), *EXPORT, "--replace"]) == 2
    assert "is a symbolic link; give the path of the directory itself" in one_line(capsys)
    assert link.is_symlink() and {p.name: p.read_bytes() for p in real.iterdir()} == before


def test_a_full_disk_is_exit_1_in_triton_and_report(bundle, tmp_path, capsys, monkeypatch):
    def full(*_a, **_k):  # noqa: ANN002, ANN003, ANN202
        raise ENOSPC

    monkeypatch.setattr(triton.shutil, "copyfile", full)
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 1
    err = one_line(capsys)
    assert "No space left on device" in err and f"nothing was written to {repo}" in err, err
    assert not repo.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setattr(report, "plot", full)
    assert report.main([str(bundle), "--png", str(tmp_path / "p.png")]) == 1
    err = one_line(capsys)
    assert "No space left on device" in err and "p.png was not written" in err, err
    monkeypatch.setattr(served, "check", lambda *_a: None)
    monkeypatch.setattr(served, "measure", full)
    assert report.main([str(bundle), "--served"]) == 1
    err = one_line(capsys)
    assert "No space left on device" in err and "served path was not recorded" in err, err


def _ctrl_c(fn, *, after: bool):  # noqa: ANN001, ANN202
    """`fn` with a real Ctrl-C (SIGINT to this process) sent just before it runs, or the moment it returns."""
    def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not after:
            signal.raise_signal(signal.SIGINT)
        result = fn(*args, **kwargs)
        if after:
            signal.raise_signal(signal.SIGINT)
        return result
    return wrapped


def test_ctrl_c_once_triton_publishes_finishes_and_reports_what_it_wrote(bundle, tmp_path, capsys, monkeypatch):
    repo = tmp_path / "repo"
    assert triton.main([str(bundle), "--out", str(repo)]) == 0
    versions = capsys.readouterr().out.count("/1 (a bundle too")
    monkeypatch.setattr(triton, "publish", _ctrl_c(triton.publish, after=True))
    assert _code(triton.main, [str(bundle), "--out", str(repo)]) == 0
    out, err = capsys.readouterr()
    assert versions and out.count("/2 (a bundle too") == versions and "SIGINT arrived" in err, (out, err)
    assert all((d / "2" / "manifest.json").is_file() for d in repo.iterdir() if d.is_dir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # the staging directory is gone
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_once_export_swaps_the_bundle_in_finishes_and_reports_it(checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "b"
    assert cli.main(["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT]) == 0
    capsys.readouterr()
    rmtree = shutil.rmtree
    # The old bundle's removal (exchanged into the temporary, or parked in .old), the last step of the swap:
    # interrupted there, the export said "interrupted" for a bundle already in place and left the old one behind.
    monkeypatch.setattr(models.io.shutil, "rmtree", lambda path, *a, **k: (
        _ctrl_c(rmtree, after=False) if str(path).endswith((".old", ".tmp")) else rmtree)(path, *a, **k))
    assert _code(cli.main, ["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT]) == 0
    std, err = capsys.readouterr()
    assert f"bundle written: {out}" in std and "SIGINT arrived" in err, (std, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no .b.*.old left
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_out_dot_is_the_current_directory(bundle, checkpoint, tmp_path, capsys, monkeypatch):
    """`--out .` put the temporary directory inside the output (its parent was itself): an export ran to the end,
    then refused "." as a non-empty directory, and export.triton refused an empty one up front. export.triton now
    fills it in place; an export, which replaces its --out by a rename, refuses it (the shell would be left in a
    deleted directory)."""
    from models.bundle import read_manifest

    for name in ("e", "t"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "e")  # the bundle would replace the shell's own directory: refused, one line
    assert cli.main(["--checkpoint", str(checkpoint), "--out", ".", *EXPORT]) == 2
    assert "is the current directory" in one_line(capsys) and list((tmp_path / "e").iterdir()) == []
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--checkpoint", str(checkpoint), "--out", "e", *EXPORT]) == 0, capsys.readouterr().err
    assert read_manifest(tmp_path / "e").servable()
    monkeypatch.chdir(tmp_path / "t")
    assert triton.main([str(bundle), "--out", "."]) == 0, capsys.readouterr().err
    written = {p.name for p in (tmp_path / "t").iterdir()}
    assert "inferenceservice.yaml" in written and "micro-onnx-fp32" in written, written
    assert not [p for p in tmp_path.rglob(".*") if p.name.endswith((".tmp", ".lock", ".old"))]
