"""CLI: `python -m serve --model exports/animals-vit_c [--model name=PATH ...] --backend onnxruntime ...`.

Flags override VITC_* environment variables. Any startup problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import argparse
import os
import re
from typing import TYPE_CHECKING, get_args

from models.cli import InputError, OneLineParser, command
from serve.errors import ServeError

PROG = "python -m serve"

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo


def _field(name: str) -> FieldInfo:
    """Setting `name`'s field: its default, bounds and type."""
    from serve.settings import Settings  # here: see build_parser

    return Settings.model_fields[name]


def shown(name: str, value: object) -> str:
    """A value of setting `name` as the help writes it: bytes in KiB/MiB/GiB, seconds as given, counts grouped."""
    from serve.settings import GiB, MiB

    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if name.endswith("_bytes") and value:
        size, unit = next(((size, unit) for size, unit in ((GiB, "GiB"), (MiB, "MiB"), (1024, "KiB"))
                           if value % size == 0), (1, "bytes"))
        return f"{value // size:,} {unit}"
    if isinstance(value, float) or _field(name).annotation is float:
        return f"{value:g}"
    return str(value) if name == "port" else f"{value:,}"  # a port is a number to type, not a quantity to read


def default(name: str, value: object = None) -> str:
    """`default VALUE`: setting `name`'s Settings default, or `value` for one whose default is None (computed)."""
    d = _field(name).get_default(call_default_factory=True)
    return f"default {shown(name, value if d is None else d)}"


def bound(name: str, which: str) -> int | float:
    """Setting `name`'s bound `which` (ge, gt, le, lt) as its Field declares it."""
    return next(getattr(m, which) for m in _field(name).metadata if hasattr(m, which))


def at_most(name: str) -> str:
    """`at most HIGH`: setting `name`'s upper bound."""
    return f"at most {shown(name, bound(name, 'le'))}"


def between(name: str) -> str:
    """`LOW to HIGH`: setting `name`'s bounds."""
    return f"{shown(name, bound(name, 'ge'))} to {shown(name, bound(name, 'le'))}"


def values(name: str) -> tuple[str, ...]:
    """The values a Literal setting takes."""
    return get_args(_field(name).annotation)


def choices(name: str, described: dict[str, str], sep: str = " | ") -> str:
    """The values of setting `name`, each with its description (if any) in parentheses; its default marked so."""
    d = _field(name).default

    def one(value: str, why: str) -> str:
        if value == d:
            return f"{value} (default: {why})" if why else f"{value} (default)"
        return f"{value} ({why})" if why else value

    return sep.join(one(v, why) for v, why in described.items())


