"""The project's import graph: no cycles, each layer imports only the layers beneath it, one list of runtimes.

Every import statement counts, also those inside functions (they run when the function does); imports under
`if TYPE_CHECKING:` do not (they never run).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "runtimes", "export", "serve", "train", "benchmarks")
# What each package may import (besides itself). The ground floor (models, data) knows no stage; runtimes know
# the contracts only; export and serve stand side by side on runtimes; benchmarks may use everything.
ALLOWED = {
    "models": set(),
    "data": {"models"},
    "runtimes": {"models", "data"},
    "export": {"models", "data", "runtimes", "serve.launch"},  # launch: starts `python -m serve` as a process
    "serve": {"models", "data", "runtimes"},
    "train": {"models", "data"},
    "benchmarks": {"models", "data", "runtimes", "export", "serve"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines |= set(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


@functools.cache  # the tree does not change during a run
def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (resolved to the most specific project module)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_lines(tree)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in `base`
            else:
                continue
            edges |= {t for t in map(resolve, targets) if t and t != module}
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_module_that_imports_it_back():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_beneath_it(package):
    bad = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items() if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in ALLOWED[package] | {package} and target not in ALLOWED[package]
    )
    assert not bad, f"{package} may import only {sorted(ALLOWED[package])}: " + ", ".join(bad)


def test_runtimes_are_listed_in_the_registry_only():
    """No tuple, list, set or dict outside runtimes/ spells out two or more runtime names."""
    import runtimes

    names = set(runtimes.names())
    offenders = []
    for module, path in _modules().items():
        if module.split(".")[0] == "runtimes":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
            if not isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict) or items is None:
                continue
            spelled = {i.value for i in items if isinstance(i, ast.Constant) and i.value in names}
            if len(spelled) >= 2:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {sorted(spelled)}")
    assert not offenders, "runtime lists outside runtimes/registry.py: " + "; ".join(offenders)


def test_export_entry_points_are_thin():
    """`python -m export.<runtime>` keeps working, and its module holds no runtime code."""
    graph = import_graph()
    for name in ("export.onnx", "export.openvino", "export.tensorrt"):
        assert graph[name] == {"export.cli", "models.cli"}, (name, graph[name])  # the runtime code, the CLI rule
        assert len((REPO / (name.replace(".", "/") + ".py")).read_text().splitlines()) < 15


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_serving_images_copy_every_package_the_server_imports(dockerfile):
    graph = import_graph()
    needed, todo = set(), [m for m in graph if m.split(".")[0] == "serve"]
    while todo:
        module = todo.pop()
        if module not in needed:
            needed.add(module)
            todo += graph[module]
    copied = {line.split()[1] for line in (REPO / dockerfile).read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line}
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    for package in sorted({m.split(".")[0] for m in needed}):
        assert package in copied, f"{dockerfile} does not COPY {package}/, which the server imports"
        assert f"!{package}/" in ignored, f".dockerignore keeps {package}/ out of the build context"


def _bound(nodes: list[ast.stmt]) -> dict[str, str]:
    """Names that these statements bind at module level (imports, defs, classes, assignments), each with what it
    is bound to (an import of the very same thing twice binds nothing new)."""
    names: dict[str, str] = {}
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            source = getattr(node, "module", None) or ""
            names.update({(a.asname or a.name).split(".")[0]: f"import {source}:{a.name}" for a in node.names})
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = f"def {node.lineno}"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = list(node.targets) if isinstance(node, ast.Assign) else [node.target]
            while targets:  # names, also inside tuples; `sys.path[0] = ...` binds nothing
                t = targets.pop()
                if isinstance(t, ast.Name):
                    names[t.id] = f"= {node.lineno}"
                elif isinstance(t, (ast.Tuple, ast.List)):
                    targets += t.elts
    return names


def test_main_blocks_do_not_shadow_module_names():
    """An entry point's `if __name__ == "__main__":` block runs in the module's namespace: an import there that
    reuses a module-level name (`from models.cli import run` in a module with its own `run`) replaces it for every
    function, and the command crashes only when run for real (the tests call main() directly)."""
    clashes = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if not isinstance(n, ast.If)]
        for node in tree.body:
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
                main, module = _bound(node.body), _bound(top)
                clashes += [f"{name}: {n}" for n in sorted(main.keys() & module.keys()) if main[n] != module[n]]
    assert clashes == []


# Every third-party module of an extra (the base install has numpy only).
EXTRA_MODULES = ("PIL", "torch", "torchvision", "timm", "fastapi", "starlette", "pydantic", "pydantic_settings",
                 "uvicorn", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "tqdm", "matplotlib", "sklearn",
                 "safetensors", "multipart", "prometheus_client")
# Run as the module `runpy` names, with every extra's modules made unimportable first.
_BARE = ("import runpy, sys\nfor m in sys.argv[1].split(','):\n    sys.modules[m] = None\n"
         "sys.argv = sys.argv[2:]\nrunpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


@pytest.mark.parametrize("argv", [
    ["serve", "--model", "x"], ["train", "--model", "vit_c_micro", "--dataset", "digits", "--out", "{tmp}/r"],
    ["train.eval", "--checkpoint", "{tmp}"], ["export", "--checkpoint", "{tmp}", "--out", "{tmp}/e"],
    ["export.onnx", "--checkpoint", "{tmp}", "--out", "{tmp}/e"], ["train.sweep", "--dry-run"],
    ["serve.sample", "--out", "{tmp}/s.png"], ["benchmarks.latency", "--pairs", "mini"],
    ["export.report", "{tmp}", "--png", "{tmp}/parity.png"],
    ["serve.tensor", "--bundle", "tests/data/legacy-bundle-v1", "README.md", "--out", "{tmp}/x.bin"],
])
def test_a_missing_extra_is_one_line_not_a_traceback(argv, tmp_path):
    """With only the base install, each command names the extra to install (PIL used to be imported by the
    preprocessing contract, which every command reads at import time, before it could say so)."""
    import subprocess
    import sys

    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    proc = subprocess.run([sys.executable, "-c", _BARE, ",".join(EXTRA_MODULES), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()  # progress lines may come first (the benchmark names its machine)
    assert "not installed" in lines[-1] and sum("error" in line for line in lines) == 1, proc.stderr


def test_training_without_matplotlib_stops_before_it_trains(tmp_path):
    """The curves are drawn after the last epoch: without matplotlib the run used to train to the end, then exit 2."""
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _BARE, "matplotlib", "train", "--model", "vit_c_micro", "--dataset",
                           "digits", "--epochs", "1", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "python -m train: error: matplotlib is not installed: install the project's train extra "
        "(in the vitc checkout: pip install -c constraints.txt '.[train]')"]
    assert not out.exists()
