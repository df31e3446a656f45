"""Atomic file and directory writes and content hashes, shared by every stage (no torch)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, NoReturn

from models.oneline import first_line


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


NO_TEMP_DIR = ("no usable temporary directory (TMPDIR, /tmp, /var/tmp, /usr/tmp and the current directory are "
               "missing or not writable): set TMPDIR to a writable directory")


def no_temp_dir(exc: BaseException) -> bool:
    """Whether `exc` is tempfile finding no writable directory (torch asks for one when it is first imported)."""
    return isinstance(exc, FileNotFoundError) and "No usable temporary directory" in str(exc)


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why `path` is not a regular file to read, from its stat alone (never opened: a FIFO would block the reader,
    a device never end), or None when it is one (through symbolic links): "is missing" when nothing is there,
    "is a symbolic link to nothing", "is not a regular file (a FIFO)", or the OSError's reason for a symbolic link
    loop ("Too many levels of symbolic links"). OSError for what stat cannot tell (no permission to search)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "is a symbolic link to nothing" if os.path.islink(path) else "is missing"
    except NotADirectoryError:  # a file where a directory of the path should be
        return "is missing"
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        return exc.strerror or str(exc)
    if stat.S_ISREG(st.st_mode):
        return None
    return f"is not a regular file ({_file_kind(st.st_mode)})"


def _file_kind(mode: int) -> str:
    """What a file that is not a regular one is, from its mode ("a FIFO", "a directory", ...)."""
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a file")


def read_regular_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """At most `max_bytes` + 1 bytes of `path`, a regular file (through symbolic links, as `not_a_file` takes
    them); ValueError "is not a regular file (a FIFO)" for anything else, told from the descriptor it opened without
    waiting (a FIFO is never waited on, a device never read, whatever was swapped in after a check), OSError when it
    cannot be opened or read. The caller refuses more than `max_bytes` (the + 1 tells it there was more)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"is not a regular file ({_file_kind(mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read(max_bytes + 1)  # never more than the cap, even when the file grows while it is read


