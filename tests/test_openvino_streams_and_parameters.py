"""OpenVINO takes --threads per inference and --parallel streams as onnxruntime does, and reports the streams and
threads the compiled model really has; a repository's OpenVINO parameters are applied, or named as not applied."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
from test_serve_fixtures import micro_bundle

import runtimes
from models.bundle import read_manifest
from models.host import usable_cpus
from runtimes import BackendOptions

MODEL = "micro-openvino-fp32"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory)


def _open(bundle: Path, **options: object):  # noqa: ANN202 - an OpenVINOBackend
    return runtimes.open_backend(bundle, read_manifest(bundle), "openvino", "fp32", BackendOptions(**options))


def _compiled(backend) -> tuple[int, int]:  # noqa: ANN001 - an OpenVINOBackend
    """(NUM_STREAMS, INFERENCE_NUM_THREADS) of the compiled model."""
    return (int(backend.compiled.get_property("NUM_STREAMS")),
            int(backend.compiled.get_property("INFERENCE_NUM_THREADS")))


@pytest.mark.parametrize("options", [{"threads": 1, "parallel": 2}, {"parallel": 4}, {}, {"hint": "latency"}],
                         ids=["threads1-parallel2", "parallel4", "default", "latency"])
def test_the_compiled_streams_and_threads_are_what_vitc_runs_and_reports(bundle, options):
    backend = _open(bundle, **options)
    try:
        streams, total = _compiled(backend)
        d = backend.describe()
        # Never more batches at once than OpenVINO has streams for (they would queue on one), reported as compiled.
        assert backend.parallelism == d["parallelism"] == streams
        if "threads" in options:  # threads per inference: the model has that many per stream
            assert total == streams * options["threads"]
        assert d["num_streams"] == streams
        assert d["inference_num_threads"] == total and d["threads_effective"] == max(1, total // streams)
        assert d["performance_hint"] == options.get("hint", "throughput").upper()
        if "parallel" in options:  # as many streams as asked, OpenVINO capping them at the cores
            assert streams <= options["parallel"] and (usable_cpus() < 2 or streams >= 2)
        if "threads" in options:  # threads per inference: the model has that many per stream
            assert total == streams * options["threads"] and d["threads_effective"] == options["threads"]
        if options.get("hint") == "latency":
            assert streams == 1 and d["threads_effective"] == total
    finally:
        backend.close()


@pytest.fixture()
def repo(bundle, tmp_path) -> Path:
    """A repository export.triton wrote, with its OpenVINO fp32 model alone."""
    from export.triton import write_repository

    out = tmp_path / "repo"
    write_repository(bundle, out, cpus=2, instances=2)
    for p in out.iterdir():
        if p.is_dir() and p.name != MODEL:
            shutil.rmtree(p)
    return out


def _set_parameters(repo: Path, parameters: dict[str, str]) -> None:
    config = repo / MODEL / "config.pbtxt"
    entries = ", ".join(f'{{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in parameters.items())
    text, n = re.subn(r"parameters \[.*?\]\n", f"parameters [{entries}]\n", config.read_text(), flags=re.S)
    assert n == 1, text
    config.write_text(text)


def test_a_repository_models_hint_and_streams_are_applied_and_bf16_is_named(repo, caplog):
    from fastapi.testclient import TestClient

    from serve.app import create_app
    from serve.settings import Settings

    _set_parameters(repo, {"HINT_BF16": "YES", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                           "INFERENCE_NUM_THREADS": "2"})
    settings = Settings(model_repository=repo, access_log=False, graceful_timeout_s=5)
    with caplog.at_level(logging.WARNING, logger="vitc.serve"), TestClient(create_app(settings)) as c:
        execution = c.get(f"/v1/models/{MODEL}").json()["execution"]
        config = c.get(f"/v2/models/{MODEL}/config").json()
    assert execution["parallelism"] == config["instance_group"][0]["count"] == 1
    unapplied = [r for r in caplog.records if r.msg == "config.pbtxt settings not applied"]
    assert len(unapplied) == 1 and unapplied[0].fields == ["parameters.HINT_BF16"]
    assert (execution["performance_hint"], execution["num_streams"]) == ("LATENCY", 1)
    assert execution["inference_precision"] == "f32"  # vitc keeps the artifact's precision: HINT_BF16 is named
    shown = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert shown["PERFORMANCE_HINT"] == "LATENCY" and shown["NUM_STREAMS"] == "1"
    assert shown["INFERENCE_NUM_THREADS"] == str(execution["inference_num_threads"])


def test_a_repository_models_streams_split_its_threads_and_the_servers_flags_win(repo, caplog):
    from serve.registry import close_models, load_models
    from serve.settings import Settings

    def served(**flags: object) -> dict:
        models = load_models(Settings(model_repository=repo, **flags))
        try:
            return models[MODEL].execution
        finally:
            close_models(models)

    _set_parameters(repo, {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": "2", "INFERENCE_NUM_THREADS": "2"})
    with caplog.at_level(logging.WARNING, logger="vitc.serve"):
        e = served()
    # The model's two threads in all (the pod's limit), one per stream: never two per stream.
    assert e["parallelism"] == min(2, usable_cpus()) and e["threads_effective"] == 1
    assert e["performance_hint"] == "THROUGHPUT" and e["num_streams"] == e["parallelism"]
    assert e["inference_num_threads"] <= 2
    assert not [r for r in caplog.records if r.msg == "config.pbtxt settings not applied"]

    # The server's own flag wins, as its --threads does; a stream count beside the latency hint is not applied.
    _set_parameters(repo, {"PERFORMANCE_HINT": "CUMULATIVE_THROUGHPUT", "NUM_STREAMS": "2"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vitc.serve"):
        e = served(openvino_hint="latency")
    unapplied = [r for r in caplog.records if r.msg == "config.pbtxt settings not applied"]
    assert len(unapplied) == 1 and unapplied[0].fields == ["parameters.PERFORMANCE_HINT", "parameters.NUM_STREAMS"]
    assert (e["performance_hint"], e["num_streams"], e["parallelism"]) == ("LATENCY", 1, 1)


def test_the_gate_line_and_the_report_give_the_images_the_accuracy_delta_was_measured_on(bundle):
    """One point of accuracy is 5 images on 512: the delta is printed with its interval and sample count."""
    from export.bundle import summary_line
    from export.report import COLUMNS, rows

    manifest = read_manifest(bundle)
    checked = 0
    for artifact, row in zip(manifest.artifacts, rows(manifest), strict=True):
        if (p := artifact.parity) is None:
            continue
        checked += 1
        ci = f" ±{p.accuracy_delta_ci95 * 100:.2f} (95% CI)"
        said = f"{p.accuracy_delta * 100:+.2f} pt{ci} on {p.val_samples} images"
        assert said in summary_line(artifact), summary_line(artifact)
        assert row[COLUMNS.index("Δacc pt")] == f"{p.accuracy_delta * 100:+.2f}{ci} on {p.val_samples} images"
    assert checked
