"""Gradient synchronisation: DDP, or one packed all-gather of sparse rows per step.

DDP issues one sparse all-reduce per embedding parameter (4 per step, each several gloo
collectives with a ~2 ms floor); ``packed`` sends every touched row of the step in one
``all_gather``:

1. each rank sums its sparse gradient rows per touched id (duplicates added) for each
   group of tables looked up with the same ids (a user's factors and bias share one index)
   and packs, for all groups, the row counts, the row ids (int32 bit patterns) and the
   values into ONE flat float32 buffer;
2. one 8-byte ``all_reduce(MAX)`` agrees on the buffer length; each rank pads to it;
3. one ``all_gather`` of the padded buffers;
4. every rank unpacks all ranks' parts in rank order and builds, per parameter, the
   coalesced sum over ranks, which becomes ``.grad`` before ``optimizer.step()``.

Every rank runs the same arithmetic on the same bytes in the same order, so replicas stay
bit-identical. The result is the sum over ranks of each rank's gradient: the caller must
not scale the loss by the world size (DDP averages, so the DDP path does).

Communication is the padded buffer x world size: 4 (d + 2) bytes per unique touched row
(id, d factors, bias) per rank, growing with the batch and never with the tables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from trainer.distributed import DistEnv
from trainer.errors import InputError

log = logging.getLogger(__name__)

SYNC_MODES = ("auto", "ddp", "packed")
MAX_ROWS = 2**31 - 1  # row indices travel as int32 bit patterns inside the float32 buffer


def resolve_sync(choice: str, sparse: bool, env: DistEnv) -> str:
    """``ddp`` or ``packed`` for this run; auto: packed for sparse gradients on gloo.

    Dense gradients (small tables, nccl) keep DDP: one bucketed all-reduce per step.
    """
    if choice not in SYNC_MODES:
        raise InputError(f"--sync {choice!r}: expected one of {' | '.join(SYNC_MODES)}")
    if choice == "packed" and (not sparse or env.backend == "nccl"):
        raise InputError("--sync packed needs sparse gradients on gloo (--gradients sparse, "
                         "--backend gloo); use --sync ddp for dense gradients")
    if choice == "auto":
        return "packed" if sparse and env.backend != "nccl" else "ddp"
    if choice == "ddp" and sparse and env.backend == "gloo" and env.is_main:
        log.warning("--sync ddp with sparse gradients: DDP's sparse all-reduce over gloo "
                    "aborted with heap corruption after a few epochs in our runs (torch "
                    "2.13); --sync packed (the default) does the same update safely")
    return choice


class PackedSparseSync:
    """Sum the sparse gradients of some embedding tables over all ranks, one all-gather a step.

    Args:
        groups: groups of embedding weights looked up with the same ids (a user's factors
            and bias): one set of row indices serves the group, its values travel side by
            side, (rows, d_1 + d_2 + ...). Tables left out are not synchronised (e.g. user
            rows that one rank owns).
        env: this process's rank, world size and backend.
    """

    def __init__(self, groups: Sequence[Sequence[nn.Parameter]], env: DistEnv) -> None:
        for group in groups:
            rows = {int(p.shape[0]) for p in group}
            if not group or len(rows) != 1 or any(p.dim() != 2 for p in group):
                raise ValueError("each group of a packed sync holds (rows, d) tables with the "
                                 f"same rows, got {[tuple(p.shape) for p in group]}")
            if rows.pop() > MAX_ROWS:
                raise ValueError(f"packed sync handles tables of at most {MAX_ROWS} rows")
        self.groups = [list(group) for group in groups]
        self.widths = [[int(p.shape[1]) for p in group] for group in self.groups]
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

    def pack(self) -> torch.Tensor:
        """This rank's (n,) float32 buffer: row counts, then per group indices and values."""
        counts, parts = [], []
        for group in self.groups:
            ids, values = self._local_rows(group)
            counts.append(len(ids))
            parts += [ids.to(torch.int32).view(torch.float32), values.reshape(-1)]
        device = self.groups[0][0].device
        header = torch.tensor(counts, dtype=torch.int32, device=device).view(torch.float32)
        return torch.cat([header, *parts])

    def unpack(self, gathered: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group, (rows,) int64 ids and (rows, D) values of all ranks, in rank order.

        Args:
            gathered: (world_size, n) float32, row r = rank r's padded buffer.
        """
        count = len(self.groups)
        pieces: list[tuple[list, list]] = [([], []) for _ in self.groups]
        for buffer in gathered:
            counts = buffer[:count].view(torch.int32).tolist()
            offset = count
            for slot, (rows, widths) in enumerate(zip(counts, self.widths)):
                width = sum(widths)
                pieces[slot][0].append(buffer[offset:offset + rows].view(torch.int32))
                offset += rows
                pieces[slot][1].append(buffer[offset:offset + rows * width].view(rows, width))
                offset += rows * width
        return [(torch.cat(i).long(), torch.cat(v)) for i, v in pieces]

    def __call__(self) -> int:
        """Replace each table's local gradient by its sum over ranks (coalesced).

        Call after ``loss.backward()`` on every rank. Returns the bytes this step moved
        (the padded buffer x world size; 0 for a single process).
        """
        if self.env.backend is None:
            return 0
        buffer = self.pack()
        length = torch.tensor([buffer.numel()], dtype=torch.int64, device=buffer.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        size = int(length.item())
        padded = torch.zeros(size, dtype=torch.float32, device=buffer.device)
        padded[:buffer.numel()] = buffer
        gathered = torch.empty(self.env.world_size * size, dtype=torch.float32,
                               device=buffer.device)
        _all_gather_single(gathered, padded)
        for group, (ids, values) in zip(self.groups,
                                        self.unpack(gathered.view(self.env.world_size, size))):
            ids, values = _sum_rows(ids, values)
            start = 0
            for param in group:
                width = int(param.shape[1])
                param.grad = torch.sparse_coo_tensor(
                    ids.unsqueeze(0), values[:, start:start + width].contiguous(),
                    param.shape, is_coalesced=True, check_invariants=False).to(param.dtype)
                start += width
        return 4 * size * self.env.world_size


# torch 2.13 renamed all_gather_into_tensor (deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _sum_rows(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique ids (sorted) and their summed value rows, duplicates added in input order.

    Cheaper than ``Tensor.coalesce()`` on CPU, and the same on every rank given the same input.
    """
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    summed = torch.zeros(len(unique), values.shape[1], dtype=values.dtype, device=values.device)
    return unique, summed.index_add_(0, inverse, values)