def ensure_dir(path: Path) -> None:
    """`mkdir -p path`, with the real reason when a part of it is not a directory: mkdir's exist_ok re-raises
    "File exists" for a file, a symlink loop or a dangling symlink."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        os.stat(path)  # ELOOP for a symlink loop, ENOENT for a dangling link
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None


def resolve_path(path: Path) -> Path:
    """`path.resolve()`, a symlink loop raised as OSError (ELOOP) as os.stat raises it: Python 3.11's resolve
    raises RuntimeError, which no caller catching OSError expects."""
    try:
        return path.resolve()
    except RuntimeError:
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


NAME_MAX = 255  # bytes in one name on ext4, xfs, btrfs and tmpfs; pathconf says otherwise where it can
PATH_MAX = 4096  # bytes in a path the kernel takes, its closing NUL included
# The temporaries of atomic_write_bytes and atomic_dir are named ".<name>.<8 random characters>.tmp" (".old"), so
# the name they stand beside must leave room for these 14 bytes.
TEMP_NAME_EXTRA = len("..12345678.tmp")


def _name_max(path: str | os.PathLike) -> int:
    """The longest name the file system holding `path` takes (its nearest existing directory decides)."""
    try:
        where = Path(os.path.abspath(path))
    except OSError:  # the current directory was removed
        return NAME_MAX
    for d in where.parents:
        try:
            limit = os.pathconf(d, "PC_NAME_MAX")
        except (OSError, ValueError):  # not there (yet), or not a directory: ask its parent
            continue
        return limit if limit > 0 else NAME_MAX
    return NAME_MAX


def out_name_problem(path: str | os.PathLike) -> str | None:
    """Why the file system will refuse to create `path` by its spelling alone, or None: a name in it longer than
    the file system takes (the last one with room for its temporary, TEMP_NAME_EXTRA bytes more) or a path longer
    than PATH_MAX. Checked before the work: found at the write, ENAMETOOLONG costs the work and a traceback."""
    raw = os.fsencode(path)
    if len(raw) >= PATH_MAX:
        return f"the path is {len(raw)} bytes long; a path can have at most {PATH_MAX - 1}"
    parts = [p for p in raw.split(b"/") if p]
    limit = _name_max(path)
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        room = limit - TEMP_NAME_EXTRA if last else limit
        if len(part) > room:
            shown = os.fsdecode(part[:24]) + "..."
            why = (f" (the file system takes {limit}, and the temporary file written beside it adds "
                   f"{TEMP_NAME_EXTRA})") if last else ""
            return f"the name {shown!r} is {len(part)} bytes; at most {room} fit{why}"
    return None


def empty_path_problem(flag: str, value: str | None, advice: str) -> str | None:
    """`FLAG is empty: ADVICE` when a path flag was given an empty or blank value, else None. Path("") is the current
    directory: an unset variable in `FLAG "$DIR"` would silently read, or write, whatever is here."""
    if value is None or value.strip():
        return None
    return f"{flag} is empty: {advice}"


def out_inside_problem(out: str | os.PathLike, folder: str | os.PathLike, what: str, harm: str, *,
                       flag: str = "--out") -> str | None:
    """`FLAG OUT lies inside WHAT FOLDER: HARM` when `out` is `folder` or under it once both are resolved (symlinks
    and `..` followed), or why they cannot be resolved; else None."""
    if not os.fspath(folder).strip():  # no folder given (the reader refuses it): nothing to be inside
        return None
    try:
        root, target = resolve_path(Path(folder)), resolve_path(Path(out))
    except OSError as exc:  # a symlink loop
        return f"cannot resolve {exc.filename}: {exc.strerror or exc}"
    if target.is_relative_to(root):
        return f"{flag} {out} lies inside {what} {root}: {harm}"
    return None


def out_file_problem(out: str | os.PathLike, example: str, *,
                     inside: tuple[str | os.PathLike, str, str] | None = None,
                     existing: Callable[[Path], str | None] | None = None, links: bool = True,
                     noun: str = "file name", flag: str = "--out") -> str | None:
    """Why `FLAG OUT` (--out by default) cannot be the file a command writes, or None; each command raises it as its
    own error.

    Checked in this order: a name the file system refuses (`out_name_problem`); a path inside `inside`, a tuple
    (folder, what, harm) for `out_inside_problem`; a symbolic link, unless `links`; a directory (the rename onto it
    would fail last: "give a NOUN such as OUT/EXAMPLE"); then, for a path already there, `existing(path)`: why it
    must not be replaced, or None to replace it (no `existing`: always replaced).
    """
    if problem := out_name_problem(out):
        return f"{flag}: {problem}"
    if inside is not None and (why := out_inside_problem(out, *inside, flag=flag)):
        return why
    path = Path(out)
    try:
        if not links and path.is_symlink():
            return f"{flag} {out} is a symbolic link; give the path of the file itself"
        if path.is_dir():
            return f"{flag} {out} is a directory; give a {noun} such as {path / example}"
        if existing is not None and os.path.lexists(path):
            return existing(path)
    except OSError as exc:  # a directory on the way that cannot be searched (a symlink loop reads as absent)
        return f"{flag} {out}: {exc.strerror or exc}"
    return None


def replace_refused(flag: str, out: str | os.PathLike) -> str:
    """The refusal of an existing `FLAG OUT` that only --overwrite replaces (serve.tensor's, serve.sample's rule)."""
    return f"{flag} {out} already exists; nothing was changed: pass --overwrite to replace it, or give a new path"


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def committing(what: str) -> Iterator[None]:
    """Run a commit and its cleanup to the end: Ctrl-C (or a SIGTERM that Python turns into an exception) arriving
    meanwhile is held, then only noted on stderr. Raised at the commit point, it would report "interrupted" for an
    output already in place and leave its temporaries; the commit is renames, so the hold is short."""
    if threading.current_thread() is not threading.main_thread():  # signals are handled on the main thread only
        yield
        return
    held: list[int] = []
    previous = {s: signal.getsignal(s) for s in _HELD_SIGNALS}
    raising = [s for s, handler in previous.items() if callable(handler)]  # not SIG_DFL, SIG_IGN or a C handler
    for s in raising:
        signal.signal(s, lambda signum, _frame: held.append(signum))
    try:
        yield
    finally:
        for s in raising:
            signal.signal(s, previous[s])
    if held:
        names = " and ".join(dict.fromkeys(signal.Signals(s).name for s in held))
        print(f"note: {names} arrived while publishing {what}; that was finished first", file=sys.stderr)


def default_mode(base: int) -> int:
    """`base` filtered by the process umask: temp files would otherwise stay owner-only (0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask




def stage(path: Path, data: bytes) -> str:
    """`data` written and synced to a temporary file beside `path` (removed again if that fails); its name."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode(0o666))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    ensure_dir(path.parent)
    tmp = stage(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def strict_json_bytes(obj: Any) -> bytes:
    """`obj` as pretty, strict JSON (what `read_strict_json` reads back): ValueError with a one-line reason for NaN,
    Infinity, a value JSON has no spelling for (a set, bytes, an object) or nesting deeper than MAX_JSON_DEPTH."""
    if _json_depth(obj) > MAX_JSON_DEPTH:  # the reader refuses it; json.dumps would also recurse without a bound
        raise ValueError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    try:
        return (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:  # a set or an object; NaN or Infinity; a circular reference
        raise ValueError(f"not strict JSON: {first_line(exc, 300)}") from None


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write pretty, strict JSON; ValueError (nothing written) for what strict JSON cannot hold."""
    atomic_write_bytes(path, strict_json_bytes(obj))


class DirectoryBusy(RuntimeError):
    """Another process is writing the same directory with `atomic_dir`."""


LOCK_RETRIES = 8
# vitc runs on POSIX systems only (pyproject.toml's classifiers, the README): its writers lock with fcntl, which Windows
# lacks.
POSIX_ONLY = ("vitc runs on Linux and macOS only, not on Windows: this Python ({platform}) has no fcntl module, which "
              "vitc's file locks need")


def import_fcntl() -> ModuleType:
    """fcntl, imported where a lock is taken (the rest of this module, read by programs that only read bundles and
    checkpoints, needs none); ImportError in one line saying vitc is POSIX-only where Python has none (Windows)."""
    try:
        import fcntl
    except ImportError:
        raise ImportError(POSIX_ONLY.format(platform=sys.platform), name="fcntl") from None
    return fcntl


def busy(target: Path) -> str:
    """What a second writer of `target` is told: the collision is transient, not its input's fault."""
    return f"another process is writing {target}: retry when it finishes"


@contextlib.contextmanager
def writer_lock(target: Path, lock: Path | None = None) -> Iterator[None]:
    """An exclusive lock beside `target` (`.<name>.lock`, or the file `lock`) held while one process writes it,
    deleted afterwards; DirectoryBusy when another process holds it.

    The lock file is deleted while still locked, so a writer that opened the old file must not trust its lock:
    after locking it checks the path still names the file it locked, and starts over when it does not.
    """
    fcntl = import_fcntl()
    path = lock if lock is not None else target.parent / f".{target.name}.lock"
    for _ in range(LOCK_RETRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, default_mode(0o666))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryBusy(busy(target)) from None
        if same_file(fd, path):
            break
        os.close(fd)  # the previous writer deleted it between our open and lock: take the new one
    else:
        raise DirectoryBusy(busy(target))
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock


def same_file(a: int | str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `b` names the file `a` is (a path, or an open file descriptor), a link or another spelling included;
    False when either is not there."""
    try:
        return os.path.samestat(os.fstat(a) if isinstance(a, int) else os.stat(a), os.stat(b))
    except OSError:
        return False


def remove_stale(target: Path) -> bool:
    """Clean up after a writer that died (killed mid-write); safe while we hold the writer lock. Whether there was
    anything to clean up.

    Killed between its two renames, it left no `target` and the old directory in `.<name>.*.old/x`: that one is
    put back. Every other temporary is an unfinished write and is removed.
    """
    # Exactly the names tempfile.mkdtemp gives them (8 random characters): a sibling target such as `<name>.v2`
    # has temporaries that a looser pattern would match, and they are not ours.
    own = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")
    leftovers = sorted(p for p in target.parent.iterdir() if own.fullmatch(p.name) and p.is_dir()
                       and not p.is_symlink())
    if not target.exists():
        for old in leftovers:
            if old.suffix == ".old" and (old / "x").is_dir():
                os.replace(old / "x", target)
                break
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return bool(leftovers)


MOUNTINFO = "/proc/self/mountinfo"
_MOUNTINFO_ESCAPE = re.compile(rb"\\([0-7]{3})")  # the kernel writes a space in a path as \040


def _mount_points() -> set[str]:
    """The mount points this process sees (/proc/self/mountinfo, field 5); empty where there is no such file."""
    try:
        with open(MOUNTINFO, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    points = set()
    for line in lines:
        if len(fields := line.split(b" ")) > 4:
            points.add(os.fsdecode(_MOUNTINFO_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), fields[4])))
    return points


def is_mount_point(path: str | os.PathLike) -> bool:
    """Whether the directory `path` names is a mount point (a volume, a bind mount), which the kernel refuses to
    rename (EBUSY) and into which nothing can be renamed from outside it (EXDEV). A symbolic link is not one:
    renaming it moves the link. os.path.ismount alone misses a bind mount within one file system (a directory of
    the same device bound elsewhere, or onto itself: only the inode differs from its parent's), so the mount table
    decides too. False for what is absent or unreadable."""
    where = Path(os.path.abspath(path))  # "X/" and "X/." name X
    try:
        if where.is_symlink() or not where.is_dir():
            return False
        real = resolve_path(where)  # the parents' links followed: the mount table holds real paths
    except OSError:
        return False
    return os.path.ismount(real) or str(real) in _mount_points()


def mount_point_problem(path: str | os.PathLike, what: str, example: str) -> str | None:
    """`PATH is a mount point, which WHAT cannot replace ...: give a directory inside it, e.g. PATH/EXAMPLE` when
    `path` is one (`is_mount_point`), else None."""
    if not is_mount_point(path):
        return None
    return (f"{os.fspath(path)} is a mount point, which {what} cannot replace (it is swapped in by a rename): give a "
            f"directory inside it, e.g. {Path(path) / example}")


class MountPointTarget(DirectoryBusy):
    """`atomic_dir`'s target is a mount point, which no rename replaces: refused before the body runs, not met as
    EBUSY at the swap after all the work. A DirectoryBusy, so that a caller reports it as a target it cannot take
    now: one line, bad input, nothing written (bundle.build does)."""


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, before_swap: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temp directory beside `target`; on success it replaces `target`, on error it is removed.

    What was written inside gets the umask's default permissions (converters write private temp files, and the
    directory is read by a server that may run as another user). If the final swap fails, the old `target` is
    put back: at every moment `target` is the old directory or the new one. One writer at a time (a lock file
    beside `target`, deleted afterwards; DirectoryBusy for a second one), and temporaries a killed writer left
    behind are removed. `before_swap` runs, under the lock, once the body has finished and before `target` is
    touched: its exception discards the new directory and keeps the old `target` (a last check of what is there).
    A `target` that is a mount point (a volume, a bind mount) is refused first (MountPointTarget): the swap
    renames `target` itself.
    """
    target = Path(target)
    if problem := mount_point_problem(target, "the new directory", "NAME"):
        raise MountPointTarget(problem)
    ensure_dir(target.parent)
    with writer_lock(target):
        remove_stale(target)
        with _swap_in(target) as tmp:
            yield tmp
            if before_swap is not None:
                before_swap()


_RENAME_EXCHANGE = 2  # linux/fs.h


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE): True when done, False where
    the kernel, the C library or the file system cannot (the caller renames twice instead); OSError otherwise."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_cwd = -100  # AT_FDCWD: the paths as given
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # no such call, or not here
        return False
    raise OSError(code, os.strerror(code), str(b))


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    if sys.platform != "linux":
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.2+
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


@contextlib.contextmanager
def _swap_in(target: Path) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, default_mode(0o777))
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), default_mode(0o777))
            for name in files:
                os.chmod(os.path.join(root, name), default_mode(0o666))
        with committing(str(target)):
            if target.exists() and exchange(tmp, target):  # one step: `target` is never missing
                shutil.rmtree(tmp, ignore_errors=True)  # now the old directory
                return
            if target.exists():  # two renames: between them `target` is missing (remove_stale puts it back)
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
                os.replace(target, old / "x")
            try:
                os.replace(tmp, target)
            except BaseException:
                if old is not None:
                    os.replace(old / "x", target)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise


