"""The project's CLI convention, shared by every entry point: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import functools
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn, TypeVar


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line on stderr and exits 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high (bounded before anything is sized by it)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value
    return parse


def int_list(low: int, high: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, at least one, each in low..high (e.g. 1,8,32)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < low or max(values) > high:
            raise argparse.ArgumentTypeError(f"expected integers in {low}..{high}, got {text!r}")
        return values
    return parse


def device_arg(text: str) -> str:
    """An argparse type: a device name of models.device (whether it exists here is checked after parsing)."""
    from models.device import DEVICE_RULE, is_device  # at parse time: this module loads first, and stays light

    # The server's and the runtimes' rule: a measurement on cuda:100 could never be served there.
    if not is_device(text):
        raise argparse.ArgumentTypeError(f"must be {DEVICE_RULE}, got {text!r}")
    return text


def float_in(low: float, high: float, *, low_open: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number in (low, high] (or [low, high]); nan and inf are refused, since every
    comparison with nan is false and would let it through a later range check."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}], "
                                             f"got {text}")
        return value
    return parse


# How libraries say "out of memory" when they raise something other than MemoryError: torch's CPU allocator
# ("DefaultCPUAllocator: can't allocate memory"), torch.cuda.OutOfMemoryError ("CUDA out of memory"), C++
# std::bad_alloc surfacing through onnxruntime, OpenVINO or TensorRT bindings (RuntimeError), and a shared library
# that cannot be mapped under an address-space limit ("libtorch_cuda.so: failed to map segment", ImportError).
# A thread that could not start (EAGAIN): memory or a pids limit, the machine either way.
_NO_THREAD = ("resource temporarily unavailable", "can't start new thread")
_OOM_MARKERS = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc", "bad allocation",
                "not enough memory", "failed to allocate", "failed to map segment", "can't alloc",
                *_NO_THREAD)
# Bindings whose errors derive from Exception alone (onnxruntime's pybind11 RuntimeException, Fail, ...): their
# words are read as a RuntimeError's are.
_BINDING_MODULES = ("onnxruntime.",)
_OOM_SIZE = re.compile(r"tried to allocate ([\d.]+ ?(?:bytes|[KMGT]i?B))", re.IGNORECASE)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the machine failed, not the input
# The storage failing under the work, not a path the user gave: an I/O error (a bad disk, a lost NFS or iSCSI
# server), a file system the kernel remounted read-only after errors, a stale NFS handle, a corrupt file system.
# A permission, a file where a directory should be, a name that exists (EACCES, ENOTDIR, EEXIST, ...) stay the
# input's: the user can fix them.
_STORAGE_FAILED = (errno.EIO, errno.EROFS, errno.ESTALE, errno.EREMOTEIO, errno.ENOLINK,
                   *((errno.EUCLEAN,) if hasattr(errno, "EUCLEAN") else ()))


def memory_failure(exc: BaseException | None) -> BaseException | None:
    """The out-of-memory error behind `exc` (a MemoryError, ENOMEM, or an allocator's error message), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
            return exc
        if _library_error(exc) and any(m in str(exc).lower() for m in _OOM_MARKERS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _library_error(exc: BaseException) -> bool:
    """Whether `exc` is of the kinds a library reports its allocator's failures with."""
    return isinstance(exc, RuntimeError | ImportError | OSError) or type(exc).__module__.startswith(_BINDING_MODULES)


def out_of_memory(exc: BaseException) -> str | None:
    """One line for an allocation failure (see `memory_failure`), else None."""
    failure = memory_failure(exc)
    if failure is None:
        return None
    if any(m in str(failure).lower() for m in _NO_THREAD):
        return "out of memory or threads (a thread could not start: a memory, pids or ulimit -u limit)"
    size = _OOM_SIZE.search(str(failure))
    return "out of memory" + (f" (an allocation of {size.group(1)} failed)" if size else "")


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is the disk (or a quota, or a file size limit) running out: the machine, not the input."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def storage_failure(exc: BaseException) -> bool:
    """Whether `exc` is the storage failing (`disk_full`, or an I/O error, a file system gone read-only, ...):
    the machine, not the input."""
    return disk_full(exc) or (isinstance(exc, OSError) and exc.errno in _STORAGE_FAILED)


def say(line: str) -> None:
    """One line on stderr in one write: processes that share it (torchrun's ranks, unbuffered) cannot splice it."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class CommandError(Exception):
    """A command stopping with one line: `run` (or a `command` main) says `{prog}: error: {reason}`, exits `code`."""

    code = 1


class InputError(CommandError):
    """Bad input (an argument, a file given, a setting): exit 2, checked before the work starts where it can be."""

    code = 2


class WorkFailed(CommandError):
    """The work failed (the machine: out of memory, a full disk; or what it measured or ran failed): exit 1."""

    code = 1


def one_line(text: str) -> str:
    """`text` with its control characters escaped as repr escapes them: a path or name given with a newline (or an
    escape sequence) stays on the error's one line, and cannot forge another."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def last_line(exc: BaseException) -> str:
    """The last non-blank line of `exc`'s message (a DataLoader worker's error carries the worker's traceback text
    before it), else its type's name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def error_reason(exc: BaseException) -> str:
    """`exc`'s message whole, for its one line (`one_line` escapes a newline in a path it names, which `last_line`
    would cut there); the last line only of one carrying a traceback's text (a DataLoader worker's error)."""
    text = str(exc)
    if "Traceback (most recent call last)" in text:
        return last_line(exc)
    return text if text.strip() else type(exc).__name__


def report(prog: str, exc: CommandError) -> int:
    """Say `exc` as the command's one line, `{prog}: error: {reason}`; its exit code."""
    say(f"{prog}: error: {one_line(str(exc))}")
    return exc.code


