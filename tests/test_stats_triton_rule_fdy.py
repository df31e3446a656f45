"""/v2/models/{name}/stats by Triton's rule (tester hEB): a request's queue and compute times count only when it
succeeds, so queue.count == compute_infer.count == success.count; a failure counts only in `fail`, even one that
fails after its batch ran (non-finite outputs: 422, or its client gone during compute); executions and batch_stats
count every executed batch. And Triton's generate extension, which vitc does not serve, is refused with a reason.

A real server of tests/fake_runtime.py for tritonclient and disconnects; in process for /v1 and /v2 on a bundle
model and on a repository model without batching (max_batch_size 0), outputs made NaN at will."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_runtime
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_repository_lifecycle import add_version
from test_repository_lifecycle import client as app_client
from test_runtime_contract_serving import MODE, MisbehavingBackend, _bundle, _runtime, registered
from test_serve_fixtures import animal_pngs, client_of, fake_server
from test_v2_conformance_hcc import UNBATCHED

from serve.launch import ServerProcess
from serve.settings import Settings

PNG = {"content-type": "image/png"}


def _stats(c: httpx.Client, name: str) -> dict[str, Any]:
    """The counts of the model's statistics entry that Triton's rule ties together."""
    s = c.get(f"/v2/models/{name}/stats").json()["model_stats"][0]
    st = s["inference_stats"]
    return {**{k: st[k]["count"] for k in ("success", "fail", "queue", "compute_infer")},
            "queue_ns": st["queue"]["ns"], "compute_ns": st["compute_infer"]["ns"],
            "inference_count": s["inference_count"], "execution_count": s["execution_count"],
            "batches": {b["batch_size"]: b["compute_infer"]["count"] for b in s["batch_stats"]}}


def _grown(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What each count of `_stats` grew by (batch sizes that did not grow left out)."""
    grown = {k: after[k] - before[k] for k in after if k != "batches"}
    grown["batches"] = {b: n - before["batches"].get(b, 0) for b, n in after["batches"].items()
                        if n != before["batches"].get(b, 0)}
    return grown


def _sample(c: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(c.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _v2(rows: int, value: float = 0.25, first: float | None = None) -> dict:
    x = np.full((rows, 3, 32, 32), value, np.float32)
    if first is not None:
        x[:, 0, 0, 0] = first
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


# -- a real server: tritonclient, and a client that leaves while its batch computes ------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("fdy")
    with fake_server(fake_runtime.write_bundle(tmp / "fake"), tmp, "--parallel", "1") as s:
        yield s


def test_tritonclient_sees_failed_requests_only_in_fail_after_their_batch_ran(server):
    """The tester's repro: 4 good requests, 3 whose outputs overflow (422). Before, queue and compute_infer counted
    7 while success was 4."""
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    triton = tc.InferenceServerClient(server.url.removeprefix("http://"))

    def tensor(rows: int, value: float) -> tc.InferInput:
        i = tc.InferInput("input", [rows, 3, 32, 32], "FP32")
        i.set_data_from_numpy(np.full((rows, 3, 32, 32), value, np.float32))
        return i

    with client_of(server) as c:
        before = _stats(c, "fake")
        for _ in range(3):
            with pytest.raises(InferenceServerException) as err:
                triton.infer("fake", [tensor(2, 3e38)])
            assert err.value.status() == "422", err.value
        failed = _grown(_stats(c, "fake"), before)
        # Executed, so in execution_count and batch_stats; failed, so nowhere else but `fail`.
        assert failed == {"success": 0, "fail": 3, "queue": 0, "compute_infer": 0, "queue_ns": 0, "compute_ns": 0,
                          "inference_count": 0, "execution_count": 3, "batches": {2: 3}}, failed
        middle = _stats(c, "fake")
        for _ in range(4):
            triton.infer("fake", [tensor(1, 0.25)])
        ok = _grown(_stats(c, "fake"), middle)
        assert ok["queue_ns"] > 0 and ok["compute_ns"] > 0, ok
        del ok["queue_ns"], ok["compute_ns"]
        assert ok == {"success": 4, "fail": 0, "queue": 4, "compute_infer": 4, "inference_count": 4,
                      "execution_count": 4, "batches": {1: 4}}, ok
        s = triton.get_inference_statistics("fake")["model_stats"][0]["inference_stats"]
        assert s["queue"]["count"] == s["compute_infer"]["count"] == s["success"]["count"], s


def test_a_client_gone_while_its_batch_computes_counts_only_as_fail(server):
    """Computed all the same (an execution), its answer dropped: a failure, with no queue or compute time."""
    computed = server.log_path.parent / "computed.log"  # the fake runtime's rows, as it starts computing them

    def slow_rows() -> int:
        return computed.read_text().splitlines().count(f"{fake_runtime.SLOW:g}") if computed.exists() else 0

    with client_of(server) as c:
        before, started = _stats(c, "fake"), slow_rows()
        gone = _sample(c, "vitc_client_disconnects_total", model="fake", stage="computing")
        body = httpx.Request("POST", f"{server.url}/v2/models/fake/infer", json=_v2(1, first=fake_runtime.SLOW))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            head = "".join(f"{k}: {v}\r\n" for k, v in body.headers.items())
            s.sendall(f"POST /v2/models/fake/infer HTTP/1.1\r\n{head}\r\n".encode() + body.read())
            _until(lambda: slow_rows() > started)  # its batch runs (a second): the client leaves now
        _until(lambda: (now := _stats(c, "fake"))["execution_count"] > before["execution_count"]
               and now["fail"] > before["fail"])
        grown = _grown(_stats(c, "fake"), before)
        assert _sample(c, "vitc_client_disconnects_total", model="fake", stage="computing") == gone + 1
    assert grown == {"success": 0, "fail": 1, "queue": 0, "compute_infer": 0, "queue_ns": 0, "compute_ns": 0,
                     "inference_count": 0, "execution_count": 1, "batches": {1: 1}}, grown


def _until(condition: Any, within: float = 30.0) -> None:
    end = time.monotonic() + within
    while not condition():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.02)


# -- in process: /v1 and /v2, batched and unbatched, outputs NaN at will -------------------------------------------

@contextlib.contextmanager
def _nan_switch_app(tmp_path: Path, batched: bool) -> Iterator[tuple[httpx.Client, str]]:
    """A client of an app serving, on a runtime whose outputs MODE makes NaN, a bundle model (dynamic batching) or
    a repository model with max_batch_size 0; and the model's name."""
    with registered(_runtime("contract", MisbehavingBackend)):
        if batched:
            settings = Settings(models=[f"m={_bundle(tmp_path / 'b', 'contract')}"], backend="contract",
                                access_log=False)
        else:
            repo = tmp_path / "repo"
            add_version(repo, "m", "1", "contract")
            (repo / "m" / "config.pbtxt").write_text(UNBATCHED.replace('name: "fake"', 'name: "m"').replace(
                'platform: "fake_platform"', 'platform: "contract_platform" backend: "contract_backend"'))
            settings = Settings(model_repository=repo, access_log=False, graceful_timeout_s=5)
        MODE["out"] = ""
        try:
            with app_client(settings) as c:
                yield c, "m"
        finally:
            MODE["out"] = ""


def _requests(c: httpx.Client, name: str, status: int) -> None:
    """One image on /v1, a form of two, and a 2-row tensor on /v2: 4 inference requests, answered `status`."""
    one, two = animal_pngs(1)[0], animal_pngs(2)
    answers = [c.post(f"/v1/models/{name}/classify", content=one, headers=PNG),
               c.post(f"/v1/models/{name}/classify", files=[("file", (f"{i}.png", p, "image/png"))
                                                             for i, p in enumerate(two)]),
               c.post(f"/v2/models/{name}/infer", json=_v2(2))]
    assert [r.status_code for r in answers] == [status] * 3, [r.text for r in answers]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "max_batch_size-0"])
