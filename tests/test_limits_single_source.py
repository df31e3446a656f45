"""One bound per knob, defined once and imported everywhere: a count one stage takes is never one another refuses.

Threads (models.host.MAX_THREADS), the batch limit (models.bundle.MAX_BATCH_LIMIT), the batches run at once
(runtimes.base.MAX_PARALLEL), the pixel limit's default and ceiling, the eval batch, and the shared argparse types
(models.cli.int_list, device_arg) that replaced each CLI's own copy.
"""

from __future__ import annotations

import argparse
import importlib

import pytest

from models.bundle import MAX_BATCH_LIMIT
from models.cli import device_arg, float_in, int_in, int_list
from models.config import MAX_IMAGE_PIXELS
from models.device import DEVICE_RULE
from models.host import MAX_THREADS
from models.preprocessing import DEFAULT_MAX_IMAGE_PIXELS
from runtimes.base import MAX_PARALLEL, BackendError, BackendOptions


def _refusal(parse, argv: list[str], capsys) -> str:
    """The one line a OneLineParser-based parse prints when it refuses `argv` (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- the batch limit ---------------------------------------------------------------------------------------------


def test_backend_options_refuse_a_max_batch_no_bundle_takes():
    """BackendOptions used to take up to 4096 rows while no bundle, export or server goes above MAX_BATCH_LIMIT."""
    assert BackendOptions(max_batch=MAX_BATCH_LIMIT).max_batch == MAX_BATCH_LIMIT
    assert BackendOptions(buckets=(1, MAX_BATCH_LIMIT)).buckets == (1, MAX_BATCH_LIMIT)
    over = MAX_BATCH_LIMIT + 1
    with pytest.raises(BackendError) as exc:
        BackendOptions(max_batch=over)
    assert str(exc.value) == f"max_batch must be a batch size in 1..{MAX_BATCH_LIMIT} or None, got {over}"
    with pytest.raises(BackendError) as exc:
        BackendOptions(buckets=(1, over))
    assert str(exc.value) == f"buckets must be a tuple of batch sizes in 1..{MAX_BATCH_LIMIT}, got (1, {over})"


def test_the_largest_served_and_exported_batch_is_one_a_backend_takes(tmp_path):
    from pydantic import ValidationError

    from export.bundle import ExportConfig, ExportError
    from serve.settings import Settings

    served = Settings(models=["x"], max_batch_size=MAX_BATCH_LIMIT).max_batch_size
    exported = ExportConfig(tmp_path / "c", tmp_path / "o", max_batch=MAX_BATCH_LIMIT).max_batch
    assert BackendOptions(max_batch=served).max_batch == BackendOptions(max_batch=exported).max_batch
    with pytest.raises(ValidationError):
        Settings(models=["x"], max_batch_size=MAX_BATCH_LIMIT + 1)
    with pytest.raises(ExportError):
        ExportConfig(tmp_path / "c", tmp_path / "o", max_batch=MAX_BATCH_LIMIT + 1)


def test_the_latency_benchmark_batches_within_the_batch_limit(capsys):
    from benchmarks.latency import build_parser

    parse = build_parser().parse_args
    assert parse(["--batch-sizes", f"1,{MAX_BATCH_LIMIT}"]).batch_sizes == (1, MAX_BATCH_LIMIT)
    line = _refusal(parse, ["--batch-sizes", f"8,{MAX_BATCH_LIMIT + 1}"], capsys)
    assert line.endswith(f"argument --batch-sizes: expected integers in 1..{MAX_BATCH_LIMIT}, "
                         f"got '8,{MAX_BATCH_LIMIT + 1}'"), line


# --- threads -----------------------------------------------------------------------------------------------------


def _served(n: int) -> object:
    from serve.settings import Settings

    return Settings(models=["x"], threads=n).threads


def _export_config(n: int) -> object:
    from export.bundle import ExportConfig

    return ExportConfig("c", "o", threads=n).threads


def _export_cli(n: int) -> object:
    from export.cli import parser

    return parser().parse_args(["--checkpoint", "c", "--out", "o", "--threads", str(n)]).threads


def _train(n: int) -> object:
    from train.config import resolve_config

    return resolve_config({"model": "vit_c_micro", "dataset": "digits", "out": "o", "threads": n}).threads


def _train_cli(n: int) -> object:
    from train.config import resolve_config
    from train.options import build_parser, explicit_options

    argv = ["--model", "vit_c_micro", "--dataset", "digits", "--out", "o", "--threads", str(n)]
    return resolve_config(explicit_options(build_parser().parse_args(argv), argv)).threads


def _eval_cli(n: int) -> object:
    from train.eval import parse_args

    return parse_args(["--checkpoint", "c", "--threads", str(n)]).threads


def _sweep_cli(n: int) -> object:
    from train.sweep.__main__ import parse_args

    return parse_args(["--threads", str(n), "--dry-run"]).threads


def _latency_cli(n: int) -> object:
    from benchmarks.latency import build_parser

    return build_parser().parse_args(["--threads", str(n)]).threads


def _backend(n: int) -> object:
    return BackendOptions(threads=n).threads


THREAD_STAGES = [_served, _export_config, _export_cli, _train, _train_cli, _eval_cli, _sweep_cli, _latency_cli,
                 _backend]


@pytest.mark.parametrize("stage", THREAD_STAGES, ids=lambda f: f.__name__.strip("_"))
def test_every_stage_takes_the_same_thread_counts(stage, capsys):
    """serve, export, train, eval, the sweep, the benchmark and a Backend: 1..MAX_THREADS, nothing beyond."""
    assert stage(1) == 1
    assert stage(MAX_THREADS) == MAX_THREADS
    for bad in (0, MAX_THREADS + 1):
        with pytest.raises((ValueError, SystemExit, BackendError)):  # pydantic's ValidationError is a ValueError
            stage(bad)
    capsys.readouterr()


def test_a_triton_thread_parameter_is_capped_at_what_every_stage_takes():
    from models.tritonconfig import TritonConfig

    config = TritonConfig(parameters={"n": str(MAX_THREADS + 1), "m": str(MAX_THREADS), "z": "0"})
    assert config.threads("m") == MAX_THREADS
    assert config.threads("n") == MAX_THREADS  # what serve then hands BackendOptions, which takes it
    assert config.threads("z") is None
    assert BackendOptions(threads=config.threads("n")).threads == MAX_THREADS


def test_no_module_keeps_a_thread_bound_of_its_own():
    """The name, where a module has it, is the one bound (export.cli reads it through export.bundle)."""
    for name in ("models.tritonconfig", "export.bundle", "train.sweep.__main__", "serve.settings", "runtimes.base"):
        module = importlib.import_module(name)
        assert getattr(module, "MAX_THREADS", MAX_THREADS) is MAX_THREADS, name
    assert MAX_THREADS == 1024  # the "1..1024" the CLIs' messages print


# --- batches run at once -----------------------------------------------------------------------------------------


def test_the_server_and_a_backend_take_the_same_parallel_counts():
    from pydantic import ValidationError

    from serve.settings import Settings

    assert Settings(models=["x"], parallel=MAX_PARALLEL).parallel == MAX_PARALLEL
    assert BackendOptions(parallel=MAX_PARALLEL).parallel == MAX_PARALLEL
    with pytest.raises(ValidationError):
        Settings(models=["x"], parallel=MAX_PARALLEL + 1)
    with pytest.raises(BackendError) as exc:
        BackendOptions(parallel=MAX_PARALLEL + 1)
    assert str(exc.value) == f"parallel must be an integer in 1..{MAX_PARALLEL}, got {MAX_PARALLEL + 1}"


# --- the pixel limit ---------------------------------------------------------------------------------------------


def test_the_pixel_limit_has_one_default_and_one_ceiling(capsys):
    from serve.settings import Settings
    from serve.tensor import main

    field = Settings.model_fields["max_image_pixels"]
    assert field.default == DEFAULT_MAX_IMAGE_PIXELS
    assert Settings(models=["x"], max_image_pixels=MAX_IMAGE_PIXELS).max_image_pixels == MAX_IMAGE_PIXELS
    line = _refusal(main, ["i.png", "--bundle", "b", "--out", "o.bin", "--max-image-pixels",
                           str(MAX_IMAGE_PIXELS + 1)], capsys)
    assert line.endswith(f"argument --max-image-pixels: must be in 1..{MAX_IMAGE_PIXELS}, got {MAX_IMAGE_PIXELS + 1}")


def test_no_module_names_the_default_pixel_limit_like_the_ceiling():
    """export.served's MAX_IMAGE_PIXELS meant 40 M while serve.settings' meant 1e9."""
    for name in ("serve.settings", "serve.tensor", "export.served", "benchmarks.e2e", "benchmarks.overhead"):
        module = importlib.import_module(name)
        assert getattr(module, "MAX_IMAGE_PIXELS", MAX_IMAGE_PIXELS) == MAX_IMAGE_PIXELS, name
        assert getattr(module, "DEFAULT_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS) == DEFAULT_MAX_IMAGE_PIXELS, name


# --- the eval batch ----------------------------------------------------------------------------------------------


def test_eval_and_the_runtime_measurement_bound_the_batch_alike(capsys):
    from train.config import MAX_DEVICE_BATCH
    from train.eval import parse_args
    from train.sweep.runtime import main

    assert parse_args(["--checkpoint", "c", "--batch-size", str(MAX_DEVICE_BATCH)]).batch_size == MAX_DEVICE_BATCH
    over = str(MAX_DEVICE_BATCH + 1)
    for parse, flag in ((parse_args, "--batch-size"), (main, "--batch")):
        argv = ["--checkpoint", "c", flag, over] if parse is parse_args else [flag, over]
        line = _refusal(parse, argv, capsys)
        assert line.endswith(f"argument {flag}: must be in 1..{MAX_DEVICE_BATCH}, got {over}"), line


# --- the shared argparse types -----------------------------------------------------------------------------------


def test_int_list_takes_bounded_comma_separated_integers():
    parse = int_list(1, 8)
    assert parse("1, 2,8,") == (1, 2, 8)
    for text, why in (("1,x", "expected comma-separated integers, got '1,x'"),
                      ("", "expected integers in 1..8, got ''"), ("0,1", "expected integers in 1..8, got '0,1'"),
                      ("9", "expected integers in 1..8, got '9'")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"^{why}$"):
            parse(text)


def test_device_arg_is_the_device_rule():
    assert [device_arg(d) for d in ("cpu", "cuda", "cuda:99")] == ["cpu", "cuda", "cuda:99"]
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        device_arg("cuda:100")
    assert str(exc.value) == f"must be {DEVICE_RULE}, got 'cuda:100'"


def test_the_sweep_bounds_its_lists_when_they_are_read(capsys):
    from train.sweep.__main__ import parse_args
    from train.sweep.plan import MAX_EPOCHS, MAX_SEED

    assert parse_args(["--epochs", "5,10", "--seeds", "0,1", "--dry-run"]).epochs == (5, 10)
    line = _refusal(parse_args, ["--epochs", "5,0"], capsys)
    assert line.endswith(f"argument --epochs: expected integers in 1..{MAX_EPOCHS}, got '5,0'"), line
    line = _refusal(parse_args, ["--seeds", "-1"], capsys)
    assert line.endswith(f"argument --seeds: expected integers in 0..{MAX_SEED}, got '-1'"), line


def test_the_benchmarks_use_the_shared_number_types(capsys):
    from benchmarks.naive_server import main as naive
    from benchmarks.overhead import main as overhead

    line = _refusal(overhead, ["--bundle", "b", "--slice", "nan"], capsys)
    assert line.endswith("argument --slice: must be a number in (0, 3600], got nan"), line
    line = _refusal(naive, ["b", "--port", "http"], capsys)
    assert line.endswith("argument --port: expected an integer, got 'http'"), line
    assert int_in(1, 65535)("65535") == 65535 and float_in(0, 3600.0)("3600") == 3600.0


def test_single_stream_takes_only_what_it_uses():
    from benchmarks.overhead import single_stream

    calls = []
    doc = single_stream({"a": lambda: calls.append(1) or (0.001, {"infer": 1.0})}, rounds=1, slice_s=0.01)
    assert doc["a"]["latency_ms"]["n"] >= 1 and doc["a"]["server_timing_ms"]["infer"]["n"] >= 1


def test_every_load_benchmark_takes_the_same_concurrency_levels(capsys):
    """latency --http took 1..1024 and then refused past 256, overhead took 1..1024, load 1..256: one bound now."""
    from benchmarks.latency import main as latency
    from benchmarks.load import main as load
    from benchmarks.loadgen import MAX_CONCURRENCY, Endpoint, closed_loop
    from benchmarks.overhead import main as overhead

    too_many = str(MAX_CONCURRENCY + 1)
    line = _refusal(latency, ["--http", "http://127.0.0.1:1", "--concurrency", too_many], capsys)
    assert line.endswith(f"argument --concurrency: expected integers in 1..{MAX_CONCURRENCY}, got '{too_many}'")
    line = _refusal(overhead, ["--bundle", "b", "--concurrency", too_many], capsys)
    assert line.endswith(f"argument --concurrency: must be in 1..{MAX_CONCURRENCY}, got {too_many}"), line
    assert load(["--concurrency", "1", too_many]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--concurrency must be within 1..{MAX_CONCURRENCY}")
    with pytest.raises(ValueError, match=f"concurrency in 1..{MAX_CONCURRENCY}"):
        closed_loop(Endpoint("http://127.0.0.1:1/x"), [b"x"], MAX_CONCURRENCY + 1, 0.01)
