"""Faults while writing and reading vitc's files: safetensors' full-disk error (not an OSError) is the machine
failing in one line (exit 1), as every full disk is; an I/O error or a file system gone read-only during a training
save or an export.triton write is exit 1 (the machine), a permission stays exit 2 (the input); `train --resume` refuses
a resume.pt that is not a regular file (and never opens it), says when there is nothing to resume, and refuses to
train again over a checkpoint whose resume.pt is gone; export.triton writes into a repository with a model directory
that has no config.pbtxt; and the readers say "is not a regular file" for a FIFO, a device, a directory, and the
reason for a symbolic link loop, where they said "is missing"."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

from export import triton
from models.bundle import BundleError, FileEntry, read_manifest, verify_file, write_manifest
from models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_meta, save_checkpoint
from models.failures import disk_full, machine_reason
from models.io import not_a_file
from train.__main__ import main as train_main
from train.state import load_resume

ERROR = "python -m train: error: "


# ------------------------------------------------------------------------------------------------- helpers


def _one_line(err: str) -> str:
    """The single line a command said on stderr (asserting that it said only that)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, object]:
    """Every entry of `folder`: a file's bytes, else what it is (never opened: a FIFO would block)."""
    seen: dict[str, object] = {}
    for p in sorted(folder.iterdir()):
        if p.is_symlink():
            seen[p.name] = ("link", os.readlink(p))
        elif p.is_dir():
            seen[p.name] = "dir"
        elif p.is_file():
            seen[p.name] = p.read_bytes()
        else:
            seen[p.name] = "special"
    return seen


def _not_regular(path: Path, kind: str) -> str:
    """Put something that is not a regular file at `path`; what the readers should say about it."""
    if path.is_symlink() or path.exists():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
        _unblock_later(path)
        return "is not a regular file (a FIFO)"
    if kind == "device":
        path.symlink_to("/dev/zero")
        return "is not a regular file (a character device)"
    if kind == "directory":
        path.mkdir()
        return "is not a regular file (a directory)"
    if kind == "loop":
        path.symlink_to(path.name)
        return "Too many levels of symbolic links"
    assert kind == "dangling"
    path.symlink_to("nowhere")
    return "is a symbolic link to nothing"


def _unblock_later(fifo: Path, after_s: float = 20.0) -> None:
    """A reader that opens `fifo` blocks until a writer comes: open one after `after_s`, so that a regression fails
    the test (with whatever the reader then says) instead of hanging the suite."""
    def writer() -> None:
        threading.Event().wait(after_s)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO when nobody reads it: nothing to unblock
        except OSError:
            return
        os.close(fd)

    threading.Thread(target=writer, daemon=True).start()


KINDS = ["fifo", "device", "directory", "loop", "dangling"]


@pytest.fixture
def stopped_run(train_stopped, tmp_path) -> Path:
    """A copy of a TRAIN_TINY run stopped at step 2 (checkpoint.json, weights, resume.pt, metrics, curves)."""
    run = tmp_path / "run"
    shutil.copytree(train_stopped(2), run)
    return run


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a random vit_c_micro (no training)."""
    from data.datasets import default_preprocessing
    from models.registry import build_model

    model = build_model("vit_c_micro", num_classes=10)
    out = tmp_path_factory.mktemp("ckpt") / "c"
    save_checkpoint(out, model, class_names=[f"c{i}" for i in range(10)],
                    preprocessing=default_preprocessing("digits", model.cfg.image_size))
    return out


# ----------------------------------------------------------------- 1. safetensors' full disk is an OSError


def _safetensors_fails(monkeypatch, message: str) -> None:
    """safetensors' save_file raising what it raises on a full disk (or a file size limit): a SafetensorError."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*_args, **_kwargs):
        raise SafetensorError(message)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize(("message", "code"), [
    ("Error while serializing: I/O error: No space left on device (os error 28)", errno.ENOSPC),
    ("Error while serializing: I/O error: File too large (os error 27)", errno.EFBIG),
])
def test_a_full_disk_while_the_weights_are_written_is_the_oserror_it_is(tmp_path, monkeypatch, message, code):
    from data.datasets import default_preprocessing
    from models.registry import build_model

    _safetensors_fails(monkeypatch, message)
    model = build_model("vit_c_micro", num_classes=10)
    out = tmp_path / "new" / "c"
    with pytest.raises(OSError) as info:
        save_checkpoint(out, model, class_names=[f"c{i}" for i in range(10)],
                        preprocessing=default_preprocessing("digits", model.cfg.image_size))
    assert info.value.errno == code and disk_full(info.value)
    assert machine_reason(info.value).startswith(os.strerror(code))
    assert not out.exists() and list((tmp_path / "new").iterdir()) == []  # no temporary, no directory it made


