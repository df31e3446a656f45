"""An empty or blank path value is refused with one line naming its flag, exit 2, before any work, in every command
(test_empty_path_flags.py has serve, train.eval and train.sweep): Path("") is the current directory, so
`serve.tensor --bundle "$B"` or `export.report "$B"` with B unset used whatever bundle lay where they ran, `export
--checkpoint ""` exported the checkpoint lying here, and `--out " "` trained or exported into a directory named " "."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import fake_runtime
import pytest

REPO = Path(__file__).resolve().parents[1]
BLANK = ("", " ")


def _never(name: str):
    def called(*args, **kwargs):
        pytest.fail(f"{name} ran: the empty path was not refused first")
    return called


def _guarded(module: str, *steps: str):
    """The module's main, with each of its `steps` (what would do the work) failing the test when called."""
    def patched(monkeypatch):
        mod = importlib.import_module(module)
        for step in steps:
            monkeypatch.setattr(mod, step, _never(f"{module}.{step}"))
        return mod.main
    return patched


_tensor = _guarded("serve.tensor", "build")
_sample = _guarded("serve.sample", "write_sample")
_report = _guarded("export.report", "read_manifest")
_train = _guarded("train.__main__", "config_from_options", "quiet_openmp")
_latency = _guarded("benchmarks.latency", "_paths_problem")
_load = _guarded("benchmarks.load", "_checked")
_overhead = _guarded("benchmarks.overhead", "check_bundle")
_gpu_check = _guarded("benchmarks.gpu_check", "_setup_problem", "_parity_main")


def _export(family: str | None):
    def patched(monkeypatch):
        import export.bundle
        from export import cli

        monkeypatch.setattr(cli, "missing_problem", _never("export.cli.missing_problem"))
        monkeypatch.setattr(export.bundle, "build_bundle", _never("export.bundle.build_bundle"))
        monkeypatch.setattr(export.bundle, "build", _never("export.bundle.build"))  # what export.cli calls
        return lambda argv: cli.main(argv, family=family)
    return patched


# (the command's main, its arguments with {} for the blank value, the prog and flag its line starts with)
CASES = [
    (_tensor, ["--bundle", "{}", "img.png", "--out", "{out}/x.npy"], "python -m serve.tensor", "--bundle"),
    (_sample, ["--out", "{}"], "python -m serve.sample", "--out"),
    (_report, ["{}"], "python -m export.report", "BUNDLE"),
    (_report, ["{here}", "{}", "--markdown"], "python -m export.report", "BUNDLE"),
    *((_export(family), argv, f"python -m export{'.' + family if family else ''}", flag)
      for family in (None, "onnx")
      for argv, flag in ((["--checkpoint", "{}", "--out", "{out}/b"], "--checkpoint"),
                         (["--checkpoint", "{here}", "--out", "{}"], "--out"),
                         (["--checkpoint", "{here}", "--out", "{out}/b", "--dataset", "{}"], "--dataset"),
                         (["--checkpoint", "{here}", "--out", "{out}/b", "--calibration-dataset", "{}"],
                          "--calibration-dataset"))),
    (_train, ["--model", "vit_c_micro", "--dataset", "animals", "--out", "{}"], "python -m train", "--out"),
    (_train, ["--model", "vit_c_micro", "--dataset", "animals", "--out", "{}", "--resume"], "python -m train",
     "--out"),
    (_train, ["--model", "vit_c_micro", "--dataset", "{}", "--out", "{out}/run"], "python -m train", "--dataset"),
    (_latency, ["--quick", "--cache", "{}"], "python benchmarks/latency.py", "--cache"),
    (_latency, ["--quick", "--out", "{}"], "python benchmarks/latency.py", "--out"),
    (_latency, ["--http", "start", "--bundle", "{}"], "python benchmarks/latency.py", "--bundle"),
    (_latency, ["--quick", "--checkpoint", "vit_c_micro={}"], "python benchmarks/latency.py",
     "--checkpoint vit_c_micro="),
    (_load, ["--out", "{}"], "python -m benchmarks.load", "--out"),
    (_load, ["--start", "--model", "{}"], "python -m benchmarks.load", "--model"),
    (_load, ["--start", "--model", "{here}", "--model", "n={}"], "python -m benchmarks.load", "--model"),
    (_overhead, ["--bundle", "{}"], "python -m benchmarks.overhead", "--bundle"),
    (_overhead, ["--bundle", "{here}", "--out", "{}"], "python -m benchmarks.overhead", "--out"),
    *((_gpu_check, ["--device", "cpu", "--smoke", flag, "{}"], "python -m benchmarks.gpu_check", flag)
      for flag in ("--out", "--work", "--cache")),
    (_gpu_check, ["--device", "cpu", "--parity-of", "{}", "--checkpoint", "{here}"],
     "python -m benchmarks.gpu_check", "--parity-of"),
    (_gpu_check, ["--device", "cpu", "--parity-of", "{here}", "--checkpoint", "{}"],
     "python -m benchmarks.gpu_check", "--checkpoint"),
]


@pytest.fixture
def bundle_here(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """The current directory holds a bundle (what an empty path would have used); (it, a directory beside it)."""
    here = fake_runtime.write_bundle(tmp_path / "here")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(here)
    return here, out


def _tree(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("blank", BLANK, ids=["empty", "blank"])
@pytest.mark.parametrize(("command", "argv", "prog", "flag"), CASES, ids=[f"{c[2]}-{' '.join(c[1])}" for c in CASES])
def test_an_empty_path_is_refused_naming_its_flag_before_any_work(bundle_here, monkeypatch, capsys, command, argv,
                                                                  prog, flag, blank):
    here, out = bundle_here
    main = command(monkeypatch)
    before = _tree(here.parent)
    args = [a.replace("{here}", str(here)).replace("{out}", str(out)).replace("{}", blank) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"{prog}: error: {flag} is empty: give "), captured.err
    assert _tree(here.parent) == before  # nothing written, here or beside it


@pytest.mark.parametrize("argv", [
    ["serve.tensor", "--bundle", "", "img.png", "--out", "{out}/x.npy"],  # it wrote the tensor of the bundle here
    ["export.report", ""],  # it reported the bundle here, exit 0
], ids=["serve.tensor", "export.report"])
def test_the_reported_commands_refuse_an_empty_bundle_as_a_whole_process(bundle_here, argv):
    """The repro as run: through models.cli.run, from a directory that holds a bundle."""
    here, out = bundle_here
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(here / "img.png")  # a real image: only the bundle is wrong
    before = _tree(here.parent)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", *(a.replace("{out}", str(out)) for a in argv)], cwd=here, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert " is empty: give " in proc.stderr
    assert _tree(here.parent) == before
