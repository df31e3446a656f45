"""Missing-extra hints: one line that names every extra a command needs at once, with the pip command that fits how
vitc is installed (its checkout, pinned by constraints.txt; or an installed wheel, which has no constraints.txt and
where `.` would be the user's own project)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import models.extras as hints
import runtimes
from export import cli as export_cli
from export.targets import parse_targets

EXPORT_ERROR = "python -m export: error: "

REPO = Path(__file__).resolve().parents[1]
# What `python -m export` and `python -m train` import: an installed copy of these behaves as a wheel install.
PACKAGES = ("models", "data", "runtimes", "export", "train", "serve")
# What a serving install lacks of what `python -m export` checks for (the train and export extras bring them).
EXPORT_MODULES = "torch,safetensors,onnx,onnxscript,nncf"
_BARE = ("import runpy, sys\nfor m in sys.argv[1].split(','):\n    sys.modules[m] = None\n"
         "sys.argv = sys.argv[2:]\nrunpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
EXPORT_WHY = ("not installed: torch, safetensors (the model every artifact is exported from); onnx, onnxscript (the "
              "ONNX graph every target but torch is built from); nncf (int8 quantisation; or leave the int8 targets "
              "out); install the project's train and export extras")


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """vitc's packages in a site-packages-like directory: no pyproject.toml, no constraints.txt beside them."""
    site = tmp_path_factory.mktemp("site-packages")
    for package in PACKAGES:
        shutil.copytree(REPO / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def _env(site: Path | None = None) -> dict[str, str]:
    """This environment, importing vitc from `site` (the installed copy) or else from the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(site)} if site else env


def _run(args: list[str], blocked: str, cwd: Path, site: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m args...` with the `blocked` modules absent (as if not installed)."""
    return subprocess.run([sys.executable, "-c", _BARE, blocked, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=_env(site))


def test_the_pip_command_fits_a_checkout_or_an_installed_wheel(monkeypatch):
    monkeypatch.setattr(hints, "from_checkout", lambda: True)
    assert hints.pip_command(["export", "train"]) == \
        "in the vitc checkout: pip install -c constraints.txt '.[train,export]'"
    assert hints.extras_hint(["train"]) == \
        "install the project's train extra (in the vitc checkout: pip install -c constraints.txt '.[train]')"
    assert hints.pip_command(packages=["tensorrt", "cuda-bindings"], where="on a machine with an NVIDIA GPU") == \
        "in the vitc checkout, on a machine with an NVIDIA GPU: pip install -c constraints.txt tensorrt cuda-bindings"
    monkeypatch.setattr(hints, "from_checkout", lambda: False)
    assert hints.pip_command(["export", "train", "train"]) == "pip install 'vitc[train,export]'"
    assert hints.extras_hint(["server", "train", "export"]) == \
        "install the project's server, train and export extras (pip install 'vitc[server,train,export]')"
    assert hints.pip_command(packages=["openvino"]) == "pip install openvino"
    assert hints.pip_command(packages=["tensorrt", "cuda-bindings"], where="on a machine with an NVIDIA GPU") == \
        "on a machine with an NVIDIA GPU: pip install tensorrt cuda-bindings"


def test_a_checkout_is_told_from_an_installed_copy(wheel_install, tmp_path):
    assert hints.from_checkout()  # the tests run from the checkout
    code = "import models.extras as c; print(c.__file__); print(c.from_checkout())"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env=_env(wheel_install), check=True).stdout.split()
    assert out == [str(wheel_install / "models" / "extras.py"), "False"]


def test_require_names_every_missing_module_and_every_extra_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(hints, "from_checkout", lambda: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "fastapi", "sklearn") else real(name, *a))
    with pytest.raises(hints.MissingModules) as info:
        hints.require("numpy", "torch", "fastapi", "sklearn")
    assert info.value.modules == ("torch", "fastapi", "sklearn") and info.value.name == "torch"
    assert hints.missing_dependency(info.value, "prog") == 2
    assert capsys.readouterr().err == (
        "prog: error: torch, fastapi and sklearn (scikit-learn) are not installed: install the project's server and "
        "train extras (pip install 'vitc[server,train]')\n")


