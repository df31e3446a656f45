"""The project's CLI convention, shared by every entry point: bad input is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import functools
import importlib.machinery
import importlib.util
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import NoReturn, TypeVar

from models.extras import missing_dependency
from models.extras import pip_command as pip_command  # README's "Adding a runtime": a runtime's `install` line
from models.failures import library_error, machine_reason
from models.io import import_fcntl
from models.loading import loading_command, stop_loading
from models.oneline import one_line as one_line  # the commands' one line, shared with what serve answers

# vitc's top-level packages (pyproject.toml's packages.find). An editable install finds them after the module path
# has been searched, so a directory of one of these names without __init__.py in the current directory (or on
# PYTHONPATH) becomes the namespace package `import` takes instead: models.build_model, runtimes.Backend and
# serve.__version__ are then missing (an ImportError traceback), and its modules run instead of vitc's.
_PACKAGES = ("benchmarks", "data", "export", "models", "runtimes", "serve", "train")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the directory that holds vitc's packages
# The packages whose __init__ the commands take names from (runtimes' re-exports, serve.__version__): one of them
# shadowed breaks every command. Any other shadowed by a directory holding none of its modules changes nothing
# that runs (a checkpoints folder named models/: `from models.cli import ...` still finds vitc's), and is left alone.
# tests/test_shadowed_packages.py checks this list against the code.
INIT_NEEDED = ("runtimes", "serve")


def _is_module_dir(path: str) -> bool:
    """Whether a subdirectory of vitc's package is one of its modules: a package, or a directory of .py files."""
    try:
        with os.scandir(path) as entries:
            return any(e.name.endswith(".py") and e.is_file() for e in entries)
    except OSError:
        return False


def _module_names(package_dir: str) -> set[str]:
    """The modules vitc's package directory offers as `package.NAME` (its own, a few dozen entries): its .py files
    and its subpackages; a data folder (benchmarks/results, data/embedded) is no module, and nothing imports it."""
    try:
        with os.scandir(package_dir) as entries:
            found = {e.name.removesuffix(".py") if e.name.endswith(".py") else e.name for e in entries
                     if not e.name.startswith(".") and (e.name.endswith(".py") and e.is_file()
                                                       or e.is_dir() and _is_module_dir(e.path))}
    except OSError:
        return set()
    return found - {"__init__"}


def _shadows_a_module(directory: str, names: Iterable[str]) -> bool:
    """Whether `directory` holds a module of one of `names` that import would take instead of vitc's: a file of a
    module suffix, or a directory of the name (a namespace package, whatever it holds). A few stat calls per name,
    never a listing: a data/ of 200,000 images costs what an empty one does."""
    suffixes = importlib.machinery.all_suffixes()
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isdir(path) or any(os.path.isfile(path + suffix) for suffix in suffixes):
            return True
    return False


def shadowing_directory() -> tuple[str, str] | None:
    """(package, directory) when a directory without __init__.py stands in for vitc's `package` and that changes
    what runs: the commands need the package's __init__ (INIT_NEEDED), or the directory holds a module of one of
    vitc's module names. A harmless one (a models/ of checkpoints, a data/ of images, vitc's own
    benchmarks/results) is left alone; a wheel's regular package in site-packages wins over such a directory, as
    does the checkout's own where it is the current directory."""
    for package in _PACKAGES:
        ours = os.path.join(_ROOT, package)
        try:
            spec = importlib.util.find_spec(package)  # a top-level name: found, not imported
        except (ImportError, ValueError):
            continue
        if spec is None or spec.origin is not None or not os.path.isdir(ours):
            continue  # vitc's own package; or this install has no such package (the serving image has no train)
        for directory in spec.submodule_search_locations or ():
            if os.path.isdir(directory) and (package in INIT_NEEDED
                                             or _shadows_a_module(directory, _module_names(ours))):
                return package, directory
    return None