MAX_JSON_DEPTH = 64  # contracts nest a few levels; a deeper document is hostile (and deep recursion crashes later)


def read_strict_json(path: str | os.PathLike, max_bytes: int) -> Any:
    """A JSON file parsed as strict JSON: at most `max_bytes`, no NaN/Infinity/overflowing numbers, nesting bounded.

    Raises ValueError with a one-line reason for a file that is none of that, OSError when it cannot be read.
    """
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # never more than the cap, even when the file grows while we read
    return parse_strict_json(data, max_bytes)


def parse_strict_json(data: bytes, max_bytes: int, *, non_finite: bool = False) -> Any:
    """`read_strict_json` on bytes already read (a writer checks what it is about to write the same way).
    `non_finite`: NaN, Infinity and numbers past a float's range are read as Python's json reads them (records an
    earlier writer made with json.dumps, whose own checks say where such a number may stand)."""
    if len(data) > max_bytes:
        raise ValueError(f"larger than {max_bytes >> 20} MiB")
    numbers = {} if non_finite else {"parse_constant": _refuse_constant, "parse_float": _finite_float}
    try:
        doc = json.loads(data, object_pairs_hook=_unique_keys, **numbers)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except _RepeatedKey as exc:
        raise ValueError(str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, non-finite numbers, 4300-digit integers
        raise ValueError(f"{type(exc).__name__}: {first_line(exc, 300)}") from None
    if _json_depth(doc) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return doc


class _RepeatedKey(ValueError):
    """A JSON object that names one key twice."""


def unique_keys_hook(error: Callable[[str], Exception]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A `json.loads` object_pairs_hook: an object whose keys all differ, else raises error(the first repeated key)."""
    # With a repeated key Python keeps the last value and other readers (Triton, jq-likes, a reviewer's eye) may take
    # the first, so one document would mean two things.
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            raise error(next(k for k, _ in pairs if k in seen or seen.add(k)))
        return obj

    return unique


_unique_keys = unique_keys_hook(lambda key: _RepeatedKey(
    f"the key {key[:80]!r} appears twice in one object (readers differ on which value counts: keep one)"))


def constant_refuser(error: Callable[[str], Exception]) -> Callable[[str], NoReturn]:
    """A `json.loads` parse_constant hook refusing NaN, Infinity and -Infinity (not strict JSON): raises error(name)."""
    def refuse(name: str) -> NoReturn:
        raise error(name)

    return refuse


_refuse_constant = constant_refuser(lambda name: ValueError(f"non-finite number {name} (the file must be strict JSON)"))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _json_depth(doc: Any) -> int:
    """How deep lists and objects nest in a document, parsed or about to be written (tuples are JSON lists too);
    iterative: no recursion on hostile input, and a cycle stops at the bound."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list | tuple):
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                return deepest
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


ZIP_END = b"PK\x05\x06"  # the end-of-central-directory record's signature (22 bytes, then a comment)
ZIP64_LOCATOR = b"PK\x06\x07"  # the zip64 end record's locator (20 bytes, just before the end record)
ZIP64_END = b"PK\x06\x06"  # the zip64 end record (56 bytes without extensible data, just before its locator)
ZIP_ENTRY = b"PK\x01\x02"  # a central directory entry's signature
ZIP_ENTRY_BYTES = 46  # a central directory entry before its name, extra field and comment
# The most bytes one entry takes: its header, then a name, an extra field and a comment of up to 65,535 bytes each.
MAX_ZIP_ENTRY_BYTES = ZIP_ENTRY_BYTES + 3 * 0xFFFF
_ZIP_END_BYTES = 22
_ZIP64_BYTES = 56 + 20  # the zip64 end record and its locator


@dataclass(frozen=True)
class ZipEnd:
    """What a zip's end records say of its central directory, read before anything reads the directory."""

    entries: int  # the largest entry count any of its records gives (0xFFFF and 0xFFFFFFFF defer to a zip64 one)
    directory: int  # the largest central directory size in bytes any of them gives
    classic_entries: int  # the classic end record's own total count
    classic_directory: int  # and its own directory size
    zip64: bool  # a zip64 locator's signature stands before the end record, in the file's last 64 KiB
    consistent: bool  # the records agree, and a directory of that size that can hold that many entries (and no
    # fewer: MAX_ZIP_ENTRY_BYTES an entry at most) starts where zipfile reads it: where one is not, the records
    # changed (or were written to mislead)
    start: int = 0  # where zipfile reads the directory from (the end record's place, less the directory's size)


def read_zip_end(f: BinaryIO) -> ZipEnd | None:
    """The end records of the zip open in `f` (binary, seekable), found as zipfile finds them (the last 22 bytes
    without a comment, else the last record signature in the last 64 KiB), None where there is none. Reads at most
    64 KiB and 160 bytes, so the entries and bytes of the directory (what zipfile parses, and allocates for, before
    anyone can look at it: 1.5 million empty entries took 30 s and 0.9 GB) are bounded before it is read."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - (_ZIP_END_BYTES + 0xFFFF)))  # the record and a comment of at most 64 KiB
    tail = f.read()
    end = len(tail) - _ZIP_END_BYTES
    if not (end >= 0 and tail.startswith(ZIP_END, end) and tail.endswith(b"\0\0")):
        end = tail.rfind(ZIP_END)
        if not 0 <= end <= len(tail) - _ZIP_END_BYTES:
            return None
    record = size - len(tail) + end
    _, _, _, here, total, directory, _, _ = struct.unpack("<4sHHHHIIH", tail[end:end + _ZIP_END_BYTES])
    counts, sizes, start = [here, total], [directory], record - directory
    if found := _zip64_records(f, record):  # their values count over the classic record's
        counts = [c for c in counts if c != 0xFFFF] + [c for _, c64, t64, _ in found for c in (c64, t64)]
        sizes = [s for s in sizes if s != 0xFFFFFFFF] + [d64 for *_, d64 in found]
        if found[0][0] == record - _ZIP64_BYTES:  # the record zipfile reads (just before the locator)
            start = found[0][0] - found[0][3]
    entries, most = max(counts), max(sizes)
    consistent = (len(set(counts)) == 1 and len(set(sizes)) == 1
                  and entries * ZIP_ENTRY_BYTES <= most <= entries * MAX_ZIP_ENTRY_BYTES
                  and start >= 0 and (entries == 0 or _starts_with(f, start, ZIP_ENTRY)))
    return ZipEnd(entries, most, total, directory, tail.rfind(ZIP64_LOCATOR, 0, end) >= 0, consistent, start)


def zip_entries(f: BinaryIO, end: ZipEnd, most: int) -> int | None:
    """How many entries the central directory that `end` describes holds, walked as zipfile walks it (an entry's
    header, then its name, extra field and comment, until the directory's size is spent, whatever the records'
    count), reading no more than `most` entries and one header more; None where it holds more, or where an entry
    lacks its signature or runs past the directory's end (zipfile would then read what the count does not list)."""
    f.seek(end.start)
    at = count = 0
    while at < end.directory:
        header = f.read(ZIP_ENTRY_BYTES)
        if count == most or len(header) < ZIP_ENTRY_BYTES or not header.startswith(ZIP_ENTRY):
            return None
        name, extra, comment = struct.unpack_from("<HHH", header, 28)
        at += ZIP_ENTRY_BYTES + name + extra + comment
        count += 1
        f.seek(end.start + at)
    return count if at == end.directory else None


def _zip64_records(f: BinaryIO, record: int) -> list[tuple[int, int, int, int]]:
    """(where, entries on its disk, entries, directory bytes) of each zip64 end record that a locator just before
    the end record (at `record`) leads to: the one zipfile reads (just before the locator), then the one at the
    locator's offset (where other readers look); none without such a locator."""
    if record < 20 or not _starts_with(f, record - 20, ZIP64_LOCATOR):
        return []
    offset = int.from_bytes(_read_at(f, record - 12, 8), "little")
    found = []
    for at in dict.fromkeys((record - _ZIP64_BYTES, offset)):
        if 0 <= at <= record - _ZIP64_BYTES and _starts_with(f, at, ZIP64_END):
            fields = _read_at(f, at + 24, 24)
            found.append((at, *(int.from_bytes(fields[i:i + 8], "little") for i in (0, 8, 16))))
    return found


def _starts_with(f: BinaryIO, at: int, signature: bytes) -> bool:
    return _read_at(f, at, len(signature)) == signature


def _read_at(f: BinaryIO, at: int, n: int) -> bytes:
    """`n` bytes of `f` from `at`, zero-padded where the file ends sooner (it may shrink while it is read)."""
    f.seek(at)
    return f.read(n).ljust(n, b"\0")
