"""hDL findings 1-4 (fDJ): resume.pt, a study's run results and study.json, and the sweep's run logs as a hostile
hand wrote them. Each is refused in one line, in bounded time and memory, and nothing outside is read or written.

The code before these fixes took hours or all memory on several of these files, so those cases run in a fresh
interpreter under an address-space limit and a 60 s guard (`_isolated`): the guard is what fails there, not a timing.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from test_sweep import _recorded_study

from models.checkpoint import CheckpointError
from train.state import RESUME_FILE, capture_rng, load_resume, save_resume
from train.sweep import runner
from train.sweep.__main__ import main as sweep_main
from train.sweep.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
GUARD_S = 60  # the old code ran for minutes to hours on these inputs; the fixed one answers in seconds
ADDRESS_SPACE = 4 << 30  # bytes a guarded interpreter may map: torch fits, an exponential repr does not
DEEP = 40  # levels of `x = [x, x]`: 2**40 elements for whatever walks it as a tree (about 2 KB on disk)
PLACEHOLDER = "fdj-placeholder-key"


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def _isolated(code: str, *args: str) -> subprocess.CompletedProcess:
    """`code` (or `-m <module>` with `args`) in a fresh interpreter, limited in memory and killed after GUARD_S."""
    argv = [sys.executable, "-c", textwrap.dedent(code), *args] if code else [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    try:
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=GUARD_S,
                              preexec_fn=_limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {GUARD_S} s (unbounded work on a small hostile file)")


def _tiny_state(**edits: object) -> dict:
    """A resume state check_resume accepts, as small as one can be, with top-level `edits`."""
    progress = {"epoch": 0, "step_in_epoch": 1, "global_step": 1, "history": [], "train_time_s": 0.1,
                "wall_time_s": 0.2, "cpu_time_s": 0.2, "samples_seen": 16, "segments": 0, "epoch_acc": None,
                "last_eval": None, "started": "2026-01-01T00:00:00Z"}
    state = {"config": {"model": "vit_c_micro"}, "steps_per_epoch": 10, "model": {"w": torch.arange(4.0)},
             "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}]}, "scheduler": {},
             "ema": None, "rng": capture_rng(), "progress": progress}
    return {**state, **edits}


def _dag(depth: int) -> list:
    """`x = [x, x]`, `depth` times: a few bytes a level in a pickle, 2**depth elements as a tree."""
    x: list = [0]
    for _ in range(depth):
        x = [x, x]
    return x


def _wide(levels: int = 12, fan: int = 8) -> list:
    """`x = [x] * fan`, `levels` times: shallow, and fan**levels values as a tree (8**12: 69 billion)."""
    x: list = [0]
    for _ in range(levels):
        x = [x] * fan
    return x


def _with_pickle_edit(run: Path, state: dict, opcodes: bytes) -> None:
    """resume.pt of `state` in `run`, with the pickled PLACEHOLDER string replaced by `opcodes` (what the pickler
    cannot write, or the test could not build: a tuple key that Python hashes in full, nesting past its recursion)."""
    save_resume(run, state)
    path = run / RESUME_FILE
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    text = PLACEHOLDER.encode()
    spelled = b"X" + struct.pack("<I", len(text)) + text
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members:
            if name.endswith("data.pkl"):
                assert data.count(spelled) == 1
                data = data.replace(spelled, opcodes)
            z.writestr(name, data)


def _tuple_dag_opcodes(depth: int) -> bytes:
    """Pickle opcodes leaving `x = (x, x)` of `depth` levels on the stack (memo slots far above torch.save's)."""
    ops = b"K\x00\x85"  # (0,)
    for level in range(depth):
        slot = struct.pack("<I", 1_000_000 + level)
        ops += b"r" + slot + b"j" + slot + b"\x86"  # memo it, fetch it again: a pair of the same tuple
    return ops


def _refused(run: Path) -> str:
    with pytest.raises(CheckpointError) as exc:
        load_resume(run)
    message = str(exc.value)
    assert "\n" not in message and len(message) < 2000, message
    return message


# ---------------------------------------------------------------- 1: values a tree walk would take 2**n steps over


LOAD = """
    import sys
    from models.checkpoint import CheckpointError
    from train.state import load_resume
    try:
        load_resume(sys.argv[1])
    except CheckpointError as exc:
        print("refused:", exc)
    else:
        print("loaded")
"""


def test_hdl_shared_reference_optimizer_setting_is_one_line_exit_2(tmp_path):
    """hDL's file: a 2 KB resume.pt whose weight_decay is `x = [x, x]` 25 deep took 19 s and 870 MB to refuse (the
    message's repr built all 2**25 elements before cutting them to 80 characters); 40 deep, hours."""
    group = {"params": [], "lr": 0.1, "weight_decay": _dag(DEEP)}
    torch.save({"version": 1, "config": {}, "steps_per_epoch": 1, "model": {}, "ema": None,
                "optimizer": {"state": {}, "param_groups": [group]}, "scheduler": {}, "rng": {}, "progress": {}},
               tmp_path / RESUME_FILE)
    assert (tmp_path / RESUME_FILE).stat().st_size < 4000
    done = _isolated("", "-m", "train", "--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits",
                     "--epochs", "1", "--batch-size", "16", "--train-subset", "64", "--val-subset", "16",
                     "--threads", "1", "--no-progress", "--resume", "--out", str(tmp_path))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "resume.pt is damaged or from another run" in lines[0], lines


def test_check_resume_describes_a_shared_reference_value_without_building_it(tmp_path):
    """check_resume's own messages (every `got ...`) describe a value from a bounded preview, whatever reaches them."""
    done = _isolated(f"""
        from train.state import check_resume
        x = [0]
        for _ in range({DEEP}):
            x = [x, x]
        state = {{"config": {{}}, "steps_per_epoch": 1, "model": {{}}, "ema": None, "scheduler": {{}}, "rng": {{}},
                 "progress": {{}}, "optimizer": {{"state": {{}}, "param_groups": [
                     {{"params": [], "lr": 0.1, "weight_decay": x}}]}}}}
        print(check_resume(state))
        state["optimizer"]["param_groups"][0] = {{"params": [], "lr": 0.1, "betas": (x, x)}}
        print(check_resume(state))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout.splitlines()
    assert len(said) == 2 and all(len(line) < 300 for line in said), said
    assert said[0].startswith("optimizer.param_groups[0].weight_decay: expected a non-negative number, got [[")
    assert said[1].startswith("optimizer.param_groups[0].betas: expected two numbers in [0, 1), got ")


def test_a_config_value_of_shared_references_is_refused_before_the_configuration_reads_it(tmp_path):
    """check_resume took any config values; the configuration's own checks then repr'd a wrong one in full."""
    save_resume(tmp_path, _tiny_state(config={"model": "vit_c_micro", "epochs": _wide()}))
    assert "config.epochs" in _refused(tmp_path)
    save_resume(tmp_path, _tiny_state(config={"model": "vit_c_micro", "epochs": [[1, 2]]}))  # within every bound
    assert _refused(tmp_path).startswith("resume.pt is damaged or from another run: config.epochs: expected a value "
                                         "or a list of values, got [[1, 2]]")
    save_resume(tmp_path, _tiny_state(config={"model": "vit_c_micro", "epochs": _wide()}))
    done = _isolated("", "-m", "train", "--device", "cpu", "--model", "vit_c_micro", "--dataset", "digits",
                     "--epochs", "1", "--threads", "1", "--no-progress", "--resume", "--out", str(tmp_path))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert "resume.pt is damaged or from another run: config.epochs" in lines[0], lines


@pytest.mark.parametrize("where", ["scheduler.base_lrs", "optimizer.param_groups[0].initial_lr", "progress.notes.a"])
def test_shared_references_anywhere_in_the_state_are_refused_naming_where(tmp_path, where):
    """Places check_resume does not read value by value (the schedule, a group's other keys, extra counters) are
    kept, deep-copied, saved again: bounded up front, whatever reads them later."""
    state = _tiny_state()
    if where.startswith("scheduler"):
        state["scheduler"] = {"base_lrs": _wide()}
    elif where.startswith("optimizer"):
        state["optimizer"]["param_groups"][0]["initial_lr"] = _wide()
    else:
        state["progress"]["notes"] = {"a": _wide()}
    save_resume(tmp_path, state)
    message = _refused(tmp_path)
    assert message.startswith(f"resume.pt is damaged or from another run: {where}: holds more than 33,554,432 "
                              "values"), message
    state = _tiny_state(scheduler={"x": _dag(DEEP)})  # narrow, and deeper than any resume state
    save_resume(tmp_path, state)
    assert _refused(tmp_path).endswith("scheduler: holds values nested more than 32 levels deep")


def test_a_value_that_contains_itself_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    save_resume(tmp_path, _tiny_state(scheduler={"loop": loop}))
    assert "contains itself" in _refused(tmp_path)


def test_nesting_deeper_than_python_recurses_is_refused_in_one_line(tmp_path):
    """100,000 nested lists (a few hundred KB): torch.load builds them, anything recursive over them then fails."""
    levels = 100_000
    _with_pickle_edit(tmp_path, _tiny_state(scheduler={"deep": PLACEHOLDER}), b"]" * levels + b"a" * (levels - 1))
    assert "nested more than" in _refused(tmp_path)


def test_a_tuple_key_of_shared_references_is_refused_before_torch_load_hashes_it(tmp_path):
    """A dict key `x = (x, x)` 40 deep: torch.load's own unpickler hashes it, all 2**40 elements (hours)."""
    _with_pickle_edit(tmp_path, _tiny_state(scheduler={PLACEHOLDER: 1}), _tuple_dag_opcodes(DEEP))
    done = _isolated(LOAD, str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("refused: cannot read resume state ") and "tuple" in done.stdout, done.stdout


def test_a_state_as_the_trainer_writes_it_still_loads(tmp_path):
    """The bounds leave every real state alone (a few levels deep; each group shares its betas with the others)."""
    betas = (0.9, 0.999)
    groups = [{"params": [i], "lr": 0.1, "betas": betas, "weight_decay": 0.05} for i in range(50)]
    history = [{"epoch": e, "step": 1, "train_loss": 1.0, "val_top1": 0.5} for e in range(2000)]
    state = _tiny_state(optimizer={"state": {}, "param_groups": groups})
    state["progress"]["history"] = history
    save_resume(tmp_path, state)
    loaded = load_resume(tmp_path)
    assert loaded is not None and len(loaded["progress"]["history"]) == 2000


# ---------------------------------------------------------------- 4: the zip directory's size, from its end record


def _many_entries_zip(path: Path, n: int, *, zip64: bool = False) -> None:
    """hDL's mkzip.py: `n` stored, empty entries with hex names, their directory and end record (zip64: the counts
    and size in a zip64 record, 0xFFFF in the classic one, as torch.save's writer lays out its end records)."""
    with path.open("wb") as f:
        _many_entries_zip_to(f, n, zip64=zip64)


def _many_entries_zip_to(f: io.RawIOBase | io.BufferedIOBase, n: int, *, zip64: bool = False,
                         offset_field: int | None = None) -> None:
    """`_many_entries_zip` into `f`; `offset_field`: what the end record says of the directory's offset."""
    body, central, offset = bytearray(), bytearray(), 0
    for i in range(n):
        name = b"%x" % i
        local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name
        body += local
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0,
                               0, 0, offset) + name
        offset += len(local)
    end = b""
    count = min(n, 0xFFFF)
    if zip64:
        record_at = offset + len(central)
        end += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), offset)
        end += struct.pack("<IIQI", 0x07064B50, 0, record_at, 1)
        count = 0xFFFF
    offset = offset if offset_field is None else offset_field
    end += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, len(central), offset, 0)
    f.write(bytes(body + central + end))


