"""Resume state (`resume.pt`): weights, optimizer, schedule, EMA, RNG and data position, written atomically.

Only tensors and plain Python values are stored, so it loads with `torch.load(weights_only=True)` (no
arbitrary unpickling). The file is replaced in one rename: a kill at any moment leaves the previous state.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import datetime as dt
import errno
import io
import itertools
import os
import pickle
import pickletools
import random
import re
import reprlib
import stat
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.datasets import content_key
from models.checkpoint import META_FILE, CheckpointError, read_checkpoint_meta
from models.failures import memory_failure
from models.io import ZIP_ENTRY_BYTES, atomic_write_bytes, not_a_file, read_zip_end, zip_entries
from models.jsonfields import is_finite, is_int

RESUME_FILE = "resume.pt"
STATE_VERSION = 1
MT_KEYS = 624  # words of Mersenne Twister state (numpy and Python)
MAX_PICKLE_BYTES = 32 << 20  # a resume state's pickle: names and small values (tensors live beside it)
MAX_REASON = 300  # characters of a damage reason (a size-mismatch list can run to pages)
# Entries of a resume state's zip: torch.save writes one a tensor storage plus a few records, and the largest model's
# state (weights, EMA, AdamW's buffers, RNG states) holds under 1,800. Checked from the end record, before zipfile
# reads the directory (1,000,000 empty entries, 85 MB, took 30 s and 500 MB to list).
MAX_RESUME_ENTRIES = 20_000
MAX_RESUME_DIRECTORY = MAX_RESUME_ENTRIES * (ZIP_ENTRY_BYTES + 320)  # bytes: an entry's header, name and extra field
# Values in one tuple of the pickle, those of the tuples in it counted each time they are: Python hashes a tuple
# through all of them, and torch.load hashes every dict key it sets (`x = (x, x)` 40 times: 2**40 values, hours).
# torch.save's largest tuples hold a tensor's shape and strides.
MAX_TUPLE_VALUES = 1 << 16
# What following the pickle may cost, whatever its size allows (32 MB of 1-byte opcodes spell 32 million): the steps
# (opcodes) torch.load takes, and the objects it builds beyond plain values (a container, or what a call builds: a
# tensor, a storage, an OrderedDict). The largest model's state (AdamW, EMA) takes 49,000 steps and builds 10,500
# objects, each epoch of its history 35 and 1: with the most epochs a run has (100,000), 3.5 million and 110,000.
# An empty set is 1 byte and builds 216 (4 MB of them took 43 s and 1.4 GB to load and walk).
MAX_PICKLE_OPS = 1 << 23
MAX_PICKLE_OBJECTS = 1 << 19
# Dict keys the pickle may set (torch.load hashes each): names, and ints that hash apart. Python hashes an int modulo
# 2**61 - 1, so past it any number of ints hash alike (80,000 such keys, 1 MB, took 104 s: each insert probed all the
# others before it), and a tuple's or a float's hash can be chosen as well. A resume state's keys are names and
# parameter indices; below 2**63, at most 4 ints share a hash.
MAX_KEY_INT = 1 << 63
# Values in the state, each counted as often as it is referred to (what a walk over it meets): a value of the pickle
# takes a byte of it at least, so only the same values referred to over and over reach more than it could spell out.
MAX_STATE_VALUES = MAX_PICKLE_BYTES
MAX_STATE_DEPTH = 32  # levels of nesting: a resume state has 6 (progress.history[i].key -> value)


def _history(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(h, dict) and is_int(h.get("epoch")) for h in x)


def _epoch_acc(x: object) -> bool:
    # The loss sum may be non-finite (a run that diverged mid-epoch): check_resume weighs it against the weights.
    return x is None or (isinstance(x, dict) and _float_like(x.get("loss_sum")) and _seconds(x.get("time"))
                         and all(_count(x.get(k)) for k in ("samples", "corrupt")))


def _float_like(x: object) -> bool:
    """A number that a float holds: a finite one, or a float's NaN or infinity (not an int too large for a float,
    which every use of it as a float raises OverflowError for)."""
    return is_finite(x) or isinstance(x, float)


def _eval_result(x: object) -> bool:
    """An `evaluate` result as the trainer reports it (the final summary takes it as it is)."""
    return (isinstance(x, dict) and all(_fraction(x.get(k)) for k in ("top1", "top5"))
            and (x.get("loss") is None or is_finite(x.get("loss"))) and _count(x.get("samples"))
            and _count(x.get("skipped_corrupt")))


def _last_eval(x: object) -> bool:
    return x is None or (isinstance(x, dict) and is_int(x.get("global_step")) and _eval_result(x.get("raw"))
                         and (x.get("ema") is None or _eval_result(x.get("ema"))))


def _timestamp(x: object) -> bool:
    """A UTC time as the trainer writes it (2026-12-06T10:00:00Z): the summary records it as the run's start."""
    if not (isinstance(x, str) and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", x)):
        return False
    try:
        dt.datetime.strptime(x, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return False
    return True


def _count(x: object) -> bool:
    return is_int(x) and x >= 0


def _seconds(x: object) -> bool:
    return is_finite(x) and x >= 0


def _fraction(x: object) -> bool:
    return is_finite(x) and 0 <= x <= 1


# What each progress counter must hold (the trainer indexes and adds to every one of them).
PROGRESS_FIELDS: dict[str, Any] = {
    "epoch": _count, "step_in_epoch": _count, "global_step": _count, "history": _history,
    "train_time_s": _seconds, "wall_time_s": _seconds, "cpu_time_s": _seconds, "samples_seen": _count,
    "segments": _count, "epoch_acc": _epoch_acc, "last_eval": _last_eval, "started": _timestamp,
}


def capture_rng() -> dict[str, Any]:
    """The global torch (CPU and CUDA), numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def save_resume(out_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise then atomically replace `out_dir/resume.pt`."""
    buf = io.BytesIO()
    torch.save({"version": STATE_VERSION, **state}, buf)
    atomic_write_bytes(Path(out_dir) / RESUME_FILE, buf.getvalue())


def load_resume(out_dir: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any] | None:
    """The saved state (tensors on CPU), None if there is none; CheckpointError if it is unreadable, or is there but
    is not a regular file (a directory, a FIFO, a link to a device or to nothing, a link loop: never opened)."""
    path = Path(out_dir) / RESUME_FILE
    try:
        problem = not_a_file(path)
    except OSError as exc:  # stat fails with EACCES when the run directory cannot be searched
        raise CheckpointError(f"cannot read resume state {path}: {exc.strerror or exc}") from None
    if problem == "is missing":
        return None
    if problem is not None:  # not the absence of a state: a run --resume would start over, and fail at its first save
        raise CheckpointError(f"cannot read resume state {path}: {problem.removeprefix('is ')}; nothing was "
                              "changed")
    check_archive(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:  # weights_only refused an object: name it, and no "weights_only=False"
        said = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        why = next((ln for ln in said if "GLOBAL" in ln or "Unsupported" in ln), said[0] if said else "")
        why = why.split(". Please", 1)[0]  # torch's advice to allowlist the class is not for untrusted files
        raise CheckpointError(f"cannot read resume state {path}: it holds Python objects no resume state holds "
                              f"({why.rstrip('.')[:200]}); it was not written by vitc and is not loaded") from None
    except Exception as exc:
        if memory_failure(exc) is not None:  # the machine (exit 1), not the file
            raise
        if _NEWER_TORCH in str(exc):  # its version record passed its CRC-32: a newer torch wrote it, intact
            raise CheckpointError(f"cannot read resume state {path}: {_reason(exc)}") from None
        # Every member passed its CRC-32, but torch's own zip reader (miniz) reads the directory its way: where it
        # disagrees with zipfile's reading, the directory changed (a disk, memory or copy error).
        raise _unreadable(path, "it", exc, torch_load=True) from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: not a version-{STATE_VERSION} resume state")
    problem = shape_problem(state) or check_resume(state)
    if problem:
        raise damaged(problem)
    return state


def check_archive(path: Path) -> None:
    """CheckpointError unless `path` is laid out as torch.save writes it: a zip whose members are all stored
    uncompressed (so what loads is never larger than the file: a 1.4 MB deflated pickle took 5 GB), whose pickle is
    at most MAX_PICKLE_BYTES, and whose every member still matches the CRC-32 recorded for it. Checked from the zip
    directory, then by reading each member, before anything is unpickled. Bytes changed anywhere (a member, its
    headers, the directory, the end records) are the one corrupt refusal (`_corrupt`), wherever they show. What
    only a hand could write, refused as not vitc's: a directory larger than any vitc writes (from the end records,
    before zipfile reads it), and a pickle that would cost more to load than its size (`pickle_problem`)."""
    import zipfile

    _check_zip_end(path)
    try:
        archive = zipfile.ZipFile(path)
    # zipfile reading a damaged directory raises nearly any type (BadZipFile, NotImplementedError for a "version
    # needed" it does not know, struct.error, EOFError, UnicodeDecodeError, OverflowError, ...): all of them are
    # the bytes; only an I/O error (or no permission) and memory are not.
    except Exception as exc:
        if memory_failure(exc) is not None:
            raise
        raise _unreadable(path, "its zip directory", exc) from None
    with archive:
        members = archive.infolist()
        for m in members:
            name = m.filename[:80]
            if m.compress_type != zipfile.ZIP_STORED and m.compress_size != m.file_size:
                raise CheckpointError(f"cannot read resume state {path}: member {name!r} is compressed, "
                                      "which torch.save never does; it was not written by vitc and is not loaded")
            # Not compressed, yet not as torch.save lists a member either: a method or a size that a flipped bit
            # changed, or the MS-DOS directory attribute, which makes torch's reader (miniz) read the member as
            # empty: its tensor would load as whatever memory held, and pass its CRC-32 check in zipfile.
            if m.compress_type != zipfile.ZIP_STORED or m.compress_size != m.file_size or \
                    m.external_attr & _DOS_DIRECTORY:
                raise _corrupt(path, f"member {name!r} has a damaged directory entry ({_entry_fault(m)})")
            if _is_pickle(m.filename) and m.file_size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"cannot read resume state {path}: its pickle is {m.file_size:,} bytes, more "
                                      f"than the {MAX_PICKLE_BYTES:,} a resume state needs")
        if sum(_is_pickle(m.filename) for m in members) > 1:  # torch.save writes one; which one torch reads is its own
            raise CheckpointError(f"cannot read resume state {path}: it holds more than one pickle (data.pkl); it is "
                                  f"not a resume state vitc wrote, and is not loaded")
        pickled = _check_crcs(path, archive, members)
    if pickled is not None and (problem := pickle_problem(pickled)):
        raise CheckpointError(f"cannot read resume state {path}: its pickle {problem}; it is not a resume state vitc "
                              f"wrote, and is not loaded")


def _is_pickle(name: str) -> bool:
    return name.lower().endswith("data.pkl")  # torch finds its pickle by name in any case


def _check_zip_end(path: Path) -> None:
    """CheckpointError unless the zip's end records list at most MAX_RESUME_ENTRIES entries in MAX_RESUME_DIRECTORY
    bytes, and its directory holds just the entries they list: read before zipfile reads the directory, which it
    does by its size (it lists every entry there, whatever the count: 5 listed over 140,000 were all read). Records
    that disagree with each other or with the directory are the corrupt refusal (a flipped bit); a directory that
    does hold that many is a file vitc did not write."""
    try:
        with open(path, "rb") as f:
            end = read_zip_end(f)
            bounded = end is not None and end.entries <= MAX_RESUME_ENTRIES and end.directory <= MAX_RESUME_DIRECTORY
            held = zip_entries(f, end, end.entries) if bounded and end.consistent else None
    except OSError as exc:
        raise _unreadable(path, "its zip end record", exc) from None
    if end is None:
        return  # (no record: zipfile says what is wrong)
    listed = f"{end.entries:,} entries in {end.directory:,} bytes"
    if not end.consistent:
        raise _corrupt(path, f"its zip end record lists {listed}, which its directory does not hold")
    if not bounded:
        raise CheckpointError(f"cannot read resume state {path}: its zip directory lists {listed}, more than any "
                              f"resume state vitc writes ({MAX_RESUME_ENTRIES:,} entries in {MAX_RESUME_DIRECTORY:,} "
                              "bytes at most: one a tensor); it is not a resume state vitc wrote, and is not loaded")
    if held != end.entries:
        raise _corrupt(path, f"its zip end record lists {listed}, which its directory does not hold (it holds more "
                             "entries, or entries that run past its end)")


CRC_CHUNK = 1 << 20  # bytes read at a time while a member's CRC-32 is checked: memory stays flat whatever its size
_DOS_DIRECTORY = 0x10  # the MS-DOS attribute bit of a zip entry's external attributes: a directory
# What torch.load says of a file a newer torch wrote (its version record): not damage.
_NEWER_TORCH = "installation may be too old"


def _entry_fault(m: Any) -> str:
    """What is wrong with a directory entry `check_archive` refused (stored, yet not as torch.save lists one)."""
    if m.external_attr & _DOS_DIRECTORY:
        return "marked a directory"
    if m.compress_size != m.file_size:
        return f"{m.compress_size:,} bytes stored for {m.file_size:,}"
    return f"compression method {m.compress_type}"


def _check_crcs(path: Path, archive: Any, members: list[Any]) -> bytes | None:
    """Read every member (stored, so at most the file's size in all, CRC_CHUNK at a time) against the CRC-32 torch.save
    recorded for it. torch.load checks none of them: a flipped bit in a tensor would load, train on and end up in
    the next checkpoint without a word (checkpoint.json guards its weights with a sha256; resume.pt has only this).
    Returns the pickle's bytes (at most MAX_PICKLE_BYTES, checked from the directory), None without one."""
    pickled = None
    for m in members:
        kept: list[bytes] | None = [] if _is_pickle(m.filename) else None
        try:
            with archive.open(m) as f:  # by its entry, not its name: a repeated name would hide the first
                while chunk := f.read(CRC_CHUNK):
                    if kept is not None:
                        kept.append(chunk)
        # A wrong CRC-32, a truncated member, a mangled local header (a flipped bit in its flags or name reads as an
        # encrypted or compressed-patched member, or a name that is not UTF-8), an offset before the file's start.
        except Exception as exc:
            if memory_failure(exc) is not None:
                raise
            if "CRC" in str(exc) and not isinstance(exc, OSError):
                raise _corrupt(path, f"member {m.filename[:80]!r} fails its CRC-32 check") from None
            raise _unreadable(path, f"member {m.filename[:80]!r}", exc) from None
        if kept is not None:
            pickled = b"".join(kept)
    return pickled


class _Pickled:
    """One value on the stack `pickle_problem` follows: how many values it holds, counted as hashing or a walk meets
    them (each time it refers to one), whether the pickle referred to it again (fetched it from its memo), whether it
    may be a dict key (a name, or an int below MAX_KEY_INT), and the global it is (`module name`), if one."""

    __slots__ = ("global_", "key", "referred", "values")

    def __init__(self, values: int, key: bool = False, global_: str | None = None) -> None:
        self.values, self.referred = min(values, MAX_TUPLE_VALUES + 1), False
        self.key, self.global_ = key, global_


# One for every plain value (a number, a name, None, the empty tuple): 8 bytes a value on the stack, not 80. Only a
# container is added to or counted (torch.load refuses to add to anything else, as the scan does once it is referred).
_PLAIN, _KEY = _Pickled(1), _Pickled(1, key=True)


class _PickleScan:
    """What `pickle_problem` follows: the stack (None for a mark), the memo, and the steps and objects so far."""

    __slots__ = ("memo", "objects", "ops", "stack")

    def __init__(self) -> None:
        self.stack: list[_Pickled | None] = []
        self.memo: dict[int, _Pickled] = {}
        self.ops = self.objects = 0


_TUPLES = frozenset({"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_TUPLE"})
_ADDS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})  # to the value below: kept
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET", "DUP"})
# Opcodes that build an object beyond a plain value (counted against MAX_PICKLE_OBJECTS): containers, and calls.
_PICKLE_OBJECTS = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "LIST", "DICT", "FROZENSET", "TUPLE", "TUPLE1",
                             "TUPLE2", "TUPLE3", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BINPERSID", "PERSID", "INST", "OBJ"})
