"""Runtime parity of a ViT_C / ViT_P pair, measured rather than assumed from flops.

Time per training step (forward, backward, AdamW step) and per inference batch (no grad), in NCHW and in
channels_last, eager and (on a GPU, where it pays) compiled. The two models alternate in short rounds so drift
hits both alike; each setting's C/P ratio is the median of the per-round ratios.

    python -m train.sweep.runtime --models vit_c_nano,vit_p_nano --device cpu

The pair is one conv-stem and one patchify model, in either order (each is recognised by its stem). A batch that
cannot fit in the device's free memory is refused before anything is allocated; running out anyway is one line.
"""

from __future__ import annotations

import models.cli  # noqa: F401 - first: a Ctrl-C or SIGTERM while the modules below load is one line (exit 130, 143)

# isort: split
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.cli import InputError, OneLineParser, command, device_arg, int_in, machine_error
from models.device import DEVICE_RULE
from train.config import MAX_DEVICE_BATCH

PROG = "python -m train.sweep.runtime"
LAYOUTS = ("nchw", "channels_last")
MAX_ROUNDS = 1000
ROUNDS = 9  # alternating rounds per setting: enough for a 95 % interval of the median per-round ratio (>= 6)


def machine(device: str = "cpu") -> dict[str, Any]:
    """Where a study or a runtime measurement ran: host, CPU model and count, GPU, torch version, source commit, and
    the load average (other work on the machine skews step timings)."""
    import os

    import torch

    from train.sweep.runner import host_facts

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {**host_facts(), "gpu": gpu, "torch": torch.__version__, "load_avg": load}


def compile_options() -> dict[str, Any]:
    """torch.compile's arguments for a timed model: the recompile guard of runtimes/pytorch.py's compile_options
    (train may not import runtimes), without its CUDA graphs (a training step with an optimizer is timed too)."""
    return {
        # dynamo keeps its compiled entries per code object, and every timed model compiles the same one
        # (VisionTransformer.forward): with one shared budget (recompile_limit, 8), a study's second pair found it
        # spent and ran eagerly after a log warning, its rows still recorded as compiled. Each timed model gets its
        # own region: one fixed batch and layout need one entry, plus spares.
        "isolate_recompiles": True,
        "recompile_limit": 3,
        # A graph break, or a recompile past the limit, raises instead of running eagerly.
        "fullgraph": True,
    }


def _timer(model_name: str, what: str, device: str, layout: str, compiled: bool, batch: int) -> Callable[[], None]:
    """One step of `what` ("train_step" / "inference") for a fresh model, as a callable that finishes its work."""
    import torch

    from models.registry import build_model, get_config

    cfg = get_config(model_name)
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(batch, cfg.in_chans, cfg.image_size, cfg.image_size, device=device).to(memory_format=fmt)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    run = torch.compile(model, **compile_options()) if compiled else model
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if what == "inference":
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                run(x)
            sync()
        return step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(run(x), y).backward()
        opt.step()
        sync()
    return train_step


def _time(step: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t0) / n


def measure(conv: str, patch: str, device: str = "cpu", batch: int = 64, rounds: int = ROUNDS,
            compiled: tuple[bool, ...] | None = None, target_s: float = 0.25) -> list[dict[str, Any]]:
    """One row per (what, layout, compiled): both models' median seconds, the per-round C/P ratios and their
    median (a compiled model that would fall back to eager raises: compile_options)."""
    if compiled is None:  # inductor on the CPU costs a minute of compilation for little gain at this size
        compiled = (False, True) if device.startswith("cuda") else (False,)
    rows = []
    for what in ("train_step", "inference"):
        for layout in LAYOUTS:
            for comp in compiled:
                steps = {m: _timer(m, what, device, layout, comp, batch) for m in (conv, patch)}
                for s in steps.values():  # warm-up (and compilation)
                    for _ in range(3):
                        s()
                n = max(1, round(target_s / max(_time(steps[conv], 1), 1e-4)))
                times: dict[str, list[float]] = {conv: [], patch: []}
                for r in range(rounds):
                    order = (conv, patch) if r % 2 == 0 else (patch, conv)
                    for m in order:
                        times[m].append(_time(steps[m], n))
                ratios = [c / p for c, p in zip(times[conv], times[patch], strict=True)]
                rows.append({
                    "what": what, "device": device, "layout": layout, "compiled": comp, "batch": batch,
                    "ms_vit_c": 1e3 * statistics.median(times[conv]), "ms_vit_p": 1e3 * statistics.median(times[patch]),
                    "ratio": statistics.median(ratios), "round_ratios": ratios, "rounds": rounds,
                    "steps_per_round": n, **({"compile": compile_options()} if comp else {}),
                })
    return rows


