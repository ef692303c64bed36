"""The fused CPU training step: one compiled pass per batch instead of forward, backward
and RowSGD.

The reference step (``BiasedMF.forward``, autograd, ``RowSGD``) builds several (B, d)
tensors and dispatches a dozen ops per batch; on one thread it reaches a fraction of a
compiled loop (bench/fused_step.md). This kernel applies the SAME update, the batch's
summed gradient computed from the pre-step weights with duplicates added, so convergence,
learning rates and every figure stay those of the reference; it only runs faster. It
writes in place into the storage of the ``nn.Embedding`` weights, which stay torch tensors:
checkpoints, the row sync, export and clustering see no difference.

The kernel itself lives in trainer/fused_kernel.py, imported lazily: where numba cannot
import or compile it, ``load_fused_kernel`` returns None after one warning and the trainer
keeps the autograd step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import torch

from shardmf.errors import interrupts_held
from trainer.model import BiasedMF
from trainer.optim import Optimizer
from trainer.sync import PeriodicRowSync

log = logging.getLogger(__name__)


@functools.cache
def load_fused_kernel() -> Callable | None:
    """The compiled batch kernel, or None (logged once) where numba cannot import or compile.

    Compiles here, on a one-rating batch of the trainer's dtypes, so a failure surfaces now
    rather than mid-epoch; ``cache=True`` keeps the machine code on disk between runs.
    """
    with interrupts_held():  # numba's imports swallow a Ctrl-C (see interrupts_held)
        try:
            from trainer.fused_kernel import sgd_batches as kernel

            ids = np.zeros(1, dtype=np.int64)
            table = np.zeros((1, 1), dtype=np.float32)
            column = np.zeros(1, dtype=np.float32)
            untracked = np.zeros(0, dtype=np.bool_)
            kernel(ids, ids, column, 1, table, table.copy(), column.copy(), column.copy(), 0.0,
                   0.0, 0.0, 0.0, 0.0, table.copy(), table.copy(), np.zeros((1, 2), np.float32),
                   column.copy(), untracked, untracked, 0.0)
        except Exception as e:  # noqa: BLE001 (any import or compile failure means: no kernel)
            log.warning("the fused CPU step is unavailable (%s: %s); training uses the slower "
                        "autograd step (install numba>=0.59 for the fused one)",
                        type(e).__name__, e)
            return None
    return kernel


class FusedSGDStep:
    """A BiasedMF's SGD step in one compiled pass: the fused twin of ``AutogradStep``.

    Replaces ``loss = model(...); loss.backward(); optimizer.step()`` with the same update,
    batch after batch: one call takes a loader item of several batches end to end and
    hands the kernel everything up to the next row exchange at once. The learning rate is
    read from the optimizer's first group at every call, so the loop's per-epoch schedule
    (and a checkpoint of the optimizer) works unchanged. The numpy views
    share the weights' storage, which the trainer only ever changes in place (``copy_``,
    ``load_state_dict``, the row sync). With several ranks it runs under the periodic row
    sync (``--sync-every N`` > 1), which it tells which rows each batch changed.

    Args:
        model: a CPU float32 BiasedMF (unwrapped).
        optimizer: the run's RowSGD (its ``lr`` is used, never its ``step``).
        kernel: ``load_fused_kernel()``'s result.
        batch_size: ratings per step (a call's last batch may be shorter).
        grad_sync: the periodic row sync, or None for one process.
        owned: each rank owns its users' rows (only item rows are exchanged).
    """

    kind = "fused"

    def __init__(self, model: BiasedMF, optimizer: Optimizer, kernel: Callable,
                 batch_size: int, grad_sync: PeriodicRowSync | None = None,
                 owned: bool = False) -> None:
        tables = (model.user_factors.weight, model.item_factors.weight,
                  model.user_bias.weight, model.item_bias.weight)
        if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
               for t in tables):
            raise ValueError("the fused step needs contiguous float32 CPU tables")
        self.model, self.optimizer, self.grad_sync, self.owned = model, optimizer, grad_sync, owned
        self.sync_bytes = 0  # bytes the row sync moved since the caller last reset this
        # Steps between row exchanges: the loop meets the other ranks only on those.
        self.exchange_every = grad_sync.every if grad_sync is not None else 1
        self.user_factors, self.item_factors = (t.detach().numpy() for t in tables[:2])
        self.user_bias, self.item_bias = (t.detach().numpy().reshape(-1) for t in tables[2:])
        # The sync's per-row "changed" flags, as numpy views the kernel sets (empty: none
        # kept); the sync clears them in place after each exchange.
        flags = [t.numpy() for t in grad_sync.touched] if grad_sync is not None else []
        untracked = np.zeros(0, dtype=np.bool_)
        self.touched_users = flags[0] if flags and not owned else untracked
        self.touched_items = flags[-1] if flags else untracked
        self.mean, self.rating_unit = float(model.global_mean), model.rating_unit
        self.reg, self.bias_reg = model.factor_reg, model.config.bias_reg
        self.kernel, self.batch_size = kernel, batch_size
        dim = self.user_factors.shape[1]
        self.old_users = np.empty((batch_size, dim), dtype=np.float32)
        self.old_items = np.empty((batch_size, dim), dtype=np.float32)
        self.old_biases = np.empty((batch_size, 2), dtype=np.float32)
        self.errors = np.empty(batch_size, dtype=np.float32)

    def __call__(self, users: torch.Tensor, items: torch.Tensor, ratings: torch.Tensor,
                 total: float) -> float:
        """Apply the update of each batch of ``batch_size`` ratings in turn, exchanging rows
        where the sync is due; returns ``total`` plus each batch's summed loss, in order.

        Args:
            users, items: (n,) int64 row ids; ratings: (n,) float32.
        """
        users_, items_, ratings_ = users.numpy(), items.numpy(), ratings.numpy()
        lr = self.optimizer.param_groups[0]["lr"]
        start = 0
        while start < len(ratings_):
            batches = -(-(len(ratings_) - start) // self.batch_size)
            if self.grad_sync is not None:
                batches = min(batches, self.grad_sync.steps_to_exchange())
            stop = min(start + batches * self.batch_size, len(ratings_))
            total = self.kernel(
                users_[start:stop], items_[start:stop], ratings_[start:stop], self.batch_size,
                self.user_factors, self.item_factors, self.user_bias, self.item_bias,
                self.mean, lr / self.rating_unit, lr, self.reg, self.bias_reg,
                self.old_users, self.old_items,
                self.old_biases, self.errors, self.touched_users, self.touched_items, total)
            if self.grad_sync is not None:
                self.sync_bytes += self.grad_sync.after_step(batches)
            start = stop
        return total

    def flush(self) -> None:
        """Bring the replicas level; before checkpoints, evaluation and an epoch's end."""
        if self.grad_sync is not None:
            self.sync_bytes += self.grad_sync.flush()
