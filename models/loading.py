"""The guard a vitc command is under while its modules load, before `models.cli.run` takes the signals over: a
Ctrl-C, SIGTERM or hang-up then is one line and exit 130 or 143, as later, not a KeyboardInterrupt traceback from
inside an import or a silent death. models/__init__ installs it first, before its own modules (a fifth of a second
on a busy machine), so it stands from the command's first import on; this module loads nothing of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

# vitc's packages whose modules are commands; each command's first import is models.cli (which loads this first).
COMMAND_PACKAGES = ("benchmarks", "export", "models", "serve", "train")

# The `python -m` name of the command being loaded, for its one line.
_loading: str | None = None


def stop_loading(signum: int, frame: object) -> None:
    """Before `run`, main has not started: nothing to clean up. An exception raised here, inside an import, would
    print a traceback (or be swallowed by importlib's callbacks): say why, and end at once with `run`'s codes."""
    stopped = signum != signal.SIGINT  # SIGTERM, or a hang-up: SIGTERM's words and code, as `run` says them
    if sys.stderr is not None:  # os.write: no buffered writer to re-enter if the signal came in the middle of one
        with contextlib.suppress(OSError, ValueError):
            os.write(sys.stderr.fileno(), f"{_loading}: {'terminated' if stopped else 'interrupted'}\n".encode())
    os._exit(143 if stopped else 130)


def loading_command() -> str | None:
    """`python -m X` when this process's program is vitc's command X (a module that ends in `cli.run`, which lifts
    the guard below), else None: a program that never calls `run` keeps Python's own handling."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name, origin = getattr(spec, "name", None) or "", getattr(spec, "origin", None)
    if name.partition(".")[0] not in COMMAND_PACKAGES or not origin:
        return None
    try:
        with open(origin, encoding="utf-8", errors="replace") as source:
            if "cli.run(" not in source.read():
                return None
    except OSError:
        return None
    return "python -m " + name.removesuffix(".__main__")


def guard_loading() -> None:
    """While vitc's command loads, until `run` starts: Ctrl-C, SIGTERM and SIGHUP stop it with `stop_loading`.
    Signals the process was started with ignored (`cmd &` in a script, nohup) stay ignored."""
    global _loading
    if threading.current_thread() is not threading.main_thread() or (prog := loading_command()) is None:
        return
    _loading = prog
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                            (signal.SIGHUP, signal.SIG_DFL)):
        if signal.getsignal(signum) == default:
            signal.signal(signum, stop_loading)