_STRINGS = frozenset({"BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING",
                      "STRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"})  # keys Python hashes with a secret seed
_INTS = frozenset({"BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"})
# The calls torch.load allows that hash every item of their argument (a set, or a dict built from a list): keys
# no SETITEMS check sees. torch.save calls an OrderedDict with no argument, and sets items in it one by one.
_HASHING_CALLS = frozenset({"builtins.set", "collections.Counter", "collections.OrderedDict"})
_HASHING = frozenset({"SETITEM", "SETITEMS", "REDUCE"})  # the opcodes `_hash_problem` looks at


def pickle_problem(data: bytes) -> str | None:
    """Why unpickling `data` would cost more than its size, or None: more than MAX_PICKLE_OPS steps or
    MAX_PICKLE_OBJECTS objects, a tuple of more than MAX_TUPLE_VALUES values (torch.load's unpickler hashes each dict
    key it sets, through all of a tuple's values), a dict key that is not a name or an int below MAX_KEY_INT, a call
    torch.save writes without arguments given some (one that hashes a list), or a value added to after the pickle
    referred to it again (which torch.save never writes: only a value that contains itself needs it, and without it
    every count here is final when it is read). Followed on the pickle's stack as an unpickler builds it, without
    building anything; a pickle that does not parse is left to torch.load to refuse."""
    scan = _PickleScan()
    try:
        for op, arg, _ in pickletools.genops(data):
            scan.ops += 1
            scan.objects += op.name in _PICKLE_OBJECTS
            if scan.ops > MAX_PICKLE_OPS or scan.objects > MAX_PICKLE_OBJECTS:
                return _cost_problem(scan)
            if problem := _pickle_step(op, arg, scan.stack, scan.memo):
                return problem
    except (ValueError, IndexError, KeyError, AttributeError):  # not a pickle, or a stack it does not balance
        return None
    return None