def test_a_safetensors_error_that_is_not_io_is_left_as_it_is(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from data.datasets import default_preprocessing
    from models.registry import build_model

    _safetensors_fails(monkeypatch, "some other problem")
    model = build_model("vit_c_micro", num_classes=10)
    with pytest.raises(SafetensorError):
        save_checkpoint(tmp_path / "c", model, class_names=[f"c{i}" for i in range(10)],
                        preprocessing=default_preprocessing("digits", model.cfg.image_size))
    assert not (tmp_path / "c").exists()


def test_train_on_a_full_disk_at_the_checkpoint_is_one_line_and_keeps_resume_pt(tmp_path, monkeypatch, capsys,
                                                                              train_cli, train_tiny):
    """It was a 30-line traceback ending in SafetensorError."""
    _safetensors_fails(monkeypatch, "Error while serializing: I/O error: No space left on device (os error 28)")
    run = tmp_path / "run"
    code, _, err = train_cli(train_main, [*train_tiny, "--max-steps", "1", "--out", str(run)], capsys)
    line = _one_line(err)
    assert code == 1, err
    assert line.startswith(f"{ERROR}cannot save the checkpoint in {run}: No space left on device"), line
    assert "resume.pt keeps step 1: --resume continues from there" in line, line
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "resume.pt"]  # no temporary left
    assert load_resume(run)["progress"]["global_step"] == 1


# --------------------------------------------------- 4. I/O errors while training saves, and their exit codes


def _replace_fails(monkeypatch, name: str, error: int, when: int = 1) -> None:
    """os.replace onto a file called `name` fails with `error` the `when`-th time (the rename of a save)."""
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            calls.append(dst)
            if len(calls) == when:
                raise OSError(error, os.strerror(error), str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("error", [errno.EIO, errno.EROFS])
def test_an_io_error_while_saving_resume_pt_is_one_line_exit_1_and_the_last_save_is_kept(
        tmp_path, monkeypatch, capsys, train_cli, train_tiny, error):
    run = tmp_path / "run"
    _replace_fails(monkeypatch, "resume.pt", error, when=2)
    code, _, err = train_cli(train_main, [*train_tiny, "--save-every-steps", "1", "--out", str(run)], capsys)
    line = _one_line(err)
    assert code == 1, err
    assert line == (f"{ERROR}cannot save resume.pt in {run}: {os.strerror(error)}; resume.pt keeps step 1: --resume "
                    "continues from there"), line
    assert sorted(p.name for p in run.iterdir()) == ["resume.pt"]
    assert load_resume(run)["progress"]["global_step"] == 1
    monkeypatch.undo()
    code, said, err = train_cli(train_main, ["--out", str(run), "--resume"], capsys)
    assert code == 0 and f"resuming {run} at epoch 1, step 1" in said, err
    assert read_checkpoint_meta(run).training.steps == 4


def test_an_io_error_on_checkpoint_json_is_one_line_exit_1(tmp_path, monkeypatch, capsys, train_cli, train_tiny):
    run = tmp_path / "run"
    _replace_fails(monkeypatch, "checkpoint.json", errno.EIO)
    code, _, err = train_cli(train_main, [*train_tiny, "--max-steps", "1", "--out", str(run)], capsys)
    assert code == 1 and "cannot save the checkpoint in" in _one_line(err) and "Input/output error" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "resume.pt"]  # its weights removed again