@pytest.mark.parametrize("zip64", [False, True])
def test_a_zip_of_many_entries_is_not_a_resume_state_vitc_wrote(tmp_path, zip64):
    """1,000,000 empty entries (85 MB) took 30 s and 500 MB before torch refused them, and the message blamed the
    disk; 30,000 show the bound as well, in well under a second."""
    _many_entries_zip(tmp_path / RESUME_FILE, 30_000, zip64=zip64)
    message = _refused(tmp_path)
    assert message.startswith(f"cannot read resume state {tmp_path / RESUME_FILE}: its zip directory lists "
                              "30,000 entries"), message
    assert "not a resume state vitc wrote" in message and "disk" not in message, message


def test_an_end_record_its_directory_does_not_hold_is_the_corrupt_refusal(tmp_path):
    """A count that changed in the end record (a flipped bit) is still damage, not a file vitc did not write."""
    save_resume(tmp_path, _tiny_state())
    path = tmp_path / RESUME_FILE
    data = bytearray(path.read_bytes())
    end = data.rfind(b"PK\x05\x06")
    data[end + 10:end + 12] = (30_000).to_bytes(2, "little")  # the total count alone: 7 entries are listed
    path.write_bytes(data)
    message = _refused(tmp_path)
    assert message.startswith(f"cannot read resume state {path}: it is corrupt: its zip end record lists 30,000 "
                              "entries"), message


