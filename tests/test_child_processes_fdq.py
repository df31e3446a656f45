"""The processes vitc's tools start (serve.launch's server, benchmarks.overhead's servers, gpu_check's steps) run
where the caller's vitc lies and import that vitc, whatever the caller's directory holds (a train.py or serve.py of
the user's never stands in for vitc's); a VITC_RUNTIMES plugin on the caller's PYTHONPATH is found; in an installed
vitc, site-packages (their directory) no longer comes ahead of the standard library. Also: gpu_check records its
latency steps as a command an installed user can rerun, its report says why there is no commit as the other reports
do, and a Python without fcntl (Windows) gets one line and exit 2 from every command, not a traceback."""

from __future__ import annotations

import ast
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import fake_runtime
import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "runtimes", "export", "serve", "train", "benchmarks")
NO_COMMIT = "git: no commit (not run from a git checkout of vitc)"
# Stands in for PyPI's `uuid` (a Python 2 module that requirements files pull in by mistake): a top-level module in
# site-packages with a standard library module's name, which only a path with site-packages first imports.
SHADOW = "raise ImportError(f'{__file__} imported instead of the standard library uuid')\n"


def _venv(root: Path, with_vitc: bool) -> tuple[Path, Path]:
    """A venv at `root` (its python, its site-packages) that reaches this environment's packages through a .pth file
    (a plain path: the editable install's finder there stays off); with vitc's packages copied in, as pip would."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = next((root / "lib").glob("python3*/site-packages"))
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if with_vitc:
        for package in PACKAGES:
            shutil.copytree(REPO / package, site / package, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return root / "bin" / "python", site


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(python, site-packages, the user's directory) of a venv with vitc installed; the user's directory holds a
    runtime plugin (fake_runtime.py) and a bundle `b` it serves."""
    root = tmp_path_factory.mktemp("installed")
    python, site = _venv(root / "venv", with_vitc=True)
    user = root / "user"
    user.mkdir()
    shutil.copy(Path(fake_runtime.__file__), user / "fake_runtime.py")
    fake_runtime.write_bundle(user / "b")
    return python, site, user


def _caller_env(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH (the caller finds vitc where it is installed), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **extra}


def _call(python: Path, cwd: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=_caller_env(**env), capture_output=True, text=True,
                          timeout=300)


STARTS_A_SERVER = """
import sys
from serve.launch import start
with start(sys.argv[1:], "server.log") as server:
    print(server.url)
"""

OVERHEAD_SERVER = """
from pathlib import Path
from benchmarks.overhead import Server
server = Server("vitc", Path("b").absolute(), backend="fake", log_dir=Path("."))
server.stop()
print("started")
"""

STEP = """
import sys
from benchmarks.gpu_check import run_group
code = "import os, uuid; print(os.getcwd()); print(uuid.__file__); print(os.environ.get('PYTHONPATH', ''))"
done = run_group([sys.executable, "-c", code], 60)
print(done.stdout, end="")
print(done.stderr, file=sys.stderr)
"""


def test_a_started_server_finds_the_callers_runtime_plugin(installed):
    """`benchmarks.load --start` and `latency --http start` (serve.launch): "unknown backend ... No module named
    'fake_runtime'" with PYTHONPATH=. (relative: the child's directory is another)."""
    python, _, user = installed
    code = STARTS_A_SERVER.replace("start(sys.argv[1:]", "start(['--model', 'b', '--backend', 'fake']")
    done = _call(python, user, code, VITC_RUNTIMES="fake_runtime", PYTHONPATH=".")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("http://127.0.0.1:")


def test_overheads_server_finds_the_callers_runtime_plugin(installed):
    python, _, user = installed
    done = _call(python, user, OVERHEAD_SERVER, VITC_RUNTIMES="fake_runtime", PYTHONPATH=str(user))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "started"


@pytest.fixture
def shadowed(installed):
    """The installed venv with a stdlib-named module in its site-packages, for the test's duration."""
    shadow = installed[1] / "uuid.py"
    shadow.write_text(SHADOW)
    try:
        yield installed
    finally:
        shadow.unlink()


