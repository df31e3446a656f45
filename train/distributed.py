"""Process-group setup for torchrun/DDP (NCCL on GPUs, gloo on CPU), the few collectives training needs, and what
keeps a rank that waits inside one stoppable."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.oneline import first_line
from train.config import ConfigError

# How long a rank waits for the others, at the rendezvous and in each collective, before it gives up with one line
# (gloo's own default is 30 minutes). Long enough for a rank that starts late or reads a large dataset folder before
# its first collective, or rank 0 writing a checkpoint while the others wait for the next step.
TIMEOUT_ENV = "VITC_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
MAX_TIMEOUT_S = 86400.0
# A Ctrl-C or SIGTERM the main thread has not taken this long after it arrived finds it blocked inside one C++ call
# (a collective waiting for a stopped or hung rank, the rendezvous waiting for one that never starts), where
# Python cannot run its handler: `watch_signals` then ends the process itself.
SIGNAL_GRACE_S = 5.0
LAUNCH_HINT = ("launch the ranks with torchrun (torchrun --nproc_per_node N -m train ...), which sets RANK, "
               "WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or unset them to train in one "
               "process")
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_WHOLE = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank, its device and the process group's backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None = None  # "nccl" | "gloo" once in a process group; None for a plain single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group (DDP), even of one rank."""
        return self.backend is not None


@dataclass(frozen=True)
class DistEnv:
    """torchrun's variables for this process, checked: where it sits, and whether it joins a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # join a process group (torchrun, or another env:// launcher, started this process)
    timeout_s: float = DEFAULT_TIMEOUT_S


def _shown(text: str) -> str:
    """An environment value as a message quotes it (bounded: it comes from outside)."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _whole(env: Mapping[str, str], name: str, low: int, high: int | None, default: int, why: str = "") -> int:
    """The integer variable `name` (else `default`); ConfigError unless it is a whole number in low..high."""
    text = env.get(name)
    if text is None:
        return default
    if not _WHOLE.fullmatch(text.strip()):
        raise ConfigError(f"{name}={_shown(text)} is not a whole number: {LAUNCH_HINT}")
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"in {low}..{high}{why}"
        raise ConfigError(f"{name}={value} must be {bound}: {LAUNCH_HINT}")
    return value


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """torchrun's variables from `environ` (default os.environ), checked together before any work: ConfigError (one
    line naming the variable) for a malformed, out-of-range or partial set. None of them set: one process."""
    env = os.environ if environ is None else environ
    world = _whole(env, "WORLD_SIZE", 1, None, 1)
    if "RANK" in env and "WORLD_SIZE" not in env and _whole(env, "RANK", 0, None, 0) != 0:
        raise ConfigError(f"RANK={_shown(env['RANK'])} without WORLD_SIZE: {LAUNCH_HINT}")
    rank = _whole(env, "RANK", 0, world - 1, 0, f" (WORLD_SIZE={world})")
    missing = [k for k in RENDEZVOUS_VARS if k not in env]
    if world > 1 and missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        raise ConfigError(f"WORLD_SIZE={world} without {names}: {LAUNCH_HINT}")
    launched = not missing
    if launched:
        address = env["MASTER_ADDR"]
        if not address.strip():
            raise ConfigError(f"MASTER_ADDR is empty: {LAUNCH_HINT}")
        if address != address.strip():  # torch looks the name up as it is: "localhost " timed out as a missing rank
            raise ConfigError(f"MASTER_ADDR={_shown(address)} has white space around it: give the address alone")
        _whole(env, "MASTER_PORT", 1, 65535, 0)
    local_world = _whole(env, "LOCAL_WORLD_SIZE", 1, world, world, f" (WORLD_SIZE={world})")
    local_rank = _whole(env, "LOCAL_RANK", 0, local_world - 1, 0, f" (LOCAL_WORLD_SIZE={local_world})")
    timeout_s = dist_timeout(env)
    if launched and (problem := _resolution_problem(env["MASTER_ADDR"], timeout_s)) is not None:
        raise ConfigError(f"MASTER_ADDR={_shown(env['MASTER_ADDR'])} does not resolve ({problem}; tried for "
                          f"{timeout_s:g} s, {TIMEOUT_ENV}): give the name or address of the machine rank 0 runs on "
                          "(127.0.0.1 on this one; torchrun sets it)")
    return DistEnv(rank, world, local_rank, local_world, launched, timeout_s)


