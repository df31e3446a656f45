"""hDQ findings 1-4 (fDL): a hostile resume.pt is refused in one line, in bounded time and memory, before torch.load
hashes or builds what would cost more than the file's size, and before any op touches a tensor that is larger than
its storage; every state the trainer writes still loads.

Before these fixes: dict keys that Python hashes alike loaded in time quadratic in their number (1 MB: 104 s), empty
sets built 340 bytes of memory for each byte of pickle, a 17 KB tensor of stride 0 made a check allocate 2**n
elements, an integer too large for a float was an OverflowError traceback, and an end record listing fewer entries
than its directory holds let zipfile list them all. Each file here is small: the test shows it refused, not timed.
"""

from __future__ import annotations

import io
import pickletools
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from test_state_sweep_hostile_fdj import PLACEHOLDER, _isolated, _refused, _tiny_state, _with_pickle_edit

from models.jsonfields import FieldError, Fields, is_finite
from train.state import RESUME_FILE, load_resume, save_resume

HUGE = 1 << 2000  # an int too large for a float (torch.save stores it as LONG1, and weights_only loads it)
COLLIDING = (1 << 61) - 1  # Python hashes every multiple of this prime to 0


def _long1(n: int) -> bytes:
    """The LONG1 opcode for `n`, as the pickler writes an int beyond 32 bits."""
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _dict_of(keys: list[bytes]) -> bytes:
    """Opcodes of a dict of `keys` (opcodes each), every value None."""
    return b"}(" + b"".join(k + b"N" for k in keys) + b"u"


def _scheduler_edit(tmp_path: Path, opcodes: bytes) -> None:
    """resume.pt whose scheduler's one value is spelt by `opcodes`."""
    _with_pickle_edit(tmp_path, _tiny_state(scheduler={"x": PLACEHOLDER}), opcodes)


def _pickle_refusal(tmp_path: Path) -> str:
    message = _refused(tmp_path)
    assert message.startswith(f"cannot read resume state {tmp_path / RESUME_FILE}: its pickle "), message
    assert message.endswith("it is not a resume state vitc wrote, and is not loaded"), message
    return message


# ---------------------------------------------------------------- 1: dict keys hashed alike, and the pickle's work


def test_int_keys_that_hash_alike_are_refused_before_torch_load_sets_them(tmp_path):
    """hDQ's `collide`: 80,000 keys k * (2**61 - 1), 10 bytes each, took 104 s to load (all hash to 0)."""
    _scheduler_edit(tmp_path, _dict_of([_long1(k * COLLIDING) for k in range(1, 3001)]))
    assert "dict key" in _pickle_refusal(tmp_path)


def test_a_tuple_key_hashed_over_and_over_is_refused(tmp_path):
    """hDQ's `tuplekey`: one tuple of 65,535 values (under the tuple bound) as a key again and again, 6 bytes a use."""
    ops = b"K\x00\x85"
    for level in range(14):
        slot = struct.pack("<I", 1_000_000 + level)
        ops += b"r" + slot + b"j" + slot + b"\x86"
    slot = struct.pack("<I", 2_000_000)
    _scheduler_edit(tmp_path, b"}(" + ops + b"r" + slot + b"N" + (b"j" + slot + b"N") * 50 + b"u")
    assert "dict key" in _pickle_refusal(tmp_path)


@pytest.mark.parametrize("call", [b"collections\nOrderedDict\n", b"UserDict\nOrderedDict\n", b"builtins\nset\n",
                                  b"__builtin__\nset\n", b"collections\nCounter\n"])
def test_a_dict_or_set_built_from_a_list_of_keys_is_refused(tmp_path, call):
    """The same keys given to a call that hashes them all (allowed by weights_only, under Python 2's names too): no
    SETITEMS to check them at."""
    pairs = b"".join(_long1(k * COLLIDING) + b"N\x86" for k in range(1, 3001))
    items = pairs if call.endswith(b"OrderedDict\n") else pairs.replace(b"N\x86", b"")
    _scheduler_edit(tmp_path, b"c" + call + b"(](" + items + b"et" + b"R")
    assert "calls " in _pickle_refusal(tmp_path)