def _cost_problem(scan: _PickleScan) -> str:
    """What the pickle `scan` stopped in costs more of than any resume state."""
    if scan.ops > MAX_PICKLE_OPS:
        return (f"takes more than {MAX_PICKLE_OPS:,} steps to load (the largest model's state with a 100,000-epoch "
                "history takes 3.5 million)")
    return (f"builds more than {MAX_PICKLE_OBJECTS:,} objects (containers and what calls build; the largest model's "
            "state with a 100,000-epoch history builds 110,000)")


def _pickle_step(op: Any, arg: Any, stack: list[_Pickled | None], memo: dict[int, _Pickled]) -> str | None:
    """Apply one opcode to `stack` and `memo` (sizes only); why it is refused, or None."""
    name = op.name
    if name in _MEMO_PUTS:
        memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        return None
    if name in _MEMO_GETS:
        value = stack[-1] if name == "DUP" else memo[arg]
        value.referred = True
        stack.append(value)
        return None
    taken = _pickle_pop(op, stack)
    if name in _HASHING and (problem := _hash_problem(name, taken)):
        return problem
    if name in _ADDS:
        target = taken.pop()
        if target.referred:
            return "adds to a value after referring to it (a value that contains itself)"
        target.values = min(MAX_TUPLE_VALUES + 1, target.values + sum(v.values for v in taken))
        stack.append(target)
        return None
    values = 1 + sum(v.values for v in taken)
    if name in _TUPLES and values > MAX_TUPLE_VALUES:
        return (f"builds a tuple of more than {MAX_TUPLE_VALUES:,} values (the same tuples referred to over and over: "
                "hashing it as a key would visit every one)")
    key = name in _STRINGS or (name in _INTS and -MAX_KEY_INT <= arg < MAX_KEY_INT)
    if values == 1 and name not in _PICKLE_OBJECTS and name != "GLOBAL":  # a plain value: shared, as it stays one
        stack.extend(None if s is pickletools.markobject else _KEY if key else _PLAIN for s in op.stack_after)
        return None
    global_ = arg if name == "GLOBAL" else None
    stack.extend(None if s is pickletools.markobject else _Pickled(values, key, global_) for s in op.stack_after)
    return None


def _hash_problem(name: str, taken: list[_Pickled]) -> str | None:
    """Why the values opcode `name` takes (`_pickle_pop`) would be hashed at a cost the file does not pay for, or
    None: a dict key set that is not a name or an int below MAX_KEY_INT, or a call that hashes its argument's items."""
    if name == "SETITEM":
        keys = taken[1:2]
    elif name == "SETITEMS":
        keys = taken[1:-1:2]  # value, key, value, key, ... (topmost first), then the dict
    else:
        keys = []
    if not all(k.key for k in keys):
        return ("sets a dict key that is not a name or an integer below 2**63 (values Python hashes alike, each "
                "insert probing all the others; a resume state's keys are names and parameter indices)")
    called = _global_name(taken[1].global_) if name == "REDUCE" and taken[1].global_ else None
    if called in _HASHING_CALLS and taken[0].values > 1:
        return (f"calls {called} with arguments (it hashes every item of a list: torch.save sets a dict's items one "
                "by one)")
    return None