# How long one lookup of MASTER_ADDR may take: a resolver that has not answered by then is left to torch's own lookup
# and its timeouts.
RESOLVE_TIMEOUT_S = 10.0
RESOLVE_RETRY_S = 0.5  # between lookups of a name not found yet
_resolved: set[str] = set()  # names found to resolve (`dist_env` runs twice: in main, then in `setup`)


def _resolution_problem(host: str, within_s: float, limit_s: float = RESOLVE_TIMEOUT_S) -> str | None:
    """Why `host` did not resolve in `within_s` (the resolver's last reason), else None; also None when a lookup does
    not answer in `limit_s`. A name not found is looked up again until then, as torch's store client does: the DNS
    record of a Kubernetes master Service can appear after the workers start. Only then is it refused, where it
    waited the whole timeout and was blamed on a rank that never came."""
    if host in _resolved:
        return None
    deadline = time.monotonic() + within_s
    while True:
        said = _look_up(host, limit_s)
        if said is None or said[0] is None:  # no answer in time (torch's to judge), or resolved
            if said is not None:
                _resolved.add(host)
            return None
        if time.monotonic() + RESOLVE_RETRY_S >= deadline:
            return said[0]
        time.sleep(RESOLVE_RETRY_S)


def _look_up(host: str, limit_s: float) -> list[str | None] | None:
    """One getaddrinfo of `host` in a thread: [None] where it resolves, [reason] where not, None with no answer."""
    said: list[str | None] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            said.append(None)
        except (OSError, UnicodeError, ValueError) as exc:  # gaierror; a label IDNA cannot encode
            said.append(first_line(exc, 120) if not isinstance(exc, OSError) or not exc.strerror else exc.strerror)

    lookup = threading.Thread(target=look_up, name="vitc-master-addr", daemon=True)
    lookup.start()
    lookup.join(limit_s)
    return said or None


def dist_timeout(env: Mapping[str, str]) -> float:
    """Seconds a rank waits for the others (`TIMEOUT_ENV`, else `DEFAULT_TIMEOUT_S`); ConfigError when malformed."""
    text = env.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 1 <= value <= MAX_TIMEOUT_S):
        raise ConfigError(f"{TIMEOUT_ENV}={_shown(text)}: expected seconds in 1..{MAX_TIMEOUT_S:g} (how long a rank "
                          f"waits for the others; default {DEFAULT_TIMEOUT_S:g})")
    return value