def test_keys_a_resume_state_holds_still_load(tmp_path):
    """Names, parameter indices (the optimizer's state), and integers as large as 2**63 - 1."""
    _scheduler_edit(tmp_path, _dict_of([_long1((1 << 63) - k) for k in range(1, 200)]
                                       + [b"K" + bytes([k]) for k in range(200)]))
    state = load_resume(tmp_path)
    assert state is not None and len(state["scheduler"]["x"]) == 399


def test_a_pickle_of_more_objects_than_any_resume_state_is_refused(tmp_path):
    """hDQ's `sets`: EMPTY_SET is 1 byte and builds 216; 4 MB took 43 s and 1.4 GB before it was accepted. 600,000
    (600 KB) pass the bound of 524,288 objects (the largest model's state with a 100,000-epoch history builds under
    120,000)."""
    _scheduler_edit(tmp_path, b"](" + b"\x8f" * 600_000 + b"e")
    assert "objects" in _pickle_refusal(tmp_path)


def test_a_pickle_of_more_steps_than_any_resume_state_is_refused(tmp_path, monkeypatch):
    """The bound on opcodes (8 million: a 32 MB pickle of 1-byte ones takes minutes to follow), shown smaller."""
    import train.state as state_module

    monkeypatch.setattr(state_module, "MAX_PICKLE_OPS", 100_000)
    _scheduler_edit(tmp_path, b"](" + b"N" * 150_000 + b"e")
    assert "steps" in _pickle_refusal(tmp_path)


def _largest_model_state(history: int, *, optimizer: str = "adamw", ema: bool = True) -> dict:
    """The state the trainer saves for the variant with the most tensors, its tensors shrunk to one element each
    (what the pickle holds of a tensor does not depend on its size), with `history` epoch records."""
    from models.registry import build_model, list_variants
    from train.config import TrainConfig
    from train.optim import param_groups

    def small(t: torch.Tensor) -> torch.Tensor:
        return torch.zeros([1] * t.dim(), dtype=t.dtype)

    def shrunk(module: torch.nn.Module) -> dict:
        weights = module.state_dict()  # an OrderedDict with its _metadata, as the trainer saves it
        for key in list(weights):
            weights[key] = small(weights[key])
        return weights

    with torch.device("meta"):
        nets = [build_model(name, num_classes=1000) for name in list_variants()]
    net = max(nets, key=lambda n: len(n.state_dict()))
    groups = param_groups(net, 0.05)
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True) if optimizer == "sgd" else \
        torch.optim.AdamW(groups, lr=0.1)
    saved = opt.state_dict()
    for i, p in enumerate(net.parameters()):
        saved["state"][i] = {"momentum_buffer": small(p)} if optimizer == "sgd" else \
            {"step": torch.tensor(5.0), "exp_avg": small(p), "exp_avg_sq": small(p)}
    wrapper = torch.nn.Module()
    wrapper.module = net  # timm's ModelEmaV3 keeps the copy as `module`
    state = _tiny_state(config=TrainConfig(model="vit_c_micro", dataset="digits", out="/x").to_dict(),
                        model=shrunk(net), optimizer=saved, ema=shrunk(wrapper) if ema else None, threads=2,
                        data={"train": "a" * 64, "val": "b" * 64}, global_batch=16, world_size=1)
    progress = state["progress"]
    progress["history"] = [{
        "epoch": e, "step": e, "complete": True, "train_loss": 1.5 + e, "lr": 0.1 / e, "epoch_time_s": 1.25 + e,
        "samples_per_s": 100.5 + e, "val_top1": 0.5, "val_top5": 0.75, "val_loss": 1.1 + e,
        "corrupt_val_skipped": e, "val_top1_ema": 0.5, "val_top5_ema": 0.7, "val_loss_ema": 1.0 + e,
        "corrupt_train_replaced": e} for e in range(1, history + 1)]
    progress.update(epoch=history, global_step=history + 1, step_in_epoch=1, samples_seen=16 * (history + 1),
                    corrupt_files=["/data/train/a/broken.JPEG"])
    state["steps_per_epoch"] = 1
    return state


