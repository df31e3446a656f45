"""Whether an error is the machine failing (out of memory, a full disk, the storage) rather than the input: the
classification every command and stage shares (models.cli turns it into the one line and exit code 1)."""

from __future__ import annotations

import errno
import re

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
        if library_error(exc) and any(m in str(exc).lower() for m in _OOM_MARKERS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def library_error(exc: BaseException) -> bool:
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


def machine_reason(exc: BaseException) -> str | None:
    """One line for `exc` when it is the machine failing (out of memory, a full disk, an I/O error), else None."""
    reason = out_of_memory(exc)
    if reason is None and storage_failure(exc):
        reason = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return reason