def test_an_io_error_on_the_metrics_after_the_checkpoint_says_the_checkpoint_is_saved(
        tmp_path, monkeypatch, capsys, train_cli, train_tiny):
    run = tmp_path / "run"
    _replace_fails(monkeypatch, "curves.png", errno.EIO)
    code, _, err = train_cli(train_main, [*train_tiny, "--max-steps", "1", "--out", str(run)], capsys)
    assert code == 1 and "cannot save metrics.jsonl and curves.png in" in _one_line(err), err
    assert "the checkpoint is saved: --resume writes them" in err
    assert read_checkpoint_meta(run).training.steps == 1


def test_a_permission_refused_mid_run_stays_exit_2(tmp_path, monkeypatch, capsys, train_cli, train_tiny):
    run = tmp_path / "run"
    _replace_fails(monkeypatch, "resume.pt", errno.EACCES)
    code, _, err = train_cli(train_main, [*train_tiny, "--max-steps", "1", "--out", str(run)], capsys)
    assert code == 2 and "cannot save resume.pt in" in _one_line(err) and "Permission denied" in err, err
    assert "nothing of this run was saved" in err and not run.exists()  # the directory it made is removed


@pytest.mark.parametrize(("error", "machine"), [
    (errno.EIO, True), (errno.EROFS, True), (errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EFBIG, True),
    (errno.ESTALE, True), (errno.EACCES, False), (errno.EPERM, False), (errno.ENOTDIR, False), (errno.EEXIST, False),
    (errno.EISDIR, False), (errno.ENOENT, False), (errno.ELOOP, False),
])
def test_the_machine_or_the_input(error, machine):
    reason = machine_reason(OSError(error, os.strerror(error), "/x/y"))
    assert (reason is not None) == machine
    if machine:
        assert reason == f"{os.strerror(error)}: /x/y"


# ----------------------------------------------------------------- 3. --resume and resume.pt that is not a file


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_resume_refuses_a_resume_pt_that_is_not_a_regular_file(stopped_run, capsys, train_cli, kind):
    """A FIFO, a link to /dev/zero or a loop retrained from step 0 and replaced it; a directory trained, then crashed
    at the first save. Refused before any work, nothing changed, nothing opened."""
    says = _not_regular(stopped_run / "resume.pt", kind)
    before = _snapshot(stopped_run)
    code, said, err = train_cli(train_main, ["--out", str(stopped_run), "--resume"], capsys)
    line = _one_line(err)
    assert code == 2 and said == "", err
    assert line == f"{ERROR}cannot read resume state {stopped_run / 'resume.pt'}: {says.removeprefix('is ')}; " \
                   "nothing was changed", line
    assert _snapshot(stopped_run) == before


@pytest.mark.timeout(120)
def test_load_resume_never_opens_a_fifo(tmp_path):
    _not_regular(tmp_path / "resume.pt", "fifo")
    with pytest.raises(CheckpointError, match=r"not a regular file \(a FIFO\)"):
        load_resume(tmp_path)
    assert load_resume(tmp_path / "absent") is None


def test_resume_with_nothing_to_resume_says_it_starts_at_step_0(tmp_path, capsys, train_cli, train_tiny):
    """A preempted job reruns its command with --resume, also before its first save: it starts the run, and says so."""
    run = tmp_path / "run"
    code, said, err = train_cli(train_main, [*train_tiny, "--max-steps", "1", "--out", str(run), "--resume"], capsys)
    assert code == 0, err
    assert said.splitlines()[0] == f"nothing to resume in {run} (no resume.pt): starting at step 0", said
    assert read_checkpoint_meta(run).training.steps == 1  # the --max-steps given, from step 0