_Main = TypeVar("_Main", bound=Callable[..., int | None])


def command(prog: str) -> Callable[[_Main], _Main]:
    """Decorate a command's main: an InputError or WorkFailed it raises is said as one line and returned as the exit
    code, so a caller in the same process (a test, another command) gets the code as `run` would exit with it."""
    def decorate(main: _Main) -> _Main:
        @functools.wraps(main)
        def checked(*args: object, **kwargs: object) -> int | None:
            try:
                return main(*args, **kwargs)
            except CommandError as exc:
                return report(prog, exc)
        return checked  # type: ignore[return-value]
    return decorate


def refuse_empty_paths(parser: argparse.ArgumentParser, paths: Iterable[tuple[str, str | None, str]]) -> None:
    """The parser's one-line error (exit 2) for the first of `paths`, (flag, value, advice) each, given an empty or
    blank value: Path("") is the current directory, so `FLAG "$DIR"` with DIR unset would read or write here."""
    from models.io import empty_path_problem  # here: a command's first import stays small

    if problem := next(filter(None, (empty_path_problem(*path) for path in paths)), None):
        parser.error(problem)


def machine_reason(exc: BaseException) -> str | None:
    """One line for `exc` when it is the machine failing (out of memory, a full disk, an I/O error), else None."""
    reason = out_of_memory(exc)
    if reason is None and storage_failure(exc):
        reason = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return reason


def machine_error(exc: BaseException, hint: str = "") -> WorkFailed | None:
    """The WorkFailed to raise when `exc` is the machine failing (`hint`: what to lower, or what was kept), else
    None: the caller handles `exc` as its own."""
    reason = machine_reason(exc)
    return None if reason is None else WorkFailed(reason + (f": {hint}" if hint else ""))


def machine_failure(exc: BaseException, prog: str, hint: str = "") -> int | None:
    """When `exc` is the machine failing (out of memory, a full disk): print it as one line (with `hint`, what to
    lower) and return exit code 1 (a failure of the work, not of the input). Otherwise None: the caller re-raises."""
    failed = machine_error(exc, hint)
    return None if failed is None else report(prog, failed)