def test_a_started_server_imports_the_standard_library_first(shadowed):
    """serve.middleware imports uuid: the server died where `python -m serve` served."""
    python, _, user = shadowed
    code = STARTS_A_SERVER.replace("start(sys.argv[1:]", "start(['--model', 'b']")
    done = _call(python, user, code)
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_gpu_check_step_of_an_installed_vitc_imports_the_standard_library_first(shadowed):
    python, site, user = shadowed
    done = _call(python, user, STEP)
    assert done.returncode == 0, done.stderr[-2000:]
    cwd, uuid_file, pythonpath = done.stdout.splitlines()
    assert Path(cwd) == site  # where the caller's vitc lies
    assert not uuid_file.startswith(str(site)), uuid_file
    assert pythonpath == "", "vitc is installed: nothing to add to the module path"


def test_a_users_module_named_as_vitcs_never_runs_in_its_place(tmp_path):
    """`make gpu-check` from a project holding a train.py ran the user's train.py as its training step."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "train.py").write_text("raise SystemExit('the user train.py ran')\n")
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from benchmarks.gpu_check import run_group\n"
            "done = run_group([sys.executable, '-m', 'train', '--help'], 120)\n"
            "print(done.rc); print(done.stderr, file=sys.stderr)\n")
    done = _call(Path(sys.executable), user, code)
    assert done.returncode == 0 and done.stdout.strip() == "0", (done.stdout, done.stderr[-2000:])
    assert "the user train.py ran" not in done.stderr


def test_a_clone_run_from_another_directory_still_runs_its_own_code(tmp_path):
    """Not installed: the child finds vitc where this process did (the checkout), whatever the caller's directory."""
    python, _ = _venv(tmp_path / "venv", with_vitc=False)
    user = tmp_path / "user"
    user.mkdir()
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from benchmarks.gpu_check import run_group\n"
            "done = run_group([sys.executable, '-c', 'import os, models; print(os.getcwd()); print(models.__file__)'],"
            " 60)\n"
            "print(done.stdout, end=''); print(done.stderr, file=sys.stderr)\n")
    done = _call(python, user, code)
    assert done.returncode == 0, done.stderr[-2000:]
    cwd, models_file = done.stdout.splitlines()
    assert Path(cwd) == REPO
    assert Path(models_file) == REPO / "models" / "__init__.py"


def _gpu_check_doc(tmp_path, monkeypatch) -> dict:
    """gpu_check's document of a smoke run on the CPU with its budget already spent (no step started)."""
    from benchmarks import gpu_check

    monkeypatch.chdir(tmp_path)
    budget = gpu_check.Budget(30, gpu_check.SMOKE.shares, reserve_s=30, min_step_s=10)
    return gpu_check.run("cpu", gpu_check.SMOKE, tmp_path / "out", tmp_path / "work", log=lambda m: None,
                         budget=budget)