def _global_name(arg: str) -> str:
    """A GLOBAL opcode's `module name` as torch.load reads it (`module.name`, Python 2's names mapped, as pickle
    maps them)."""
    module, _, name = arg.partition(" ")
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    else:
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _pickle_pop(op: Any, stack: list[_Pickled | None]) -> list[_Pickled]:
    """The values `op` takes from `stack`, topmost first (those above its mark, then those below it)."""
    taken = []
    below = len(op.stack_before)
    if pickletools.markobject in op.stack_before:
        while (value := stack.pop()) is not None:
            taken.append(value)
        below = op.stack_before.index(pickletools.markobject)
    taken.extend(stack.pop() for _ in range(below))
    if any(v is None for v in taken):  # a mark where a value stands: torch.load refuses that itself
        raise IndexError("a mark in place of a value")
    return taken


def _corrupt(path: Path, what: str) -> CheckpointError:
    """The one refusal of a resume.pt whose bytes changed since it was written (`what`: where that shows)."""
    return CheckpointError(f"cannot read resume state {path}: it is corrupt: {what[:MAX_REASON]} (changed since it "
                           f"was written: a disk, memory or copy error); {_corrupt_advice(path.parent)}")


def _reason(exc: BaseException) -> str:
    """`exc`'s message on one line, at most MAX_REASON characters (its type's name when it has none)."""
    return " ".join(str(exc).split())[:MAX_REASON] or type(exc).__name__


def _unreadable(path: Path, what: str, exc: Exception, *, torch_load: bool = False) -> CheckpointError:
    """The refusal for `exc`, raised reading `what` of resume.pt: an I/O error or a permission as the system says
    it, anything else (the bytes) the corrupt refusal. EINVAL is a seek to an offset a changed directory gave."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno != errno.EINVAL:
        return CheckpointError(f"cannot read resume state {path}: {exc.strerror or exc}")
    said = f"{type(exc).__name__}: {_reason(exc)}" if torch_load else _reason(exc)
    return _corrupt(path, f"{what} cannot be read{' by torch.load' if torch_load else ''} ({said})")


def _corrupt_advice(out: Path) -> str:
    """What to do about a corrupt resume.pt in `out`, true whether or not a checkpoint sits beside it."""
    try:
        read_checkpoint_meta(out)
    except CheckpointError:  # no checkpoint that reads: --overwrite would refuse the directory as no run of ours
        return "nothing was changed: restore resume.pt from a copy to continue the run, or train into a new --out"
    return (f"nothing was changed: restore resume.pt from a copy to continue the run, or --overwrite trains it again "
            f"from step 0 (the checkpoint beside it has its own sha256 check in {META_FILE} and still exports and "
            f"evaluates)")


def damaged(reason: object) -> CheckpointError:
    """The one-line error for a resume state that does not fit this run (multi-line reasons are folded)."""
    text = "; ".join(line.strip() for line in str(reason).splitlines() if line.strip())
    if len(text) > MAX_REASON:
        text = text[:MAX_REASON] + "..."
    return CheckpointError(f"{RESUME_FILE} is damaged or from another run: {text}")


class _Preview(reprlib.Repr):
    """reprlib's repr for values read from resume.pt: a few items of a few levels (never the whole of a value that
    refers to one list 2**40 times: repr builds it all before a format cuts it), tensors by dtype and shape, objects
    of other types by their type's name."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset, self.maxfrozenset = 3, 4, 6, 6, 4, 4
        self.maxstring, self.maxlong, self.maxother = 60, 40, 40

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # its decimal digits take time (and past 4,300 digits, raise)
            return f"an integer of {x.bit_length()} bits"
        return super().repr_int(x, level)

    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        """reprlib's, without sorting the keys first (a walk over all of them)."""
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        shown = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in itertools.islice(x.items(), self.maxdict)]
        return "{" + ", ".join(shown) + (", ..." if len(x) > self.maxdict else "") + "}"

    def repr_instance(self, x: object, level: int) -> str:
        if isinstance(x, torch.Tensor):
            return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {tuple(x.shape)}"
        for kind, shown in ((dict, self.repr_dict), (list, self.repr_list), (tuple, self.repr_tuple)):
            if isinstance(x, kind):  # a subclass (OrderedDict, torch.Size) as its base shows
                return shown(x, level)
        if isinstance(x, bool | float | complex | type(None) | torch.dtype | torch.device):
            return builtins.repr(x)
        return f"a {type(x).__name__}"


_PREVIEW = _Preview()
MAX_PREVIEW = 80  # characters of a value quoted in a message


def describe(value: object) -> str:
    """A value read from resume.pt as a message quotes it: a bounded preview (`_Preview`), at most MAX_PREVIEW
    characters, built in bounded time whatever the value holds."""
    return _PREVIEW.repr(value)[:MAX_PREVIEW]


def _containers(value: object) -> Iterable[object]:
    """What `value` holds, where it is a container (a dict's keys too: a tuple key is walked and hashed)."""
    if isinstance(value, dict):
        return itertools.chain(value.keys(), value.values())
    if isinstance(value, list | tuple | set | frozenset):
        return value
    return ()


def _is_container(value: object) -> bool:
    return isinstance(value, dict | list | tuple | set | frozenset)


def _measure(root: object, seen: dict[int, tuple[int, int]]) -> str | None:
    """Record in `seen` (by id) the values and levels of `root` and of each container in it: values counted as a
    walk meets them (a shared one each time), yet each container visited once, without recursion. Why `root` cannot
    be walked (it contains itself, or nests deeper than MAX_STATE_DEPTH), or None."""
    stack: list[tuple[object, bool]] = [(root, False)]
    open_: set[int] = set()  # the containers on the path to the one being visited
    while stack:
        value, done = stack.pop()
        key = id(value)
        if done:
            open_.discard(key)
            held = [seen.get(id(v), (1, 0)) for v in _containers(value)]
            values = min(MAX_STATE_VALUES + 1, 1 + sum(n for n, _ in held))
            seen[key] = (values, 1 + max((d for _, d in held), default=0))
            continue
        if key in seen or not _is_container(value):
            continue
        if key in open_:
            return "holds a value that contains itself"
        if len(open_) >= MAX_STATE_DEPTH:
            return f"holds values nested more than {MAX_STATE_DEPTH} levels deep"
        open_.add(key)
        stack.append((value, True))
        stack.extend((v, False) for v in _containers(value) if _is_container(v))
    if seen.get(id(root), (1, 0))[1] > MAX_STATE_DEPTH:  # deeper below a value first met higher up
        return f"holds values nested more than {MAX_STATE_DEPTH} levels deep"
    return None


