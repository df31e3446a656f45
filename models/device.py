"""Device names (cpu, cuda, cuda:N) and the NVIDIA driver probe, on the ground floor: the runtimes, the server's
settings and the benchmarks accept the same names within the same bounds, and say the same thing of a missing
driver."""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator

# cuda:0 to cuda:99: far above any one machine's GPUs, low enough that a typo (cuda:100) is refused when the
# settings are read rather than when a model loads.
# ASCII digits without a leading zero: torch.device refuses "cuda:01" and Unicode digits ("cuda:\u0663"), which
# `\d` would let through to fail only when a model loads.
GPU_INDEX = r"(0|[1-9][0-9]?)"
DEVICE_RE = re.compile(rf"^(cpu|cuda(:{GPU_INDEX})?)$")
DEVICE_RULE = "cpu, cuda or cuda:N (N from 0 to 99)"

DRIVER_LIBRARIES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll", "libcuda.dylib")
NO_DRIVER = "no NVIDIA driver (libcuda.so.1 not found)"


def is_device(value: object) -> bool:
    """Whether `value` is a device name: cpu, cuda or cuda:N with N below 100."""
    # fullmatch: `$` alone would let a trailing newline ("cuda\n") through
    return isinstance(value, str) and DEVICE_RE.fullmatch(value) is not None


def is_gpu_index(value: object) -> bool:
    """Whether `value` is a GPU index as cuda:N takes it: 0 to 99 in ASCII digits, no leading zero."""
    return isinstance(value, str) and re.fullmatch(GPU_INDEX, value) is not None


def cuda_version_text(version: int) -> str:
    """CUDA's integer version (1000 * major + 10 * minor, e.g. 13000) as "13.0"."""
    return f"{version // 1000}.{version % 1000 // 10}"


def _driver_libraries(libraries: tuple[str, ...]) -> Iterator[ctypes.CDLL]:
    """The NVIDIA driver libraries among `libraries` that load here, in that order, each loaded when reached."""
    for name in libraries:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        yield lib


def has_driver(libraries: tuple[str, ...] = DRIVER_LIBRARIES) -> bool:
    """Whether an NVIDIA driver library (libcuda) can be loaded here; needs no GPU."""
    return next(_driver_libraries(libraries), None) is not None


def driver_cuda_version(libraries: tuple[str, ...] = DRIVER_LIBRARIES) -> str | None:
    """The newest CUDA version the installed driver supports ("13.0", from the driver library's own
    cuDriverGetVersion, which needs no GPU context); None where no driver library can be loaded or it fails."""
    for lib in _driver_libraries(libraries):
        version = ctypes.c_int(0)
        with contextlib.suppress(AttributeError, OSError):
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0 and version.value > 0:
                return cuda_version_text(version.value)
    return None