# The third-party modules vitc imports, as a ModuleNotFoundError names them: (distribution, the extra in
# pyproject.toml that brings it; where several do, the serving one). A runtime's own packages (onnxruntime,
# OpenVINO, TensorRT) are not here: its `install` hint says how to get them where it is asked for. None of these
# extras brings an onnxruntime distribution, so following a hint never puts one beside the other.
# tests/test_packaging.py checks the table against pyproject.toml.
DEPENDENCY_EXTRAS: dict[str, tuple[str, str]] = {
    "fastapi": ("fastapi", "server"),
    "uvicorn": ("uvicorn", "server"),
    "httptools": ("httptools", "server"),
    "uvloop": ("uvloop", "server"),
    "python_multipart": ("python-multipart", "server"),
    "pydantic": ("pydantic", "server"),
    "pydantic_settings": ("pydantic-settings", "server"),
    "PIL": ("pillow", "server"),
    "prometheus_client": ("prometheus-client", "server"),
    "torch": ("torch", "train"),
    "torchvision": ("torchvision", "train"),
    "timm": ("timm", "train"),
    "safetensors": ("safetensors", "train"),
    "tqdm": ("tqdm", "train"),
    "matplotlib": ("matplotlib", "train"),
    "sklearn": ("scikit-learn", "train"),
    "onnx": ("onnx", "convert"),
    "onnxscript": ("onnxscript", "convert"),
    "nncf": ("nncf", "convert"),
}


# pyproject.toml's extras in its order, the order a hint names several in.
EXTRAS = ("server", "serve", "train", "convert", "export", "gpu", "dev")


@functools.cache  # the answer cannot change while the process runs
def from_checkout() -> bool:
    """Whether this vitc runs from its source checkout (the packages' parent holds vitc's pyproject.toml), where
    constraints.txt pins what is installed; else it is an installed distribution (a wheel), which carries neither."""
    from models.host import SOURCE, _is_vitc_project  # here: a command's first import stays small

    return _is_vitc_project(SOURCE)


def pip_command(extras: Iterable[str] = (), packages: Iterable[str] = (), where: str = "") -> str:
    """The pip command that installs vitc's `extras` and the distributions `packages`, for how this vitc is installed:
    in its checkout, pinned by constraints.txt; else through the installed vitc (pip reads the extras from its
    metadata: a wheel has no constraints.txt, and `.` would be the user's own project). `where`: a condition to
    say first ("on a machine with an NVIDIA GPU")."""
    chosen = _ordered(extras)
    names = [f"'{p}'" if "[" in p else p for p in packages]
    checkout = from_checkout()
    spec = ([f"'{'.' if checkout else 'vitc'}[{','.join(chosen)}]'"] if chosen else []) + names
    command = "pip install " + ("-c constraints.txt " if checkout else "") + " ".join(spec)
    context = ", ".join(c for c in ("in the vitc checkout" if checkout else "", where) if c)
    return f"{context}: {command}" if context else command


def extras_hint(extras: Iterable[str]) -> str:
    """What to install, in one phrase: "install the project's train and export extras (pip install ...)"."""
    chosen = _ordered(extras)
    return f"install the project's {_joined(chosen)} extra{'s' if len(chosen) > 1 else ''} ({pip_command(chosen)})"


def _ordered(extras: Iterable[str]) -> list[str]:
    """Each extra once, in pyproject.toml's order (one it does not name, a plug-in runtime's, last)."""
    return sorted(set(extras), key=lambda e: (EXTRAS.index(e) if e in EXTRAS else len(EXTRAS), e))