def refuse_shadowed_packages() -> None:
    """A command stops here, one line and exit 2, when a directory shadows one of vitc's packages (the fix named);
    a program that only imports vitc gets an ImportError saying the same."""
    if (found := shadowing_directory()) is None:
        return
    package, directory = found
    parent = os.path.dirname(os.path.abspath(directory))
    with contextlib.suppress(OSError):
        if os.path.samefile(parent, os.curdir):
            directory = "./" + os.path.basename(directory)
    fix = ("run from another directory, or set PYTHONSAFEPATH=1" if directory.startswith("./") else
           f"rename it, or take {parent} off the module path (PYTHONPATH)")
    reason = f"{directory} (a directory without __init__.py) shadows vitc's package {package!r}: {fix}"
    if (prog := loading_command()) is None:
        raise ImportError(reason, name=package)
    print(f"{prog}: error: {reason}", file=sys.stderr)
    raise SystemExit(2)


def refuse_unsupported_platform() -> None:
    """A command stops here, one line and exit 2, where Python has no fcntl (Windows: models.io's writers lock with
    it, and the commands stop on POSIX signals), before any work; a program that imports this module gets the same
    words as an ImportError."""
    try:
        import_fcntl()
    except ImportError as exc:
        reason = str(exc)
    else:
        return
    if (prog := loading_command()) is None:
        raise ImportError(reason, name="fcntl")
    print(f"{prog}: error: {reason}", file=sys.stderr)
    raise SystemExit(2)


