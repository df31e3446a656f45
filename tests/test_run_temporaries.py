"""What a training killed mid-write leaves in its run directory is removed by the next run, and nothing else:
safetensors writes the weights to a `.tmp<6 chars>` file of its own (Rust's tempfile) before renaming it."""

from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from train.state import clear_stale_temporaries, own_temporary, safetensors_temporary_name


def test_safetensors_own_temporary_is_ours():
    """Its name as safetensors makes it (watched while a large file is written), then as the next run clears it."""
    with tempfile.TemporaryDirectory() as d:
        seen: set[str] = set()
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.update(os.listdir(d))
                time.sleep(0.0002)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            save_file({"x": torch.zeros(8_000_000)}, os.path.join(d, ".weights.tmp.safetensors"))
        finally:
            done.set()
            watcher.join()
        made = seen - {".weights.tmp.safetensors"}
        if not made:
            pytest.skip("the write ended between two looks: no temporary seen")
        assert all(own_temporary(n) or safetensors_temporary_name(n) for n in made), seen


def test_the_next_run_clears_them_and_nothing_else(tmp_path):
    ours = [".weights.tmp.safetensors", ".resume.pt.ab12cd34.tmp"]
    # `.tmpA1b2C3` has safetensors' name but is no safetensors file, in no run: a user's (tests/test_checkpoint_races)
    theirs = [".tmpA1b2C3", ".tmpA1b2C", ".tmpA1b2C3x", "tmpA1b2C3", "notes.txt", ".tmp-a1b2c"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    clear_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)
