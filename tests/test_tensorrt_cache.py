"""The TensorRT timing cache is a convenience, never a failure: `import runtimes` worked only with a home directory
(a container user with no HOME and no passwd entry crashed every command), and an unwritable cache directory failed
a model whose engine had built. Runs without TensorRT: the cache is plain files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from runtimes import tensorrt

ROOT = Path(__file__).resolve().parents[1]


def test_runtimes_import_for_a_user_without_a_home():
    """As for a container user with neither HOME nor a passwd entry: Path.home() raises."""
    code = ("import pathlib\n"
            "def no_home(cls):\n    raise RuntimeError('Could not determine home directory.')\n"
            "pathlib.Path.home = classmethod(no_home)\n"
            "import runtimes, runtimes.tensorrt as t\nprint(t.cache_dir())")
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr[-2000:]


def test_the_cache_is_read_and_kept_where_it_can_be_and_skipped_where_not(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = tensorrt.timing_cache({"gpu": "NVIDIA H200", "compute_capability": "90"}, "10.9.0")
    assert path == tmp_path / "xdg" / "vitc" / "tensorrt-10.9.0-sm90-nvidia-h200.cache"
    assert tensorrt.read_cache(path) == b"" and tensorrt.save_cache(path, b"timings")
    assert tensorrt.read_cache(path) == b"timings"
    (tmp_path / "file").write_text("x")
    blocked = tmp_path / "file" / "vitc" / "t.cache"  # its directory cannot be made: a read-only home does the same
    assert tensorrt.save_cache(blocked, b"timings") is False and tensorrt.read_cache(blocked) == b""
    assert tensorrt.save_cache(None, b"timings") is False and tensorrt.read_cache(None) == b""
    assert tensorrt.read_cache(tmp_path) == b""  # a directory where the file should be