def shape_problem(state: dict[str, Any]) -> str | None:
    """Why `state` cannot be walked value by value, or None: it contains itself, nests deeper than MAX_STATE_DEPTH, or
    holds more than MAX_STATE_VALUES values counted as a walk meets them. Measured before anything walks it (a
    message's repr, the configuration's checks, a copy, the next save): torch.load keeps the pickle's references,
    so 2 KB can hold a list that refers to one list 2**40 times, and a walk over it never ends."""
    seen: dict[int, tuple[int, int]] = {}
    for key, value in state.items():
        if problem := _measure(value, seen):
            return f"{_path([key])}: {problem}"
    if sum(seen.get(id(v), (1, 0))[0] for v in state.values()) > MAX_STATE_VALUES:
        return (f"{_path(_heaviest(state, seen))}: holds more than {MAX_STATE_VALUES:,} values, counted as a walk "
                "meets them (the same values referred to over and over, as vitc never writes them)")
    return None


def _heaviest(state: dict[str, Any], seen: dict[int, tuple[int, int]]) -> list[object]:
    """The keys that lead to where most of `state`'s values are: through its dicts, and lists of dicts."""
    path: list[object] = []
    value: object = state
    while len(path) < MAX_STATE_DEPTH:
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value)) \
            if isinstance(value, list | tuple) else []
        if not items:
            break
        key, held = max(items, key=lambda item: seen.get(id(item[1]), (1, 0))[0])
        if not (isinstance(value, dict) or isinstance(held, dict)):
            break
        path.append(key)
        value = held
    return path


def _path(keys: list[object]) -> str:
    """`keys` as a message names the place (config.epochs, optimizer.param_groups[0].lr)."""
    text = ""
    for key in keys:
        text += f"[{key}]" if isinstance(key, int) else f".{key[:80]}" if isinstance(key, str) else f"[{describe(key)}]"
    return text.removeprefix(".")


def _option(x: object) -> bool:
    """A configuration value as TrainConfig.to_dict writes it: a JSON scalar, or a list of them (betas, command)."""
    return _scalar(x) or (isinstance(x, list | tuple) and all(_scalar(v) for v in x))


def _scalar(x: object) -> bool:
    # An int too large for a float is none: the configuration's own range checks raise OverflowError on it.
    return x is None or isinstance(x, bool | float | str) or (isinstance(x, int) and is_finite(x))


def _tensor_dict(x: object) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items())


def tensor_problem(state: dict[str, Any]) -> str | None:
    """Why a tensor anywhere in `state` is not one torch.save writes of what vitc saves, or None: a CPU tensor of
    strided layout whose every element has a place of its own in its storage. A view with a zero or overlapping
    stride holds more elements than its storage (torch.zeros(1).expand(2**34): 17 KB of file), and any op over it
    (a check's isfinite) allocates all of them. Read from shapes and strides only, before any op touches a tensor."""
    for keys, tensor in _tensors(state):
        if problem := _view_problem(tensor):
            return f"{_path(keys)}: {problem}"
    return None


def _tensors(root: dict[str, Any]) -> Iterator[tuple[list[object], torch.Tensor]]:
    """Every tensor in `root`, with the keys that lead to it: each container visited once (by id), without
    recursion, so a value that contains itself or is shared is walked once."""
    stack: list[tuple[object, list[object]]] = [(root, [])]
    seen: set[int] = set()
    while stack:
        value, keys = stack.pop()
        if isinstance(value, torch.Tensor):
            yield keys, value
            continue
        if id(value) in seen:
            continue
        seen.add(id(value))
        items = value.items() if isinstance(value, dict) else enumerate(value)  # (sets: an index of its order)
        stack.extend((v, [*keys, k]) for k, v in items if isinstance(v, torch.Tensor) or _is_container(v))


def _view_problem(t: torch.Tensor) -> str | None:
    """Why `t` is not a CPU strided tensor whose elements each have their own place within its storage, or None."""
    if t.layout != torch.strided or t.device.type != "cpu" or t.is_quantized or t.is_nested:
        return f"a {'quantized ' if t.is_quantized else ''}{t.layout} tensor on {t.device}, which no resume state holds"
    if t.numel() == 0:
        return None
    span = 1  # elements from the first to the last of the dimensions so far, taken by increasing stride
    for size, stride in sorted(((n, st) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1),
                               key=lambda dim: dim[1]):
        if stride < span:
            return (f"a view of shape {tuple(t.shape)} and strides {t.stride()} whose elements share places in its "
                    "storage (a zero or overlapping stride), which torch.save of a resume state never writes")
        span += stride * (size - 1)
    held = t.untyped_storage().nbytes() // t.element_size()
    if t.storage_offset() + span > held:
        return f"a view of {span:,} elements from element {t.storage_offset():,} of a storage of {held:,}"
    return None


def _check_rng(rng: object) -> str | None:
    """Why `rng` cannot be restored by `restore_rng`, or None."""
    if not isinstance(rng, dict) or not {"torch", "cuda", "numpy", "python"} <= rng.keys():
        return "rng: expected a dict with torch, cuda, numpy and python states"
    if not isinstance(rng["torch"], torch.Tensor) or rng["torch"].dtype != torch.uint8:
        return "rng.torch: expected a uint8 tensor"
    if not isinstance(rng["cuda"], list) or not all(isinstance(t, torch.Tensor) for t in rng["cuda"]):
        return "rng.cuda: expected a list of tensors"
    n, p = rng["numpy"], rng["python"]
    # numpy's set_state and Python's setstate raise OverflowError or ValueError on values capture_rng never
    # writes (a gauss too large for a float, a flag or a word beyond its C type, another state version).
    if not (isinstance(n, dict) and isinstance(n.get("keys"), torch.Tensor) and n["keys"].shape == (MT_KEYS,)
            and n["keys"].dtype == torch.int64 and is_int(n.get("pos")) and 0 <= n["pos"] <= MT_KEYS
            and is_int(n.get("has_gauss")) and n["has_gauss"] in (0, 1) and _float_like(n.get("gauss"))):
        return f"rng.numpy: expected keys ({MT_KEYS} integers), pos (0..{MT_KEYS}), has_gauss (0 or 1) and gauss"
    # numpy takes the keys as uint32: one outside that range would be wrapped silently into another state.
    if not bool(((n["keys"] >= 0) & (n["keys"] < 1 << 32)).all()):
        return "rng.numpy.keys: expected integers from 0 to 2**32 - 1"
    if not (isinstance(p, dict) and is_int(p.get("version")) and p["version"] == random.Random.VERSION
            and isinstance(p.get("internal"), list) and len(p["internal"]) == MT_KEYS + 1
            and all(is_int(v) and 0 <= v < 1 << 32 for v in p["internal"][:MT_KEYS])
            and is_int(p["internal"][MT_KEYS]) and 0 <= p["internal"][MT_KEYS] <= MT_KEYS
            and (p.get("gauss") is None or _float_like(p.get("gauss")))):
        return (f"rng.python: expected version {random.Random.VERSION}, internal ({MT_KEYS} words of 32 bits and a "
                f"position in 0..{MT_KEYS}) and gauss")
    return None


