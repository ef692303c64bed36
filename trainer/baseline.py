"""The bias-only baseline every factor model must beat: mean + damped item and user offsets.

b_i = sum(r - mean) / (damping + n_i), then b_u = sum(r - mean - b_i) / (damping + n_u),
from two streaming passes over each rank's training row groups and one all-reduce of the
per-user and per-item sums (once per run, so dense tables are fine).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from trainer.data import read_piece
from trainer.distributed import DistEnv, all_reduce, all_reduce_tensor
from trainer.shards import ShardSet, pieces_for_rank

DAMPING = 10.0  # pseudo-ratings at the mean: shrinks offsets of rarely rated users and items


def bias_baseline_rmse(shards: ShardSet, env: DistEnv) -> float | None:
    """Test RMSE of the damped-bias predictor (None when there is no test split)."""
    train = pieces_for_rank(shards.pieces("train"), env.rank, env.world_size)
    mean = shards.train_mean
    item_bias = _damped_offsets(train, shards.num_items, env,
                                lambda u, i, r: (i, r - mean))
    user_bias = _damped_offsets(train, shards.num_users, env,
                                lambda u, i, r: (u, r - mean - item_bias[i]))
    sse = 0.0
    count = 0
    low, high = shards.scale
    for piece in pieces_for_rank(shards.pieces("test"), env.rank, env.world_size):
        users, items, ratings = read_piece(piece)
        predicted = np.clip(mean + user_bias[users] + item_bias[items], low, high)
        sse += float(np.square(predicted - ratings).sum())
        count += len(ratings)
    sse, count = all_reduce([sse, float(count)], env)
    return math.sqrt(sse / count) if count else None


def _damped_offsets(pieces, size: int, env: DistEnv, residual) -> np.ndarray:
    sums = np.zeros(size, dtype=np.float64)
    counts = np.zeros(size, dtype=np.float64)
    for piece in pieces:
        keys, values = residual(*read_piece(piece))
        sums += np.bincount(keys, weights=values, minlength=size)
        counts += np.bincount(keys, minlength=size)
    both = all_reduce_tensor(torch.from_numpy(np.concatenate([sums, counts])), env).numpy()
    return both[:size] / (DAMPING + both[size:])
