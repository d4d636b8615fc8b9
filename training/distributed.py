"""One process or many: the process group under `torchrun`, and the device each process trains on.

`torchrun` sets RANK, WORLD_SIZE and LOCAL_RANK; without them training is a single process and none
of this touches torch.distributed. Gloo on CPUs, NCCL on GPUs (one GPU per process, by local rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0 alone evaluates, logs and writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device: str = "auto") -> Context:
    """Joins the process group when launched by torchrun; a single-process context otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(0, 1, resolve_device(device), None)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    chosen = resolve_device(device, local_rank)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return Context(rank, world_size, chosen, backend)


def teardown(context: Context) -> None:
    """Leaves the process group together, once every rank is done (after rank 0 has written the run).

    The barrier keeps a rank that finishes first from exiting while rank 0 still writes the run: a
    rank that dies on its way out (a C++ abort in torch's teardown once killed one, rarely, in CI)
    makes torchrun stop every other rank, rank 0 with its run half written. Called on success only:
    after an error another rank may sit in a collective that would never end (torchrun stops the
    ranks then)."""
    if not (context.distributed and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()


def broadcast_from_main(context: Context, values: list[float]) -> list[float]:
    """Rank 0's values on every rank (the validation result that decides checkpointing and stopping)."""
    if not context.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