def _pickle_counts(state: dict) -> tuple[int, int]:
    """(opcodes, objects built) of `state`'s pickle as torch.save writes it."""
    from train.state import _PICKLE_OBJECTS

    buf = io.BytesIO()
    torch.save({"version": 1, **state}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        (data,) = [z.read(m) for m in z.infolist() if m.filename.endswith("data.pkl")]
    names = [op.name for op, _, _ in pickletools.genops(data)]
    return len(names), sum(n in _PICKLE_OBJECTS for n in names)


def test_the_pickle_bounds_fit_the_largest_model_and_the_longest_run_with_a_wide_margin():
    """The largest model's weights, EMA and AdamW buffers, and a history of the most epochs a run can have (each
    record with every key the trainer writes), take under half of each bound."""
    from train.config import TrainConfig
    from train.state import MAX_PICKLE_OBJECTS, MAX_PICKLE_OPS

    epochs = 100_000
    with pytest.raises(Exception, match="epochs"):
        TrainConfig(model="vit_c_micro", dataset="digits", out="/x", epochs=epochs + 1)
    base_ops, base_objects = _pickle_counts(_largest_model_state(0))
    ops, objects = _pickle_counts(_largest_model_state(1000))
    per_epoch_ops, per_epoch_objects = (ops - base_ops) / 1000, (objects - base_objects) / 1000
    assert 2 * (base_ops + epochs * per_epoch_ops) <= MAX_PICKLE_OPS, (base_ops, per_epoch_ops)
    assert 2 * (base_objects + epochs * per_epoch_objects) <= MAX_PICKLE_OBJECTS, (base_objects, per_epoch_objects)


@pytest.mark.parametrize(("optimizer", "ema"), [("adamw", True), ("adamw", False), ("sgd", True), ("sgd", False)])
def test_the_largest_model_state_still_loads(tmp_path, optimizer, ema):
    """Every optimizer and EMA combination `python -m train` offers, its state_dicts with their _metadata."""
    save_resume(tmp_path, _largest_model_state(300, optimizer=optimizer, ema=ema))
    state = load_resume(tmp_path)
    assert state is not None and len(state["progress"]["history"]) == 300
    assert (state["ema"] is not None) == ema


# ---------------------------------------------------------------- 2: a tensor larger than its storage


def _view(n: int) -> torch.Tensor:
    return torch.zeros(1).expand(n)  # one element of storage, n of tensor: torch.save writes it as it is


def test_a_stride_0_view_is_refused_before_any_op_allocates_its_elements(tmp_path):
    """hDQ's `stride0`: 17 KB; the EMA check's isfinite allocated all 2**29 elements (4 GB); 2**34 was reported as
    "out of memory... try a smaller --batch-size". Each place a tensor can be, in a guarded interpreter."""
    n = 1 << 40
    cases = {
        "ema.w": _tiny_state(ema={"w": _view(n)}),
        "model.norm.running_var": _tiny_state(model={"w": torch.arange(4.0), "norm.running_var": _view(n)}),
        "model.w": _tiny_state(model={"w": _view(n)}),
        "optimizer.state[0].exp_avg": _tiny_state(optimizer={"state": {0: {"exp_avg": _view(n)}},
                                            "param_groups": [{"params": [0], "lr": 0.1}]}),
        "scheduler.kept[0]": _tiny_state(scheduler={"kept": [_view(n)]}),
    }
    cases["model.w"]["progress"]["epoch_acc"] = {"loss_sum": float("nan"), "samples": 16, "corrupt": 0, "time": 0.5}
    runs = []
    for name, state in cases.items():
        save_resume(tmp_path / name, state)
        assert (tmp_path / name / RESUME_FILE).stat().st_size < 40_000
        runs.append(str(tmp_path / name))
    done = _isolated(EACH, *runs)
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout.splitlines()
    assert len(said) == len(runs), (done.stdout, done.stderr[-2000:])
    for name, line in zip(cases, said, strict=True):
        assert line.startswith(f"refused: resume.pt is damaged or from another run: {name}"), line
        assert "storage" in line, line


EACH = """
    import sys
    from models.checkpoint import CheckpointError
    from train.state import load_resume
    for run in sys.argv[1:]:
        try:
            load_resume(run)
        except CheckpointError as exc:
            print("refused:", exc)
        except (MemoryError, RuntimeError) as exc:  # what the old code's checks raised allocating 2**40 elements
            print("failed:", " ".join(str(exc).split())[:200])
        else:
            print("loaded")
"""


def test_an_overlapping_view_is_refused(tmp_path):
    """Strides that are not zero but still give two elements one place (rows that overlap)."""
    base = torch.arange(1001.0)
    overlapping = base.as_strided((1000, 2), (1, 1))
    save_resume(tmp_path, _tiny_state(ema={"w": overlapping}))
    message = _refused(tmp_path)
    assert message.startswith("resume.pt is damaged or from another run: ema.w: ") and "storage" in message, message


def test_views_torch_save_writes_of_real_tensors_still_load(tmp_path):
    """Channels-last and transposed weights, a strided slice, two tensors of one storage, empty and 0-d tensors."""
    conv = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    shared = torch.arange(12.0)
    tensors = {"conv": conv, "t": torch.randn(5, 7).t(), "slice": torch.arange(20.0)[2::3],
               "a": shared[:6], "b": shared.view(3, 4)[1:], "empty": torch.zeros(0, 5), "scalar": torch.tensor(2.0),
               "unit": torch.zeros(4, 1).expand(4, 1)}
    save_resume(tmp_path, _tiny_state(model={"w": torch.arange(4.0), **tensors}, ema=dict(tensors)))
    state = load_resume(tmp_path)
    assert state is not None
    for key, value in tensors.items():
        assert torch.equal(state["ema"][key], value) and state["ema"][key].stride() == value.stride(), key


# ---------------------------------------------------------------- 3: integers too large for a float


def test_is_finite_says_false_for_an_integer_too_large_for_a_float():
    assert is_finite(10 ** 300) and not is_finite(HUGE) and not is_finite(-HUGE)
    assert not is_finite(float("nan")) and is_finite(0.5) and not is_finite(True)
    with pytest.raises(FieldError, match="must be a number"):
        Fields({"x": HUGE}, "doc.json").get("x", float)


@pytest.mark.parametrize("where", [
    "optimizer.param_groups[0].lr", "progress.epoch_acc", "progress.history[0].lr", "config.lr",
    "optimizer.state[0]", "rng.numpy", "rng.python"])
def test_an_integer_too_large_for_a_float_is_refused_in_one_line(tmp_path, where):
    """hDQ: lr = 1 << 2000 ended in OverflowError (exit 1), as did the epoch's loss sum; the configuration's own
    check and the RNG's restore did the same after the state loaded."""
    state = _tiny_state()
    progress = state["progress"]
    if where == "optimizer.param_groups[0].lr":
        state["optimizer"]["param_groups"][0]["lr"] = HUGE
    elif where == "progress.epoch_acc":
        progress["epoch_acc"] = {"loss_sum": HUGE, "samples": 16, "corrupt": 0, "time": 0.5}
    elif where == "progress.history[0].lr":
        progress["history"] = [{"epoch": 1, "step": 1, "lr": HUGE}]
    elif where == "config.lr":
        state["config"]["lr"] = HUGE
    elif where == "optimizer.state[0]":
        state["optimizer"]["state"] = {0: {"step": HUGE}}
    elif where == "rng.numpy":
        state["rng"]["numpy"]["gauss"] = HUGE
    else:
        state["rng"]["python"]["gauss"] = HUGE
    save_resume(tmp_path, state)
    message = _refused(tmp_path)
    assert message.startswith(f"resume.pt is damaged or from another run: {where}"), message
    if not where.startswith(("rng", "optimizer.state")):  # those name what they expect instead
        assert "an integer of 2001 bits" in message, message


@pytest.mark.parametrize(("field", "value"), [
    pytest.param("numpy.has_gauss", HUGE, id="numpy.has_gauss-huge"), ("numpy.has_gauss", 2),
    ("python.internal", 1 << 32), ("python.internal", -1), ("python.index", 625), ("python.version", 4)])
def test_an_rng_state_restore_rng_cannot_restore_is_refused_in_one_line(tmp_path, field, value):
    """Each made numpy's set_state or Python's setstate raise (OverflowError, ValueError) once the state had loaded."""
    state = _tiny_state()
    rng = state["rng"]
    if field == "numpy.has_gauss":
        rng["numpy"]["has_gauss"] = value
    elif field == "python.internal":
        rng["python"]["internal"][3] = value
    elif field == "python.index":
        rng["python"]["internal"][-1] = value
    else:
        rng["python"]["version"] = value
    save_resume(tmp_path, state)
    message = _refused(tmp_path)
    assert message.startswith(f"resume.pt is damaged or from another run: rng.{field.split('.')[0]}"), message


def test_a_real_rng_state_restores():
    from train.state import capture_rng, check_resume, restore_rng

    state = _tiny_state(rng=capture_rng())
    assert check_resume(state) is None
    restore_rng(state["rng"])


# ---------------------------------------------------------------- 4: the zip directory, as its end record lists it


def _zip_listing(path: Path, n: int, listed: int, *, name_bytes: int = 20) -> int:
    """hDQ's manyzip2.py: `n` stored, empty entries whose end record lists `listed` (its directory's size is true).
    Returns the directory's size."""
    local, central = bytearray(), bytearray()
    for i in range(n):
        name = f"{i:0{name_bytes}x}".encode()
        offset = len(local)
        local += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0,
                               0, 0, 0, 0, offset) + name
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, listed, listed, len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return len(central)


