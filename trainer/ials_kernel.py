"""The compiled passes of the iALS row updates (trainer/ials.py).

Its own module because it needs numba at import: only ``trainer.ials.load_ials_kernels``
imports it, so importing ``trainer`` stays light.
"""

from __future__ import annotations

import numba
import numpy as np

from trainer.fused_kernel import KERNEL_FASTMATH, PREFETCH_AHEAD, prefetch_row


@numba.njit(cache=True, fastmath=KERNEL_FASTMATH, nogil=True)
def add_pair_products(targets: np.ndarray, sources: np.ndarray, confidence: np.ndarray,
                      source_table: np.ndarray, direction: np.ndarray, products: np.ndarray,
                      right_side: np.ndarray) -> None:
    """The observed part of each target row's normal-equation matvec, for a chunk of pairs.

    For every pair k, with t = targets[k], y = source_table[sources[k]], c = confidence[k]:
    ``products[t] += c * (y . direction[t]) * y`` and, where ``right_side`` has rows,
    ``right_side[t] += c * y``. Summed over all of a row's pairs this is
    ``sum c y y^T direction[t]`` and ``sum c y``: no d x d matrix is ever formed. The source
    rows are gathered at random from a table far larger than the caches, so the row
    PREFETCH_AHEAD pairs on is requested while this pair is computed.

    Args:
        targets, sources: (n,) int64 row ids into ``direction``/``products`` and
            ``source_table``.
        confidence: (n,) float32.
        source_table: (rows, d) float32, the fixed side.
        direction: (target rows, d) float32, the vector each row's matrix multiplies.
        products: (target rows, d) float32, accumulated into.
        right_side: (target rows, d) float32 accumulated into, or (0, d) to skip.
    """
    count = len(targets)
    dim = source_table.shape[1]
    with_right_side = right_side.shape[0] > 0
    for k in range(count):
        if k + PREFETCH_AHEAD < count:
            prefetch_row(source_table, sources[k + PREFETCH_AHEAD])
        target, source, weight = targets[k], sources[k], confidence[k]
        dot = np.float32(0.0)
        for j in range(dim):
            dot += source_table[source, j] * direction[target, j]
        scale = weight * dot
        for j in range(dim):
            products[target, j] += scale * source_table[source, j]
        if with_right_side:
            for j in range(dim):
                right_side[target, j] += weight * source_table[source, j]


@numba.njit(cache=True, fastmath=KERNEL_FASTMATH, nogil=True)
def observed_loss(users: np.ndarray, items: np.ndarray, confidence: np.ndarray,
                  user_table: np.ndarray, item_table: np.ndarray) -> float:
    """``sum c (1 - w_u . h_i)^2`` over a chunk of pairs, in float64.

    Args:
        users, items: (n,) int64 row ids; confidence: (n,) float32.
        user_table, item_table: (rows, d) float32.
    """
    dim = user_table.shape[1]
    total = 0.0
    for k in range(len(users)):
        user, item = users[k], items[k]
        dot = 0.0
        for j in range(dim):
            dot += np.float64(user_table[user, j]) * item_table[item, j]
        total += confidence[k] * (1.0 - dot) ** 2
    return total