MAX_ERROR_CHARS = 1000  # of an argument error's reason: every choice of a long list fits


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line on stderr and exits 2 (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes what it refuses, and lists unrecognized arguments raw: a value with a newline forged a
        # second line, and a 5,000-digit --port was echoed whole.
        message = one_line(message)
        if len(message) > MAX_ERROR_CHARS:
            message = f"{message[:MAX_ERROR_CHARS]}... ({len(message):,} characters)"
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


def repeated(values: Iterable[object]) -> list[object]:
    """The values given more than once, in the order first given: a list flag names each case once (a repeated
    batch size was measured twice and reported with the first one's numbers)."""
    seen: set[object] = set()
    return list(dict.fromkeys(v for v in values if v in seen or seen.add(v)))


def int_list(low: int, high: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, at least one, each in low..high and given once (e.g. 1,8,32)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < low or max(values) > high:
            raise argparse.ArgumentTypeError(f"expected integers in {low}..{high}, got {text!r}")
        if twice := repeated(values):
            raise argparse.ArgumentTypeError(f"{', '.join(map(str, twice))} given more than once in {text!r}: give "
                                             "each value once")
        return values
    return parse


# A secret's spelling on a command line: a bearer token given to --api-key, `=`-joined or as the next token, also inside
# a flag string of more `python -m serve` flags (latency's --server-args='--api-key K', load's --server-arg), or after
# "Bearer". The parsers keep argparse's abbreviations (launch and latency read serve's `--por`, `--model-rep`), so
# every prefix argparse may take for these flags counts: a prefix another option shares is refused before anything
# is written, and redacting it as well costs nothing.
SECRET_FLAG = "--api-key"
FLAG_STRING = "--server-args"
_BEARER = re.compile(r"(\bBearer\s+)\S+", re.IGNORECASE)
REDACTED = "***"


def _takes_as(option: str, flag: str) -> bool:
    """Whether argparse may read `option` as `flag`: the flag in full, or a prefix of it (allow_abbrev)."""
    return len(option) > 2 and option.startswith("--") and flag.startswith(option)


def _redacted_flags(text: str) -> str:
    """A flag string with its secrets redacted (shlex-split, so a quoted key goes whole); as given when it holds
    none, REDACTED whole when it does not split (unbalanced quotes: where the key ends is unknown)."""
    import shlex  # only here: this module loads with every command

    try:
        words = shlex.split(text)
    except ValueError:
        return REDACTED
    redacted = redact_secrets(words)
    if redacted == words:
        return text
    # shlex.join, but with the marker left bare (`--api-key ***`, not `'--api-key=***'`): it stands for a value
    # that was there, not for a shell glob
    return " ".join(w if shlex.quote(w.replace(REDACTED, "x")) == w.replace(REDACTED, "x") else shlex.quote(w)
                    for w in redacted)


def _redacted(token: str, previous: str | None) -> str:
    """`token` with its secret redacted, `previous` the token before it (`--api-key K`: K is the next token)."""
    if previous is not None and _takes_as(previous, SECRET_FLAG):
        return REDACTED
    if previous is not None and _takes_as(previous, FLAG_STRING):
        return _redacted_flags(token)
    option, eq, value = token.partition("=")
    if eq and _takes_as(option, SECRET_FLAG):
        return f"{option}={REDACTED}"
    if eq and _takes_as(option, FLAG_STRING):
        return f"{option}={_redacted_flags(value)}"
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, token)


def redact_secrets(argv: Iterable[str]) -> list[str]:
    """`argv` with every secret's value replaced by REDACTED, for command lines written into results and logs."""
    tokens = list(argv)
    return [_redacted(token, tokens[i - 1] if i else None) for i, token in enumerate(tokens)]


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


def machine_error(exc: BaseException, hint: str = "") -> WorkFailed | None:
    """The WorkFailed to raise when `exc` is the machine failing (`hint`: what to lower, or what was kept), else
    None: the caller handles `exc` as its own."""
    reason = machine_reason(exc)
    return None if reason is None else WorkFailed(reason + (f": {hint}" if hint else ""))


def write_failed(exc: BaseException, out: str | os.PathLike) -> WorkFailed | None:
    """The WorkFailed (exit 1) to raise when the machine failed while the file `out` was written (a full disk, an I/O
    error: `machine_error`), said as `REASON: OUT was not written`, else None: the caller says what is wrong with
    `out` (exit 2). A read-only file system is the latter: a command that did not probe `out` before its work was
    given a read-only place. Nothing is lost either way: the writers are atomic, an earlier file stays as it was."""
    if isinstance(exc, OSError) and exc.errno == errno.EROFS:
        return None
    # Without its file name: the one that failed is the temporary written beside `out` (or none, for a write).
    bare = OSError(exc.errno, exc.strerror) if isinstance(exc, OSError) else exc
    return machine_error(bare, f"{os.fspath(out)} was not written")


def machine_failure(exc: BaseException, prog: str, hint: str = "") -> int | None:
    """When `exc` is the machine failing (out of memory, a full disk): print it as one line (with `hint`, what to
    lower) and return exit code 1 (a failure of the work, not of the input). Otherwise None: the caller re-raises."""
    failed = machine_error(exc, hint)
    return None if failed is None else report(prog, failed)


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


def _on_hangup(signum: int, frame: object) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the terminal is gone: another hang-up must not cut the cleanup short
    raise Terminated  # SIGTERM's path: said as "terminated", exit 143


@contextlib.contextmanager
def hangup_terminates() -> Iterator[None]:
    """While the body runs, SIGHUP (the terminal closed) stops the command as SIGTERM does: its cleanup runs (a
    started server or a step's process group stopped, temporary directories removed) and one line says so. Its default
    ends the process without a word and leaves children of their own sessions running. Not under nohup (SIGHUP
    ignored: asked to outlive the terminal), nor outside the main thread (no handlers there)."""
    # Nested in another (its handler already set): left to the outer one, whose cleanup a restore here would leave
    # open to a second hang-up.
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGHUP) in (signal.SIG_IGN, _on_hangup):
        yield
        return
    previous = signal.signal(signal.SIGHUP, _on_hangup)
    try:
        yield
    finally:
        # Put back unless taken over meanwhile: a hang-up's handler ignores the next ones for the cleanup still to
        # come (the one line, the exit), and `run` ignores every signal once the outcome is known; the default put
        # back there would end the process without a word (exit 129). None: a handler not set from Python.
        if signal.getsignal(signal.SIGHUP) is _on_hangup:
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)


