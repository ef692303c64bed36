"""Everything about processes, devices and collectives lives here, and only here.

Nothing below this module reads the environment: rank and world size are arguments, so a
test can build "rank 1 of 2" in one process.
"""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """Who this process is: global rank decides rank-0 duties, local rank the device."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: a single process without a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str = "auto",
                     timeout_s: int = 600) -> DistEnv:
    """Read RANK/LOCAL_RANK/WORLD_SIZE once (absent: one process), set the device, join."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda, but torch sees no CUDA device (install a CUDA "
                             "build of torch or use --device cpu)")
        torch.cuda.set_device(local_rank)  # before init_process_group, so nccl binds it
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise InputError("--backend nccl needs --device cuda; use gloo on the CPU")
    if world_size == 1:
        return DistEnv(rank, local_rank, 1, 1, torch_device, None)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=torch_device if device == "cuda" else None)
    return DistEnv(rank, local_rank, world_size, local_world_size, torch_device, backend)


def teardown() -> None:
    """Leave the process group; called on every exit path.

    DDP's reducer sits in a reference cycle: collect it while the group is alive, or gloo
    threads may still hold its tensors when the interpreter shuts down (SIGABRT at exit).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP across ranks; a single process trains the plain module."""
    model.to(env.device)
    if env.backend is None:
        return model
    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    # The only buffer (the global mean) never changes: no need to broadcast it every step.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce(values: list[float], env: DistEnv, op: str = "sum") -> list[float]:
    """Reduce a few numbers across ranks in one collective (float64, so sums stay exact)."""
    if env.backend is None:
        return list(values)
    device = env.device if env.backend == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                "min": dist.ReduceOp.MIN}[op])
    return tensor.tolist()


def all_reduce_tensor(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor across ranks in place (used for the once-per-run baseline tables)."""
    if env.backend is None:
        return tensor
    moved = tensor.to(env.device) if env.backend == "nccl" else tensor
    dist.all_reduce(moved)
    return moved.cpu()


def on_main_then_broadcast(action: Callable[[], T], env: DistEnv) -> T:
    """Run rank-0-only work and hand its result to every rank: no collective in an if-rank."""
    result = [action() if env.is_main else None]
    if env.backend is not None:
        dist.broadcast_object_list(result, src=0)
    return result[0]
