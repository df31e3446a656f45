"""The benchmark CLIs' defects found by the hEI tester: secrets kept out of the results, results published all or
nothing, repeated list values refused, bounded answers, flags of a started server refused with a URL, headline
findings from firm cells only, library modules that say they are not commands, the open loop's words for a server
that fails, negative Server-Timing durations. Fast: stand-in servers in this process, hand-made documents."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from stand_in_http import StandInHandler, stand_in_server

from benchmarks import e2e, load, loadgen
from benchmarks.latency import main as latency_main
from benchmarks.library import COMMANDS
from benchmarks.report import publish
from models.cli import redact_secrets

REPO = Path(__file__).resolve().parents[1]

SECRET = "s3cr3t-token"
INFO = {"name": "m", "variant": "vit_c_micro", "runtime": "onnxruntime", "precision": "fp32", "device": "cpu",
        "max_batch": 8, "source": {"sha256": "x"}}
ANSWER = json.dumps({"model": "m", "predictions": [{"label": "cat", "index": 0, "score": 0.9}]}).encode()


@contextmanager
def _vitc_like(post_status: int = 200, post_body: bytes = ANSWER, timing: str | None = None) -> Iterator[str]:
    """A vitc-shaped server: its model list and description, and every classification answered alike."""

    class Handler(StandInHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_body(json.dumps({"models": [INFO]} if self.path == "/v1/models" else INFO).encode())

        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            self.send_body(post_body, post_status, {"Server-Timing": timing} if timing else None)

    with stand_in_server(Handler) as url:
        yield url


def _exit_code(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """A command's exit code, whether argparse exits (SystemExit) or main returns it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


# --- 1. a secret given on the command line is never written into the results ---------------------------------------

def test_redact_secrets_hides_every_spelling_of_a_bearer_token():
    argv = ["--api-key", SECRET, f"--api-key={SECRET}", "--api", SECRET, f"--server-args=--api-key {SECRET} --port 3",
            "--server-arg", f"--api-key={SECRET}", "-H", f"Authorization: Bearer {SECRET}", "--apiary", "kept"]
    assert redact_secrets(argv) == ["--api-key", "***", "--api-key=***", "--api", "***",
                                    "--server-args=--api-key *** --port 3", "--server-arg", "--api-key=***", "-H",
                                    "Authorization: Bearer ***", "--apiary", "kept"]


@pytest.mark.parametrize(("argv", "expected"), [
    (["--a", SECRET], ["--a", "***"]),  # argparse takes any unique prefix of --api-key
    ([f"--ap={SECRET}"], ["--ap=***"]),
    ([f"--server-args=--a {SECRET}"], ["--server-args=--a ***"]),
    (["--server-args", f"--api-key='{SECRET} 4' --model 'a b'"], ["--server-args", "--api-key=*** --model 'a b'"]),
    (["--server", f"--api-ke=\"{SECRET} 4\""], ["--server", "--api-ke=***"]),  # a prefix of --server-args
    ([f"--server-args=--api-key '{SECRET}"], ["--server-args=***"]),  # unbalanced: where the key ends is unknown
    (["--server-args", "--port 3 --model 'a b'"], ["--server-args", "--port 3 --model 'a b'"]),  # as given
])
def test_redact_secrets_takes_every_spelling_argparse_reads_as_the_key(argv, expected):
    """`--a K`, `--ap=K` and `--server-args="--api-key='K 4'"` were written with the key, or half of it."""
    assert redact_secrets(argv) == expected


