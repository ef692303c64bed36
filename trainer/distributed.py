"""Processes, devices and collectives: every torch.distributed call of the trainer is made
here, but for the row exchange's own (trainer/sync.py). Other modules call the helpers
below, each a collective every rank must reach.

Nothing below this module reads the environment: rank and world size are arguments, so a
test can build "rank 1 of 2" in one process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import gc
import inspect
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from shardmf.errors import InputError

T = TypeVar("T")

# Test-only fault injection, read here once like every other environment variable:
# SHARDMF_TEST_FAULT=KIND:RANK:STEP makes rank RANK, on the first attempt of a job only
# (TORCHELASTIC_RESTART_COUNT 0 or unset), fail just before global step STEP (1-based,
# counted across epochs). KIND "kill" sends itself SIGKILL (a crashed node: no cleanup, no
# traceback); "raise" raises RuntimeError (a bug in one rank); "hang" sleeps until a signal
# ends it (a stopped or hung rank: its peers time out). Unset, it does nothing; it
# exists so tests can crash a rank at a known point without racing a process tree.
TEST_FAULT_ENV = "SHARDMF_TEST_FAULT"
FAULT_KINDS = ("kill", "raise", "hang")


@dataclass(frozen=True)
class TestFault:
    """A fault to inject (tests only): ``kind`` on ``rank`` before global step ``step``."""

    __test__ = False  # not a pytest test class, despite its name

    kind: str
    rank: int
    step: int

    @classmethod
    def parse(cls, text: str) -> TestFault:
        try:
            kind, rank, step = text.split(":")
            fault = cls(kind, int(rank), int(step))
        except ValueError as e:
            raise InputError(f"{TEST_FAULT_ENV}={text!r}: expected KIND:RANK:STEP with KIND "
                             f"one of {', '.join(FAULT_KINDS)}, e.g. kill:1:40") from e
        if fault.kind not in FAULT_KINDS or fault.step < 1:
            raise InputError(f"{TEST_FAULT_ENV}={text!r}: expected KIND:RANK:STEP with KIND "
                             f"one of {', '.join(FAULT_KINDS)} and STEP >= 1")
        return fault

    def maybe_fire(self, rank: int, global_step: int) -> None:
        """Fail here if this is the rank and step; otherwise return at once."""
        if rank != self.rank or global_step != self.step:
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        while self.kind == "hang":
            time.sleep(3600)
        raise RuntimeError(f"{TEST_FAULT_ENV}: injected failure on rank {rank} before "
                           f"step {global_step}")


@dataclass(frozen=True)
class DistEnv:
    """Who this process is: global rank decides rank-0 duties, local rank the device."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None: a single process without a process group
    restart_count: int = 0  # torchrun's restarts of this job so far (>0: resume if possible)
    test_fault: TestFault | None = None  # tests only: see SHARDMF_TEST_FAULT

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: str = "auto",
                     timeout_s: int = 600) -> DistEnv:
    """Read RANK/LOCAL_RANK/WORLD_SIZE once (absent: one process), set the device, join.

    Also read once: TORCHELASTIC_RESTART_COUNT (a job restarted by ``torchrun
    --max-restarts`` resumes from its checkpoint) and the test-only SHARDMF_TEST_FAULT.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    restart_count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    fault_text = os.environ.get(TEST_FAULT_ENV)
    # A fault fires on the first attempt only, so a restarted job can finish.
    test_fault = TestFault.parse(fault_text) if fault_text and restart_count == 0 else None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device='cuda', but torch sees no CUDA device (install a CUDA "
                             "build of torch or use device='cpu')")
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"{local_world_size} ranks on this node but torch sees "
                             f"{torch.cuda.device_count()} CUDA device(s): one rank per GPU; "
                             "use at most that many ranks, or device='cpu'")
        torch.cuda.set_device(local_rank)  # before init_process_group, so nccl binds it
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise InputError("backend='nccl' needs device='cuda'; use gloo on the CPU")
    if world_size == 1:
        return DistEnv(rank, local_rank, 1, 1, torch_device, None, restart_count, test_fault)
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, timeout=timeout,
                            device_id=torch_device if device == "cuda" else None,
                            **_restart_safe_store(rank, world_size, restart_count, timeout))
    return DistEnv(rank, local_rank, world_size, local_world_size, torch_device, backend,
                   restart_count, test_fault)


def _restart_safe_store(rank: int, world_size: int, restart_count: int,
                        timeout: datetime.timedelta) -> dict:
    """Under torchrun, a store whose keys are private to this attempt of the job.

    torchrun's workers share the agent's TCPStore (TORCHELASTIC_USE_AGENT_STORE=True), and
    it outlives a restart with no per-attempt prefix (torch 2.13): after ``--max-restarts``
    restarts the job, gloo on a new rank can read the dead attempt's addresses and fail with
    "connectFullMesh ... Connection refused". A prefix per restart keeps attempts apart.
    Without the agent store, init_process_group's own env:// rendezvous is used unchanged.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size=world_size, is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"shardmf/attempt-{restart_count}", store),
            "rank": rank, "world_size": world_size}


# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's maximum on 64-bit systems
_TRIM_THRESHOLD_BYTES = 256 * 2**20


def keep_freed_memory() -> bool:
    """Let glibc reuse a step's large temporaries instead of unmapping them every step.

    A training step allocates and frees several (batch, dim) tensors of a few MB. glibc
    serves blocks that size with mmap and unmaps them on free, so every step pays fresh
    page faults (zeroing) for each: 30-45 % of a CPU step at 8,192 x 64 in our
    measurements (bench/train_throughput.md). Raising the mmap and trim thresholds keeps
    them in the heap for reuse. Returns False where the C library has no mallopt (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (AttributeError, OSError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


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
    # The only buffer (the global mean) never changes: no need to sync it every step
    # (torch 2.13 renamed the switch; older releases know only broadcast_buffers).
    accepted = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in accepted
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=device_ids, **no_buffer_sync)


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


def gather_floats(value: float, env: DistEnv) -> list[float]:
    """Each rank's number, by rank, on every rank: a sum of one-hot vectors, so exact."""
    one_hot = [0.0] * env.world_size
    one_hot[env.rank] = value
    return all_reduce(one_hot, env)


def all_reduce_tensor(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor across ranks in place (used for the once-per-run baseline tables)."""
    if env.backend is None:
        return tensor
    moved = tensor.to(env.device) if env.backend == "nccl" else tensor
    dist.all_reduce(moved)
    return moved.cpu()


def all_gather_objects(value: T, env: DistEnv) -> list[T]:
    """Each rank's picklable value, by rank, on every rank (for a few small objects)."""
    if env.backend is None:
        return [value]
    values: list = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(env: DistEnv) -> None:
    """Return once every rank has reached this point."""
    if env.backend is not None:
        dist.barrier()


def on_main_then_broadcast(action: Callable[[], T], env: DistEnv) -> T:
    """Run rank-0-only work and hand its result to every rank: no collective in an if-rank."""
    result = [action() if env.is_main else None]
    if env.backend is not None:
        dist.broadcast_object_list(result, src=0)
    return result[0]
