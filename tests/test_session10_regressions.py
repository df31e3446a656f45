"""Regressions hCS found (fixed by fCS): a training command holding a path's undecodable bytes made /v1/models answer
500 for every model; vitc's own benchmarks/results (and any data folder named like a vitc package) made every
command refuse to start, and the check listed such a directory whole on each start; an explicit --parallel was
dropped without a word for a repository OpenVINO model whose config.pbtxt sets the latency hint."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

import pytest
from test_openvino_streams_and_parameters import MODEL, _set_parameters, bundle, repo  # noqa: F401 - fixtures
from test_serve_fixtures import LEGACY, micro_checkpoint
from test_shadowed_packages import FIX, _run, _workdir, editable  # noqa: F401 - editable is a fixture

from models.cli import one_line

# ------------------------------------------------------------------- 1. a training command with undecodable bytes

# As train records it: shlex.join of the arguments, a path's byte 0xff decoded by the file system's rule (a lone
# surrogate, U+DCFF).
COMMAND = shlex.join(("python", "-m", "train", "--out", os.fsdecode(b"/runs/r\xff"), "--note", "a\tb"))


@pytest.fixture(scope="module")
def odd_bundle(tmp_path_factory) -> Path:
    """A real bundle exported from a checkpoint whose training.command_line holds COMMAND."""
    import json

    from export.bundle import build_bundle

    root = tmp_path_factory.mktemp("odd-command")
    ckpt = micro_checkpoint(root)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["training"] = {"command_line": COMMAND}
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))  # escaped as \udcff, as json.dump writes it
    build_bundle(ckpt, root / "odd", targets=("onnx",), name="odd", max_batch=8, parity_samples=64,
                 calibration_samples=16, log=lambda _: None)
    return root / "odd"


def test_v1_models_answer_a_training_command_with_undecodable_bytes_escaped(odd_bundle):
    """It was 500 (PydanticSerializationError: surrogates not allowed), for /v1/models with every other model too."""
    from fastapi.testclient import TestClient

    from models.bundle import read_manifest
    from serve.app import create_app
    from serve.settings import Settings

    assert read_manifest(odd_bundle).provenance.training_command == COMMAND  # accepted as written
    shown = one_line(COMMAND)
    assert "\\udcff" in shown and "\\t" in shown  # the undecodable byte stays visible, as export.report shows it
    settings = Settings(models=[f"clean={LEGACY}", f"odd={odd_bundle}"], backend="onnxruntime", access_log=False)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        one, listing = c.get("/v1/models/odd"), c.get("/v1/models")
    assert (one.status_code, listing.status_code) == (200, 200), (one.text, listing.text)
    assert one.json()["provenance"]["training_command"] == shown
    by_name = {m["name"]: m for m in listing.json()["models"]}
    assert by_name["odd"]["provenance"]["training_command"] == shown and by_name["clean"]["ready"]
    one.content.decode("utf-8")  # strict: no surrogate escaped into the bytes


# ----------------------------------------------------- 2. and 3. a data folder named like one of vitc's packages


def test_vitcs_own_benchmark_results_directory_does_not_block_a_command(editable, tmp_path):  # noqa: F811 - fixture
    """benchmarks/results is where the benchmarks write by default: vitc's own results/ is data, not a module."""
    here = _workdir(tmp_path, "benchmarks/results", "data/embedded")
    (here / "benchmarks" / "results" / "2026-vm-http.json").write_text("{}")
    out = _run(editable, here, "-m", "models", "list")
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert "vit_c_nano" in out.stdout


@pytest.mark.parametrize("entry", ["latency.py", "latency/", "latency/x.py"])
def test_a_directory_of_a_vitc_module_name_is_still_refused(editable, tmp_path, entry):  # noqa: F811 - fixture
    """A module file, or a directory of the name (a namespace package import takes, whatever it holds), runs or is
    imported instead of vitc's benchmarks.latency."""
    here = _workdir(tmp_path, "benchmarks/results")
    path = here / "benchmarks" / entry
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.endswith("/"):
        path.mkdir()
    else:
        path.write_text("raise SystemExit('not vitc: this directory was imported')\n")
    out = _run(editable, here, "-m", "models", "list")
    assert (out.returncode, out.stderr) == (
        2, f"python -m models: error: ./benchmarks (a directory without __init__.py) shadows vitc's package "
           f"'benchmarks': {FIX}\n")


# Every directory listed while models.cli loads (the shadow check runs at its import), as os.listdir and os.scandir
# announce it to an audit hook.
_LISTED = """
import os, sys
listed = []
sys.addaudithook(lambda event, args: listed.append(os.path.abspath(os.fsdecode(args[0] or ".")))
                 if event in ("os.listdir", "os.scandir") else None)
import models.cli
print(sum(p == os.path.abspath("data") for p in listed))
"""


def test_the_check_does_not_list_a_large_data_directory(editable, tmp_path):  # noqa: F811 - fixture
    """It listed ./data and stat'ed every entry on each start (200,000 files: 2.5 s instead of 0.8 s): its cost now
    is a few stat calls per vitc module name, whatever the directory holds."""
    here = _workdir(tmp_path, "data/images")
    for i in range(2000):
        (here / "data" / f"img{i:05d}.jpg").touch()
    out = _run(editable, here, "-c", _LISTED)
    assert (out.returncode, out.stderr, out.stdout) == (0, "", "0\n")


# ------------------------------------------------------ 4. --parallel beside a repository model's latency hint


def test_parallel_dropped_by_a_repository_models_latency_hint_is_named(repo, caplog):  # noqa: F811 - fixture
    """The CLI refuses --openvino-hint latency --parallel 2; the same contradiction from one model's config.pbtxt
    does not stop the server (the flag is global), but the warning names the model, the flag and the parameter."""
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    _set_parameters(repo, {"PERFORMANCE_HINT": "LATENCY"})
    with caplog.at_level(logging.WARNING, logger="vitc.serve"):
        models = load_models(Settings(model_repository=repo, parallel=2))
    try:
        execution = models[MODEL].execution
    finally:
        close_models(models)
    assert (execution["performance_hint"], execution["num_streams"], execution["parallelism"]) == ("LATENCY", 1, 1)
    unapplied = [r for r in caplog.records if r.msg == "config.pbtxt settings not applied"]
    assert len(unapplied) == 1, [r.msg for r in caplog.records]
    record = unapplied[0]
    assert (record.model, record.fields) == (MODEL, [])
    assert record.flags == ["--parallel 2 (parameters.PERFORMANCE_HINT LATENCY runs one stream)"]


def test_parallel_beside_a_repository_models_throughput_hint_is_applied(repo, caplog):  # noqa: F811 - fixture
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    _set_parameters(repo, {"PERFORMANCE_HINT": "THROUGHPUT"})
    with caplog.at_level(logging.WARNING, logger="vitc.serve"):
        models = load_models(Settings(model_repository=repo, parallel=2))
    close_models(models)
    assert not [r for r in caplog.records if r.msg == "config.pbtxt settings not applied"]
