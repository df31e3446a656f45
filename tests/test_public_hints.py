"""House style on the modules the code review named: every public function has type hints on its parameters and
its return (no `# noqa: ANN` in their place), and every package says what it is for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HINTED = ("benchmarks/overhead.py", "train/sweep/claims.py", "runtimes/openvino.py", "runtimes/build.py",
          "export/served.py", "export/bundle.py", "benchmarks/naive_server.py", "benchmarks/plots.py",
          "benchmarks/load.py")


def _unhinted(text: str) -> list[str]:
    """Public functions and methods lacking a parameter or return annotation, or hiding that behind `noqa: ANN`."""
    tree, lines = ast.parse(text), text.splitlines()
    out = []
    for scope in (tree, *(n for n in tree.body if isinstance(n, ast.ClassDef))):
        for f in scope.body:
            if not isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) or f.name.startswith("_"):
                continue
            a = f.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
            missing = [p.arg for p in params if p.annotation is None and p.arg not in ("self", "cls")]
            signature = "\n".join(lines[f.lineno - 1:f.body[0].lineno - 1])
            if missing or f.returns is None or "noqa: ANN" in signature:
                out.append(f"{f.name}:{f.lineno} {', '.join(missing) or 'return or noqa'}")
    return out


@pytest.mark.parametrize("path", HINTED)
def test_public_functions_are_hinted(path):
    assert _unhinted((REPO / path).read_text()) == []


def test_every_package_has_a_module_docstring():
    for init in sorted(REPO.glob("*/__init__.py")):
        if init.parent.name in ("tests", "build") or init.parent.name.endswith(".egg-info"):
            continue
        assert ast.get_docstring(ast.parse(init.read_text())), init