def conv_and_patch(models: str) -> tuple[str, str]:
    """(the conv-stem model, the patchify one) named in `models`, in either order; KeyError or ValueError if the
    list is not one ViT_C and one ViT_P."""
    from models.registry import get_config

    names = [m.strip() for m in models.split(",") if m.strip()]
    if len(names) != 2:
        raise ValueError(f"expected two models, a ViT_C and a ViT_P, got {len(names)}")
    kinds = {m: get_config(m).stem.kind for m in names}
    conv = [m for m in names if kinds[m] == "conv"]
    patch = [m for m in names if kinds[m] == "patchify"]
    if len(conv) != 1 or len(patch) != 1:
        raise ValueError(f"{names[0]} ({kinds[names[0]]} stem) and {names[1]} ({kinds[names[1]]} stem) are not a "
                         f"pair: give one conv-stem (ViT_C) and one patchify (ViT_P) model")
    return conv[0], patch[0]


def memory_needed(model: str, batch: int) -> int:
    """About the bytes of a training step: float32 weights, gradients and AdamW's two moments, the input batch,
    and twice the counted activations (the peaks measured on the CPU are 1.3-2.1x them)."""
    from models.complexity import complexity
    from models.registry import get_config

    cfg = get_config(model)
    c = complexity(cfg)
    return 4 * (4 * c.params + batch * (2 * c.acts + cfg.in_chans * cfg.image_size ** 2))


def _cgroup_free() -> int | None:
    """Bytes this cgroup (v2) may still allocate, or None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if not limit.isdigit() else max(0, int(limit) - used)


def available_memory(device: str) -> int | None:
    """Free bytes on `device` (the GPU's, or the host's available memory within its cgroup), None if unknown."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        info = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", info, re.M)
    free = [x for x in (int(m.group(1)) * 1024 if m else None, _cgroup_free()) if x is not None]
    return min(free) if free else None


def batch_problem(models: tuple[str, ...], device: str, batch: int) -> str | None:
    """Why `batch` cannot fit on `device` for the larger of `models` (checked before anything is allocated)."""
    free = available_memory(device)
    if free is None:
        return None
    need, model = max((memory_needed(m, batch), m) for m in models)
    if need <= free:
        return None
    return (f"--batch {batch}: a training step of {model} needs about {need / 2**30:.1f} GiB, {device} has "
            f"{free / 2**30:.1f} GiB free")


def device_problem(device: str) -> str | None:
    """Why `device` cannot run here (no CUDA, no such GPU), or None."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        return f"this machine has {torch.cuda.device_count()} GPU(s)"
    return None


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    """Print the rows as a table; exit 2 with one line for a bad model name."""
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit_c_nano,vit_p_nano", help="the ViT_C,ViT_P pair (either order)")
    p.add_argument("--device", type=device_arg, default="cpu", help=f"{DEVICE_RULE} (default cpu)")
    p.add_argument("--batch", type=int_in(1, MAX_DEVICE_BATCH), default=64,
                   help=f"images per step, 1..{MAX_DEVICE_BATCH}")
    p.add_argument("--rounds", type=int_in(1, MAX_ROUNDS), default=ROUNDS,
                   help=f"alternating rounds, 1..{MAX_ROUNDS} (default {ROUNDS}; 6 at least for a 95 %% interval)")
    args = p.parse_args(argv)
    try:
        conv, patch = conv_and_patch(args.models)
    except (ValueError, KeyError) as exc:
        raise InputError(f"--models: {exc.args[0] if exc.args else exc}") from None
    problem = device_problem(args.device)
    problem = f"--device {args.device}: {problem}" if problem else batch_problem((conv, patch), args.device, args.batch)
    if problem:
        raise InputError(problem)
    try:
        rows = measure(conv, patch, args.device, args.batch, args.rounds)
    except (MemoryError, RuntimeError) as exc:
        if failed := machine_error(exc, "try a smaller --batch"):
            raise failed from None
        raise
    for r in rows:
        print(row_line(r))
    return 0


def row_line(r: dict[str, Any]) -> str:
    """One measured setting as the command prints it: both times, the C/P ratio with its interval, the verdict."""
    from train.sweep.claims import runtime_row

    j = runtime_row(r)
    ci = f" ({j['interval_label']} {j['interval'][0]:.3f}..{j['interval'][1]:.3f})" if j["interval"] else ""
    return (f"{r['what']:<10} {r['layout']:<13} {'compiled' if r['compiled'] else 'eager':<8} "
            f"C {r['ms_vit_c']:.2f} ms  P {r['ms_vit_p']:.2f} ms  C/P {r['ratio']:.3f}{ci}  {j['judgement']}")


if __name__ == "__main__":
    from models import cli

    cli.run(main, PROG)
