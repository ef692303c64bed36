"""Stream a rank's own row groups as whole-tensor batches.

A batch is cut from Arrow arrays converted once per row group, never built row by row.
Every epoch yields exactly ``steps`` batches on every rank: a rank with fewer ratings wraps
around its (reshuffled) row groups, so uneven shards cannot make one rank wait forever.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.shards import Piece

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (B,) users, (B,) items, (B,) ratings
COLUMNS = ["user_id", "item_id", "rating"]


def read_piece(piece: Piece) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row group as (int64 users, int64 items, float32 ratings)."""
    table = pq.ParquetFile(piece.path).read_row_group(piece.row_group, columns=COLUMNS)
    return (table.column(0).to_numpy().astype(np.int64),
            table.column(1).to_numpy().astype(np.int64),
            table.column(2).to_numpy().astype(np.float32))


def steps_per_epoch(pieces: list[Piece], batch_size: int) -> int:
    """Batches needed for a rank to see each of its ratings once."""
    rows = sum(p.rows for p in pieces)
    return -(-rows // batch_size)


class TrainBatches(IterableDataset):
    """One epoch of one rank's training batches, shuffled by (seed, epoch, rank, worker).

    Row groups are visited in a seeded random order and their rows permuted; with
    ``num_workers`` > 0 each DataLoader worker takes every k-th row group and an equal
    share of the steps, and the DataLoader's round-robin keeps the order deterministic.
    """

    def __init__(self, pieces: list[Piece], batch_size: int, steps: int, seed: int,
                 epoch: int, rank: int) -> None:
        if not pieces:
            raise ValueError("a rank has no training row groups")
        self.pieces, self.batch_size, self.steps = pieces, batch_size, steps
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        order = [self.pieces[i] for i in rng.permutation(len(self.pieces))]
        mine = order[worker::workers] or order  # more workers than pieces: share them
        steps = self.steps // workers + (worker < self.steps % workers)
        return _batches(mine, self.batch_size, steps, rng)


def _batches(pieces: list[Piece], batch_size: int, steps: int,
             rng: np.random.Generator) -> Iterator[Batch]:
    pending: list[tuple[np.ndarray, ...]] = []
    buffered = 0
    produced = 0
    index = 0
    while produced < steps:
        while buffered < batch_size:
            columns = read_piece(pieces[index % len(pieces)])
            index += 1
            permutation = rng.permutation(len(columns[0]))
            pending.append(tuple(c[permutation] for c in columns))
            buffered += len(permutation)
        merged = [np.concatenate(parts) for parts in zip(*pending)]
        for start in range(0, buffered - batch_size + 1, batch_size):
            if produced == steps:
                return
            yield tuple(torch.from_numpy(c[start:start + batch_size]) for c in merged)
            produced += 1
        used = (buffered // batch_size) * batch_size
        pending = [tuple(c[used:] for c in merged)]
        buffered -= used


def train_loader(dataset: TrainBatches, workers: int, pin_memory: bool) -> DataLoader:
    """Batches are already whole tensors: the DataLoader only moves them (batch_size=None)."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False)


def eval_batches(pieces: list[Piece], batch_size: int) -> Iterator[Batch]:
    """A rank's share of val or test rows in file order, in large batches."""
    for piece in pieces:
        users, items, ratings = read_piece(piece)
        for start in range(0, len(users), batch_size):
            stop = start + batch_size
            yield (torch.from_numpy(users[start:stop]), torch.from_numpy(items[start:stop]),
                   torch.from_numpy(ratings[start:stop]))
