"""The runtimes' usage telemetry, kept off: onnxruntime (Microsoft's 1DS) and OpenVINO/NNCF (Google Analytics)
send usage events by default and write tracking ids under $HOME, unannounced. A server inside someone's cluster
must not phone home, and a read-only $HOME must not turn its first log line into a coloured warning."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def off() -> None:
    """Turn the telemetry of onnxruntime and OpenVINO off for this process, unless the user opted in explicitly."""
    # onnxruntime reads it when it creates its environment (the first session); ORT_DISABLE_TELEMETRY=0 keeps it on.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if importlib.util.find_spec("openvino_telemetry") is None:
        return
    from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

    if getattr(OptInChecker.check, "_vitc", False):
        return
    asked = OptInChecker.check

    def check(self: Any, *args: Any, **kwargs: Any) -> Any:
        # No consent file means "send" to OpenVINO's tools; here it means no. An explicit opt-in
        # (`opt_in_out --opt_in`, ~/intel/openvino_telemetry = 1) is still honoured.
        try:
            result = asked(self, *args, **kwargs)
        except Exception:
            # A consent file that cannot be looked for is no consent: Path.home() raises RuntimeError with neither
            # $HOME nor a passwd entry (a container's arbitrary UID), and OpenVINO would let it fail every model.
            return ConsentCheckResult.DECLINED
        return ConsentCheckResult.DECLINED if result == ConsentCheckResult.NO_FILE else result

    check._vitc = True  # type: ignore[attr-defined]
    OptInChecker.check = check


@contextlib.contextmanager
def quiet_child_env() -> Iterator[dict[str, str]]:
    """The environment for a runtime's own tool run as a child process (OpenVINO's benchmark_app), which this
    process cannot reach: onnxruntime's variable, and a temporary $HOME holding OpenVINO's opt-out file."""
    with tempfile.TemporaryDirectory(prefix="vitc-home-") as home:
        (Path(home) / "intel").mkdir()
        (Path(home) / "intel" / "openvino_telemetry").write_text("0")  # what `opt_in_out --opt_out` writes
        yield {**os.environ, "ORT_DISABLE_TELEMETRY": os.environ.get("ORT_DISABLE_TELEMETRY", "1"), "HOME": home}
