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
        try:
            os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="vitc-matplotlib-")
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