def test_the_end_record_is_found_where_zipfile_finds_it():
    """The record zipfile reads is the last 22 bytes when they hold one: a search for the last signature found the
    bytes `PK\x05\x06` spelt by that record's own offset field instead, and then checked nothing (golden.npz)."""
    from models.io import read_zip_end

    buf = io.BytesIO()
    _many_entries_zip_to(buf, 30_000, offset_field=0x06054B50)
    zipfile.ZipFile(io.BytesIO(buf.getvalue())).close()  # zipfile reads the directory, whatever that field says
    end = read_zip_end(io.BytesIO(buf.getvalue()))
    assert end is not None and end.entries == end.classic_entries == 30_000 and end.consistent, end


def test_the_entry_bound_fits_the_largest_model_with_a_wide_margin():
    """A torch.save zip has one entry a tensor storage plus a few: the weights, the EMA's, AdamW's three buffers
    (four with amsgrad) for each parameter, the RNG states and the fixed records."""
    from models.registry import build_model, list_variants
    from train.state import MAX_RESUME_ENTRIES

    most = 0
    for name in list_variants():
        with torch.device("meta"):
            net = build_model(name, num_classes=1000)
        tensors, params = len(net.state_dict()), len(list(net.parameters()))
        most = max(most, 2 * tensors + 4 * params + 16 + 3 + 8)  # + 16 GPUs' RNG states, torch's, numpy's
    assert most * 10 <= MAX_RESUME_ENTRIES, (most, MAX_RESUME_ENTRIES)