def _check_progress(progress: object) -> str | None:
    """Why `progress` is not a set of training counters, or None."""
    if not isinstance(progress, dict):
        return "progress: expected a dict"
    for key, ok in PROGRESS_FIELDS.items():
        if key not in progress:
            return f"progress: missing {key!r}"
        if not ok(progress[key]):
            return f"progress.{key}: unexpected value {describe(progress[key])}"
    # Written since resume.pt lists the corrupt files training replaced; older states go without.
    if "corrupt_files" in progress and not _strings(progress["corrupt_files"]):
        return "progress.corrupt_files: expected a list of paths"
    if not isinstance(progress.get("diverged", False), bool):
        return f"progress.diverged: unexpected value {describe(progress['diverged'])}"
    return _check_history(progress["history"])


# The numbers of a history record (metrics.jsonl's line of an epoch) that the trainer compares, sums or plots.
HISTORY_NUMBERS = ("step", "train_loss", "lr", "epoch_time_s", "samples_per_s", "val_loss", "val_loss_ema",
                   "corrupt_train_replaced", "corrupt_val_skipped")
HISTORY_FRACTIONS = ("val_top1", "val_top5", "val_top1_ema", "val_top5_ema")


def _check_history(history: list[dict[str, Any]]) -> str | None:
    """Why a history record is not one the trainer wrote (JSON scalars; its numbers finite or null), or None."""
    for i, record in enumerate(history):
        where = f"progress.history[{i}]"
        for key, value in record.items():
            if not isinstance(key, str):
                return f"{where}: unexpected key {describe(key)}"
            if not (value is None or isinstance(value, bool | str) or is_finite(value)):
                return f"{where}.{key[:80]}: unexpected value {describe(value)}"
        for key in HISTORY_NUMBERS + HISTORY_FRACTIONS:
            value = record.get(key)
            if value is not None and not (_fraction(value) if key in HISTORY_FRACTIONS else is_finite(value)):
                what = "a fraction in [0, 1]" if key in HISTORY_FRACTIONS else "a number"
                return f"{where}.{key}: expected {what} or null, got {describe(value)}"
    return None


# Optimizer hyperparameters torch keeps in each parameter group (AdamW's and SGD's): load_state_dict takes the saved
# values as they are, and a wrong type fails only at the first step, mid-training.
GROUP_NUMBERS = ("lr", "weight_decay", "eps", "momentum", "dampening")
GROUP_FLAGS = ("amsgrad", "maximize", "capturable", "differentiable", "nesterov", "decoupled_weight_decay")
GROUP_OPTIONAL_FLAGS = ("foreach", "fused")


def _check_optimizer(opt: object) -> str | None:
    """Why `opt` is not an optimizer state_dict of AdamW or SGD as the trainer saves it, or None."""
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        return "optimizer: expected a dict with state and param_groups"
    if not opt["param_groups"]:
        return "optimizer.param_groups: expected at least one group"
    for i, group in enumerate(opt["param_groups"]):
        where = f"optimizer.param_groups[{i}]"
        if not isinstance(group, dict):
            return f"{where}: expected a dict"
        if not (isinstance(group.get("params"), list) and all(_count(p) for p in group["params"])):
            return f"{where}.params: expected a list of parameter indices"
        if "lr" not in group:
            return f"{where}: missing 'lr'"
        for key in GROUP_NUMBERS:
            if key in group and not (is_finite(group[key]) and group[key] >= 0):
                return f"{where}.{key}: expected a non-negative number, got {describe(group[key])}"
        betas = group.get("betas", (0.0, 0.0))
        if not (isinstance(betas, tuple | list) and len(betas) == 2
                and all(is_finite(b) and 0 <= b < 1 for b in betas)):
            return f"{where}.betas: expected two numbers in [0, 1), got {describe(betas)}"
        for key in GROUP_FLAGS + GROUP_OPTIONAL_FLAGS:
            unset = key in GROUP_OPTIONAL_FLAGS and group.get(key) is None
            if key in group and not (isinstance(group[key], bool) or unset):
                return f"{where}.{key}: expected true or false, got {describe(group[key])}"
    for key, buffers in opt["state"].items():
        if not (_count(key) and isinstance(buffers, dict) and all(
                isinstance(k, str) and (isinstance(v, torch.Tensor) or is_finite(v)) for k, v in buffers.items())):
            return f"optimizer.state[{describe(key)[:20]}]: expected a dict of tensors"
    return None


# Optimizer group settings a resume does not compare: the parameters, the rate (a function of the step, set from it)
# and `fused`, which the device decides (fused kernels on CUDA): a run takes its own, so a state saved on the CPU
# resumes on a GPU. Every other setting the optimizer class has (amsgrad, maximize, decoupled_weight_decay, ...)
# changes what a step computes, and torch's load_state_dict would take the saved one over the run's without a word.
UNCOMPARED_SETTINGS = ("params", "lr", "fused")
# Per-parameter buffers that hold squares (AdamW's second moments): a negative one makes the step's root NaN.
SQUARES = ("exp_avg_sq", "max_exp_avg_sq")


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each of `optimizer`'s groups' settings as this run built them (every key but the parameters)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def settings_problem(groups: list[dict[str, Any]], run: list[dict[str, Any]], *,
                     required: Collection[str] = ()) -> str | None:
    """Why optimizer groups (saved, or loaded) do not hold this run's settings `run` (`optimizer_settings`), or None.
    A setting a saved group lacks (an older torch's) is left to the loaded groups' check, which names the settings
    a step reads (`required`, the optimizer's defaults): the load fills in only the flags torch added since, and a
    group still without one (weight_decay, eps, betas) fails the first step with a KeyError."""
    if len(groups) != len(run):
        return f"optimizer: {len(groups)} parameter groups, this run's optimizer has {len(run)}"
    for i, (was, now) in enumerate(zip(groups, run, strict=True)):
        for key, value in now.items():
            if key in UNCOMPARED_SETTINGS:
                continue
            if key not in was:
                if key in required:
                    return f"optimizer.param_groups[{i}] has no {key!r}, this run's is {value!r:.40}"
                continue
            if _plain(was[key]) != _plain(value):
                return (f"optimizer.param_groups[{i}].{key} is {describe(was[key])[:40]}, this run's {value!r:.40} "
                        f"(its configuration)")
    return None


def _plain(value: object) -> object:
    return tuple(value) if isinstance(value, list | tuple) else value


def _buffer_names(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> set[str] | None:
    """The per-parameter state a step of `optimizer` keeps for a parameter of `group`, or None when not known."""
    if isinstance(optimizer, torch.optim.Adam):  # AdamW too
        return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group.get("amsgrad") else set())
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer"} if group.get("momentum") else set()
    return None


