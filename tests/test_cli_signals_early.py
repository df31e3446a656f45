"""Ctrl-C and SIGTERM at the edges of a `models.cli.run` command: while its modules still load (numpy, torch, onnx:
up to a second before `run` starts), it stops with run's one line and exit 130 or 143, not a traceback or a silent
death by SIGTERM."""

from __future__ import annotations

import ast
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}

# `python -m serve.tensor --help`, where MODULE (numpy: the first module it loads after models.cli) takes until
# the test writes a line: the signal comes while the command is loading, at a known point.
LOADING = textwrap.dedent("""
    import runpy, sys

    class SlowImport:
        def find_spec(self, name, path=None, target=None):
            if name == MODULE:
                sys.meta_path.remove(self)
                print("loading", name, file=sys.stderr, flush=True)
                sys.stdin.readline()
            return None

    sys.meta_path.insert(0, SlowImport())
    sys.argv = ["serve.tensor", "--help"]
    runpy.run_module("serve.tensor", run_name="__main__", alter_sys=True)
""")


def _loading(module: str = "numpy", ignored: int | None = None) -> subprocess.Popen[str]:
    """The command, held while it imports `module`; started with signal `ignored` ignored, and SIGHUP as a
    terminal's run has it (even where the tests run under nohup)."""
    def dispositions() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        if ignored is not None:
            signal.signal(ignored, signal.SIG_IGN)

    proc = subprocess.Popen([sys.executable, "-c", LOADING.replace("MODULE", repr(module))], env=ENV, cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=dispositions)
    assert proc.stderr.readline() == f"loading {module}\n"
    return proc


# models.config: the first module models/__init__ imports (dataclasses, typing, the complexity and registry
# modules after it: a fifth of a second on a busy machine), before models.cli itself has run a line; the guard
# stood only from the end of models.cli, and a Ctrl-C there was a KeyboardInterrupt traceback.
@pytest.mark.parametrize("module", ["numpy", "models.config"])
@pytest.mark.parametrize(("signum", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                      (signal.SIGTERM, 143, "terminated"),
                                                      (signal.SIGHUP, 143, "terminated")],
                         ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_while_the_command_loads_is_one_line(signum, code, word, module):
    proc = _loading(module)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (code, "", f"python -m serve.tensor: {word}\n")


def test_a_signal_ignored_at_start_stays_ignored_while_loading():
    proc = _loading(ignored=signal.SIGINT)  # as `cmd &` in a script
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and out.startswith("usage: python -m serve.tensor") and err == "", (out, err)


def _calls_run(tree: ast.Module) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "run"
               and isinstance(n.func.value, ast.Name) and n.func.value.id == "cli" for n in ast.walk(tree))


def _entry_points() -> dict[Path, ast.Module]:
    """Every module that calls `cli.run(...)`: the project's commands."""
    trees = {p: ast.parse(p.read_text(encoding="utf-8"))
             for top in ("benchmarks", "export", "models", "serve", "train") for p in (ROOT / top).rglob("*.py")}
    return {p: tree for p, tree in sorted(trees.items()) if _calls_run(tree)}


def test_every_command_loads_models_cli_before_anything_else():
    from models.loading import COMMAND_PACKAGES

    entry_points = _entry_points()
    assert len(entry_points) >= 15, entry_points
    for path, tree in entry_points.items():
        imports = [node for node in tree.body
                   if isinstance(node, ast.Import | ast.ImportFrom) and getattr(node, "module", "") != "__future__"]
        first = imports[0]
        assert isinstance(first, ast.Import) and [a.name for a in first.names] == ["models.cli"], path
        assert path.relative_to(ROOT).parts[0] in COMMAND_PACKAGES, path


def test_only_a_command_that_ends_in_run_is_guarded():
    """A vitc module that never calls `run` (the benchmark's hand-written server) keeps Python's own handling: the
    guard would otherwise outlive its loading."""
    probe = ("import importlib.util, signal, sys\n"
             "sys.modules['__main__'].__spec__ = importlib.util.find_spec(sys.argv[1])\n"
             "import models.cli\n"
             "for h in map(signal.getsignal, (signal.SIGINT, signal.SIGTERM)):\n"
             "    print(getattr(h, '__name__', None) or signal.Handlers(h).name)\n")
    handlers = {module: subprocess.run([sys.executable, "-c", probe, module], env=ENV, cwd=ROOT, capture_output=True,
                                       text=True, timeout=60).stdout.split()
                for module in ("serve.tensor", "export.__main__", "benchmarks.naive_server")}
    assert handlers == {"serve.tensor": ["stop_loading", "stop_loading"],
                        "export.__main__": ["stop_loading", "stop_loading"],
                        "benchmarks.naive_server": ["default_int_handler", "SIG_DFL"]}, handlers
