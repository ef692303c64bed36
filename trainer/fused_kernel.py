"""The compiled kernel of the fused CPU step (trainer/fused_step.py).

Its own module because it needs numba at import: only ``load_fused_kernel`` imports it,
so a machine without numba still trains (on the autograd step).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

# Reassociation lets LLVM vectorise the dot products and sums of squares (torch's own
# reductions reorder them too), and contraction fuses multiply-adds: 1.1-1.3x the strict
# kernel, side by side. No flag that changes results on inf/nan: a diverging loss must
# still show as non-finite.
KERNEL_FASTMATH = {"reassoc", "contract"}
# Ratings ahead whose rows are prefetched while a rating's rows are copied: the tables
# are far larger than the caches, so every row is a DRAM miss, and the copy loop alone
# keeps too few of them in flight (bench/fused_step.md: 8-16 ahead, same gain).
PREFETCH_AHEAD = 8
CACHE_LINE_BYTES = 64


@intrinsic
def prefetch_row(typingctx, table, row):
    """Ask the CPU to fetch ``table[row, :]`` into the caches, for writing, without waiting.

    numba has no prefetch of its own; this emits LLVM's ``llvm.prefetch`` for each cache
    line of the row (a hint: it never faults, whatever the address).
    """
    def codegen(context, builder, signature, args):
        table_type = signature.args[0]
        array = context.make_array(table_type)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        start = cgutils.get_item_pointer(context, builder, table_type, array, [args[1], zero])
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(
            "llvm.prefetch", [byte_pointer],
            ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        row_bytes = builder.mul(builder.extract_value(array.shape, 1),
                                context.get_constant(types.intp, table_type.dtype.bitwidth // 8))
        base = builder.bitcast(start, byte_pointer)
        with cgutils.for_range_slice(builder, zero, row_bytes,
                                     context.get_constant(types.intp, CACHE_LINE_BYTES)) as (
                offset, _):
            # arguments: address, 1 = for a write, 3 = keep in every cache level, 1 = data
            builder.call(prefetch, [builder.gep(base, [offset]), ir.Constant(i32, 1),
                                    ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(table, row), codegen


@numba.njit(cache=True, fastmath=KERNEL_FASTMATH, nogil=True)
def sgd_batches(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, batch_size: int,
                user_factors: np.ndarray, item_factors: np.ndarray, user_bias: np.ndarray,
                item_bias: np.ndarray, mean: float, factor_lr: float, bias_lr: float,
                reg: float, bias_reg: float, old_users: np.ndarray, old_items: np.ndarray,
                old_biases: np.ndarray,
                errors: np.ndarray, touched_users: np.ndarray, touched_items: np.ndarray,
                total: float) -> float:
    """``sgd_batch`` on each run of ``batch_size`` ratings in turn (the last may be shorter);
    returns ``total`` plus each batch's summed loss, added in order.

    One call per loader item instead of one per batch: the call's own cost (argument
    checks, views) was paid per 512 ratings.
    """
    loss = total
    for start in range(0, len(ratings), batch_size):
        stop = min(start + batch_size, len(ratings))
        loss += sgd_batch(users[start:stop], items[start:stop], ratings[start:stop],
                          user_factors, item_factors, user_bias, item_bias, mean, factor_lr,
                          bias_lr, reg, bias_reg, old_users, old_items, old_biases, errors,
                          touched_users, touched_items)
    return loss


@numba.njit(cache=True, fastmath=KERNEL_FASTMATH, nogil=True)
def sgd_batch(users: np.ndarray, items: np.ndarray, ratings: np.ndarray,
              user_factors: np.ndarray, item_factors: np.ndarray, user_bias: np.ndarray,
              item_bias: np.ndarray, mean: float, factor_lr: float, bias_lr: float,
              reg: float, bias_reg: float, old_users: np.ndarray, old_items: np.ndarray,
              old_biases: np.ndarray,
              errors: np.ndarray, touched_users: np.ndarray,
              touched_items: np.ndarray) -> float:
    """One batch's summed-gradient SGD step, in place; returns the batch's summed loss.

    Pass 1 copies every rating's rows into the (B, d) scratch buffers before anything
    moves, prefetching the rows of the rating PREFETCH_AHEAD further on; pass 2 computes
    errors and the loss from the copies; pass 3 updates the tables from the copies only. A
    row that several ratings of the batch touch therefore receives the sum of gradients
    computed from its OLD value, exactly as RowSGD applies autograd's sparse gradient.
    The arithmetic follows SquaredErrorWithL2 in float32 (loss in float64).

    Pass 1 is nothing but independent loads and stores, so the CPU overlaps the cache
    misses of several ratings; with the dot product in the same loop, its serial sum
    held each rating's misses back (1.2-1.5x slower, bench/fused_step.md).
    Rows are indexed as ``table[row, j]``: a row view would cost reference counting.
    Pass 3 also flags the rows it changes for the periodic row sync (trainer/sync.py), which
    costs nothing there against a per-step indexed store from Python.

    Args:
        users, items: (B,) int64 row ids; ratings: (B,) float32.
        user_factors, item_factors: (rows, d) float32 tables; user_bias, item_bias: (rows,).
        old_users, old_items: (>= B, d) float32 scratch; old_biases: (>= B, 2) float32;
            errors: (>= B,) float32 scratch.
        touched_users, touched_items: (rows,) bool flags set for every row changed, or
            empty arrays where nothing is tracked.
    """
    count = len(ratings)
    dim = user_factors.shape[1]
    mean32 = np.float32(mean)
    neg_factor_lr, neg_bias_lr = np.float32(-factor_lr), np.float32(-bias_lr)
    decay = np.float32(2.0 * reg)
    bias_decay = np.float32(2.0 * bias_reg)
    two = np.float32(2.0)
    flag_users, flag_items = len(touched_users) > 0, len(touched_items) > 0
    for b in range(count):
        if b + PREFETCH_AHEAD < count:
            prefetch_row(user_factors, users[b + PREFETCH_AHEAD])
            prefetch_row(item_factors, items[b + PREFETCH_AHEAD])
        user, item = users[b], items[b]
        for j in range(dim):
            old_users[b, j] = user_factors[user, j]
        for j in range(dim):
            old_items[b, j] = item_factors[item, j]
        old_biases[b, 0] = user_bias[user]
        old_biases[b, 1] = item_bias[item]
    squared_error = 0.0
    squared_rows = 0.0
    squared_biases = 0.0
    for b in range(count):
        dot = np.float32(0.0)
        norms = np.float32(0.0)
        for j in range(dim):
            dot += old_users[b, j] * old_items[b, j]
            norms += old_users[b, j] * old_users[b, j] + old_items[b, j] * old_items[b, j]
        b_u, b_i = old_biases[b, 0], old_biases[b, 1]
        error = dot + b_u + b_i + mean32 - ratings[b]
        errors[b] = error
        squared_error += error * error
        squared_rows += norms
        squared_biases += b_u * b_u + b_i * b_i
    for b in range(count):
        user, item = users[b], items[b]
        gradient = two * errors[b]
        for j in range(dim):
            user_factors[user, j] += neg_factor_lr * (old_users[b, j] * decay
                                                      + gradient * old_items[b, j])
        for j in range(dim):
            item_factors[item, j] += neg_factor_lr * (old_items[b, j] * decay
                                                      + gradient * old_users[b, j])
        user_bias[user] += neg_bias_lr * (gradient + bias_decay * old_biases[b, 0])
        item_bias[item] += neg_bias_lr * (gradient + bias_decay * old_biases[b, 1])
        if flag_users:
            touched_users[user] = True
        if flag_items:
            touched_items[item] = True
    return squared_error + reg * squared_rows + bias_reg * squared_biases