def optimizer_problem(saved: dict[str, Any], optimizer: torch.optim.Optimizer, global_step: int, *,
                      weights_finite: bool) -> str | None:
    """Why a saved optimizer state (`check_resume` passed it) is not what this run's optimizer would hold at
    `global_step`, or None: the groups' settings and sizes, each parameter's buffers (the names a step keeps, the
    parameter's shape and dtype, finite unless the weights are not (a run diverging mid-epoch saves NaN in both;
    a square may overflow to infinity first), squares not negative) and step counts of `global_step`. Every
    parameter takes every optimizer step (each gets a gradient from every batch), so past step 0 each keeps its
    buffers, and its count is the run's. `optimizer`'s parameters hold the saved weights (the model is loaded
    first): one that is NaN or infinite must have non-finite buffers, as a step that diverges leaves them."""
    run = optimizer_settings(optimizer)
    if problem := settings_problem(saved["param_groups"], run):
        return problem
    owner: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
    for i, (was, now) in enumerate(zip(saved["param_groups"], optimizer.param_groups, strict=True)):
        if len(was["params"]) != len(now["params"]):
            return f"optimizer.param_groups[{i}]: {len(was['params'])} parameters, this run's {len(now['params'])}"
        owner.update((index, (param, now)) for index, param in zip(was["params"], now["params"], strict=True))
    for index, buffers in saved["state"].items():
        where = f"optimizer.state[{index}]"
        if index not in owner:
            return f"{where}: no parameter group lists parameter {index}"
        param, group = owner[index]
        names = _buffer_names(optimizer, group)
        if names is not None and set(buffers) != names:
            return f"{where}: holds {sorted(buffers)}, a step of this run's optimizer keeps {sorted(names)}"
        for name, value in buffers.items():
            if problem := _buffer_problem(name, value, param, global_step, weights_finite):
                return f"{where}.{name}: {problem}"
        if buffers and not bool(torch.isfinite(param).all()) and all(
                bool(torch.isfinite(v).all()) for k, v in buffers.items() if k != "step"):
            # A step makes a weight NaN or infinite only through its gradient, which its buffers then hold too
            # (and keep: a NaN moment stays NaN); a weight edited alone has finite ones.
            return f"{where}: finite buffers for a parameter that holds NaN or infinity (a diverging step leaves both)"
    for index, (_, group) in owner.items():
        if global_step and index not in saved["state"] and _buffer_names(optimizer, group):
            return (f"optimizer.state: nothing for parameter {index} at step {global_step} (every parameter takes "
                    f"every step, and keeps its buffers)")
    return None


def _buffer_problem(name: str, value: object, param: torch.Tensor, global_step: int,
                    weights_finite: bool) -> str | None:
    """Why one saved per-parameter buffer cannot continue this run at `global_step`, or None."""
    if not isinstance(value, torch.Tensor):
        return f"expected a tensor, got {type(value).__name__}"
    if name == "step":  # a float32 count of the optimizer steps this parameter took
        if value.dim() != 0 or value.dtype != torch.float32:
            return f"expected a float32 step count, got {value.dtype} of shape {tuple(value.shape)}"
        count = float(value)
        if count != global_step:  # one per optimizer step, and every parameter takes every step
            return f"{count:g} steps, this run is at step {global_step} (every parameter takes every step)"
        return None
    if value.shape != param.shape or value.dtype != param.dtype:
        return (f"{value.dtype} of shape {tuple(value.shape)} for a parameter of {param.dtype} "
                f"{tuple(param.shape)}")
    if weights_finite and name in SQUARES and bool(torch.isnan(value).any()):
        return "holds NaN, with finite weights (a diverging run's weights are not)"
    # A huge but finite gradient's square overflows to infinity while the weights stay finite (the step it scales
    # is then 0): a run with a far too high rate saves that before its weights turn NaN.
    if weights_finite and name not in SQUARES and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        return "holds NaN or infinity, with finite weights (a diverging run's weights are not)"
    if name in SQUARES and bool((value < 0).any()):
        return "holds a negative value (it is a running mean of squares)"
    return None


def as_this_run(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`saved` with each group's `fused` as this run's optimizer has it (load_state_dict places the step counts by
    it, and the device decides it)."""
    groups = [{**was, "fused": now["fused"]} if "fused" in now else was
              for was, now in zip(saved["param_groups"], optimizer.param_groups, strict=True)]
    return {**saved, "param_groups": groups}


def all_finite(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of `tensors` holds finite numbers only."""
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def _check_loss_sum(state: dict[str, Any]) -> str | None:
    """A non-finite running loss sum marks the run diverged when it resumes: only a run whose weights diverged too
    (NaN or infinite) saves one. A finite one is a sum of cross-entropies: never negative."""
    acc = state["progress"]["epoch_acc"]
    if acc is not None and acc["loss_sum"] < 0:
        return f"progress.epoch_acc.loss_sum: {acc['loss_sum']!r}, a sum of losses, is negative"
    if acc is None or is_finite(acc["loss_sum"]):
        return None
    if not all_finite(state["model"]):
        return None
    return f"progress.epoch_acc.loss_sum: {acc['loss_sum']!r} with finite weights (a diverged run's are not)"


def _check_running_var(tensors: dict[str, torch.Tensor], where: str) -> str | None:
    """Why a BatchNorm running variance of `tensors` (the model's or the EMA's) is not one training computes, or
    None: a running mean of variances is never negative, and NaN or infinite only once a weight is (the forward that
    overflows it gives NaN gradients, and the step then gives NaN weights)."""
    for key, value in tensors.items():
        if key.rsplit(".", 1)[-1] != "running_var":
            continue
        if bool((value < 0).any()):
            return f"{where}.{key}: holds a negative value (it is a running variance)"
        if not bool(torch.isfinite(value).all()) and all_finite(
                {k: t for k, t in tensors.items() if k.rsplit(".", 1)[-1] not in ("running_var", "running_mean")}):
            return f"{where}.{key}: holds NaN or infinity, with finite weights (a diverging run's are not)"
    return None


def _check_averages(state: dict[str, Any]) -> str | None:
    """Why the EMA or a BatchNorm batch count is not one training keeps, or None: the EMA averages the weights of
    every step, so it is finite while they are (a NaN weight stays NaN), and a count of batches is never negative."""
    for where in ("model", "ema"):
        for key, value in (state[where] or {}).items():
            if key.rsplit(".", 1)[-1] == "num_batches_tracked" and bool((value < 0).any()):
                return f"{where}.{key}: holds a negative value (it counts batches)"
    if state["ema"] is not None and not all_finite(state["ema"]) and all_finite(state["model"]):
        return "ema: holds NaN or infinity, with finite weights (an average of finite weights is finite)"
    return None


def _strings(x: object) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) for v in x)


def _check_data(data: object) -> str | None:
    """Why `data` is not the train/val fingerprints a run started on, with a folder's content samples, or None
    (older states have no data, or no content samples: those may not move, `train.config.check_movable`)."""
    if data is None:
        return None
    if not (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in ("train", "val"))):
        return "data: expected the train and val fingerprints"
    for key in (content_key("train"), content_key("val")):
        if key in data and not isinstance(data[key], str):
            return f"data.{key}: expected a content sample's digest (text), got {describe(data[key])[:40]}"
    return None