def test_an_end_record_listing_few_entries_over_a_large_directory_is_refused_from_the_record(tmp_path):
    """hDQ's r_z140: 5 entries listed, 140,000 in the directory: zipfile read them all (it reads the directory by its
    size, whatever the count), then torch's reader failed. 5 over 3,000 (200 KB): refused from the end record, as
    the count that changed it is (a flipped bit or a hand: the records disagree with the directory)."""
    size = _zip_listing(tmp_path / RESUME_FILE, 3000, 5)
    message = _refused(tmp_path)
    assert message.startswith(f"cannot read resume state {tmp_path / RESUME_FILE}: it is corrupt: its zip end record "
                              f"lists 5 entries in {size:,} bytes, which its directory does not hold"), message
    assert "torch.load" not in message, message


def test_a_directory_holding_more_entries_than_listed_is_refused_before_zipfile_reads_it(tmp_path):
    """Within every bound (20,000 entries could take those bytes), yet the directory holds more than listed: zipfile
    would list every one."""
    size = _zip_listing(tmp_path / RESUME_FILE, 3000, 2999)
    message = _refused(tmp_path)
    assert message.startswith(f"cannot read resume state {tmp_path / RESUME_FILE}: it is corrupt: its zip end record "
                              f"lists 2,999 entries in {size:,} bytes, which its directory does not hold"), message


