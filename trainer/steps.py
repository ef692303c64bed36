"""The per-step model update, behind one interface:
``total = step(users, items, ratings, total)``.

A step scores one rank's share of the global batch, moves the parameters and keeps the
replicas equal. `AutogradStep` is the reference (and the GPU path): autograd backward, the
optimizer, and either DDP's all-reduce (inside backward) or a row sync (trainer/sync.py)
around the optimizer step. `FusedSGDStep` (trainer/fused_step.py) applies the same SGD
update in one compiled CPU pass. Both offer the same interface: called with one or more
batches of the step's ``batch_size`` ratings laid end to end ((n,) int64 user ids, (n,)
int64 item ids, (n,) float32 ratings), they step on each batch in turn and return
``total`` plus each batch's summed loss, added in that order, so a resumed epoch adds the
same numbers in the same order as an uninterrupted one however its batches were grouped
(a detached 0-dim float64 tensor on the rank's device, or a float from the fused CPU
step); ``sync_bytes`` counts the bytes its sync moved and ``flush()`` brings the replicas
level before anyone looks at them.
"""

from __future__ import annotations

import torch

from trainer.distributed import DistEnv, wrap_model
from trainer.fused_step import FusedSGDStep, load_fused_kernel
from trainer.model import BiasedMF
from trainer.optim import Optimizer
from trainer.strategy import Strategy
from trainer.sync import PackedSparseSync, PeriodicRowSync


class AutogradStep:
    """Forward, backward, sync, optimizer step: the reference model update.

    ``grad_sync`` (packed sync) runs after each backward and after each optimizer step;
    without it ``model`` is DDP-wrapped (or alone). DDP averages gradients over ranks, so
    ``scale`` (the world size there) makes the update the gradient of the sum over the
    global batch and the learning rate per rating; the packed sync sums already (1.0).
    A call takes one or more batches of ``batch_size`` ratings end to end and steps on each.
    """

    kind = "autograd"

    def __init__(self, model: torch.nn.Module, optimizer: Optimizer,
                 grad_sync: PackedSparseSync | PeriodicRowSync | None, scale: float,
                 batch_size: int) -> None:
        self.model, self.optimizer, self.grad_sync, self.scale = model, optimizer, grad_sync, scale
        self.batch_size = batch_size
        self.sync_bytes = 0  # bytes the row sync moved since the caller last reset this
        # Steps between row exchanges: the loop meets the other ranks only on those.
        self.exchange_every = grad_sync.every if grad_sync is not None else 1

    def __call__(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
                 total: torch.Tensor | float) -> torch.Tensor:
        device = self.optimizer.param_groups[0]["params"][0].device
        columns = [c.to(device, non_blocking=True) for c in (users, items, ratings)]
        for batch in zip(*(c.split(self.batch_size) for c in columns)):
            loss = self.model(*batch)
            self.optimizer.zero_grad(set_to_none=True)
            (loss * self.scale).backward()
            if self.grad_sync is not None:
                self.sync_bytes += self.grad_sync.after_backward()
            self.optimizer.step()
            if self.grad_sync is not None:
                self.sync_bytes += self.grad_sync.after_step()
            total = total + loss.detach().double()
        return total

    def flush(self) -> None:
        """Bring the replicas level (the periodic sync's pending changes); before checkpoints,
        evaluation and the end of an epoch."""
        if self.grad_sync is not None:
            self.sync_bytes += self.grad_sync.flush()


def build_step(strategy: Strategy, model: BiasedMF, optimizer: Optimizer, rank_batch: int,
               env: DistEnv) -> AutogradStep | FusedSGDStep:
    """The run's step, as `trainer.strategy.resolve_strategy` chose it.

    Built after any resume: the periodic sync snapshots the weights it starts from. Only
    the periodic sync exchanges rows the fused step changed in place; DDP and the per-step
    packed sync exchange gradients, which it never materialises.
    """
    step_model, grad_sync = replica_sync(strategy, model, rank_batch, env)
    if strategy.step == "fused":
        return FusedSGDStep(model, optimizer, load_fused_kernel(), rank_batch, grad_sync,
                            strategy.owned)
    return AutogradStep(step_model, optimizer, grad_sync,
                        1.0 if grad_sync is not None else float(env.world_size), rank_batch)


def replica_sync(strategy: Strategy, model: BiasedMF, rank_batch: int, env: DistEnv
                 ) -> tuple[torch.nn.Module, PackedSparseSync | PeriodicRowSync | None]:
    """The module to step and what keeps replicas equal: DDP's wrapper, or a row sync."""
    if strategy.sync != "packed":
        return wrap_model(model, env), None
    if env.backend is None:
        return model, None
    groups = item_tables(model) if strategy.owned else sparse_tables(model)
    if strategy.sync_every > 1:
        return model, PeriodicRowSync(groups, env, strategy.sync_every, rank_batch)
    return model, PackedSparseSync(groups, env)


def sparse_tables(model: BiasedMF) -> list[list[torch.nn.Parameter]]:
    """The embedding weights a packed sync exchanges, grouped by the ids that index them."""
    return [[model.user_factors.weight, model.user_bias.weight], *item_tables(model)]


def item_tables(model: BiasedMF) -> list[list[torch.nn.Parameter]]:
    """The only weights exchanged when each rank owns its users' rows."""
    return [[model.item_factors.weight, model.item_bias.weight]]
