"""The error contract of the command-line entry points (bad input: exit 2 and one readable line; the machine failing:
exit 1 and one line; nothing lost or corrupted), where hDF found it broken:

- `export.report --png` replaced any existing file and wrote into the bundle it reports on; `serve.sample --out`
  replaced any existing image;
- a VITC_API_KEY (or --api-key) no Authorization header can carry was accepted, and every request got 401;
- nan/inf in a serve float setting was called out of range; `--model "a b=PATH"` was called a missing directory;
- a full disk under `serve.sample`, `serve.tensor` and `train.eval --out` named no file;
- `export.triton --out` on a read-only file system failed after the work, as the machine (exit 1);
- `benchmarks.latency --min-reps 0` blamed --cell-seconds, and --min-reps had no upper bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import fake_runtime
import pytest
from conftest import _preserved_process_state
from test_serve_fixtures import animal_pngs, one_line
from test_train_eval_out import checkpoint  # noqa: F401 - a fixture: an untrained vit_c_micro checkpoint

from models import cli

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy-bundle-v1"  # a real ONNX bundle: reported and published in a second


def _code(main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """A command's exit code in this process, the parser's refusals (SystemExit) included."""
    try:
        return int(main(argv) or 0)
    except SystemExit as exc:
        return int(exc.code)


def _exit(main: Callable[[list[str]], int | None], argv: list[str], prog: str) -> int:
    """A command's exit code as `python -m` gives it (models.cli.run: a machine failure is exit 1 too)."""
    with pytest.raises(SystemExit) as info:
        cli.run(lambda: main(argv), prog)
    return int(info.value.code)


@contextlib.contextmanager
def _tmpfs(where: Path, *options: str) -> Iterator[Path]:
    """A tiny tmpfs mounted on `where` (root only: the test is skipped otherwise), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


@contextlib.contextmanager
def _full_disk(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory whose file system has no room left: a real full tmpfs (root), or every fsync failing with ENOSPC
    as a full disk makes it fail (the write itself succeeds into the page cache, the flush does not)."""
    if how == "tmpfs":
        with _tmpfs(tmp_path / "full") as full:
            fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                with contextlib.suppress(OSError):  # until ENOSPC
                    while True:
                        os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)
            yield full
        return

    def no_room(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (full := tmp_path / "full").mkdir()
    monkeypatch.setattr(os, "fsync", no_room)
    yield full


# --------------------------------------------------------------------------------------- 2: export.report --png
@pytest.fixture()
def bundle(tmp_path) -> Path:
    return Path(shutil.copytree(LEGACY, tmp_path / "bundle"))


def test_report_png_refuses_an_existing_file_it_did_not_write(bundle, tmp_path, capsys):
    from export import report

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"precious")
    assert _code(report.main, [str(bundle), "--png", str(photo)]) == 2
    err = one_line(capsys)
    assert f"--png {photo} already exists" in err and "--overwrite" in err, err
    assert photo.read_bytes() == b"precious"
    assert _code(report.main, [str(bundle), "--png", str(photo), "--overwrite"]) == 0  # asked for: replaced
    assert photo.read_bytes().startswith(b"\x89PNG")