def build_parser() -> argparse.ArgumentParser:
    # Here, not at module level: numpy, pydantic and the runtime registry take a fraction of a second to import, and
    # until models.cli.run has installed its SIGTERM handler a signal to PID 1 (the container) would be dropped.
    import runtimes
    from serve.server import DEFAULT_CONNECTIONS
    from serve.settings import Settings

    p = OneLineParser(
        prog=PROG, argument_default=argparse.SUPPRESS,
        description="Serve exported bundles over HTTP: /v1 image classification, the Open Inference Protocol "
                    "(/v2), Prometheus /metrics, docs at /docs.",
        epilog="Every flag is also an environment variable VITC_<SETTING> (e.g. VITC_MODELS=a,b for --model, "
               "VITC_API_KEY=..., VITC_ACCESS_LOG=false for --no-access-log); a misspelt one is refused; "
               "flags win. Startup problems: one line on stderr, exit code 2.",
    )
    # Defaults and bounds come from Settings (`default`, `at_most`, `between`, `choices`); "(default: ...)" in words
    # is a setting whose default is None, decided at start.
    p.add_argument("--model", dest="models", action="append", metavar="[NAME=]PATH",
                   help="bundle directory to serve (repeatable); NAME overrides the bundle's name")
    p.add_argument("--model-dir", help="serve every bundle found directly under this directory, each under its "
                                       "directory's name (as a Triton repository names its models)")
    p.add_argument("--model-repository",
                   help="serve every model of a Triton-style repository (python -m export.triton writes one); "
                        "one version of each: the newest, or the highest its config.pbtxt's version_policy lists")
    p.add_argument("--backend", help=f"{' | '.join(runtimes.names())} ({default('backend')})")
    p.add_argument("--device", help=choices("device", {"cpu": "", "cuda": "", "cuda:N": ""}))
    p.add_argument("--precision", help="artifact precision (default: the most precise servable one)")
    p.add_argument("--host", help=f"bind address ({default('host')})")
    p.add_argument("--port", type=int, help=f"port ({default('port')}; 0 picks a free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on everything but /v2/health/live, "
                                     "/v2/health/ready and the API docs (/docs, /redoc, /openapi.json); a model's "
                                     "own ready endpoint needs it: it tells which models exist (prefer "
                                     "VITC_API_KEY: flags show up in `ps`)")
    p.add_argument("--max-batch-size", type=int,
                   help=f"rows per batch ({default('max_batch_size')}, capped by the bundle)")
    p.add_argument("--max-queue-delay-ms", type=float,
                   help=f"how long a request waits for companions ({default('max_queue_delay_ms')})")
    p.add_argument("--max-queue-size", type=int,
                   help="images in progress per model (decoding, queued or running) before 503 "
                        f"({default('max_queue_size')})")
    p.add_argument("--threads", type=int,
                   help="intra-op threads per inference (default: the CPUs divided among the --parallel streams)")
    p.add_argument("--parallel", type=int, help="batches run at once (default: the backend's optimum for the hint)")
    p.add_argument("--openvino-hint", help=choices("openvino_hint", {
        "throughput": "several batches in flight, each on part of the CPUs; OpenVINO and onnxruntime on the CPU",
        "latency": "one batch at a time on every CPU"}))
    p.add_argument("--compile", action="store_true",
                   help="torch: torch.compile; on CUDA a CUDA graph per batch bucket, captured before ready")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="torch: NHWC activations for the stem's convolutions (default: on CUDA)")
    p.add_argument("--max-body-bytes", type=int,
                   help=f"request body limit ({default('max_body_bytes')}, {at_most('max_body_bytes')})")
    p.add_argument("--max-buffered-bytes", type=int,
                   help="request bodies held at once, all requests together, before 503 "
                        f"({default('max_buffered_bytes', Settings.model_construct().buffered_bytes_limit)}, at "
                        f"least --max-body-bytes, {at_most('max_buffered_bytes')})")
    p.add_argument("--max-connections", type=int,
                   help="connections open at once; one more gets 503 and is closed "
                        f"({default('max_connections', DEFAULT_CONNECTIONS)}, fewer if the open-file limit, ulimit "
                        "-n, is lower)")
    p.add_argument("--receive-timeout-s", type=float,
                   help="a request's headers, and then its body, must each arrive within this many seconds, "
                        f"else 408 and the connection is closed ({default('receive_timeout_s')})")
    p.add_argument("--max-image-pixels", type=int,
                   help=f"decoded pixel limit ({default('max_image_pixels')}, {at_most('max_image_pixels')})")
    p.add_argument("--max-files", type=int, help=f"images per multipart request ({default('max_files')})")
    p.add_argument("--jpeg-draft", choices=values("jpeg_draft"),
                   help="draft-decode big JPEGs (faster): " + choices("jpeg_draft", {
                       "measured": "only for models whose served-path record, python -m export.report --served, "
                                   "shows it costs <= 0.1 point", "always": "", "never": ""}, sep=", "))
    p.add_argument("--no-jpeg-draft", dest="jpeg_draft", action="store_const", const="never",
                   help="same as --jpeg-draft never")
    p.add_argument("--decode-threads", type=int, help="image decoding threads (default: all CPUs)")
    p.add_argument("--decode-queue", type=int,
                   help=f"decode jobs waiting for a thread before 503 ({default('decode_queue')})")
    p.add_argument("--decode-budget-pixels", type=int,
                   help=f"pixels being decoded at once, all requests together, before 503 "
                        f"({default('decode_budget_pixels')} or --max-image-pixels if larger, at least "
                        f"--max-image-pixels, {at_most('decode_budget_pixels')})")
    p.add_argument("--keep-alive-s", type=float, metavar="SECONDS",
                   help="an idle keep-alive connection is closed after this many seconds "
                        f"({default('keep_alive_s')}, {between('keep_alive_s')}); behind a proxy or load balancer "
                        "that reuses connections, set it above the proxy's idle timeout (AWS ALB 60, nginx upstream "
                        "keepalive_timeout 60, GCP 600), or it gets 502s")
    p.add_argument("--inference-timeout-s", type=float,
                   help="a batch running longer answers 504 and marks the model not ready "
                        f"({default('inference_timeout_s')})")
    p.add_argument("--no-strict-readiness", dest="strict_readiness", action="store_false",
                   help="/v2/health/ready says ready once started, whatever the models' state (Triton's "
                        "--strict-readiness=false); without it, 400 while a model the server knows is not ready "
                        "and was not unloaded (a failed load, a runtime not installed here), or while every model "
                        "is unloaded")
    # Any case, as Triton lowercases it (its material often writes --model-control-mode=EXPLICIT).
    p.add_argument("--model-control-mode", type=lambda v: v.strip().lower(), choices=values("model_control_mode"),
                   help="as Triton's: " + choices("model_control_mode", {
                       "none": "POST /v2/repository/models/NAME/load and /unload are refused, 503",
                       "explicit": "any client may load and unload models, and the server may start with none; "
                                   "combine with --api-key"}, sep=", "))
    p.add_argument("--graceful-timeout-s", type=float,
                   help="SIGTERM or Ctrl-C (SIGINT): how long in-flight requests may finish "
                        f"({default('graceful_timeout_s')}, {at_most('graceful_timeout_s')})")
    p.add_argument("--shutdown-delay", type=float, metavar="SECONDS",
                   help="SIGTERM or Ctrl-C (SIGINT): report not ready at once but go on answering for this long "
                        "before the drain, while a load balancer stops routing here "
                        f"({default('shutdown_delay')}, {at_most('shutdown_delay')}; Kubernetes: 5); a second "
                        "signal cuts it short")
    p.add_argument("--log-level",
                   help=choices("log_level", dict.fromkeys(values("log_level"), "")))
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request log lines")
    return p


