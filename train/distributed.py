"""Process-group setup for torchrun/DDP (NCCL on GPUs, gloo on CPU) and the few collectives training needs."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from train.config import ConfigError


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


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


def pick_device(preference: str) -> torch.device:
    """Resolve --device (auto, cpu, cuda) to this process's device type; raises ConfigError."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA GPU is available")
    return torch.device("cuda" if preference in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def launched_by_torchrun() -> bool:
    """torchrun (or another env:// launcher) started this process: it set the rendezvous variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def setup(preference: str) -> DistInfo:
    """Join torchrun's process group if launched by it, else run as a single process.

    `torchrun --nproc_per_node 1` joins a group of one, so the DDP path (NCCL on a GPU) runs on a one-GPU machine
    exactly as it will on eight; `python -m train` skips it.
    """
    kind = pick_device(preference).type
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} but only {torch.cuda.device_count()} GPUs on this node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = None
    if world > 1 or launched_by_torchrun():
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                    device_id=device if kind == "cuda" else None)
        backend = dist.get_backend()
    return DistInfo(rank, world, local_rank, local_world, device, backend)


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
