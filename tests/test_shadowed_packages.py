"""A directory without __init__.py named like one of vitc's top-level packages, in the directory a command runs from:
with the editable (development) install it became a namespace package that `import` took instead of vitc's, and
`python -m serve` / `python -m export` died with an ImportError traceback (exit 1). Every command now refuses it in
one line (exit 2); a harmless one (a data/ of images) is left alone, and a regular package on the path wins."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIX = "run from another directory, or set PYTHONSAFEPATH=1"


@pytest.fixture(scope="module")
def editable(tmp_path_factory) -> Path:
    """The python of a venv holding vitc's editable install of this tree (setuptools' finder, as `make install`
    makes it) and, through a .pth line, this environment's packages (numpy ...) without their .pth files."""
    shared = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    if any((Path(d) / "models" / "__init__.py").is_file() for d in shared):
        pytest.skip("vitc is installed here from a wheel: its packages would win over the namespace")
    out = tmp_path_factory.mktemp("editable")
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_editable(sys.argv[1]))", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=300, check=True)
    wheel = out / build.stdout.strip().splitlines()[-1]
    venv = out / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # No PYTHONPATH: a vitc on it (this tree's vitc.egg-info, in an sdist) would count as installed already.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--ignore-installed", "--disable-pip-version-check", str(wheel)], check=True,
                   capture_output=True, timeout=300, env=_environment())
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(site) / "shared-environment.pth").write_text("".join(f"{d}\n" for d in sorted(shared)))
    return python


def _environment(**env: str) -> dict[str, str]:
    """This process's environment without PYTHONPATH and PYTHONSAFEPATH, plus env."""
    return {**{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}, **env}


def _run(python: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python ARGS` from cwd with vitc resolved only by the editable install (no PYTHONPATH unless given)."""
    return subprocess.run([str(python), *args], cwd=cwd, env=_environment(**env), capture_output=True, text=True,
                          timeout=300)


def _workdir(tmp_path: Path, *dirs: str, files: tuple[str, ...] = ()) -> Path:
    here = tmp_path / "work"
    for d in dirs:
        (here / d).mkdir(parents=True)
    for f in files:
        (here / f).write_text("raise SystemExit('not vitc: this directory was imported')\n")
    return here


@pytest.mark.parametrize(("package", "argv"), [
    ("runtimes", ["-m", "serve", "--model", "missing"]),
    ("runtimes", ["-m", "export", "--checkpoint", "missing", "--out", "b", "--targets", "onnx"]),
    ("serve", ["-m", "serve", "--model", "missing"]),  # serve.__version__ (the app's version) would be missing
])
def test_a_directory_shadowing_a_package_is_refused_in_one_line(editable, tmp_path, package, argv):
    here = _workdir(tmp_path, package)
    out = _run(editable, here, *argv)
    prog = f"python -m {argv[1]}"
    assert (out.returncode, out.stdout, out.stderr) == (
        2, "", f"{prog}: error: ./{package} (a directory without __init__.py) shadows vitc's package {package!r}: "
               f"{FIX}\n")


def test_the_refusals_fix_works(editable, tmp_path):
    out = _run(editable, _workdir(tmp_path, "runtimes"), "-m", "serve", "--model", "missing", PYTHONSAFEPATH="1")
    assert out.returncode == 2 and "shadows" not in out.stderr, out.stderr
    assert out.stderr.startswith("python -m serve: error: model 'missing'"), out.stderr


def test_a_directory_holding_a_module_of_vitcs_name_is_refused(editable, tmp_path):
    """data's __init__ is only a docstring, but data/datasets.py here ran instead of vitc's (export imports it)."""
    out = _run(editable, _workdir(tmp_path, "data", files=("data/datasets.py",)), "-m", "export", "--checkpoint",
               "missing", "--out", "b", "--targets", "onnx")
    assert (out.returncode, out.stderr) == (
        2, f"python -m export: error: ./data (a directory without __init__.py) shadows vitc's package 'data': {FIX}\n")


def test_a_harmless_directory_is_left_alone(editable, tmp_path):
    """A dataset's root (train/ and val/ of class folders: `python -m train --data .`), a data/ of images or a
    models/ of checkpoints: no module of vitc's names, and no command needs their __init__, so nothing changes."""
    here = _workdir(tmp_path, "train/cat", "train/dog", "val/cat", "data/images", "benchmarks/plots-of-mine",
                    "models/run1", "export/b")
    out = _run(editable, here, "-m", "models", "list")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "vit_c_nano" in out.stdout
    out = _run(editable, here, "-m", "serve", "--model", "models/run1")
    assert (out.returncode, out.stderr.split(": error: ")[-1].strip()) == (
        2, "model 'models/run1': not a bundle: models/run1/manifest.json is missing"), out.stderr


def test_the_packages_whose_init_the_commands_need_are_the_ones_listed():
    """A command importing a name from a package's __init__ (not a submodule) breaks when that package is shadowed:
    such packages must be in INIT_NEEDED, or a shadowing directory would give a traceback, not the refusal."""
    import ast

    from models.cli import _PACKAGES, INIT_NEEDED

    needed = set()
    for package in _PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module in _PACKAGES and node.level == 0:
                    subs = {p.stem for p in (REPO / node.module).iterdir() if not p.name.startswith(("_", "."))}
                    if any(a.name not in subs for a in node.names):
                        needed.add(node.module)
                elif isinstance(node, ast.Attribute) and node.attr == "__version__" \
                        and isinstance(node.value, ast.Name) and node.value.id in _PACKAGES:
                    needed.add(node.value.id)
    assert needed == set(INIT_NEEDED)


def test_the_checkout_and_a_regular_package_on_the_path_are_not_shadowed(editable, tmp_path):
    # In the checkout the packages are the current directory's own; a wheel's regular package (here the checkout
    # through PYTHONPATH) wins over a namespace portion, so the directory shadows nothing.
    assert _run(editable, REPO, "-m", "models", "list").returncode == 0
    out = _run(editable, _workdir(tmp_path, "runtimes", "models"), "-m", "serve", "--model", "missing",
               PYTHONPATH=str(REPO))
    assert out.returncode == 2 and out.stderr.startswith("python -m serve: error: model 'missing'"), out.stderr


def test_a_program_importing_vitc_gets_an_import_error_that_says_why(editable, tmp_path):
    out = _run(editable, _workdir(tmp_path, "runtimes"), "-c", "import models.cli")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"ImportError: ./runtimes (a directory without __init__.py) shadows vitc's package 'runtimes': {FIX}")