def test_report_png_replaces_its_own_chart(bundle, tmp_path, capsys):
    """`make demo` writes the same chart on every run: an earlier chart of this command is replaced, as
    train.eval replaces an earlier result of its own."""
    from export import report

    chart = tmp_path / "parity.png"
    assert _code(report.main, [str(bundle), "--png", str(chart)]) == 0
    first = chart.stat().st_ino
    assert _code(report.main, [str(bundle), "--png", str(chart)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [f"plot: {chart}"] * 2
    assert chart.stat().st_ino != first  # written again (atomically: a new file renamed over the old one)
    # Another program's PNG is no chart of this command, whatever its name says.
    from PIL import Image

    Image.new("RGB", (4, 4)).save(other := tmp_path / "other.png")
    before = other.read_bytes()
    assert _code(report.main, [str(bundle), "--png", str(other)]) == 2
    assert "already exists" in one_line(capsys) and other.read_bytes() == before


def test_report_png_inside_the_bundle_is_refused(bundle, tmp_path, capsys):
    from export import report

    before = sorted(p.name for p in bundle.iterdir())
    assert _code(report.main, [str(bundle), "--png", str(bundle / "chart.png")]) == 2
    err = one_line(capsys)
    assert "lies inside the bundle" in err and "--png" in err, err
    assert sorted(p.name for p in bundle.iterdir()) == before  # the next export over it is not refused
    second = Path(shutil.copytree(LEGACY, tmp_path / "second"))
    assert _code(report.main, [str(bundle), str(second), "--png", str(second / "sub" / "chart.png")]) == 2
    assert "lies inside the bundle" in one_line(capsys) and not (second / "sub").exists()


def test_sample_refuses_an_existing_out_without_overwrite(tmp_path, capsys):
    """As serve.tensor: an existing --out is replaced only with --overwrite."""
    from serve import sample

    out = tmp_path / "s.png"
    out.write_bytes(b"my own picture")
    assert sample.main(["--out", str(out)]) == 2
    err = one_line(capsys)
    assert f"--out {out} already exists" in err and "--overwrite" in err, err
    assert out.read_bytes() == b"my own picture"
    assert sample.main(["--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------- 3: the API key's bytes
@pytest.fixture()
def serve_main(tmp_path, monkeypatch) -> Callable[[list[str]], int]:
    """serve's main with no VITC_* setting from outside; starting the server fails the test."""
    import serve.server
    from serve.__main__ import main

    for name in [n for n in os.environ if n.upper().startswith("VITC_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(serve.server, "run", lambda settings: pytest.fail(f"the server started: {settings}"))
    return main


KEYS = ["sekrit\nvalue", "sekrit\r\nvalue", "sekrit\x1bvalue", "sekrit\x7fvalue", "sekrit\x85value",
        "sekrit\udcffvalue"]  # the last: an environment variable's byte that is not UTF-8


@pytest.mark.parametrize("key", KEYS, ids=["lf", "crlf", "esc", "del", "c1", "not-utf8"])
@pytest.mark.parametrize("given", ["flag", "environment"])
def test_an_api_key_no_header_can_carry_is_refused_without_printing_it(serve_main, tmp_path, monkeypatch, capsys,
                                                                       key, given):
    fake_runtime.write_bundle(bundle := tmp_path / "b")
    argv = ["--model", str(bundle)]
    if given == "flag":
        argv += ["--api-key", key]
    else:
        monkeypatch.setenv("VITC_API_KEY", key)
    assert serve_main(argv) == 2
    err = one_line(capsys)
    assert "--api-key (VITC_API_KEY)" in err and "Authorization header" in err, err
    assert "sekrit" not in err, err  # the key is never printed, nor a part of it


def test_a_nul_in_the_api_key_is_refused(serve_main, tmp_path, capsys):
    """A NUL cannot be in an environment variable or argv, but a caller of main can pass one."""
    fake_runtime.write_bundle(bundle := tmp_path / "b")
    assert serve_main(["--model", str(bundle), "--api-key", "sekrit\0value"]) == 2
    err = one_line(capsys)
    assert "U+0000" in err and "sekrit" not in err, err


def test_a_key_with_inner_spaces_tabs_and_non_ascii_letters_is_still_taken(tmp_path, monkeypatch):
    """What a header carries (a space or tab inside, UTF-8 letters as obs-text) is not refused."""
    from serve.settings import Settings

    for name in [n for n in os.environ if n.upper().startswith("VITC_")]:
        monkeypatch.delenv(name)
    for key in ("a b", "a\tb", "clé-secrète", "  padded\n"):
        assert Settings(api_key=key).api_key.get_secret_value() == key.strip()


# -------------------------------------------------------------------- 4.1, 4.2: serve's float settings and --model
@pytest.mark.parametrize("setting", ["max_queue_delay_ms", "receive_timeout_s", "inference_timeout_s",
                                     "graceful_timeout_s"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("given", ["flag", "environment"])
def test_nan_and_inf_in_a_float_setting_are_called_not_finite(serve_main, monkeypatch, capsys, setting, value, given):
    argv = ["--model", "b"]
    if given == "flag":
        argv.append(f"--{setting.replace('_', '-')}={value}")  # `=`: "-inf" alone reads as a flag
    else:
        monkeypatch.setenv(f"VITC_{setting.upper()}", value)
    assert serve_main(argv) == 2
    err = one_line(capsys)
    assert f"VITC_{setting.upper()}" in err and "finite number" in err, err
    assert "less than" not in err and "greater than" not in err, err


@pytest.mark.parametrize("name", ["a b", "", "-x", "x" * 129, "a/b"])
def test_an_invalid_model_name_is_named_as_such(serve_main, tmp_path, capsys, name):
    fake_runtime.write_bundle(bundle := tmp_path / "b")
    assert serve_main([f"--model={name}={bundle}"]) == 2  # `--model=`: "-x=..." alone reads as a flag
    err = one_line(capsys)
    assert f"{name!r} is not a model name" in err and "a model name is 1..128 of A-Z" in err, err
    assert "not found" not in err, err


def test_a_bundle_whose_path_holds_an_equals_sign_is_still_a_path(tmp_path):
    from serve.registry import parse_model_arg

    fake_runtime.write_bundle(odd := tmp_path / "a b=c")
    assert parse_model_arg(str(odd)) == (None, odd)  # the whole argument is the directory
    assert parse_model_arg(f"{tmp_path}/x=y") == (None, tmp_path / "x=y")  # neither is there: read as a path
    assert parse_model_arg(f"good={odd}") == ("good", odd)
    # What a load by name (and benchmarks.load --start) reads: the same refusal, a ServeError and a ValueError.
    from serve.errors import ServeError

    for error in (ServeError, ValueError):
        with pytest.raises(error, match=r"--model: 'x y' is not a model name .*a model name is 1\.\.128"):
            parse_model_arg(f"x y={odd}")


# --------------------------------------------------------------------------- 4.3: a full disk under a file --out
@pytest.mark.parametrize("how", ["fsync", "tmpfs"])
def test_a_full_disk_names_the_file_that_was_not_written(tmp_path, monkeypatch, capsys, checkpoint, how):  # noqa: F811 - fixture
    from serve import sample, tensor
    from train import eval as train_eval

    fake_runtime.write_bundle(bundle := tmp_path / "b")
    (image := tmp_path / "i.png").write_bytes(animal_pngs(1)[0])
    with _full_disk(tmp_path, how, monkeypatch) as full, _preserved_process_state():
        for main, argv, prog, out in (
            (sample.main, ["--out"], sample.PROG, full / "s.png"),
            (tensor.main, ["--bundle", str(bundle), str(image), "--out"], tensor.PROG, full / "t.npy"),
            (train_eval.main, ["--checkpoint", str(checkpoint), "--limit", "8", "--device", "cpu", "--threads", "1",
                               "--out"], train_eval.PROG, full / "e.json"),
        ):
            assert _exit(main, [*argv, str(out)], prog) == 1, prog
            err = one_line(capsys)
            assert err == f"{prog}: error: No space left on device: {out} was not written", err
            assert not out.exists() and not [p for p in full.iterdir() if p.name.startswith(f".{out.name}.")]


def test_stdout_on_a_full_disk_is_one_line_without_a_traceback():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "models", "list"], cwd=ROOT, stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "python -m models: error: No space left on device", proc.stderr


# ----------------------------------------------------------------------- 4.4: export.triton --out, read-only
@contextlib.contextmanager
def _read_only(tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on a read-only file system: a real read-only tmpfs (root), or every create under it failing with
    EROFS as the kernel fails them (opening, making a directory)."""
    if how == "tmpfs":
        with _tmpfs(tmp_path / "ro", "ro") as ro:
            yield ro
        return
    (ro := tmp_path / "ro").mkdir()
    real_open, real_mkdir = os.open, os.mkdir

    def under(path: object) -> bool:
        where = os.path.abspath(path) if isinstance(path, str | os.PathLike) else ""
        return where == str(ro) or where.startswith(str(ro) + os.sep)

    def ro_open(path, flags, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if under(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    yield ro


@pytest.mark.parametrize("how", ["patched", "tmpfs"])
def test_triton_out_on_a_read_only_file_system_is_refused_before_the_work(bundle, tmp_path, monkeypatch, capsys, how):
    from export import triton

    with _read_only(tmp_path, how, monkeypatch) as ro:
        for out in (ro / "repo", ro / "deeper" / "repo"):
            assert _exit(triton.main, [str(bundle), "--out", str(out)], triton.PROG) == 2, out
            err = one_line(capsys)
            assert err.startswith(f"{triton.PROG}: error: --out {out}: ") and "Read-only file system" in err, err
        assert list(ro.iterdir()) == []


def test_triton_still_publishes_into_a_writable_directory(bundle, tmp_path, capsys):
    from export import triton

    assert triton.main([str(bundle), "--out", str(tmp_path / "new" / "repo")]) == 0, capsys.readouterr().err
    assert (tmp_path / "new" / "repo" / "inferenceservice.yaml").is_file()


# -------------------------------------------------------------------------------- 4.5: benchmarks.latency --min-reps
@pytest.mark.parametrize("value", ["0", "-3", "99999999999999999999", "1000001", "x"])
def test_min_reps_is_validated_as_a_count_naming_its_own_flag(tmp_path, capsys, monkeypatch, value):
    from benchmarks.latency import main

    monkeypatch.setattr("benchmarks.suite.run_suite", lambda *_a, **_k: pytest.fail("the benchmark ran"))
    try:
        code = main(["--quick", "--min-reps", value, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    except SystemExit as exc:  # the parser's own refusal
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--min-reps" in err and "--cell-seconds" not in err, err
