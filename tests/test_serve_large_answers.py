"""Large ranked answers (/v1 `top_k` over many files, v2 `classification` over many rows): an answer of more than
deps.MAX_RANKED entries is refused before anything is decoded or inferred, and an admitted large one is built off the
event loop, so liveness is answered meanwhile. The backend is tests/fake_runtime.py with a 100,000-class head
(the most a bundle may have), served by a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fake_runtime
import httpx
import numpy as np
import pytest
from test_serve_fixtures import animal_pngs, client_of, fake_server, softmax
from test_top_k_bounds import wide_bundle

from models.bundle import MAX_CLASSES, read_manifest
from serve.launch import ServerProcess
from serve.tensor import image_tensor

CLASSIFY = "/v1/models/fake/classify"
INFER = "/v2/models/fake/infer"
STATS = "/v2/models/fake/stats"
MAX_RANKED = 100_000  # serve.routes.deps.MAX_RANKED, as the README documents it


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return wide_bundle(tmp_path_factory.mktemp("widest") / "fake", MAX_CLASSES)


@pytest.fixture(scope="module")
def served(bundle: Path, tmp_path_factory) -> Iterator[tuple[ServerProcess, Path]]:
    """The server, and the file the fake runtime appends every row it computes to."""
    tmp = tmp_path_factory.mktemp("widest-server")
    with fake_server(bundle, tmp) as s:
        yield s, tmp / "computed.log"


@pytest.fixture
def client(served) -> Iterator[httpx.Client]:
    with client_of(served[0]) as c:
        yield c


def _files(n: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    png = animal_pngs(1)[0]
    return [("file", (f"{i}.png", png, "image/png")) for i in range(n)]


def _v2(rows: int, k: int) -> dict:
    x = np.random.default_rng(rows).uniform(-1, 1, (rows, 3, 32, 32)).astype(np.float32)
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
            "outputs": [{"name": "logits", "parameters": {"classification": k}}]}


def _computed(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def _refused(client: httpx.Client, log: Path, send) -> httpx.Response:  # noqa: ANN001 - a request-sending callable
    """`send()`'s answer, asserted to have inferred nothing: no row computed, the model's statistics unchanged."""
    stats, computed = client.get(STATS).json(), _computed(log)
    r = send()
    assert client.get(STATS).json() == stats
    assert _computed(log) == computed
    return r


# --- refused before inference; at the bound, answered ----------------------------------------------------------------


@pytest.mark.parametrize("files, k", [(2, MAX_RANKED // 2 + 1), (64, 1563), (4, MAX_CLASSES)])
def test_v1_files_times_top_k_over_the_bound_is_a_422_before_decoding(client, served, files, k):
    r = _refused(client, served[1], lambda: client.post(f"{CLASSIFY}?top_k={k}", files=_files(files)))
    assert r.status_code == 422, r.text[:300]
    assert r.json() == {"error": f"the answer would rank {files} files x top_k {k} = {files * k:,} predictions; at "
                                 f"most {MAX_RANKED:,} per request: send fewer files per request, or a smaller top_k"}
    most = MAX_RANKED // files  # the same files with the largest top_k the bound admits
    r = client.post(f"{CLASSIFY}?top_k={most}", files=_files(files))
    assert r.status_code == 200, r.text[:300]
    for answer in r.json():
        scores = [q["score"] for q in answer["predictions"]]
        assert len({q["index"] for q in answer["predictions"]}) == most and scores == sorted(scores, reverse=True)


INT64_MAX = (1 << 63) - 1


@pytest.mark.parametrize("rows, k, shown", [(2, MAX_CLASSES, str(MAX_CLASSES)), (8, 12_501, "12501"),
                                            (2, INT64_MAX, f"{INT64_MAX} (clamped to the output's {MAX_CLASSES:,})")])
def test_v2_rows_times_classification_over_the_bound_is_a_400_before_inference(client, served, rows, k, shown):
    n = rows * min(k, MAX_CLASSES)
    r = _refused(client, served[1], lambda: client.post(INFER, json=_v2(rows, k)))
    assert r.status_code == 400, r.text[:300]
    assert r.json() == {"error": f"the answer would rank {rows} rows x classification {shown} = {n:,} entries; at "
                                 f"most {MAX_RANKED:,} per request: send fewer rows per request, a smaller "
                                 "classification, or ask for the raw FP32 output (no classification) and rank it "
                                 "yourself"}
    most = MAX_RANKED // rows
    r = client.post(INFER, json=_v2(rows, most))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["outputs"][0]["shape"] == [rows, most]


# --- the largest answer: ranked right, and built while the server answers others ------------------------------------


def _live_while(server: ServerProcess, path: str, **request) -> tuple[httpx.Response, float, float,
                                                                       list[tuple[float, float]]]:
    """POST `request` (a large one) to `path` while probing /v2/health/live back to back: the big answer, its
    encode stage (Server-Timing, s), when its headers arrived, and each probe's (sent, answered)."""
    probes: list[tuple[float, float]] = []
    done = threading.Event()

    def probe() -> None:
        with client_of(server) as c:
            while not done.is_set():
                sent = time.monotonic()
                assert c.get("/v2/health/live").status_code == 200
                probes.append((sent, time.monotonic()))
                time.sleep(0.005)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        # Uncompressed (compression runs off the loop on its own), and timed at its headers, not at its body's end.
        headers = {"accept-encoding": "identity", **request.pop("headers", {})}
        with client_of(server) as c, c.stream("POST", path, headers=headers, **request) as r:
            arrived = time.monotonic()
            r.read()
    finally:
        done.set()
        prober.join()
    assert r.status_code == 200, r.text[:300]
    stages = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    return r, float(stages["encode"]) / 1e3, arrived, probes