@pytest.mark.parametrize("spelling", [["--api-key", SECRET], ["--a", SECRET]])
def test_the_api_key_is_not_written_into_the_end_to_end_results(tmp_path, capsys, spelling):
    """`--api-key s3cr3t-token` (or `--a s3cr3t-token`) was recorded verbatim in the -http.json and the Command line
    of the -http.md."""
    with _vitc_like() as url:
        rc = latency_main(["--http", url, *spelling, "--quick", "--concurrency", "1", "--duration", "0.3",
                           "--rate", "20", "--no-plots", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    written = sorted(tmp_path.iterdir())
    assert [p.suffix for p in written] == [".json", ".md"]
    for path in written:
        assert SECRET not in path.read_text(), path
    assert json.loads(written[0].read_text())["argv"][-2:] == ["--out", str(tmp_path)]
    assert f"{spelling[0]} ***" in written[1].read_text()


# --- 2. results are published all together or not at all -----------------------------------------------------------

def test_publish_leaves_nothing_when_one_file_cannot_be_staged(tmp_path):
    (tmp_path / "blocker").write_text("a file where the plot's directory should be")
    files = {tmp_path / "r.json": b"{}", tmp_path / "blocker" / "r.png": b"png"}
    with pytest.raises(NotADirectoryError):
        publish(files, "the results r")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]  # no lone JSON, no temporaries


def test_an_end_to_end_report_that_fails_to_render_writes_nothing(tmp_path):
    """The JSON was written first and the Markdown rendered after it: a failure (or a Ctrl-C) there left it alone."""
    with pytest.raises(KeyError):
        e2e.write_e2e_reports({"created": "2026-12-07T17:47:00Z", "host": "vm", "closed": []}, tmp_path, plots=False)
    assert list(tmp_path.iterdir()) == []


def _load_server_handler() -> type[StandInHandler]:
    """A vitc-shaped server for the load test: its model list, empty metrics and classifications."""

    class Handler(StandInHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = {"/v1/models": json.dumps({"models": [INFO]}).encode(), "/metrics": b""}.get(self.path)
            self.send_body(body if body is not None else json.dumps(INFO).encode())

        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            self.send_body(ANSWER)

    return Handler


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_load_test_saves_leaves_all_its_files_or_none(signum, tmp_path):
    """The JSON was published, then the plot drawn: a signal as soon as the JSON appeared left it alone (rc 130)."""
    out = tmp_path / "l.json"
    with stand_in_server(_load_server_handler()) as url:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.load", "--url", url, "--concurrency", "1",
                                 "--duration", "0.2", "--warmup", "0", "--images", "1", "--out", str(out)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    # The JSON is there only once everything was rendered and staged: the signal waits for the renames (a `note:`,
    # exit 0), or comes after them, while the command still prints what it wrote (interrupted there: 128 + signum);
    # either way every file of the run stands, and only those.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "l.png"], err
    assert proc.returncode in (0, 128 + signum), err


# --- 3. a list flag that repeats a value is refused ------------------------------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["--quick", "--batch-sizes", "1,8,1"], "argument --batch-sizes: 1 given more than once in '1,8,1'"),
    (["--quick", "--pairs", "micro,micro"], "--pairs 'micro,micro' names micro more than once"),
    (["--http", "start", "--concurrency", "4,4"], "argument --concurrency: 4 given more than once in '4,4'"),
])
def test_latency_refuses_a_repeated_list_value_before_any_work(argv, says, tmp_path, capsys):
    """`--batch-sizes 1,1` timed batch 1 twice and printed the first cell's latencies on both rows."""
    rc = _exit_code(latency_main, [*argv, "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "c").exists()


def test_the_load_test_refuses_a_repeated_concurrency(tmp_path, capsys):
    assert _exit_code(load.main, ["--concurrency", "1", "4", "1", "--out", str(tmp_path / "l.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m benchmarks.load: error: --concurrency 1 given more than once: give each level once"]


# --- 4. answers are read up to a bound -------------------------------------------------------------------------------

def _oversize_handler(announced: bool) -> type[StandInHandler]:
    """Answers every POST with MAX_ANSWER_BYTES + 1 bytes: with its Content-Length, or delimited by the close."""

    class Handler(StandInHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.read_body()
            body = b" " * (loadgen.MAX_ANSWER_BYTES + 1)
            if announced:
                self.send_body(body)
                return
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

    return Handler


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "read-until-close"])
def test_an_oversize_answer_is_a_failed_request_not_read_whole(announced):
    """The client read whole answers: a 1 GiB answer took 2 GB of its memory (256 connections in the open loop)."""
    with stand_in_server(_oversize_handler(announced), "/v1/models/m/classify") as url:
        client = loadgen.Client(e2e.classify_endpoint(url.removesuffix("/v1/models/m/classify"), "m", "image/png",
                                                      None))
        assert [client.post(b"x") for _ in range(2)] == [loadgen.TOO_LARGE] * 2
        assert loadgen.TOO_LARGE == "bad answer: too large (over 4 MiB)" and client.conn is None


def test_an_oversize_model_list_is_one_line_and_exit_2(tmp_path, capsys):
    class Handler(StandInHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", str(loadgen.MAX_GET_BYTES + 1))  # never sent: refused unread
            self.end_headers()

    with stand_in_server(Handler) as url:
        rc = latency_main(["--http", url, "--quick", "--no-progress", "--out", str(tmp_path)])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python benchmarks/latency.py: error: GET {url}/v1/models answered more than 64 MiB: not a vitc server's "
        "answer"]


# --- 5. flags of a started server are refused with a running server's URL ------------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["--backend", "openvino"], "--backend applies to --start only"),
    (["--model", "x", "--server-arg=--foo"], "--model, --server-arg apply to --start only"),
])
def test_the_load_test_refuses_flags_of_a_started_server_with_a_url(argv, says, tmp_path, capsys):
    """`--url ... --backend openvino` (or --model x) ran against the server as it was, exit 0, every model tested."""
    assert _exit_code(load.main, ["--url", "http://127.0.0.1:9", *argv, "--out", str(tmp_path / "l.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m benchmarks.load: error: {says} (the server it starts)"), err


def test_latency_refuses_runtime_with_a_running_server(tmp_path, capsys):
    """`--http URL --runtime openvino` timed an onnxruntime server and recorded `--runtime openvino`."""
    assert _exit_code(latency_main, ["--http", "http://127.0.0.1:9", "--runtime", "openvino", "--quick", "--out",
                                     str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python benchmarks/latency.py: error: --runtime applies to --http start only (the backend of the server it "
        "starts); a running server's runtime is its own"]
    assert list(tmp_path.iterdir()) == []


# --- 6. only firm cells are headline findings ------------------------------------------------------------------------

def test_an_indicative_cell_is_not_a_headline_finding():
    """Every --quick cell (a range of a few rounds, "indicative: ...") was listed under "C/P outside +-5 %"."""
    from benchmarks.report import markdown, summarize_doc

    doc = json.loads((REPO / "benchmarks" / "results" / "2026-12-05-0235-vm.json").read_text())
    firm, indicative, loose = [r for r in doc["ratios"] if r["pair"] == "mini"][:3]
    firm.update(ratio=0.90, flagged=True, verdict="C faster", firm=True)
    indicative.update(ratio=0.785, flagged=True, verdict="indicative: C faster", firm=False,
                      interval_kind="range of 3 rounds")
    loose.update(ratio=0.92, flagged=True, verdict="inconclusive", firm=False)
    for r in doc["ratios"]:
        r["flagged"] = r["flagged"] and r in (firm, indicative, loose)
    doc.pop("summary")  # rebuilt from the ratios, as a run writes it
    assert [r["firm"] for r in summarize_doc(doc)["mini"]["ratios"][:3]] == [True, False, False]
    lines = [ln for ln in markdown(doc).splitlines() if "C/P outside" in ln]
    cell = "{target} b{batch}: {ratio:.3f}"
    assert lines == [f"- mini: C/P outside +-5 %: {cell.format(**firm)}",
                     "- mini: C/P outside +-5 % in cells too short to conclude (not a finding): "
                     f"{cell.format(**indicative)} (indicative: range of 3 rounds), {cell.format(**loose)} "
                     "(inconclusive)"], lines


# --- 7. a library module run as a command says it is not one ---------------------------------------------------------

# Modules of benchmarks/ that run on their own: the commands, and the hand-written server the overhead benchmark starts.
RUNNABLE = {"__init__", "naive_server", *COMMANDS}


def test_every_library_module_run_as_a_command_says_so_in_one_line():
    """`python -m benchmarks.report --help` (or any argument) ran nothing and exited 0 without a word."""
    modules = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in RUNNABLE)
    assert {"report", "suite", "library"} <= set(modules) and "naive_server" not in modules
    for module in modules:
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert (proc.returncode, proc.stdout) == (2, ""), (module, proc.stderr[-2000:])
        assert proc.stderr.splitlines() == [
            f"python -m benchmarks.{module}: error: a library module of the benchmarks, not a command: run python -m "
            "benchmarks.latency | load | overhead | gpu_check"], module


# --- 8. an open loop short of its rate by failures says so, not "fell behind" ----------------------------------------

@contextmanager
def _closed_port() -> Iterator[str]:
    """A loopback URL nothing listens on: every connection refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("server, error", [(_closed_port, "ConnectionRefusedError"),
                                           (lambda: _vitc_like(post_status=500), "HTTP 500")],
                         ids=["down", "500"])
def test_an_open_loop_against_a_failing_server_names_the_failures(server, error):
    """A server that was down, or answered 500 at once, was said to have fallen behind (achieved 100 % below)."""
    with server() as url:
        s = loadgen.open_loop(e2e.classify_endpoint(url, "m", "image/png", None), [b"x"], rate=20.0, seconds=0.5,
                              warmup_s=0.1).summary()
    n = s["scheduled"]
    assert n > 0 and s["ok"] == 0 and s["errors"] == {error: n} and s["failed"] == n
    assert s["fell_behind"] is False
    doc = {"closed": [], "open": s, "single_stream": None, "bare": None, "overhead": None}
    line = next(x for x in e2e.format_e2e(doc).splitlines() if x.startswith("open loop"))
    assert line.endswith(f": {n} of the {n} requests scheduled in the window failed ({error} ×{n}), not answered late")
    assert "fell behind" not in line


def test_an_open_loop_whose_answers_time_out_still_fell_behind():
    s = loadgen.LoadResult("open", None, 10.0, 2.0, errors={loadgen.UNANSWERED: 20}, scheduled=20).summary()
    assert s["fell_behind"] is True and s["failed"] == 0


# --- 9. a negative Server-Timing duration is no timing ---------------------------------------------------------------

def test_a_negative_server_timing_duration_is_skipped():
    """`decode;dur=-5` was kept: the stage table printed a p50 of -5 ms."""
    assert loadgen.parse_server_timing("decode;dur=-5, compute;dur=2.5, encode;dur=-0.001, queue;dur=0") == {
        "compute": 2.5, "queue": 0.0}
    with _vitc_like(timing="decode;dur=-5, compute;dur=1") as url:
        s = loadgen.closed_loop(e2e.classify_endpoint(url, "m", "image/png", None), [b"x"], 1, 0.2,
                                warmup_s=0.0).summary()
    assert s["ok"] > 0 and list(s["server_timing_ms"]) == ["compute"]


# --- 10. the gpu-check file name the docs give is the one written ----------------------------------------------------

def test_the_documented_gpu_check_file_name_is_the_written_one():
    """README and gpu_check's docstring said <date>-<host>-gpu-check.json; the run wrote 2026-12-07-1741-vm-..."""
    from benchmarks.report import stem_name

    name = stem_name({"created": "2026-12-07T17:41:09Z", "host": "vm"}, "-gpu-check")
    assert name == "2026-12-07-1741-vm-gpu-check"
    readme = " ".join((REPO / "README.md").read_text().split())
    docstring = " ".join((REPO / "benchmarks" / "gpu_check.py").read_text().split('"""')[1].split())
    assert f"`<date>-<time>-<host>-gpu-check.{{json,md}}` (e.g. `{name}.json`, the time in UTC as HHMM)" in readme
    assert f"<date>-<time>-<host>-gpu-check.json / .md (e.g. {name}.json, the time in UTC as HHMM)" in docstring
    assert "<date>-<host>-gpu-check" not in readme + docstring
