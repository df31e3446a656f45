"""What a library module of the benchmarks does when run as a command: it is none, and says which are."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

COMMANDS = ("latency", "load", "overhead", "gpu_check")  # the package's commands; its other modules are their library


def library_module(spec: ModuleSpec | None) -> NoReturn:
    """Run as `python -m benchmarks.X` (`spec`: its __spec__; None run as a file) where X is one of the commands'
    library modules: say so in one line, naming the commands, and exit 2 (it ran nothing, and exited 0 without a
    word, whatever its arguments)."""
    prog = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    print(f"{prog}: error: a library module of the benchmarks, not a command: run python -m benchmarks."
          f"{' | '.join(COMMANDS)}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    library_module(__spec__)