def test_a_real_resume_state_is_within_the_directory_bounds(tmp_path):
    from train.state import MAX_RESUME_DIRECTORY, MAX_RESUME_ENTRIES

    tensors = {f"blocks.{i}.attn.qkv.weight": torch.zeros(2) for i in range(300)}
    save_resume(tmp_path, _tiny_state(model=tensors, ema=dict(tensors)))
    with zipfile.ZipFile(tmp_path / RESUME_FILE) as z:
        entries = len(z.infolist())
        directory = sum(46 + len(i.filename.encode()) + len(i.extra) + len(i.comment) for i in z.infolist())
    # Per entry, the bound leaves room for 10 times the largest model's entries at this size each.
    assert directory / entries * MAX_RESUME_ENTRIES <= MAX_RESUME_DIRECTORY, (directory, entries)
    assert load_resume(tmp_path) is not None


# ---------------------------------------------------------------- 2: a study's run results and study.json


SPEC = RunSpec("vit_c_nano", "digits", "adamw", 1e-3, 0.05, 1)
NESTED = "[" * 200_000 + "]" * 200_000


def test_a_deeply_nested_result_is_a_damaged_record(tmp_path):
    path = runner.result_path(tmp_path, SPEC)
    path.parent.mkdir(parents=True)
    path.write_text(NESTED)
    assert not runner.is_done(tmp_path, SPEC)  # a resume trains it again
    (why,) = runner.damaged_results(tmp_path, [SPEC])
    assert why.startswith(f"{path}: ") and "nested too deeply" in why and "\n" not in why, why


