"""Keeping replicas equal (``--sync``, ``--sync-every``), three ways:

- `PeriodicRowSync`, the default with several CPU ranks (under the fused step): each rank
  steps alone, and every N steps (``--sync-every``, chosen from the data) every row a rank
  changed is set to snapshot + the sum of the ranks' changes over the square root of the
  ranks that changed it. With users owned by rank, only item rows are exchanged.
- `PackedSparseSync` (``--sync-every 1``, autograd step): every step, all ranks' sparse
  gradient rows summed, exactly the step of one process on the global batch.
- DDP's all-reduce (trainer/distributed.py's ``wrap_model``): dense gradients, nccl.

Touched rows travel in one float32 buffer per exchange (`RowExchange`: an 8-byte
all-reduce agrees on its length, one all-gather moves it, 4 (d + 2) bytes per row and
rank); the periodic sync sends a table with few rows for the ratings between exchanges
whole, in one all-reduce. Every rank does the same arithmetic on the same bytes in the
same order, so replicas stay bit-identical, and communication is bounded by the ratings
trained between exchanges, never by the tables. The measurements behind each choice are
in bench/scaling.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.distributed import DistEnv

MAX_ROWS = 2**31 - 1  # row indices travel as int32 bit patterns inside the float32 buffer
# Periodic sync: a table whose rows are at most 1/4 of the ratings a rank trains on between
# exchanges is exchanged whole (one all-reduce), a larger one by its touched rows.
DENSE_EXCHANGE_RATINGS_PER_ROW = 4


class RowExchange:
    """One all-gather that gives every rank all ranks' (ids, values) rows, per table group.

    Args:
        widths: the value width of each group (d + 1 for factors and bias side by side).
        env: this process's rank, world size and backend.
    """

    def __init__(self, widths: Sequence[int], env: DistEnv) -> None:
        self.widths = list(widths)
        self.env = env

    def pack(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """This rank's (n,) float32 buffer: row counts, then per group indices and values."""
        device = parts[0][1].device
        header = torch.tensor([len(ids) for ids, _ in parts], dtype=torch.int32,
                              device=device).view(torch.float32)
        pieces = [header]
        for ids, values in parts:
            pieces += [ids.to(torch.int32).view(torch.float32), values.reshape(-1)]
        return torch.cat(pieces)

    def unpack(self, gathered: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group, (rows,) int64 ids and (rows, width) values of all ranks, in rank order.

        Args:
            gathered: (world_size, n) float32, row r = rank r's padded buffer.
        """
        count = len(self.widths)
        pieces: list[tuple[list, list]] = [([], []) for _ in self.widths]
        for buffer in gathered:
            counts = buffer[:count].view(torch.int32).tolist()
            offset = count
            for slot, (rows, width) in enumerate(zip(counts, self.widths)):
                pieces[slot][0].append(buffer[offset:offset + rows].view(torch.int32))
                offset += rows
                pieces[slot][1].append(buffer[offset:offset + rows * width].view(rows, width))
                offset += rows * width
        return [(torch.cat(i).long(), torch.cat(v)) for i, v in pieces]

    def __call__(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
        """All ranks' rows per group, and the bytes moved (padded buffer x world size)."""
        buffer = self.pack(parts)
        length = torch.tensor([buffer.numel()], dtype=torch.int64, device=buffer.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        size = int(length.item())
        padded = torch.zeros(size, dtype=torch.float32, device=buffer.device)
        padded[:buffer.numel()] = buffer
        gathered = torch.empty(self.env.world_size * size, dtype=torch.float32,
                               device=buffer.device)
        _all_gather_single(gathered, padded)
        return (self.unpack(gathered.view(self.env.world_size, size)),
                4 * size * self.env.world_size)


def _check_groups(groups: Sequence[Sequence[nn.Parameter]]) -> list[list[nn.Parameter]]:
    for group in groups:
        rows = {int(p.shape[0]) for p in group}
        if not group or len(rows) != 1 or any(p.dim() != 2 for p in group):
            raise ValueError("each group of a row sync holds (rows, d) tables with the "
                             f"same rows, got {[tuple(p.shape) for p in group]}")
        if rows.pop() > MAX_ROWS:
            raise ValueError(f"a row sync handles tables of at most {MAX_ROWS} rows")
    return [list(group) for group in groups]


class PackedSparseSync:
    """Sum the sparse gradients of some embedding tables over all ranks, one all-gather a step.

    The result is the sum of the ranks' gradients: the caller must not scale the loss by
    the world size (DDP averages, so the DDP path does).

    Args:
        groups: groups of embedding weights looked up with the same ids (a user's factors
            and bias): one set of row indices serves the group, its values travel side by
            side, (rows, d_1 + d_2 + ...). Tables left out are not synchronised (e.g. user
            rows that one rank owns).
        env: this process's rank, world size and backend.
    """

    every = 1  # steps between exchanges

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], env: DistEnv) -> None:
        self.groups = _check_groups(groups)
        self.exchange = RowExchange([sum(int(p.shape[1]) for p in g) for g in self.groups],
                                    env)
        self.env = env

    def _local_rows(self, group: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's unique touched rows of a group: (n,) int64 ids, (n, D) summed values."""
        grads = [p.grad for p in group]
        device = group[0].device
        width = sum(int(p.shape[1]) for p in group)
        if all(g is None for g in grads):
            return (torch.empty(0, dtype=torch.int64, device=device),
                    torch.empty(0, width, dtype=torch.float32, device=device))
        if any(g is None or not g.is_sparse for g in grads):
            raise RuntimeError("packed sync needs sparse gradients (nn.Embedding(sparse=True)) "
                               "on every table of a group")
        ids = grads[0]._indices()[0]
        for grad in grads[1:]:
            if not torch.equal(grad._indices()[0], ids):
                raise RuntimeError("packed sync: tables of one group were looked up with "
                                   "different ids")
        values = torch.cat([g._values().reshape(len(ids), -1).float() for g in grads], dim=1)
        return _sum_rows(ids, values)

    def after_backward(self) -> int:
        """Replace each table's local gradient by its sum over ranks (coalesced).

        Call after ``loss.backward()`` on every rank. Returns the bytes this step moved
        (the padded buffer x world size; 0 for a single process).
        """
        if self.env.backend is None:
            return 0
        gathered, moved = self.exchange([self._local_rows(group) for group in self.groups])
        for group, (ids, values) in zip(self.groups, gathered):
            ids, values = _sum_rows(ids, values)
            start = 0
            for param in group:
                width = int(param.shape[1])
                param.grad = torch.sparse_coo_tensor(
                    ids.unsqueeze(0), values[:, start:start + width].contiguous(),
                    param.shape, is_coalesced=True, check_invariants=False).to(param.dtype)
                start += width
        return moved

    def after_step(self) -> int:
        return 0

    def flush(self) -> int:
        return 0


class PeriodicRowSync:
    """Each rank steps on its own; every N steps the rows changed anywhere are made equal.

    Between exchanges a rank applies only its own gradients (local SGD). At an exchange
    every rank sets each row to snapshot + the SUM of its changes since the snapshot over
    the ranks that changed it, divided by the square root of their number k, computed in
    the same order everywhere: replicas are bit-identical again. Each rank's change is
    already a step towards what its own ratings want: for a row that moved little, the
    ranks' steps add up as one process's would (the sum is right); for a row that settled
    between exchanges, they point at the same place (the mean is right). The mean alone
    slowed every shared row k-fold, and two ranks ended 0.006 RMSE behind one; the sum
    oscillated on popular rows; sqrt(k) between them ends where one process does
    (bench/ranks.md). A row only one
    rank touched keeps that rank's change in full: with users owned by rank, user rows are
    never exchanged at all. The snapshot doubles the memory of the tables synced.

    Two ways to exchange, chosen per group from its size alone (so every rank agrees):
    a table with a quarter as many rows as the ratings a rank trains on between exchanges,
    or fewer, is mostly touched, and its whole change (plus a touched flag per row) goes
    through one all-reduce; a larger one sends only the rows it touched, through one
    all-gather.
    Either way communication per exchange is bounded by the ratings in between or by the
    table, and falls N-fold per step at most.

    The caller exchanges after every N-th step (``after_step``; a caller that runs several
    steps at once asks ``steps_to_exchange`` first) and before anything that
    must see equal replicas: evaluation, checkpoints (``flush``). Both are collectives.
    """

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], env: DistEnv, every: int,
                 rank_batch: int) -> None:
        self.groups = _check_groups(groups)
        self.dense = [DENSE_EXCHANGE_RATINGS_PER_ROW * int(g[0].shape[0]) <= every * rank_batch
                      for g in self.groups]
        sparse_widths = [sum(int(p.shape[1]) for p in g)
                         for g, dense in zip(self.groups, self.dense) if not dense]
        self.exchange = RowExchange(sparse_widths, env)
        self.snapshots = [[p.detach().clone() for p in group] for group in self.groups]
        # Per group, the rows changed since the last exchange: set by after_backward, or by
        # the fused kernel itself (trainer/fused_kernel.py) through numpy views, so they are
        # cleared in place, never replaced.
        self.touched = [torch.zeros(g[0].shape[0], dtype=torch.bool, device=g[0].device)
                        for g in self.groups]
        self.env, self.every, self.pending = env, every, 0

    def after_backward(self) -> int:
        """Note the rows this step's gradients touch (before the optimizer moves them)."""
        for group, touched in zip(self.groups, self.touched):
            grad = group[0].grad
            if grad is not None:
                touched[grad._indices()[0]] = True
        return 0

    def steps_to_exchange(self) -> int:
        """Steps a caller may take before the next exchange is due."""
        return self.every - self.pending

    def after_step(self, steps: int = 1) -> int:
        """Count ``steps`` more steps (at most ``steps_to_exchange()``); exchange when due."""
        self.pending += steps
        return self.flush() if self.pending >= self.every else 0

    @torch.no_grad()
    def flush(self) -> int:
        """Exchange now if any step ran since the last exchange (the same on every rank)."""
        if self.pending == 0:
            return 0
        self.pending = 0
        groups = list(zip(self.groups, self.snapshots, self.touched, self.dense))
        moved = 0
        if any(self.dense):
            moved += self._flush_dense([g for g in groups if g[3]])
        if not all(self.dense):
            moved += self._flush_sparse([g for g in groups if not g[3]])
        return moved

    def _flush_dense(self, groups: list) -> int:
        """One all-reduce of every table's change and touched flags, laid end to end.

        Each block is written in place into one flat buffer, with no per-table temporaries
        to concatenate (bench/scaling.md: those made the flush slow).
        """
        total = sum(sum(p.numel() for p in group) + len(touched)
                    for group, _, touched, _ in groups)
        buffer = torch.empty(total, dtype=torch.float32, device=groups[0][2].device)
        blocks, offset = [], 0
        for group, snapshots, touched, _ in groups:
            changes = []
            for param, snapshot in zip(group, snapshots):
                change = buffer[offset:offset + param.numel()].view_as(param)
                torch.sub(param, snapshot, out=change)
                changes.append(change)
                offset += param.numel()
            flags = buffer[offset:offset + len(touched)]
            flags.copy_(touched)
            offset += len(touched)
            blocks.append((changes, flags))
        dist.all_reduce(buffer)
        for (group, snapshots, touched, _), (changes, flags) in zip(groups, blocks):
            _apply_changes(group, snapshots, None, changes, flags)
            touched.zero_()
        return 4 * buffer.numel() * self.env.world_size

    def _flush_sparse(self, groups: list) -> int:
        parts = []
        for group, snapshots, touched, _ in groups:
            ids = touched.nonzero()[:, 0]
            parts.append((ids, torch.cat([p[ids] - s[ids] for p, s in zip(group, snapshots)],
                                         dim=1)))
        gathered, moved = self.exchange(parts)
        for (group, snapshots, touched, _), (ids, changes) in zip(groups, gathered):
            ones = torch.ones(len(ids), 1, dtype=changes.dtype, device=changes.device)
            ids, summed = _sum_rows(ids, torch.cat([changes, ones], dim=1))
            widths = [int(p.shape[1]) for p in group]
            _apply_changes(group, snapshots, ids, list(summed[:, :-1].split(widths, dim=1)),
                        summed[:, -1])
            touched.zero_()
        return moved


def _apply_changes(group: list[nn.Parameter], snapshots: list[torch.Tensor],
                   ids: torch.Tensor | None, summed: list[torch.Tensor],
                   ranks: torch.Tensor) -> None:
    """Rows (all, or ``ids``) = snapshot + summed change / sqrt(ranks that changed them).

    ``summed`` holds each table's summed change rows; ``ranks`` counts the ranks per row.
    """
    divisor = ranks.clamp(min=1).sqrt_().unsqueeze(1)
    for param, snapshot, change in zip(group, snapshots, summed):
        if ids is None:
            snapshot.addcdiv_(change, divisor)
            param.copy_(snapshot)
        else:
            rows = torch.addcdiv(snapshot[ids], change, divisor)
            param[ids] = rows
            snapshot[ids] = rows


# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _sum_rows(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids (sorted) and their summed value rows, duplicates added in input order.

    Cheaper than ``Tensor.coalesce()`` on CPU, and the same on every rank given the same input.
    """
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    summed = torch.zeros(len(unique), values.shape[1], dtype=values.dtype, device=values.device)
    return unique, summed.index_add_(0, inverse, values)
