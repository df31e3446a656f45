"""The project's extras and install hints: which extra brings a missing module, `require` to check them up front,
and the pip command that installs them, for a checkout or an installed wheel."""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable, Sequence

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