# Ctrl-Cs and SIGTERMs whose exception Python discarded (`_keep_discarded`), for `raise_discarded_signal`.
_discarded: list[KeyboardInterrupt] = []


def _keep_discarded(unraisable: object) -> bool:
    """For `sys.unraisablehook`: keep a Ctrl-C or SIGTERM that its handler raised where Python discards exceptions
    (a `__del__`, a weakref callback, an at-fork hook) for `raise_discarded_signal`, instead of printing it. It was
    lost there: the run trained on and exited 0. Returns whether it was one."""
    exc = getattr(unraisable, "exc_value", None)
    if not isinstance(exc, KeyboardInterrupt):
        return False
    _discarded.append(exc)
    return True


def raise_discarded_signal() -> None:
    """Raise the Ctrl-C or SIGTERM that Python discarded since the last call, if any. Long work calls this at its
    safe points (between batches, before it saves): the signal stops it there, as it would have where it came.
    Not raised from the discarding place itself: anything that runs there, a handler included, is discarded too."""
    if _discarded:
        kind = type(_discarded[0])
        _discarded.clear()
        raise kind


@contextlib.contextmanager
def _discarded_signals_kept() -> Iterator[None]:
    """While the body runs: `_keep_discarded` before the unraisable hook in place (which prints the rest)."""
    previous = sys.unraisablehook

    def hook(unraisable: object) -> None:
        if not _keep_discarded(unraisable):
            previous(unraisable)  # type: ignore[arg-type]
    sys.unraisablehook = hook
    try:
        yield
    finally:
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


def _set_handlers(handlers: dict[int, object]) -> BaseException | None:
    """signal.signal for each, all set even where a pending signal's handler raises (signal.signal runs those first,
    and sets nothing then: it is called again); returns the first such exception, for the caller to raise."""
    raised: BaseException | None = None
    for signum, handler in handlers.items():
        for _ in range(3):  # a handler raises once per signal: a third failure is signal.signal's own
            try:
                signal.signal(signum, handler)  # type: ignore[arg-type]
                break
            except BaseException as exc:  # a Terminated or KeyboardInterrupt too: the caller raises it
                raised = raised or exc
    return raised


def _set_mask(how: int, signals: Iterable[int]) -> tuple[set[int], BaseException | None]:
    """signal.pthread_sigmask, whose change is made even where a pending signal's handler then raises -> (the mask
    before, that exception)."""
    try:
        return signal.pthread_sigmask(how, signals), None
    except BaseException as exc:  # a Terminated or KeyboardInterrupt too: the caller raises it
        return set(), exc


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM arriving while the body runs (a DataLoader forking its workers) are raised as it ends.

    Python ran their handlers where the signal landed: inside the at-fork hooks, which discard the exception, or
    half way through starting the workers (an iterator that could not shut them down, a traceback). Meanwhile they
    are recorded by stand-in handlers, and blocked in this thread, so a child forked here starts with them blocked
    and dies of none before it has taken them over (`train.pipeline`'s worker ignores Ctrl-C, and keeps SIGTERM
    blocked for a thread that ends it only on its parent's)."""
    held: list[int] = []
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():  # handlers are the main thread's only
        previous = {s: h for s in _DEFERRED if callable(h := signal.getsignal(s))}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ())  # as it is, to restore
    try:
        if (raised := _set_handlers(dict.fromkeys(previous, lambda signum, _frame: held.append(signum)))) is not None:
            raise raised  # a signal that came before the body: as it would have been
        if (raised := _set_mask(signal.SIG_BLOCK, _DEFERRED)[1]) is not None:
            raise raised
        yield
    finally:
        # Unblocked first, while the stand-ins record: one that waited blocked is noted, not raised where the real
        # handlers would stay out. Every step is taken whatever one raises (another signal's handler).
        late = _set_mask(signal.SIG_SETMASK, mask)[1]
        late = _set_handlers(previous) or late
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)  # the real handler raises here (Terminated, KeyboardInterrupt)
        if late is not None:
            raise late
        raise_discarded_signal()  # one discarded before (a `__del__`): this is a safe point too


