"""The benchmark CLIs' defects found by the hEI tester: secrets kept out of the results, results published all or
nothing, repeated list values refused, bounded answers, flags of a started server refused with a URL, headline
findings from firm cells only, library modules that say they are not commands, the open loop's words for a server
that fails, negative Server-Timing durations. Fast: stand-in servers in this process, hand-made documents."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

from stand_in_http import StandInHandler, stand_in_server

from benchmarks.latency import main as latency_main
from models.cli import redact_secrets

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


# --- 1. a secret given on the command line is never written into the results ---------------------------------------

def test_redact_secrets_hides_every_spelling_of_a_bearer_token():
    argv = ["--api-key", SECRET, f"--api-key={SECRET}", "--api", SECRET, f"--server-args=--api-key {SECRET} --port 3",
            "--server-arg", f"--api-key={SECRET}", "-H", f"Authorization: Bearer {SECRET}", "--apiary", "kept"]
    assert redact_secrets(argv) == ["--api-key", "***", "--api-key=***", "--api", "***",
                                    "--server-args=--api-key *** --port 3", "--server-arg", "--api-key=***", "-H",
                                    "Authorization: Bearer ***", "--apiary", "kept"]


def test_the_api_key_is_not_written_into_the_end_to_end_results(tmp_path, capsys):
    """`--api-key s3cr3t-token` was recorded verbatim in the -http.json and the Command line of the -http.md."""
    with _vitc_like() as url:
        rc = latency_main(["--http", url, "--api-key", SECRET, "--quick", "--concurrency", "1", "--duration", "0.3",
                           "--rate", "20", "--no-plots", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    written = sorted(tmp_path.iterdir())
    assert [p.suffix for p in written] == [".json", ".md"]
    for path in written:
        assert SECRET not in path.read_text(), path
    assert json.loads(written[0].read_text())["argv"][-2:] == ["--out", str(tmp_path)]
    assert "--api-key ***" in written[1].read_text()