def pick_device(preference: str) -> torch.device:
    """Resolve --device (auto, cpu, cuda) to this process's device type; raises ConfigError."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is available")
    return torch.device("cuda" if preference in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


class DistSetupError(RuntimeError):
    """The process group did not form (no peer within the timeout, the port taken): one line, exit 1."""


def setup(preference: str) -> DistInfo:
    """Join torchrun's process group if launched by it, else run as a single process.

    `torchrun --nproc_per_node 1` joins a group of one, so the DDP path (NCCL on a GPU) runs on a one-GPU machine
    exactly as it will on eight; `python -m train` skips it.
    """
    env = dist_env()
    kind = pick_device(preference).type
    rank, world, local_rank, local_world = env.rank, env.world_size, env.local_rank, env.local_world_size
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs on this node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = None
    if env.launched:
        if not dist.is_initialized():
            try:
                with _held_stderr(), _rendezvous_deadline(env):
                    dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                            device_id=device if kind == "cuda" else None,
                                            timeout=datetime.timedelta(seconds=env.timeout_s))
            except (RuntimeError, ValueError) as exc:  # DistStoreError, DistNetworkError: no peer came, port taken
                raise DistSetupError(_setup_failure(exc, env)) from exc
        backend = dist.get_backend()
    return DistInfo(rank, world, local_rank, local_world, device, backend)


# Past the timeouts torch applies (connecting to the store, then gloo's or NCCL's own connections): slack for a
# loaded machine, so only a rendezvous that cannot end by itself meets the deadline.
RENDEZVOUS_SLACK_S = 5.0
_prog = ["vitc"]  # the name in this module's own lines: `watch_signals` is given the program's


@contextlib.contextmanager
def _rendezvous_deadline(env: DistEnv) -> Iterator[None]:
    """End the process (one line, exit 1) if the body is still running 2 x the timeout (+ slack) later. torch bounds
    the wait for peers, not the store's handshake: a MASTER_PORT where another service accepts the connection and
    never answers hung the rank for good; so did rank 0, which hosts the store, when the ranks disagree on
    WORLD_SIZE (`_stall` says which). Nothing is written before the group forms, so nothing is lost."""
    deadline = 2 * env.timeout_s + RENDEZVOUS_SLACK_S
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    line = f"{_prog[0]}: error: the process group did not form at {where} within {deadline:g} s: {_stall(env)}\n"

    def give_up() -> None:
        with contextlib.suppress(OSError):  # os.write: the main thread may hold stderr's buffered writer
            os.write(_stderr_fd[0], line.encode())
        os._exit(1)

    timer = threading.Timer(deadline, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _hosts_store(env: DistEnv) -> bool:
    """Whether this rank serves the rendezvous's store on MASTER_PORT itself: rank 0, unless torchrun's agent does."""
    return env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"


def _ranks(n: int) -> str:
    return f"{n} rank{'s' * (n != 1)}"


def _stall(env: DistEnv) -> str:
    """Why a rendezvous that outlived its deadline stalled, as this rank can tell."""
    if not _hosts_store(env):
        return "what listens there does not answer as torch's rendezvous (another service on MASTER_PORT?)"
    if env.world_size == 1:
        return ("this rank hosts the rendezvous, and what answered there is not it: MASTER_ADDR must name this "
                "machine")
    return ("this rank hosts the rendezvous there: the other ranks did not all arrive, or they disagree on "
            f"WORLD_SIZE (this rank's is {env.world_size})")


# torch's own switches for its C++ log: set by the user, what it prints at the rendezvous is theirs to see.
USER_LOG_VARS = ("TORCH_CPP_LOG_LEVEL", "TORCH_DISTRIBUTED_DEBUG")
MAX_HELD_BYTES = 1 << 20  # what `_held_stderr` passes on of the rendezvous's log (a few lines when it forms)
_stderr_fd = [2]  # where this module's own lines go: the real stderr while fd 2 is held


@contextlib.contextmanager
def _held_stderr() -> Iterator[None]:
    """Hold what is written to fd 2 (torch's C++ log) in a temporary file meanwhile: passed on (its first
    MAX_HELD_BYTES) when the body ends normally, dropped when it raises. A rank whose peers never come otherwise
    printed c10d's log and a C++ stack trace per connection try (about 50 lines) before its one line. Nothing is
    held when the user set TORCH_CPP_LOG_LEVEL or TORCH_DISTRIBUTED_DEBUG, or when stderr is closed."""
    held = saved = None
    if not any(v in os.environ for v in USER_LOG_VARS):
        try:
            saved = os.dup(2)
            held = tempfile.TemporaryFile()
        except OSError:  # stderr closed (`2>&-`), no temporary directory: nothing held
            if saved is not None:
                os.close(saved)
            saved = None
    if saved is None or held is None:
        yield
        return
    _flush_stderr()
    os.dup2(held.fileno(), 2)
    _stderr_fd[0] = saved  # the signal watcher's line must reach the user, not the held file
    formed = False
    try:
        yield
        formed = True
    finally:
        _flush_stderr()
        os.dup2(saved, 2)
        _stderr_fd[0] = 2
        os.close(saved)
        with held:
            if formed:
                held.seek(0)
                log = held.read(MAX_HELD_BYTES + 1)
                if len(log) > MAX_HELD_BYTES:
                    log = log[:MAX_HELD_BYTES] + b"\n[... the rest of torch's rendezvous log left out]\n"
                with contextlib.suppress(OSError):
                    _write_all(2, log)


def _flush_stderr() -> None:
    """Flush Python's stderr buffer, so that what it printed lands on the side of fd 2 it was printed to."""
    with contextlib.suppress(Exception):
        if sys.stderr is not None:
            sys.stderr.flush()