@contextlib.contextmanager
def signals_caught() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP caught while the body runs and raised again on leaving (main thread): a child
    process started inside is recorded before the interrupt unwinds past it (Popen interrupted while it waits for
    the exec would leave the child running with nobody to stop it). Not a blocked signal mask: the child would
    inherit that. An ignored one stays ignored (nohup, `cmd &`): the child inherits that too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():  # None: a handler not set from Python, which only the default stands for
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for s in dict.fromkeys(caught):
            if s == signal.SIGHUP and previous[s] in (signal.SIG_DFL, None):
                # Its default would end the process on the spot, the child just recorded left running: a hang-up
                # takes SIGTERM's path instead, as under `run` (hangup_terminates).
                raise Terminated
            signal.raise_signal(s)  # now to the handler it was meant for


_RUNNING = object()  # `run`'s code while main has not returned


def _no_temp_dir(exc: BaseException) -> bool:
    from models.io import no_temp_dir  # here: a command's first import stays small

    return no_temp_dir(exc)


def run(main: Callable[[], int | None], prog: str) -> NoReturn:
    """Exit with `main()`'s code; an InputError or WorkFailed is one line, `{prog}: error: {reason}`, and exit 2 or
    1; Ctrl-C is one line and exit 130, SIGTERM (until `main` installs its own handler, as the server does once it
    serves) and SIGHUP (the terminal closed; not under nohup) one line and exit 143, also where the signal surfaced
    as another error raised from it (an import it interrupted), what was being written left as it was (the writers
    are atomic); the machine failing (`machine_failure`) one line and exit 1, a missing extra
    (`missing_dependency`) one line and exit 2, and a closed output pipe (`| head`) ends quietly."""
    main_thread = threading.current_thread() is threading.main_thread()
    # The program itself (`python -m X`), rather than a caller that goes on (a test calling this in-process), which
    # keeps its own signal handling.
    program = main_thread and sys._getframe(1).f_globals.get("__name__") == "__main__"
    if main_thread:
        signal.signal(signal.SIGTERM, _on_sigterm)
        # Ctrl-C raises again, for main's cleanup; a hang-up is SIGTERM's (hangup_terminates, below)
        for signum, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGHUP, signal.SIG_DFL)):
            if signal.getsignal(signum) is stop_loading:
                signal.signal(signum, default)
    fill_closed_std_streams()
    code: object = _RUNNING
    try:
        # A closed terminal stops every command as SIGTERM does (its default would kill it without a word, leaving
        # locks, temporary directories and started servers behind); not under nohup.
        with hangup_terminates():
            try:
                with _discarded_signals_kept() if main_thread else contextlib.nullcontext():
                    returned = main()
                    # One that Python discarded while main ran (in a __del__) and main did not raise itself (only
                    # training looks for one): it came before main returned, and stops the command as such.
                    raise_discarded_signal()
                    code = returned
            finally:
                if program:
                    # The outcome is known (main returned or raised): a signal from here on must not change it,
                    # while stdout is flushed below (a slow reader holds that up), or while Python tears down
                    # (waiting for threads, torch's and onnx's destructors: a second or more) into 143 without a
                    # word, or a traceback. Python leaves an ignored signal ignored to the end, where its own
                    # handlers would fall back to the default, which kills.
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
        elif isinstance(exc, MemoryError) or library_error(exc):  # unless the command said it
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
    """SIGTERM, Ctrl-C and SIGHUP no longer stop the process (it is exiting with its command's code)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


refuse_unsupported_platform()  # at the command's first import, before any module that needs fcntl
refuse_shadowed_packages()  # at the command's first import: before it asks the shadowed package for anything