def test_resume_refuses_to_train_again_over_a_checkpoint_whose_resume_pt_is_gone(stopped_run, capsys, train_cli,
                                                                                 train_tiny):
    """The run stopped at --max-steps 2 retrained from step 0, to the end (its --max-steps was not passed on), and
    replaced the checkpoint; with its resume.pt the same command says there is nothing to resume."""
    (stopped_run / "resume.pt").unlink()
    before = _snapshot(stopped_run)
    code, said, err = train_cli(train_main, [*train_tiny, "--out", str(stopped_run), "--resume"], capsys)
    line = _one_line(err)
    assert code == 2 and said == "", err
    assert line == (f"{ERROR}--resume: {stopped_run} holds a checkpoint of 2 training steps but no resume.pt to "
                    "continue it from; nothing was changed: --overwrite trains the run again from step 0"), line
    assert _snapshot(stopped_run) == before


def test_resume_of_an_epochs_0_run_without_resume_pt_still_runs(tmp_path, capsys, train_cli, train_tiny):
    """An --epochs 0 run writes no resume.pt: nothing was trained, so nothing is lost by running it again."""
    run = tmp_path / "run"
    argv = [a if a != "1" or i != train_tiny.index("--epochs") + 1 else "0" for i, a in enumerate(train_tiny)]
    assert train_cli(train_main, [*argv, "--out", str(run)], capsys)[0] == 0
    code, said, err = train_cli(train_main, [*argv, "--out", str(run), "--resume"], capsys)
    assert code == 0 and "nothing to resume in" in said, err


def test_a_directory_where_the_run_writes_a_file_is_refused_before_the_training(stopped_run, capsys, train_cli,
                                                                                 train_tiny):
    """With --overwrite, a directory metrics.jsonl (or resume.pt) failed the first save, after the training."""
    (stopped_run / "metrics.jsonl").unlink()
    (stopped_run / "metrics.jsonl").mkdir()
    before = _snapshot(stopped_run)
    code, said, err = train_cli(train_main, [*train_tiny, "--out", str(stopped_run), "--overwrite"], capsys)
    assert code == 2 and said == "", err
    assert _one_line(err) == (f"{ERROR}--out {stopped_run}: metrics.jsonl is a directory, where the run writes a "
                              "file; nothing was changed: remove it, or choose a new --out")
    assert _snapshot(stopped_run) == before