def settings_args(argv: list[str] | None = None) -> dict[str, object]:
    """The flags given, as Settings arguments (flags not given are left to VITC_* variables and defaults; which
    models a model directory from the environment gives way to is Settings' rule)."""
    return vars(build_parser().parse_args(argv))


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Check the settings and serve until stopped; a startup problem is one line (InputError), exit 2."""
    args = settings_args(argv)
    if "api_key" in args and not str(args["api_key"]).strip():  # --api-key "$TOKEN" with TOKEN unset
        raise InputError("--api-key is empty: give the key, or leave --api-key out to serve without authentication")
    from pydantic import ValidationError  # here: a missing server extra is one line (models.cli.run), not a traceback

    try:
        from serve.settings import Settings, clipped, flag, unknown_environment

        near, _ = unknown_environment(dict(os.environ))
        if near:  # a misspelt setting would be ignored without a word (VITC_MODEL: "no models to serve")
            raise InputError(f"environment variable {near[0]} (every setting is VITC_<SETTING>; see --help)")
        settings = Settings(**args)
        from serve.server import run

        run(settings)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = err.get("loc") or ()
        where = str(loc[0]) if loc else ""
        # An item of a list setting (VITC_MODELS='[1]', a second --model): pydantic's path `models.0` is no name.
        item = f"item {loc[1] + 1}: " if len(loc) > 1 and isinstance(loc[1], int) else ""
        msg = str(err.get("msg")).removeprefix("Value error, ")
        bound = (err.get("ctx") or {}).get("le")
        if where.endswith("_bytes") and isinstance(bound, int) and bound >= 1 << 30:  # 17179869184 means 16 GiB
            msg += f" ({bound / (1 << 30):g} GiB)"
        # Named as the user gives them: the flag, and the environment variable (pydantic names the fields).
        fields = Settings.model_fields
        if where in fields:
            # A flag that only turns a setting off (--no-access-log) is not what the variable says: name its values.
            values = "=true|false" if flag(where).startswith("--no-") else ""
            where = f"{flag(where)} (VITC_{where.upper()}{values})"
        msg = re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: flag(m[0]) if m[0] in fields else m[0], msg)
        if where:
            raise InputError(f"invalid setting {where}: {item}{msg} (got {clipped(repr(err.get('input')))})") from None
        raise InputError(f"invalid settings: {msg}") from None  # a rule across settings: the message names them
    except ServeError as exc:
        raise InputError(str(exc)) from None
    return 0


if __name__ == "__main__":
    from models import cli

    # SIGTERM while the models load stops the start (exit 143; as PID 1 in a container a signal without a handler
    # is dropped); once serving, serve.server's handler takes over and uvicorn drains the requests in flight.
    cli.run(main, PROG)