def _joined(items: Sequence[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def installed(module: str) -> bool:
    """Whether `module` can be imported (found without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module shadowed by a None entry, or a broken parent package
        return False


class MissingModules(ModuleNotFoundError):
    """Modules a command needs that are not installed: all of them, so one line names every extra to install."""

    def __init__(self, modules: Sequence[str]) -> None:
        super().__init__(f"No module named {modules[0]!r}" + (f" (nor {', '.join(modules[1:])})" if modules[1:]
                                                                else ""), name=modules[0])
        self.modules = tuple(modules)


def require(*modules: str) -> None:
    """MissingModules (which `run` turns into the extras to install) naming every one of `modules` that is not
    installed: checked up front, so a run does not fail at its end on what it needs last (the training curves), nor
    stop at the first missing extra when it needs two."""
    if missing := [m for m in modules if not installed(m)]:
        raise MissingModules(missing)


def missing_dependency(exc: BaseException, prog: str) -> int | None:
    """When `exc` is modules of the extras not being installed: print every extra to install as one line and return
    exit code 2. Otherwise None (vitc's own modules, a module of no extra)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    named = exc.modules if isinstance(exc, MissingModules) else (exc.name,)
    # `import sklearn.datasets` names sklearn when scikit-learn is absent, but the submodule when sklearn is broken
    modules = [m for name in named if (m := next((m for m in (name, name.partition(".")[0])
                                                  if m in DEPENDENCY_EXTRAS), None))]
    if not modules:
        return None
    what = [m if DEPENDENCY_EXTRAS[m][0] == m else f"{m} ({DEPENDENCY_EXTRAS[m][0]})" for m in dict.fromkeys(modules)]
    verb = "is" if len(what) == 1 else "are"
    extras = [DEPENDENCY_EXTRAS[m][1] for m in modules]
    print(f"{prog}: error: {_joined(what)} {verb} not installed: {extras_hint(extras)}", file=sys.stderr)
    return 2


def fill_closed_std_streams() -> None:
    """Point a closed stdout or stderr (`>&-`, `2>&-`; Python then sets sys.stdout or sys.stderr to None) at
    /dev/null: the run's lines and progress bar go nowhere instead of failing it, and the descriptor is not handed
    to the next file opened (the lock, a checkpoint), where C libraries' warnings to it would land."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:  # closed: the next open takes this number
            null = os.open(os.devnull, os.O_WRONLY)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:  # its own /dev/null: fd may by now be a file something else opened
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8", errors="replace"))  # for the process's life


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout`, Kubernetes and Slurm send), raised where the program is, so that the same
    cleanup as for Ctrl-C runs (temporary directories, locks) and the command says why it stopped."""


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the cleanup stops the process at once
    raise Terminated


_RUNNING = object()  # `run`'s code while main has not returned


def _no_temp_dir(exc: BaseException) -> bool:
    from models.io import no_temp_dir  # here: a command's first import stays small

    return no_temp_dir(exc)


def run(main: Callable[[], int | None], prog: str) -> NoReturn:
    """Exit with `main()`'s code; an InputError or WorkFailed is one line, `{prog}: error: {reason}`, and exit 2 or
    1; Ctrl-C is one line and exit 130, SIGTERM (until `main` installs its own handler, as the server does once it
    serves) one line and exit 143, also where the signal surfaced as another error raised from it (an import it
    interrupted), what was being written left as it was (the writers are atomic); the machine
    failing (`machine_failure`) one line and exit 1, a missing extra (`missing_dependency`) one line and exit 2, and
    a closed output pipe (`| head`) ends quietly."""
    main_thread = threading.current_thread() is threading.main_thread()
    # The program itself (`python -m X`), rather than a caller that goes on (a test calling this in-process), which
    # keeps its own signal handling.
    program = main_thread and sys._getframe(1).f_globals.get("__name__") == "__main__"
    if main_thread:
        signal.signal(signal.SIGTERM, _on_sigterm)
        if signal.getsignal(signal.SIGINT) is _stop_loading:  # Ctrl-C raises again, for main's cleanup
            signal.signal(signal.SIGINT, signal.default_int_handler)
    fill_closed_std_streams()
    code: object = _RUNNING
    try:
        try:
            code = main()
        finally:
            if program:
                # The outcome is known (main returned or raised): a signal from here on must not change it, while
                # stdout is flushed below (a slow reader holds that up), or while Python tears down (waiting for
                # threads, torch's and onnx's destructors: a second or more) into 143 without a word, or a
                # traceback. Python leaves an ignored signal ignored to the end, where its own handlers would fall
                # back to the default, which kills.
                _ignore_signals()
        sys.stdout.flush()
    except KeyboardInterrupt as exc:
        code = _stopped(prog, exc, code)
    except Exception as exc:
        if (stop := stopped_by(exc)) is not None:
            # The signal landed where it became another error (an ImportError "initialization failed" out of a C
            # extension's import, such as matplotlib's backend after the last step): it stopped the command.
            code = _stopped(prog, stop, code)
        elif isinstance(exc, CommandError):  # raised by a main that is not a `command` (which says it itself)
            code = report(prog, exc)
        elif isinstance(exc, BrokenPipeError):
            # Python would report the pipe again when it flushes stdout at exit: point stdout at /dev/null first.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = 141
        elif _no_temp_dir(exc):  # a read-only root file system without TMPDIR: the environment's to fix
            from models.io import NO_TEMP_DIR

            print(f"{prog}: error: {NO_TEMP_DIR}", file=sys.stderr)
            code = 2
        elif isinstance(exc, MemoryError) or _library_error(exc):  # unless the command said it
            code = machine_failure(exc, prog) or missing_dependency(exc, prog)
            if code is None:
                raise
        else:
            raise
    if program:
        _ignore_signals()  # where the signal above came before the signals were ignored
    elif main_thread:
        atexit.register(_ignore_signals)  # for the caller's own teardown
    raise SystemExit(code)


def stopped_by(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM (Terminated) that `exc` was raised from or while handling, if any."""
    seen: set[int] = set()
    cause = exc.__cause__ or exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _stopped(prog: str, exc: KeyboardInterrupt, code: object) -> object:
    """Say why the command stopped (Ctrl-C: 130, SIGTERM: 143), unless main had already returned its code."""
    if code is not _RUNNING:
        # It came after main returned (in the instant before the signals were ignored, or while an in-process
        # caller's stdout was flushed): main's code stands.
        return code
    stopped = isinstance(exc, Terminated)
    # A note main added (exc.add_note) says what of its work is kept: "finished runs are kept; ..."
    notes = "".join(f": {note}" for note in getattr(exc, "__notes__", ()))
    say(f"{prog}: {'terminated' if stopped else 'interrupted'}{one_line(notes)}")
    return 143 if stopped else 130


def _ignore_signals() -> None:
    """SIGTERM and Ctrl-C no longer stop the process (it is exiting with its command's code)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


# While a command's modules load (numpy, torch, onnx: up to a second or more), before `run` takes the signals over:
# the `python -m` name of the command, for its one line.
_loading: str | None = None

# vitc's packages whose modules are commands. Each command imports this module before anything else, so that a
# Ctrl-C or SIGTERM while the rest loads is one line and exit 130 or 143, as later, not a traceback (or a silent
# death by SIGTERM).
_COMMAND_PACKAGES = ("benchmarks", "export", "models", "serve", "train")


def _stop_loading(signum: int, frame: object) -> None:
    """Before `run`, main has not started: nothing to clean up. An exception raised here, inside an import, would
    print a traceback (or be swallowed by importlib's callbacks): say why, and end at once with `run`'s codes."""
    stopped = signum == signal.SIGTERM
    if sys.stderr is not None:  # os.write: no buffered writer to re-enter if the signal came in the middle of one
        with contextlib.suppress(OSError, ValueError):
            os.write(sys.stderr.fileno(), f"{_loading}: {'terminated' if stopped else 'interrupted'}\n".encode())
    os._exit(143 if stopped else 130)


def _loading_command() -> str | None:
    """`python -m X` when this process's program is vitc's command X (a module that ends in `cli.run`, which lifts
    the guard below), else None: a program that never calls `run` keeps Python's own handling."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name, origin = getattr(spec, "name", None) or "", getattr(spec, "origin", None)
    if name.partition(".")[0] not in _COMMAND_PACKAGES or not origin:
        return None
    try:
        with open(origin, encoding="utf-8", errors="replace") as source:
            if "cli.run(" not in source.read():
                return None
    except OSError:
        return None
    return "python -m " + name.removesuffix(".__main__")


def _guard_loading() -> None:
    """While vitc's command loads, until `run` starts: Ctrl-C and SIGTERM stop it with `_stop_loading`. Signals the
    process was started with ignored (`cmd &` in a script, nohup) stay ignored."""
    global _loading
    if threading.current_thread() is not threading.main_thread() or (prog := _loading_command()) is None:
        return
    _loading = prog
    for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) == default:
            signal.signal(signum, _stop_loading)


_guard_loading()