# ------------------------------------------------------------- 5. readers: "is not a regular file", not "missing"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_json_that_is_not_a_regular_file(checkpoint, tmp_path, kind):
    ckpt = tmp_path / "c"
    shutil.copytree(checkpoint, ckpt)
    says = _not_regular(ckpt / "checkpoint.json", kind)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint_meta(ckpt)
    where = ckpt / "checkpoint.json"
    assert str(info.value) == (f"not a checkpoint: {where} {says}" if says.startswith("is ")
                               else f"cannot read {where}: {says}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_weights_that_are_not_a_regular_file(checkpoint, tmp_path, kind):
    ckpt = tmp_path / "c"
    shutil.copytree(checkpoint, ckpt)
    weights = read_checkpoint_meta(ckpt).weights_path
    says = _not_regular(weights, kind)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    assert str(info.value) == f"checkpoint weights file {weights} {says}"
    weights.rmdir() if kind == "directory" else weights.unlink()
    with pytest.raises(CheckpointError, match="checkpoint weights missing: "):
        load_checkpoint(ckpt)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", KINDS)
def test_manifest_json_that_is_not_a_regular_file(tmp_path, kind):
    bundle = tmp_path / "b"
    bundle.mkdir()
    says = _not_regular(bundle / "manifest.json", kind)
    with pytest.raises(BundleError) as info:
        read_manifest(bundle)
    where = bundle / "manifest.json"
    assert str(info.value) == (f"not a bundle: {where} {says}" if says.startswith("is ")
                               else f"cannot read {where}: {says}")
    (bundle / "manifest.json").rmdir() if kind == "directory" else (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="is missing"):
        read_manifest(bundle)


@pytest.mark.timeout(120)
def test_an_artifact_file_that_is_a_fifo_is_not_opened(tmp_path):
    _not_regular(tmp_path / "model.onnx", "fifo")
    with pytest.raises(BundleError, match=r"artifact file .*model\.onnx is not a regular file \(a FIFO\)"):
        verify_file(tmp_path, FileEntry("model.onnx", "0" * 64, 1))


def test_not_a_file_tells_them_apart(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to("f")
    assert not_a_file(tmp_path / "f") is None and not_a_file(tmp_path / "link") is None
    assert not_a_file(tmp_path / "absent") == "is missing"
    assert not_a_file(tmp_path / "f" / "below") == "is missing"


# --------------------------------------------------------------------------------------------- 2. export.triton


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    """Two one-artifact (ONNX) bundles of different names: micro and other."""
    micro = micro_bundle(tmp_path_factory, ("onnx",))
    other = tmp_path_factory.mktemp("other") / "other"
    shutil.copytree(micro, other)
    write_manifest(other, dataclasses.replace(read_manifest(other), name="other"))
    return micro, other


def _triton(argv: list[str]) -> int:
    """export.triton's main in-process: its exit code (its parser's refusals exit through SystemExit)."""
    try:
        return triton.main(argv)
    except SystemExit as exc:
        return exc.code


def _repo(bundles, tmp_path) -> Path:
    repo = tmp_path / "repo"
    triton.write_repository(bundles[0], repo)
    return repo


def test_a_model_directory_without_config_pbtxt_is_valid_for_a_new_model(bundles, tmp_path, capsys):
    """It crashed with AttributeError: 'VersionPolicy' object has no attribute 'version_policy' (a model being
    copied in, or one left to Triton's defaults)."""
    repo = _repo(bundles, tmp_path)
    (repo / "micro-onnx-fp32" / "config.pbtxt").unlink()
    assert triton._served_versions(repo / "micro-onnx-fp32", None, generated=False) == [1]
    assert _triton([str(bundles[1]), "--out", str(repo)]) == 0, capsys.readouterr().err
    assert (repo / "other-onnx-fp32" / "1" / "manifest.json").is_file()
    assert not (repo / "micro-onnx-fp32" / "config.pbtxt").exists()  # not this run's model: left as it was


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_an_inferenceservice_yaml_that_is_not_a_file_is_refused_up_front(bundles, tmp_path, capsys, kind):
    repo = _repo(bundles, tmp_path)
    isvc = repo / "inferenceservice.yaml"
    says = _not_regular(isvc, kind)
    before = {p: _snapshot(p) for p in [repo, *(d for d in repo.iterdir() if d.is_dir() and d != isvc)]}
    assert _triton([str(bundles[1]), "--out", str(repo)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line == (f"python -m export.triton: error: --out {repo}: {isvc} {says}; remove it (this tool writes the "
                    "repository's inferenceservice.yaml)"), line
    assert {p: _snapshot(p) for p in before} == before


@pytest.mark.parametrize(("error", "code"), [(errno.EIO, 1), (errno.EROFS, 1), (errno.EACCES, 2)])
def test_export_triton_exit_code_for_a_failed_rename(bundles, tmp_path, monkeypatch, capsys, error, code):
    """An I/O error was exit 2 (bad input): it is the machine failing."""
    repo = tmp_path / "repo"
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        if Path(dst) == repo:
            raise OSError(error, os.strerror(error), str(src), None, str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    assert _triton([str(bundles[0]), "--out", str(repo)]) == code
    line = _one_line(capsys.readouterr().err)
    assert os.strerror(error) in line and "nothing was written" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no repository, staging or lock left