def test_installed_export_names_the_train_and_export_extras_in_its_first_line(wheel_install, tmp_path):
    """A serving install (no torch, no converters): the export said only the converters were missing, and after
    those were installed, that torch was; and its command was for the checkout, which a wheel user does not have."""
    out = _run(["export", "--checkpoint", "c", "--out", "e"], EXPORT_MODULES, tmp_path, wheel_install)
    assert (out.returncode, out.stderr.strip().splitlines()) == (
        2, [f"{EXPORT_ERROR}{EXPORT_WHY} (pip install 'vitc[train,export]')"])
    out = _run(["export", "--checkpoint", "c", "--out", "e"], EXPORT_MODULES, tmp_path)  # from the checkout
    assert (out.returncode, out.stderr.strip().splitlines()) == (
        2, [f"{EXPORT_ERROR}{EXPORT_WHY} (in the vitc checkout: pip install -c constraints.txt '.[train,export]')"])
    assert list(tmp_path.iterdir()) == []


def test_installed_train_and_runtimes_give_the_wheel_command(wheel_install, tmp_path):
    out = _run(["train", "--model", "vit_c_micro", "--dataset", "digits", "--out", "r"], "torch,tqdm", tmp_path,
               wheel_install)
    assert (out.returncode, out.stderr.strip().splitlines()) == (2, [
        "python -m train: error: torch and tqdm are not installed: install the project's train extra "
        "(pip install 'vitc[train]')"])
    code = "import runtimes\nfor rt in runtimes.runtimes(): print(rt.name, '|', rt.install)"
    lines = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                           env=_env(wheel_install), check=True).stdout.splitlines()
    assert lines == [
        "onnxruntime | pip install onnxruntime (CPU), or 'onnxruntime-gpu[cuda,cudnn]' on an NVIDIA GPU (never both)",
        "openvino | pip install openvino",
        "tensorrt | on a machine with an NVIDIA GPU: pip install tensorrt cuda-bindings",
        "torch | install the project's train extra (pip install 'vitc[train]')"]


def test_export_beside_onnxruntime_gpu_asks_for_convert_not_the_cpu_runtimes(monkeypatch):
    """The export extra brings the CPU onnxruntime, which would go beside onnxruntime-gpu (the gpu extra) and break
    both: a GPU environment is told `convert`, and openvino on its own."""
    monkeypatch.setattr(export_cli, "distribution_versions", lambda names: {n: "1.22" for n in names})
    real = importlib.util.find_spec
    absent = ("torch", "onnx", "openvino")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    assert export_cli.missing_problem(parse_targets(["onnx", "openvino-fp32"])) == (
        "not installed: torch (the model every artifact is exported from); openvino (the openvino targets); onnx "
        "(the ONNX graph every target but torch is built from); install the project's train and convert extras (in "
        "the vitc checkout: pip install -c constraints.txt '.[train,convert]'); for openvino: in the vitc checkout: "
        "pip install -c constraints.txt openvino")


def test_the_extras_named_are_pyprojects():
    with (REPO / "pyproject.toml").open("rb") as f:
        extras = tuple(tomllib.load(f)["project"]["optional-dependencies"])
    assert hints.EXTRAS == extras
    assert {rt.name: rt.export_extra for rt in runtimes.runtimes()} == {
        "onnxruntime": "export", "openvino": "export", "tensorrt": None, "torch": "train"}


def test_a_plug_in_runtime_imports_pip_command_from_models_cli_as_the_readme_says():
    """README's "Adding a runtime": a runtime's `install` is a `models.cli.pip_command(...)` line (the hints live in
    models.extras; models.cli keeps the name for plug-ins outside this repository)."""
    from models.cli import pip_command

    assert pip_command is hints.pip_command