def test_read_zip_end_checks_the_directory_size_against_its_count():
    """No zip entry takes more than 46 bytes and three 16-bit lengths: a directory larger than that is not listed."""
    from models.io import ZIP_ENTRY_BYTES, read_zip_end, zip_entries

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(3):
            z.writestr(f"m{i}", b"x")
    data = bytearray(buf.getvalue())
    end = read_zip_end(io.BytesIO(bytes(data)))
    assert end is not None and end.consistent and end.entries == 3
    assert zip_entries(io.BytesIO(bytes(data)), end, 10) == 3
    at = data.rfind(b"PK\x05\x06")
    data[at + 8:at + 12] = struct.pack("<HH", 1, 1)  # one entry listed of the three
    end = read_zip_end(io.BytesIO(bytes(data)))
    assert end is not None and end.consistent  # one entry could take those bytes
    assert zip_entries(io.BytesIO(bytes(data)), end, 1) is None  # but the directory holds more
    big = _zip_bytes(1, ZIP_ENTRY_BYTES + 3 * 0xFFFF + 1)
    end = read_zip_end(io.BytesIO(big))
    assert end is not None and not end.consistent


def _zip_bytes(listed: int, directory: int) -> bytes:
    """An end record listing `listed` entries in `directory` bytes, after that many bytes of directory."""
    body = b"PK\x01\x02" + b"\0" * (directory - 4)
    return body + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, listed, listed, directory, 0, 0)