def _check_position(state: dict[str, Any]) -> str | None:
    """Why the progress counters disagree with each other or with the file's batch, or None: a run at step s of
    epoch e has taken e x steps_per_epoch + s optimizer steps, and each trained one global batch."""
    progress, per_epoch = state["progress"], state["steps_per_epoch"]
    epoch, step = progress["epoch"], progress["step_in_epoch"]
    if progress["global_step"] != epoch * per_epoch + step:
        return (f"progress.global_step is {progress['global_step']}, but epoch {epoch} and step {step} of "
                f"{per_epoch} steps per epoch make {epoch * per_epoch + step}")
    for i, record in enumerate(progress["history"]):
        if is_finite(record.get("step")) and record["step"] > progress["global_step"]:
            return f"progress.history[{i}].step is {record['step']}, after the run's step {progress['global_step']}"
    last = progress["last_eval"]
    if last is not None and not 0 <= last["global_step"] <= progress["global_step"]:
        return (f"progress.last_eval.global_step is {last['global_step']}, not a step from 0 to "
                f"{progress['global_step']}")
    batch, world = state.get("global_batch"), state.get("world_size")  # older states have neither
    for key, value in (("global_batch", batch), ("world_size", world)):
        if value is not None and not (is_int(value) and value >= 1):
            return f"{key}: expected a whole number >= 1, got {describe(value)[:40]}"
    if batch is not None and world is not None and batch % world:
        return f"global_batch {batch} is not a multiple of world_size {world}"
    if batch is not None and progress["samples_seen"] != progress["global_step"] * batch:
        return (f"progress.samples_seen is {progress['samples_seen']}, but {progress['global_step']} steps of a "
                f"global batch of {batch} trained {progress['global_step'] * batch}")
    acc = progress["epoch_acc"]
    if acc is None:  # mid-epoch only in a state the trainer did not write (`_apply_state` refuses that)
        return None
    if acc["corrupt"] > acc["samples"]:
        return f"progress.epoch_acc.corrupt is {acc['corrupt']}, more than its {acc['samples']} samples"
    if batch is not None and world is not None:
        # Every rank's samples since the sums went over all ranks; rank 0's alone in states written before.
        low, high = step * (batch // world), step * batch
        if not low <= acc["samples"] <= high:
            return (f"progress.epoch_acc.samples is {acc['samples']}, but {step} steps of a global batch of {batch} "
                    f"trained {high}")
    return None


def check_resume(state: dict[str, Any]) -> str | None:
    """Why `state` is not a resume state this code wrote (types and keys), or None when it looks whole."""
    missing = [k for k in ("config", "steps_per_epoch", "model", "optimizer", "scheduler", "ema", "rng", "progress")
               if k not in state]
    if missing:
        return f"missing {', '.join(missing)}"
    if problem := tensor_problem(state):  # before any check's op reads one
        return problem
    if not isinstance(state["config"], dict) or not all(isinstance(k, str) for k in state["config"]):
        return "config: expected a dict of options"
    for key, value in state["config"].items():  # the configuration's own checks quote a wrong value in full
        if not _option(value):
            return f"config.{key[:80]}: expected a value or a list of values, got {describe(value)}"
    if not is_int(state["steps_per_epoch"]) or state["steps_per_epoch"] < 0:
        return "steps_per_epoch: expected a non-negative integer"
    if not _tensor_dict(state["model"]):
        return "model: expected a dict of tensors"
    if state["ema"] is not None and not _tensor_dict(state["ema"]):
        return "ema: expected a dict of tensors or None"
    for where in ("model", "ema"):
        if state[where] is not None and (problem := _check_running_var(state[where], where)):
            return problem
    if problem := _check_averages(state):
        return problem
    if problem := _check_optimizer(state["optimizer"]):
        return problem
    if not isinstance(state["scheduler"], dict):
        return "scheduler: expected a dict"
    # The CPU threads the run computed with (`train.trainer.changed_numerics`); older states go without.
    if state.get("threads") is not None and not (is_int(state["threads"]) and state["threads"] >= 1):
        return f"threads: expected a whole number >= 1, got {describe(state['threads'])[:40]}"
    return (_check_rng(state["rng"]) or _check_progress(state["progress"]) or _check_position(state)
            or _check_loss_sum(state) or _check_data(state.get("data")))


# What a writer killed mid-write leaves in a run directory: atomic_write_bytes's `.<name>.<8 chars>.tmp`, the
# checkpoint's fixed temporary, and the plot's `.curves.png.tmp` of runs before it was written atomically too.
# Nothing else is ours to delete.
_OWN_TEMPORARY = re.compile(r"\.(resume\.pt|metrics\.jsonl|checkpoint\.json|curves\.png)\.[a-z0-9_]{8}\.tmp"
                            r"|\.curves\.png\.tmp|\.weights\.tmp\.safetensors")
# safetensors writes the weights to a `.tmp<6 characters>` file of its own beside them (Rust's tempfile), then
# renames it. That name is an ordinary one (a user's `.tmpbackup`), so such a file is not taken for ours by its name:
# see `safetensors_temporary`.
_SAFETENSORS_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")
MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own bound on its JSON header


def own_temporary(name: str) -> bool:
    """Whether `name` is a temporary file vitc's writers leave in a run directory when killed mid-write."""
    return _OWN_TEMPORARY.fullmatch(name) is not None


def safetensors_temporary_name(name: str) -> bool:
    """Whether `name` has the form of safetensors' own temporary (`.tmp` and 6 letters or digits)."""
    return _SAFETENSORS_TEMPORARY.fullmatch(name) is not None


def safetensors_temporary(path: Path) -> bool:
    """Whether `path` is safetensors' temporary as a killed checkpoint save leaves it: that name, a regular file (not
    a link) and a safetensors file by its first bytes (an 8-byte little-endian header length, then '{')."""
    if not safetensors_temporary_name(path.name):
        return False
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # swapped for a link or a FIFO meanwhile
        try:
            head = os.read(fd, 9)
        finally:
            os.close(fd)
    except OSError:
        return False
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") <= MAX_SAFETENSORS_HEADER and head[8:] == b"{"


def clear_stale_temporaries(out_dir: str | os.PathLike) -> None:
    """Remove temp files a killed writer left behind (the renamed targets are intact): vitc's own names, and
    safetensors' temporary only where it is one (`safetensors_temporary`) in a directory that already is a run.

    Nothing else is removed: a user's file of the same name in a directory that holds no run is theirs.
    """
    out = Path(out_dir)
    weights_temporaries = []
    for tmp in out.iterdir():
        if own_temporary(tmp.name) and tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
        elif safetensors_temporary(tmp):
            weights_temporaries.append(tmp)
    if weights_temporaries and is_run_dir(out):
        for tmp in weights_temporaries:
            tmp.unlink(missing_ok=True)


def is_run_dir(out_dir: str | os.PathLike) -> bool:
    """Whether `out_dir` holds this project's training run: a valid checkpoint.json or resume.pt."""
    out = Path(out_dir)
    try:
        read_checkpoint_meta(out)
        return True
    except CheckpointError:
        pass
    try:
        return load_resume(out, mmap=True) is not None
    except CheckpointError:
        return False