def _answered_while_encoding(encode: float, arrived: float, probes: list[tuple[float, float]]) -> int:
    """Probes sent and answered inside the big answer's encode stage (its middle: the stage ends about when the
    answer's headers arrive, which the margins allow for)."""
    start, end = arrived - 0.9 * encode, arrived - 0.1 * encode
    return sum(start <= sent and answered <= end for sent, answered in probes)


def _logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    """What the fake runtime computes for one row `x`."""
    return fake_runtime.logits(np.load(bundle / fake_runtime.WEIGHTS), x)[0]


def test_the_largest_v1_answer_ranks_as_numpy_does_while_liveness_is_answered(served, bundle):
    png = animal_pngs(1)[0]
    r, encode, arrived, probes = _live_while(served[0], f"{CLASSIFY}?top_k={MAX_RANKED}", content=png,
                                             headers={"content-type": "image/png"})
    p = softmax(_logits(bundle, image_tensor(read_manifest(bundle), png)))
    predictions = r.json()["predictions"]
    assert [q["index"] for q in predictions] == np.argsort(-p, kind="stable").tolist()
    assert np.array_equal([q["score"] for q in predictions], np.sort(p)[::-1])
    assert all(q["label"] == f"c{q['index']}" for q in predictions)
    # Built on the event loop, the encode stage (hundreds of ms) answered no probe until it ended.
    assert _answered_while_encoding(encode, arrived, probes) >= 1, (encode, arrived, probes[-20:])


@pytest.mark.parametrize("k", [MAX_RANKED, INT64_MAX])
def test_the_largest_v2_answer_ranks_as_numpy_does_while_liveness_is_answered(served, bundle, k):
    body = _v2(1, k)
    r, encode, arrived, probes = _live_while(served[0], INFER, json=body)
    logits = _logits(bundle, np.asarray(body["inputs"][0]["data"], np.float32).reshape(1, 3, 32, 32))
    out = r.json()["outputs"][0]
    assert out["shape"] == [1, MAX_CLASSES]
    assert out["data"] == [f"{logits[i]:f}:{i}:c{i}" for i in np.argsort(-logits, kind="stable")]
    assert _answered_while_encoding(encode, arrived, probes) >= 1, (encode, arrived, probes[-20:])


# --- documented, and held in the decode budget ----------------------------------------------------------------------


def test_the_bound_is_the_one_the_readme_and_openapi_document(client):
    from serve.routes import deps

    assert deps.MAX_RANKED == MAX_RANKED
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert ("| ranked entries in one answer: /v1 files × `top_k`, v2 rows × `classification` (a count above the "
            f"output's size counts as that size) | {MAX_RANKED:,}: ") in readme
    params = client.get("/openapi.json").json()["paths"]["/v1/models/{name}/classify"]["post"]["parameters"]
    top_k = next(p for p in params if p["name"] == "top_k")
    assert top_k["description"].endswith(f"with several files, files x top_k at most {MAX_RANKED:,} (422)")


def test_a_large_answer_that_finds_the_decode_budget_full_is_busy_naming_the_answer():
    from serve.routes.deps import answer_memory
    from serve.workpool import Busy, PixelBudget

    budget = PixelBudget(1000, wait_s=0)
    failed: list[BaseException] = []

    def build() -> None:  # in a thread, as the work pool builds it
        try:
            with answer_memory(budget, lambda: 50 * 1000):
                pass
        except Busy as exc:
            failed.append(exc)

    with budget.reserve(1):
        worker = threading.Thread(target=build)
        worker.start()
        worker.join()
    assert [str(e) for e in failed] == ["the server's decode budget is in use (1 of 1,000 pixels); building this "
                                        "answer needs 1,000"]
    assert budget.used == 0
    build()  # alone, an answer larger than the budget holds all of it
    assert not failed[1:]