def test_v1_and_v2_requests_failing_after_compute_count_only_as_fail(tmp_path, batched):
    with _nan_switch_app(tmp_path, batched) as (c, name):
        before = _stats(c, name)
        MODE["out"] = "nan"
        _requests(c, name, 422)
        failed = _grown(_stats(c, name), before)
        # Rows executed: 1 + 2 images, 2 tensor rows; without batching each request is one inference of size 1.
        executed = 5 if batched else 4
        assert sum(b * n for b, n in failed["batches"].items()) == executed, failed
        assert failed["execution_count"] == sum(failed["batches"].values()), failed
        del failed["batches"], failed["execution_count"]
        assert failed == {"success": 0, "fail": 4, "queue": 0, "compute_infer": 0, "queue_ns": 0, "compute_ns": 0,
                          "inference_count": 0}, failed
        middle = _stats(c, name)
        MODE["out"] = ""
        _requests(c, name, 200)
        ok = _grown(_stats(c, name), middle)
        assert ok["queue_ns"] > 0 and ok["compute_ns"] > 0, ok
        assert (ok["success"], ok["fail"], ok["queue"], ok["compute_infer"]) == (4, 0, 4, 4), ok
        # With no request failing after its batch ran, the batches' inferences are the successful ones.
        assert ok["inference_count"] == sum(b * n for b, n in ok["batches"].items()) == executed, ok
        end = _stats(c, name)
        assert end["queue"] == end["compute_infer"] == end["success"] == 4, end
        # The Prometheus series keep their documented meaning: every batch executed, every request a batch took.
        assert _sample(c, "vitc_batch_size_count", model=name) == end["execution_count"]
        assert _sample(c, "vitc_compute_duration_seconds_count", model=name) == end["execution_count"]
        assert _sample(c, "vitc_queue_duration_seconds_count", model=name) == 8


# -- generate --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v2/models/{}/generate", "/v2/models/{}/generate_stream",
                                  "/v2/models/{}/versions/1/generate", "/v2/models/{}/versions/1/generate_stream"])
@pytest.mark.parametrize("model", ["fake", "nope", "logging"])
def test_generate_is_refused_with_a_reason_as_the_other_unserved_extensions(server, path, model):
    with client_of(server) as c:
        r = c.post(path.format(model), json={"text_input": "x"})
        trace = c.get(f"/v2/models/{model}/trace/setting")  # an unserved extension: no model lookup either
    assert (trace.status_code, r.status_code) == (400, 400), r.text
    error = r.json()["error"]
    assert error.startswith("vitc does not serve Triton's generate extension (GET /v2 lists the extensions it "
                            "serves)") and "/infer" in error, error
