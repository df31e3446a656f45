"""matplotlib for files only (Agg), usable where HOME is read-only (a container's readOnlyRootFilesystem)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend. Without a writable config directory (HOME read-only or absent),
    matplotlib warned twice and then refused to draw; it gets a private temporary one instead."""
    if "MPLCONFIGDIR" not in os.environ and not _writable(Path(os.environ.get("HOME") or "/nonexistent")):
        # One per user, reused (its font cache is built once), private: not a new directory every run.
        private = Path(tempfile.gettempdir()) / f"vitc-matplotlib-{os.getuid()}"
        try:
            private.mkdir(mode=0o700, exist_ok=True)
            if private.is_symlink() or private.stat().st_uid != os.getuid():
                raise PermissionError(f"{private} is not this user's own directory")
            os.environ["MPLCONFIGDIR"] = str(private)
        except OSError:  # no writable temporary directory either: matplotlib says why when it draws
            pass
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _writable(home: Path) -> bool:
    config = home / ".config" / "matplotlib"
    probe = next((p for p in (config, config.parent, home) if p.exists()), None)
    return probe is not None and os.access(probe, os.W_OK | os.X_OK)
