"""How a run executes, decided once and together: user rows, gradients, sync, exchange
interval and the step.

These five choices constrain one another (owned users need a row sync; the fused step
needs no per-step gradient exchange; DDP cannot carry sparse gradients on nccl), so one
function decides them all from the ``auto`` fields of `TrainConfig`, the facts of the
shards and the ranks, and refuses a combination that cannot run with one message naming
the fields.

The default path: on one process the fused CPU step and nothing to exchange. With several
ranks (gloo or nccl) sparse gradients and the packed row sync, ranks stepping alone and
exchanging the rows they changed every EXCHANGE_EVERY_RATINGS ratings a rank, in dense
float buffers that both backends carry; on shards partitioned by user each rank owns its
users' rows, so only item rows travel. The periodic exchange also lets the fused step run
on CPU ranks. DDP (a dense all-reduce of whole tables every step) is used only when asked
for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shardmf.errors import InputError
from trainer.config import EXCHANGE_EVERY_RATINGS, TrainConfig

DENSE_ROWS_PER_BATCH_ROW = 4  # DDP: dense gradients while tables have <= 4 rows per batch row


@dataclass(frozen=True)
class Strategy:
    """The resolved execution choices of a run (recorded in config.json)."""

    user_embeddings: str  # "owned": each rank holds its users' rows; or "replicated"
    gradients: str  # "sparse" (touched rows) or "dense" (whole tables)
    sync: str  # "packed" row sync or "ddp" (meaningful with several ranks only)
    sync_every: int  # steps between row exchanges; 1: every step
    step: str  # "fused" (compiled CPU SGD) or "autograd"

    @property
    def owned(self) -> bool:
        return self.user_embeddings == "owned"

    @property
    def sparse(self) -> bool:
        return self.gradients == "sparse"


@dataclass(frozen=True)
class Facts:
    """What the strategy depends on besides the config: the shards and the ranks."""

    world_size: int
    backend: str | None  # "gloo", "nccl", or None for one process
    device_type: str  # "cpu" or "cuda"
    optimizer: str  # OptimConfig.optimizer
    partitioned_by_user: bool  # the manifest's partition scheme is "user"
    table_rows: int  # users + items
    rank_batch: int  # ratings per step on one rank


def resolve_strategy(config: TrainConfig, facts: Facts,
                     fused_kernel_loads: Callable[[], bool]) -> Strategy:
    """Fill every ``auto`` execution choice of ``config``; a given choice always wins, and
    one that cannot run with the others is an InputError naming the fields.

    ``fused_kernel_loads`` is asked only when the fused step could run (it compiles numba).
    """
    several = facts.world_size > 1
    owned = _user_embeddings(config, facts)
    sync_every = config.sync_every
    if sync_every is None:
        periodic = several and config.sync != "ddp" and config.gradients != "dense"
        sync_every = max(2, EXCHANGE_EVERY_RATINGS // facts.rank_batch) if periodic else 1
    gradients = config.gradients
    if gradients == "auto":
        # A per-step exchange of sparse rows moves ~2 x the global batch rows; DDP's dense
        # all-reduce moves whole tables in one cheap collective, worth it for small tables.
        small_tables = facts.table_rows <= (DENSE_ROWS_PER_BATCH_ROW * facts.rank_batch
                                            * facts.world_size)
        per_step = several and sync_every == 1 and not owned
        dense = per_step and (facts.backend == "nccl" or small_tables or config.sync == "ddp")
        gradients = "dense" if dense else "sparse"
    sync = config.sync
    if sync == "auto":
        sync = "packed" if gradients == "sparse" else "ddp"
    if sync == "ddp" and owned:
        raise InputError("user_embeddings='owned' keeps user rows on their rank, which DDP "
                         "cannot do; use sync='packed' (or user_embeddings='replicated')")
    if sync == "ddp" and sync_every > 1:
        raise InputError(f"sync_every={sync_every} works with the packed row sync; leave it "
                         "at 1 (or unset) for sync='ddp'")
    if sync == "packed" and gradients == "dense":
        raise InputError("sync='packed' exchanges sparse rows; drop gradients='dense' (or use "
                         "sync='ddp')")
    if sync == "ddp" and gradients == "sparse" and facts.backend == "nccl":
        raise InputError("gradients='sparse' with sync='ddp' needs gloo: nccl cannot "
                         "all-reduce sparse tensors; use sync='packed'")
    if owned and gradients == "dense":
        raise InputError("user_embeddings='owned' exchanges item rows only, as sparse "
                         "gradients; drop gradients='dense' (or use user_embeddings "
                         "'replicated')")
    step = _step(config.step, facts, per_step_sync=several and sync_every == 1,
                 fused_kernel_loads=fused_kernel_loads)
    return Strategy("owned" if owned else "replicated", gradients, sync, sync_every, step)


def _user_embeddings(config: TrainConfig, facts: Facts) -> bool:
    """True when each rank owns its users' rows."""
    choice = config.user_embeddings
    if choice == "replicated":
        return False
    if choice == "auto":
        return (facts.partitioned_by_user and facts.world_size > 1
                and config.gradients != "dense" and config.sync != "ddp")
    if not facts.partitioned_by_user:
        raise InputError("user_embeddings='owned' needs shards partitioned by user; prepare "
                         "them with partition_by 'user'")
    return True


def _step(choice: str, facts: Facts, per_step_sync: bool,
          fused_kernel_loads: Callable[[], bool]) -> str:
    """``fused`` on the CPU with plain SGD when nothing is exchanged every step and numba
    loads; ``autograd`` otherwise (adagrad/adam, CUDA, a per-step exchange of gradients,
    which the fused step never materialises)."""
    if choice == "autograd":
        return choice
    obstacle = None
    if facts.optimizer != "sgd":
        obstacle = f"optimizer={facts.optimizer!r} (it supports 'sgd' only)"
    elif facts.device_type != "cpu":
        obstacle = f"device={facts.device_type!r} (it runs on the CPU only)"
    elif per_step_sync:
        obstacle = "a gradient exchange every step (use `sync_every` 2 or more with several ranks)"
    if obstacle is None and not fused_kernel_loads():
        obstacle = ("numba, which could not load or compile the kernel (see the warning "
                    "above; install numba>=0.59)")
    if obstacle is None:
        return "fused"
    if choice == "fused":
        raise InputError(f"step='fused' cannot run with {obstacle}; use step='auto' or "
                         "'autograd'")
    return "autograd"