def test_gpu_checks_latency_steps_are_commands_an_installed_user_can_rerun(tmp_path, monkeypatch):
    """`python benchmarks/latency.py ...` names a file under the checkout: from the user's directory, or with vitc
    installed, "can't open file"."""
    from benchmarks.latency import build_parser

    doc = _gpu_check_doc(tmp_path, monkeypatch)
    commands = {s["name"]: shlex.split(s["command"]) for s in doc["steps"]
                if s["name"] in ("latency-1", "serve-under-load")}
    assert len(commands) == 2, doc["steps"]
    for name, cmd in commands.items():
        assert cmd[1:3] == ["-m", "benchmarks.latency"], (name, cmd)
        build_parser().parse_args(cmd[3:])
        rerun = subprocess.run([*cmd[:3], "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0 and "usage:" in rerun.stdout, (name, rerun.stderr)


def test_gpu_checks_report_says_why_there_is_no_commit(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    doc = _gpu_check_doc(tmp_path, monkeypatch)
    doc["environment"]["git"] = {"commit": None, "dirty": None}
    text = gpu_check.markdown(doc)
    assert NO_COMMIT in text and "git ?" not in text
    doc["environment"]["git"] = {"commit": "0123456789abcdef0123", "dirty": False}
    assert "git 0123456789ab" in gpu_check.markdown(doc)


def test_overheads_report_says_why_there_is_no_commit():
    from benchmarks import overhead

    doc = {"environment": {"versions": {"python": "3.11"}, "cpu": {"model": "cpu", "usable_cpus": 2, "flags": []},
                           "git": {"commit": None}},
           "config": {"rounds": 1, "slice_s": 1, "concurrency": 4, "saturation_s": 1}, "image": "x.png",
           "image_bytes": 1}
    line = overhead._setup_lines(doc)[0]
    assert NO_COMMIT in line and "git ?" not in line, line


def _command_modules() -> list[str]:
    """Every module that calls `cli.run(...)` (the project's commands), as `python -m` names it."""
    out = []
    for top in ("benchmarks", "export", "models", "serve", "train"):
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "run"
                   and isinstance(n.func.value, ast.Name) and n.func.value.id == "cli" for n in ast.walk(tree)):
                out.append(".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__main__"))
    return out


@pytest.fixture(scope="module")
def no_fcntl(tmp_path_factory) -> dict[str, str]:
    """An environment whose Python cannot import fcntl, as on Windows (a sitecustomize blocks it)."""
    where = tmp_path_factory.mktemp("no-fcntl")
    (where / "sitecustomize.py").write_text("import sys\nsys.modules['fcntl'] = None\n")
    return {**os.environ, "PYTHONPATH": f"{where}{os.pathsep}{REPO}"}


def test_the_commands_are_found():
    assert len(_command_modules()) >= 15 and {"serve", "export", "benchmarks.gpu_check"} <= set(_command_modules())


@pytest.mark.parametrize("module", _command_modules())
def test_a_python_without_fcntl_gets_one_line_from_every_command(module, no_fcntl, tmp_path):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=no_fcntl, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stdout[-500:], done.stderr[-2000:])
    assert done.stdout == ""
    line = done.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith(f"python -m {module}: error: ") and "fcntl" in line and "Linux" in line, line


def test_a_python_without_fcntl_reads_bundles_and_is_told_why_at_the_first_lock(no_fcntl, tmp_path):
    """models.io imported fcntl at its top: a program reading a checkpoint or a bundle (which takes no lock) failed
    at import with Python's bare "import of fcntl halted". It reads now, and the first lock says why it cannot."""
    program = (
        "import sys\n"
        "from pathlib import Path\n"
        "import models.bundle, models.checkpoint\n"
        "from models.io import sha256_file, writer_lock\n"
        "print(sha256_file(sys.argv[1]))\n"
        "try:\n"
        "    with writer_lock(Path(sys.argv[1])):\n"
        "        pass\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    target = tmp_path / "f"
    target.write_bytes(b"x")
    done = subprocess.run([sys.executable, "-c", program, str(target)], cwd=tmp_path, env=no_fcntl,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        hashlib.sha256(b"x").hexdigest(),
        f"vitc runs on Linux and macOS only, not on Windows: this Python ({sys.platform}) has no fcntl module, which "
        "vitc's file locks need"]
    assert not (tmp_path / ".f.lock").exists()


def test_the_package_declares_the_systems_it_runs_on():
    classifiers = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("classifiers", [])
    assert "Operating System :: POSIX :: Linux" in classifiers, classifiers
    assert "Operating System :: OS Independent" not in classifiers
    assert "not supported on Windows" in " ".join((REPO / "README.md").read_text().split())


def test_a_nested_hangup_guard_leaves_the_outer_cleanup_protected():
    import signal

    from models.cli import Terminated, hangup_terminates

    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(Terminated), hangup_terminates():
            try:
                with hangup_terminates():
                    os.kill(os.getpid(), signal.SIGHUP)
            finally:  # the outer cleanup: a second hang-up is ignored, not raised again
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, before)