def _write_all(fd: int, data: bytes) -> None:
    """os.write until `data` is written (a pipe may take part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_watching: list[int] = []  # the wakeup pipe's (read, write) descriptors once `watch_signals` runs
_taken = [0]  # Ctrl-Cs and SIGTERMs the main thread's own handlers have run for (the normal path)


def watch_signals(prog: str, grace_s: float = SIGNAL_GRACE_S) -> bool:
    """From now on, a Ctrl-C or SIGTERM that the main thread does not take within `grace_s` ends the process with
    `models.cli.run`'s line (`prog: terminated`, exit 143; `interrupted`, 130). Returns whether it watches.

    Python runs a signal handler on the main thread between bytecodes, so a rank blocked inside gloo or NCCL (the
    rendezvous waiting for a rank that never starts, a collective or DDP's backward waiting for one that hangs) kept
    running until the timeout. The C-level handler still writes the signal to the wakeup descriptor; a thread reads
    it and ends the process when neither the handlers installed now ran nor the main thread ran any bytecode
    meanwhile. Nothing is committed mid-collective (checkpoints are written between steps), and the temporaries and
    lock file left behind are cleared by the next run. A signal at any other moment takes the normal path, which
    the main thread starts at once (its cleanup then takes as long as it needs).
    """
    _prog[0] = prog
    if _watching:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False  # only the main thread may set the wakeup descriptor or handlers
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:
        previous = None
    if previous != -1:  # not ours to take: asyncio or the embedding program uses it (or it failed)
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
        return False
    _watching.extend((read_fd, write_fd))
    for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(handler := signal.getsignal(signum)):
            signal.signal(signum, _counted(handler))
    os.register_at_fork(after_in_child=_forget_in_child)  # a DataLoader worker's own signals are its own
    threading.Thread(target=_watch, args=(read_fd, prog, grace_s), name="vitc-signal-watch", daemon=True).start()
    return True


def _counted(handler: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
    """`handler`, counting in `_taken` that the main thread took the signal (it raises: count first)."""
    def take(signum: int, frame: Any) -> Any:
        _taken[0] += 1
        return handler(signum, frame)
    return take


def _forget_in_child() -> None:
    """In a forked child (a DataLoader worker): its signals must not reach the parent's watcher through the pipe."""
    if _watching:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        for fd in _watching:
            with contextlib.suppress(OSError):
                os.close(fd)
        _watching.clear()


def _watch(read_fd: int, prog: str, grace_s: float) -> None:
    """The watcher thread: for each Ctrl-C or SIGTERM, end the process if the main thread is stuck (`_main_stuck`)."""
    taken = _taken[0]
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        caught = [s for s in data if s in (signal.SIGINT, signal.SIGTERM)]
        if caught and _main_stuck(grace_s, taken):
            stopped = caught[0] == signal.SIGTERM
            _flush_stdout()
            with contextlib.suppress(OSError):  # os.write: stderr's buffered writer may be the main thread's
                os.write(_stderr_fd[0], f"{prog}: {'terminated' if stopped else 'interrupted'}\n".encode())
            os._exit(143 if stopped else 130)
        taken = _taken[0]


def _main_stuck(grace_s: float, taken: int) -> bool:
    """Whether, for `grace_s` seconds, the main thread's handlers take no signal beyond the `taken` before and it
    runs no bytecode: it is inside one C++ call, where Python cannot run a handler. Any bytecode it runs passes a
    point where Python runs the pending handler first (which may be another's: a commit holds signals meanwhile)."""
    ident = threading.main_thread().ident
    where = _main_spot(ident)  # in the Python frame that made the call, while it lasts
    if where is None or _taken[0] != taken:
        return False
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if _taken[0] != taken or _main_spot(ident) != where:
            return False
    return True


def _main_spot(ident: int | None) -> tuple[int, int] | None:
    """Where the main thread is: (its frame's id, the instruction in it; the frame lives while it runs there), or
    None. No reference to the frame is kept: one held while the main thread stopped on the signal kept what the
    frame's locals reach alive (the trainer, DDP's reducer) until this thread dropped it, and a gloo process group
    freed here while Python shut down aborted the rank ("terminate called without an active exception")."""
    frame = sys._current_frames().get(ident)
    return None if frame is None else (id(frame), frame.f_lasti)


def _flush_stdout() -> None:
    """Flush the lines printed so far, from a helper thread given a second: the main thread may hold stdout's lock
    (blocked writing to a reader that stopped reading)."""
    stream = sys.stdout
    if stream is None:
        return

    def flush() -> None:
        with contextlib.suppress(Exception):
            stream.flush()
    helper = threading.Thread(target=flush, daemon=True)
    helper.start()
    helper.join(1.0)


# How torch says that a connection it used for the rendezvous closed under it, the process at its other end gone:
# the store's client (the store's host went away), then gloo's connections between the ranks (another rank did).
STORE_CLOSED = ("Failed to recv, got 0 bytes", "Connection was likely closed")
PEER_CLOSED = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _setup_failure(exc: BaseException, env: DistEnv) -> str:
    """One line for a process group that did not form: the ranks did not all come in time, the rank hosting the
    rendezvous went away, or the port is taken."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    reason = first_line(exc, 300).rstrip(".")
    if any(sign in reason.lower() for sign in ("timed out", "wait timeout")):
        waited = _applied_timeout_s(reason, env)
        if env.world_size == 1:  # no other rank to wait for: its own store was not reached
            return (f"the process group of 1 rank did not form at {where} within {waited:g} s ({reason}): "
                    "this rank hosts the rendezvous, so MASTER_ADDR must name this machine (127.0.0.1)")
        return (f"the {env.world_size} ranks did not all meet at {where} within {waited:g} s ({reason}): start "
                f"every rank (torchrun does), or give a slow start longer with {TIMEOUT_ENV}")
    if any(sign in reason for sign in (*STORE_CLOSED, *PEER_CLOSED)):
        gone = _store_host(env) if any(sign in reason for sign in STORE_CLOSED) else "another rank"
        return (f"the process group of {_ranks(env.world_size)} did not form at {where}: {gone} went away during "
                "the rendezvous: it failed or was stopped, and its own message says why")
    return f"could not form the process group of {_ranks(env.world_size)} at {where}: {reason}"


def _applied_timeout_s(reason: str, env: DistEnv) -> float:
    """The timeout torch applied to the wait that `reason` ended. The store's host counts whole seconds and gives up
    only once more of them than the timeout have passed ("Timed out after 3 seconds waiting for clients" for 2 s);
    its clients' waits apply the timeout as given."""
    if "waiting for clients" in reason:
        return math.floor(env.timeout_s) + 1
    return env.timeout_s


def _store_host(env: DistEnv) -> str:
    """Who went away when the store's connection closed under this rank, as it can tell."""
    if _hosts_store(env):
        return "another rank"  # its own store stands: the connection was to a peer
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return "torchrun's agent, which hosts the rendezvous there,"
    return "rank 0, which hosts the rendezvous there,"


def teardown(info: DistInfo) -> None:
    """Leave the process group (a barrier first so no rank exits while others still talk)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all ranks (float64, exact for counts)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_buffers(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank: DDP keeps per-rank BN statistics."""
    if info.distributed:
        for b in module.buffers():
            dist.broadcast(b.data, src=0)


def state_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer, bit for bit."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather_digests(module: nn.Module, info: DistInfo) -> list[str]:
    """Every rank's state digest, in rank order (all ranks must hold identical weights after DDP)."""
    mine = state_digest(module)
    if not info.distributed:
        return [mine]
    out: list[str | None] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return [str(d) for d in out]


def union_over_ranks(items: set[str], info: DistInfo) -> set[str]:
    """The union of every rank's `items` (a few strings each: the corrupt files a rank met)."""
    if not info.distributed:
        return set(items)
    out: list[list[str] | None] = [None] * info.world_size
    dist.all_gather_object(out, sorted(items))
    return {str(x) for part in out for x in part or []}
