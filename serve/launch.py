"""Run `python -m serve` as a child process on a loopback port: for tests, the load test and local tools.

The child runs in REPO, where the caller's vitc lies, so that it imports that vitc (`child_env`, which
benchmarks.overhead and benchmarks.gpu_check use for their children too); the caller's relative paths are made
absolute. It binds port 0 (a free port, no race with other processes) and logs it in its "listening" line, which this
module reads back from the log file (so the child's --log-level must stay at info or debug).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the directory that holds vitc's packages (site-packages, installed)
MAX_REASON = 300  # characters of the server's own error quoted in a one-line failure


def child_env(env: Mapping[str, str], python: str = sys.executable) -> dict[str, str]:
    """`env` for a vitc command that `python` runs with REPO as its directory (where the caller's vitc lies, so the
    child imports the same vitc, whatever the caller's directory holds: a train.py or serve.py of the user's never
    stands in for vitc's): an installed vitc's REPO is site-packages, which `python -m` would put ahead of the
    standard library (a stray uuid.py there replaced it), so this interpreter then leaves it off its path
    (PYTHONSAFEPATH) and finds vitc as any installed package; another interpreter keeps it (how it finds vitc)."""
    out = dict(env)
    if out.get("PYTHONPATH"):  # PYTHONPATH=. means the caller's directory, not the child's
        out["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else p for p in out["PYTHONPATH"].split(os.pathsep))
    if REPO.name in ("site-packages", "dist-packages") and python == sys.executable:
        out["PYTHONSAFEPATH"] = "1"
    return out


def last_error(log: str) -> str | None:
    """The server's last error in `log` as one bounded line; None when there is no error."""
    # Its last JSON log line at level error or critical (with the exception's last line), or a refused start's
    # `python -m serve: error: ...` line (`error: ...` from an older vitc), whichever is later; else the last line
    # of a Python traceback (a crash before logging was set up).
    for line in reversed(log.splitlines()):
        line = line.strip()
        reason = ""
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                exc = str(entry.get("exc") or "").strip()
                reason = str(entry.get("msg") or "").strip() + (f": {exc.splitlines()[-1]}" if exc else "")
        elif line.startswith(("python -m serve: error:", "error:")):  # it refused to start: a setting, a bundle
            reason = line.partition("error:")[2]
        if reason.strip():
            return _bounded(reason)
    if "Traceback (most recent call last)" in log:
        return _bounded(next(line for line in reversed(log.splitlines()) if line.strip()))
    return None


def _bounded(text: str) -> str:
    """One line of at most MAX_REASON characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


PATH_FLAGS = ("--model", "--model-dir", "--model-repository")
PATH_ENV = {"VITC_MODEL_DIR": "--model-dir", "VITC_MODEL_REPOSITORY": "--model-repository", "VITC_MODELS": "--model"}


def _absolute(flag: str, value: str) -> str:
    """A path value of `flag` (`--model` takes `name=path` too) made absolute; an empty path is left as it is, for
    the server to refuse (abspath would turn it into this directory)."""
    from serve.settings import model_path_text

    path = model_path_text(value) if flag == "--model" else value
    if not path.strip():
        return value
    return value.removesuffix(path) + os.path.abspath(path)


def _path_flag(option: str, options: list[str]) -> str | None:
    """The path flag that `option` names as `python -m serve`'s parser reads it (in full, or abbreviated to a
    prefix of one option only: argparse's allow_abbrev), or None."""
    if option not in options:
        found = [o for o in options if o.startswith(option)] if option.startswith("--") else []
        option = found[0] if len(found) == 1 else ""
    return option if option in PATH_FLAGS else None


def absolute_paths(args: list[str]) -> list[str]:
    """`python -m serve` arguments with their paths made absolute: the server runs in its caller's directory, and its
    log and answers then name the same files to a reader anywhere else."""
    from serve.__main__ import build_parser

    options = [o for action in build_parser()._actions for o in action.option_strings]
    out: list[str] = []
    items = iter(args)
    for arg in items:
        option, eq, value = arg.partition("=")
        if eq and (flag := _path_flag(option, options)):
            out.append(f"{option}={_absolute(flag, value)}")
        elif (flag := _path_flag(arg, options)) and (value := next(items, None)) is not None:
            out += [arg, _absolute(flag, value)]
        else:
            out.append(arg)
    return out


def absolute_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the paths of VITC_MODEL_DIR, VITC_MODEL_REPOSITORY and VITC_MODELS made absolute, for the same
    reason as `absolute_paths` (the settings read these names in upper case alone); a malformed VITC_MODELS is left for
    the server to refuse."""
    from serve.settings import split_models

    out = dict(env)
    for name, value in env.items():
        flag = PATH_ENV.get(name)
        if flag == "--model" and value.strip():
            try:
                models = split_models(value)
            except ValueError:
                continue
            if isinstance(models, list) and all(isinstance(m, str) for m in models):
                out[name] = json.dumps([_absolute(flag, m) for m in models])
        elif flag:
            out[name] = _absolute(flag, value)
    return out


class ServerProcess:
    """A started server: `url`, `port`, `proc`; `wait_ready()`, `logs()`, `stop()` (SIGTERM, exit code)."""

    def __init__(self, args: list[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
                 timeout: float = 60.0, python: str = sys.executable, cwd: str | os.PathLike | None = None) -> None:
        child = child_env(absolute_env({**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}), python)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open for the child's whole life
        self.proc = subprocess.Popen(
            [python, "-m", "serve", "--host", "127.0.0.1", "--port", "0", *absolute_paths(args)],
            cwd=REPO if cwd is None else cwd, stdout=self._log, stderr=subprocess.STDOUT, env=child,
        )
        try:
            self.port = self._wait_port(timeout)
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_port(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.logs().splitlines():
                if '"listening"' in line:
                    return int(json.loads(line)["port"])
            self._check_alive()
            time.sleep(0.05)
        raise RuntimeError(self._failure(f"server did not start within {timeout:g}s"))

    def _failure(self, what: str) -> str:
        """`what` and the server's own reason on the first line (what a one-line report shows), the log tail after."""
        logs = self.logs()
        reason = last_error(logs)
        return f"{what}{': ' + reason if reason else ''}\n{logs[-3000:]}"

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(self._failure(f"server exited with code {self.proc.returncode}"))

    def wait_ready(self, timeout: float = 60.0) -> ServerProcess:
        """Block until /v2/health/ready answers 200."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            self._check_alive()
            time.sleep(0.05)
        raise RuntimeError(self._failure(f"server not ready within {timeout:g}s"))

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful), SIGKILL after `timeout`; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


START_TIMEOUT_S = 60.0
COMPILE_START_TIMEOUT_S = 600.0  # torch.compile, then a CUDA graph captured per batch bucket, before "ready"
READY_AFTER_PORT_S = 5.0  # at least, once the port is open (the models are loaded by then)
_TRUE = ("1", "true", "yes", "on")


def start_timeout(args: list[str], env: dict[str, str] | None = None) -> float:
    """How long a server started with `args` (and `env` over this process's environment) may take to be ready:
    minutes when it compiles its models (--compile or VITC_COMPILE), else a minute."""
    compiles = "--compile" in args or {**os.environ, **(env or {})}.get("VITC_COMPILE", "").lower() in _TRUE
    return COMPILE_START_TIMEOUT_S if compiles else START_TIMEOUT_S


def start(args: list[str], log_path: str | os.PathLike, env: dict[str, str] | None = None,
          python: str = sys.executable, timeout: float | None = None,
          cwd: str | os.PathLike | None = None) -> ServerProcess:
    """Start a server (with `python`, another environment's interpreter if given, in `cwd` if given: REPO by
    default) and wait until it is ready, at most `timeout` seconds in all (default `start_timeout(args, env)`: the
    models load before the port opens)."""
    timeout = start_timeout(args, env) if timeout is None else timeout
    end = time.monotonic() + timeout
    server = ServerProcess(args, log_path, env, timeout=timeout, python=python, cwd=cwd)
    try:
        return server.wait_ready(max(READY_AFTER_PORT_S, end - time.monotonic()))
    except BaseException:
        server.stop()
        raise
