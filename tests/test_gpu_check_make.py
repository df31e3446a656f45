"""`make gpu-check` before its multi-GB install: a machine without an NVIDIA GPU is told so in one line (exit 2) with
nothing installed, and a failed install ends with one readable line, pip's traceback kept in a log. Run in a scratch
directory against the repository's Makefile, with a fake nvidia-smi and a fake environment: nothing is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

_PIP_STUB_FAILURE = """\
Traceback (most recent call last):
  File "/tmp/pip-build-env/overlay/lib/python3.11/site-packages/wheel_stub/error.py", line 67, in report_install_failure
wheel_stub.error.InstallFailedError:
This is a special placeholder package which downloads a real wheel package
from https://pypi.nvidia.com/. If https://pypi.nvidia.com/ is not reachable, we
cannot download the real wheel file to install.
error: metadata-generation-failed
"""


def _make(where: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # not a sub-make of a running make
    return subprocess.run(["make", "--no-print-directory", "-f", str(MAKEFILE), *args], cwd=where, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path) -> Path:
    """A scratch project directory: the files the install's stamp depends on, and a fake nvidia-smi."""
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).write_text("")
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e1f0000-0000-0000-0000-000000000000)'\n")
    smi.chmod(0o755)
    return tmp_path


def test_without_an_nvidia_gpu_it_says_so_in_one_line_before_installing_anything(project):
    done = _make(project, "-n", "gpu-check", "NVIDIA_SMI=/nonexistent/nvidia-smi",
                 f"NVIDIA_PROC={project / 'no-driver'}")
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and "no NVIDIA GPU here" in err[0] and "nothing installed" in err[0], done.stderr
    assert "--device cpu --smoke" in err[0]
    assert "pip install" not in done.stdout and "venv" not in done.stdout  # -n: nothing would have run either
    assert not (project / ".venv-gpu").exists()


@pytest.mark.parametrize("probe", ["nvidia-smi", "proc"])
def test_with_a_gpu_either_probe_lets_the_install_and_the_check_run(project, probe):
    proc = project / "gpus"
    proc.mkdir()
    if probe == "proc":  # the driver's entries without nvidia-smi (a container)
        (proc / "0000:18:00.0").mkdir()
    smi = str(project / "bin" / "nvidia-smi") if probe == "nvidia-smi" else "/nonexistent/nvidia-smi"
    done = _make(project, "-n", "gpu-check", f"NVIDIA_SMI={smi}", f"NVIDIA_PROC={proc}",
                 "GPU_CHECK_ARGS=--budget 1200 --device cuda:1")
    assert done.returncode == 0, done.stderr
    assert "-e '.[train,convert,gpu]'" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last == ".venv-gpu/bin/python -m benchmarks.gpu_check --budget 1200 --device cuda:1"


def test_a_failed_install_ends_with_one_readable_line_and_keeps_pips_output_in_a_log(project):
    # An environment whose pip fails as the TensorRT stub does where pypi.nvidia.com cannot be reached.
    python = project / ".venv-gpu" / "bin" / "python"
    python.parent.mkdir(parents=True)
    (project / "failure.txt").write_text(_PIP_STUB_FAILURE)
    python.write_text(f"#!/bin/sh\ncase \"$*\" in *' -e '*) cat {project / 'failure.txt'} >&2; exit 1;; esac\n")
    python.chmod(0o755)
    done = _make(project, "gpu-check", f"NVIDIA_SMI={project / 'bin' / 'nvidia-smi'}")
    assert done.returncode != 0
    err = [line for line in done.stderr.strip().splitlines() if not line.startswith("make: *** ")]
    assert err == ["make gpu-check: installing the GPU environment failed: NVIDIA's wheels (TensorRT) download from "
                   "https://pypi.nvidia.com/, which this machine could not reach (pip's output: .venv-gpu/install.log)"]
    assert "Traceback" not in done.stderr + done.stdout
    assert (project / ".venv-gpu" / "install.log").read_text() == _PIP_STUB_FAILURE
    assert not (project / ".venv-gpu" / ".installed-stamp").exists()  # the next make tries again


def test_another_failed_install_names_pips_own_error(project):
    python = project / ".venv-gpu" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for pip==26.3' >&2\nexit 1\n")
    python.chmod(0o755)
    done = _make(project, "gpu-check", f"NVIDIA_SMI={project / 'bin' / 'nvidia-smi'}")
    err = [line for line in done.stderr.strip().splitlines() if not line.startswith("make: *** ")]
    assert done.returncode != 0 and err == [
        "make gpu-check: installing the GPU environment failed: ERROR: No matching distribution found for "
        "pip==26.3 (pip's output: .venv-gpu/install.log)"]