def test_report_only_names_a_deeply_nested_result_exit_2(tmp_path, capsys):
    out, _ = _recorded_study(tmp_path)
    victim = sorted((out / runner.RESULTS_DIR).iterdir())[0]
    victim.write_text(NESTED)
    assert sweep_main(["--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"damaged run result {victim}: " in err[0], err


@pytest.mark.parametrize("kind", ["fifo", "device link", "directory"])
def test_a_result_that_is_no_regular_file_is_damaged_without_being_read(tmp_path, kind):
    """A FIFO hung the sweep for good; a link to /dev/zero read until memory ran out."""
    path = runner.result_path(tmp_path, SPEC)
    path.parent.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device link":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()
    done = _isolated(f"""
        from pathlib import Path
        from train.sweep import runner
        from train.sweep.spec import RunSpec
        spec = RunSpec.from_dict({json.dumps(SPEC.to_dict())})
        print(runner.read_result(Path({str(tmp_path)!r}), spec))
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("(None, 'is not a regular file ("), done.stdout


def test_a_result_linked_to_a_regular_file_is_still_read(tmp_path):
    """Links to regular files are followed, as for runtime.json (a study copied with its results linked)."""
    from test_sweep import _fake_result

    elsewhere = tmp_path / "kept.json"
    elsewhere.write_text(json.dumps(_fake_result(SPEC, 20.0)))
    path = runner.result_path(tmp_path, SPEC)
    path.parent.mkdir(parents=True)
    path.symlink_to(elsewhere)
    assert runner.is_done(tmp_path, SPEC)


def test_a_deeply_nested_study_record_is_refused_in_one_line(tmp_path, capsys):
    out, _ = _recorded_study(tmp_path)
    (out / "study.json").write_text(NESTED)
    assert sweep_main(["--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{out / 'study.json'}: not a readable study record" in err[0], err
    assert "nested too deeply" in err[0], err


# ---------------------------------------------------------------- 3: the run log beside each training directory


def _failing_run(runs: Path) -> Path:
    """A run directory `python -m train` refuses at once (not empty, and no run of its own): it exits 2."""
    run_dir = runs / SPEC.run_id
    run_dir.mkdir(parents=True)
    (run_dir / "junk.txt").write_text("junk")
    return run_dir


def test_a_log_linked_elsewhere_is_replaced_and_nothing_is_written_through_it(tmp_path):
    """hDL: training output was appended to whatever file the link named (and a legacy log too)."""
    runs = tmp_path / "runs"
    run_dir = _failing_run(runs)
    (run_dir / runner.LEGACY_LOG).write_text("an earlier attempt's output\n")
    victim = tmp_path / "victim.txt"
    victim.write_text("victim original content\n")
    log = runner.log_path(runs, SPEC)
    log.symlink_to(victim)
    with pytest.raises(runner.RunFailed) as exc:
        runner.run_one(SPEC, tmp_path / "study", runs, runner.WorkerSlot(1))
    assert exc.value.code == 2 and "is not empty" in str(exc.value), exc.value
    assert victim.read_text() == "victim original content\n"
    assert not log.is_symlink() and log.is_file()
    text = log.read_text()
    assert text.startswith("an earlier attempt's output\n") and "python -m train: error:" in text, text


RUN_ONE = """
    import sys
    from pathlib import Path
    from train.sweep import runner
    from train.sweep.spec import RunSpec
    spec = RunSpec.from_dict({spec})
    try:
        runner.run_one(spec, Path(sys.argv[1]) / "study", Path(sys.argv[1]) / "runs", runner.WorkerSlot(1))
    except runner.RunFailed as exc:
        print("failed", exc.code, exc)
"""


def test_a_log_that_is_a_fifo_is_refused_without_waiting_on_it(tmp_path):
    """open(log, "ab") on a FIFO waits for a reader that never comes."""
    runs = tmp_path / "runs"
    _failing_run(runs)
    os.mkfifo(runner.log_path(runs, SPEC))
    done = _isolated(RUN_ONE.format(spec=json.dumps(SPEC.to_dict())), str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout.strip().splitlines()
    assert len(said) == 1 and said[0].startswith(f"failed 2 {SPEC.run_id}: its log "), said
    assert "is not a regular file (a FIFO)" in said[0], said


def test_the_failure_line_reads_a_bounded_tail_of_the_log(tmp_path):
    """A log swapped for a link to /dev/zero was read to its end, which never comes."""
    link = tmp_path / "x.log"
    link.symlink_to("/dev/zero")
    done = _isolated("""
        import sys
        from pathlib import Path
        from train.sweep import runner
        print(runner._attempt_lines(Path(sys.argv[1]), 0))
    """, str(link))
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr[-2000:])
    log = tmp_path / "big.log"
    log.write_bytes(b"old attempt\n" + b"x" * (1 << 20) + b"\npython -m train: error: the last line\n")
    assert runner._attempt_lines(log, 0) == ["python -m train: error: the last line"]


def test_describe_never_builds_a_shared_reference_value():
    """The bounded preview itself, on values no resume state holds (as check_resume's messages meet them)."""
    from train.state import describe

    deep = _dag(60)
    assert describe(deep).startswith("[[[") and len(describe(deep)) <= 80
    assert describe(torch.zeros(3, 4)) == "a float32 tensor of shape (3, 4)"
    assert describe("x" * 10_000).startswith("'xxx") and len(describe("x" * 10_000)) <= 80
    assert describe(0.5) == "0.5" and describe(None) == "None" and describe("lr") == "'lr'"
    assert describe(io.BytesIO()) == "a BytesIO"
