"""The iALS ranking objective, optimised by alternating conjugate-gradient row updates.

The loss (Rendle et al. 2021, "Revisiting the performance of iALS on item recommendation"),
over user rows w_u and item rows h_i:

    sum_{(u, i) observed} c_ui (1 - w_u . h_i)^2          observed pairs pulled to 1
  + alpha0 * sum_{all u, i} (w_u . h_i)^2                 every pair a weak 0
  + reg * sum_u (n_u + alpha0 * I) |w_u|^2 + reg * sum_i (n_i + alpha0 * U) |h_i|^2

with U, I the global numbers of users and items and n_u, n_i the global numbers of a row's
observed pairs (the frequency-scaled regularisation, exponent nu = 1). The all-pairs term
is ``alpha0 * trace(G_W G_H)`` through the d x d Gramians ``G_W = W^T W``, ``G_H = H^T H``:
no negative is sampled and no user x item matrix exists.

With the item table fixed, the loss is a separate quadratic in each user row, minimised by

    (sum_{i in I_u} c_ui h_i h_i^T + alpha0 G_H + reg (n_u + alpha0 I) Id) w_u
        = sum_{i in I_u} c_ui h_i

and symmetrically for items. A half-sweep runs ``cg_steps`` conjugate-gradient steps on all
rows' systems at once, warm-started at the current rows: every step costs one streaming
pass over the pairs (the compiled kernel in trainer/ials_kernel.py accumulates each row's
``sum c y y^T p``) plus a dense ``p @ G`` in numpy; the first pass also forms the right-hand
sides. K steps thus cost K + 1 passes; 3 steps matched exact solves in ranking quality at
1/6.5 of their cost in issue #21's measurements (ML-100K test NDCG@10 0.2505 vs 0.2493).

Across ranks, item rows are replicated: each rank accumulates the item matvecs of its own
pairs for ALL items, one all-reduce per CG step sums them, and every rank then runs the same
arithmetic on the same sums, so the item table stays identical everywhere. User rows owned
by their rank (``users_owned``: each user's pairs all live on that rank) need no collective;
replicated user rows are summed like items.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from types import ModuleType

import numpy as np
import torch

from shardmf.errors import InputError
from trainer.distributed import DistEnv, all_reduce, all_reduce_tensor

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]
# (user rows, local when owned; item ids) int64 and confidence float32 of this rank's pairs;
# each call of such a function starts a fresh pass over the same pairs.
Chunks = Callable[[], Iterable[Chunk]]

# A CG row whose search direction has (numerically) no curvature left has converged: its
# step size is left at 0 instead of dividing by ~0.
_NO_CURVATURE = np.finfo(np.float64).tiny


def confidence(ratings: np.ndarray, *, interactions: bool, threshold: float | None,
               liked_weight: float = 1.0) -> np.ndarray:
    """Each observed pair's weight c_ui in the iALS loss, float32 (n,).

    Ratings (``interactions=False``): ``1 + liked_weight * [rating >= threshold]``: a pair
    the user liked counts more than one merely rated, with ``threshold`` the relevance
    threshold of the ranking metrics (trainer/ranking.py). This is what beat the tuned
    implicit-ALS peer in the measurements.

    Interactions (``interactions=True``, ``ratings`` holding non-negative weights such as
    play counts): ``1 + log((1 + weight) / 2)``, i.e. ``1 + log1p(weight) - log1p(1)``. A
    weight of 1, what a bare (user, item) pair stands for, gives exactly c = 1, the setting
    at which alpha0 and the regularisation were measured on interaction data; larger
    weights grow slowly (a log, so a few huge counts cannot swamp the loss), and a weight of
    0 still gives a positive c = 1 - log 2 ~ 0.31 (the pair was observed). Plain
    ``1 + log1p(weight)`` would turn every unweighted log into a constant 1 + log 2, a
    different loss scale from the one the defaults were chosen at.

    Args:
        ratings: (n,) ratings, or weights for interactions.
        interactions: whether ``ratings`` are interaction weights.
        threshold: the rating at or above which a pair is liked; ratings only (None for
            interactions).
        liked_weight: the extra confidence of a liked pair, >= 0.
    """
    values = np.asarray(ratings, dtype=np.float64)
    if interactions:
        if threshold is not None:
            raise ValueError(f"threshold={threshold}: interaction weights have no relevance "
                             "threshold; pass threshold=None")
        if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0):
            raise ValueError("ratings: interaction weights must be finite and >= 0, found "
                             f"{values[~(np.isfinite(values) & (values >= 0))][0]}")
        return (1.0 + np.log1p(values) - np.log1p(1.0)).astype(np.float32)
    if threshold is None:
        raise ValueError("threshold=None: ratings need the relevance threshold at or above "
                         "which a pair counts as liked")
    if not (math.isfinite(liked_weight) and liked_weight >= 0):
        raise ValueError(f"liked_weight={liked_weight}: expected a finite number >= 0")
    return (1.0 + liked_weight * (values >= threshold)).astype(np.float32)


@functools.cache
def load_ials_kernels() -> ModuleType:
    """trainer/ials_kernel.py, imported on first use (numba is heavy to import)."""
    try:
        from trainer import ials_kernel
    except ImportError as e:
        raise InputError(f"the iALS ranking objective needs numba>=0.59, which cannot be "
                         f"imported here ({e}); install it (pip install 'numba>=0.59')") from e
    return ials_kernel


class ImplicitALS:
    """Alternating CG row updates of the iALS loss on this rank's training pairs.

    Updates the two tables in place, through numpy views of their storage (they are the
    ``nn.Embedding`` weights the rest of the trainer checkpoints and exports; the trainer
    only ever changes them in place). The CG state and the Gramians are float64; the tables
    and the passes over the pairs are float32.

    Call ``count`` once on the training pairs, then ``sweep`` as often as wanted; ``loss``
    is for tests and logging. Every rank must make the same calls in the same order (each
    may run collectives). The tables and the counts are the whole state: a run resumed
    from its tables builds a new one, calls ``count`` and continues bit for bit at a sweep
    boundary, provided ``chunks`` yields the pairs in the same order (the float32 sums of
    a pass depend on it, by rounding only).

    Args:
        user_table: (rows, d) float32 CPU: this rank's users (local row ids) when
            ``users_owned``, else all ``num_users`` users.
        item_table: (num_items, d) float32 CPU, identical on every rank (and kept so).
        alpha0: weight of the all-pairs term, >= 0.
        cg_steps: CG steps per half-sweep, >= 1 (each one pass over the pairs).
        num_users: the global number of users U.
        users_owned: each rank holds only its own users' rows and all their pairs.
        env: this process's rank and world size.
    """

    def __init__(self, user_table: torch.Tensor, item_table: torch.Tensor, *, alpha0: float,
                 cg_steps: int, num_users: int, users_owned: bool, env: DistEnv) -> None:
        for name, table in (("user_table", user_table), ("item_table", item_table)):
            if (table.dtype != torch.float32 or table.device.type != "cpu" or table.dim() != 2
                    or not table.is_contiguous()):
                raise ValueError(f"{name}: expected a contiguous 2-D float32 CPU tensor, found "
                                 f"{table.dtype} {tuple(table.shape)} on {table.device}")
        if user_table.shape[1] != item_table.shape[1]:
            raise ValueError(f"user_table has {user_table.shape[1]} columns, item_table "
                             f"{item_table.shape[1]}: both need the embedding dimension")
        if not (math.isfinite(alpha0) and alpha0 >= 0):
            raise ValueError(f"alpha0={alpha0}: expected a finite number >= 0")
        if cg_steps < 1:
            raise ValueError(f"cg_steps={cg_steps}: expected at least 1")
        rows = user_table.shape[0]
        if rows > num_users or (rows != num_users and not users_owned):
            raise ValueError(f"user_table has {rows} rows, expected "
                             f"{'at most ' if users_owned else ''}num_users={num_users} "
                             f"(users_owned={users_owned})")
        self._users = user_table.detach().numpy()
        self._items = item_table.detach().numpy()
        self._alpha0 = alpha0
        self._cg_steps = cg_steps
        self._num_users = num_users
        self._users_owned = users_owned
        self._env = env
        self._kernels = load_ials_kernels()
        # n + alpha0 * (size of the other side), per row; set by count()
        self._user_reg_weight: np.ndarray | None = None
        self._item_reg_weight: np.ndarray | None = None

    def count(self, chunks: Chunks) -> None:
        """One pass over the pairs: each row's global pair count n, for the regularisation.

        Also checks every row id against its table, once, so the compiled passes that
        follow cannot read outside a table.
        """
        user_rows, num_items = self._users.shape[0], self._items.shape[0]
        counts = np.zeros(user_rows + num_items, dtype=np.float64)
        for chunk in chunks():
            users, items, _ = self._as_arrays(chunk)
            for name, ids, size in (("user rows", users, user_rows), ("item ids", items,
                                                                      num_items)):
                if len(ids) and (ids.min() < 0 or ids.max() >= size):
                    raise ValueError(f"{name}: ids from {ids.min()} to {ids.max()}, expected "
                                     f"0..{size - 1}")
            counts[:user_rows] += np.bincount(users, minlength=user_rows)
            counts[user_rows:] += np.bincount(items, minlength=num_items)
        if self._users_owned:  # a user's pairs are all here: only item counts are partial
            counts[user_rows:] = self._sum_across_ranks(counts[user_rows:])
        else:
            counts = self._sum_across_ranks(counts)
        self._user_reg_weight = counts[:user_rows] + self._alpha0 * num_items
        self._item_reg_weight = counts[user_rows:] + self._alpha0 * self._num_users

    def sweep(self, chunks: Chunks, reg: float) -> None:
        """One user half-sweep, then one item half-sweep, ``cg_steps`` CG steps each."""
        user_weight, item_weight = self._reg_weights(reg)
        self._half_sweep(chunks, users_side=True, gram=self._item_gram(),
                         diagonal=reg * user_weight, summed=not self._users_owned)
        self._half_sweep(chunks, users_side=False, gram=self._user_gram(),
                         diagonal=reg * item_weight, summed=True)

    def loss(self, chunks: Chunks, reg: float) -> float:
        """The full loss of the current tables over all ranks' pairs (the same on every rank)."""
        user_weight, item_weight = self._reg_weights(reg)
        observed = sum(self._kernels.observed_loss(*self._as_arrays(chunk), self._users,
                                                   self._items) for chunk in chunks())
        user_term = reg * float(user_weight @ _row_norms(self._users))
        if self._users_owned:  # each rank holds its own users' rows: their terms add up
            observed, user_term = all_reduce([observed, user_term], self._env)
        else:
            (observed,) = all_reduce([observed], self._env)
        all_pairs = self._alpha0 * float(np.sum(self._user_gram() * self._item_gram()))
        item_term = reg * float(item_weight @ _row_norms(self._items))
        return observed + all_pairs + user_term + item_term

    def _reg_weights(self, reg: float) -> tuple[np.ndarray, np.ndarray]:
        if not (math.isfinite(reg) and reg >= 0):
            raise ValueError(f"reg={reg}: expected a finite number >= 0")
        if self._user_reg_weight is None or self._item_reg_weight is None:
            raise RuntimeError("ImplicitALS.count must run on the training pairs first")
        return self._user_reg_weight, self._item_reg_weight

    def _item_gram(self) -> np.ndarray:
        items = self._items.astype(np.float64)
        return items.T @ items  # replicated rows: the same on every rank

    def _user_gram(self) -> np.ndarray:
        users = self._users.astype(np.float64)
        gram = users.T @ users
        return self._sum_across_ranks(gram) if self._users_owned else gram

    def _half_sweep(self, chunks: Chunks, *, users_side: bool, gram: np.ndarray,
                    diagonal: np.ndarray, summed: bool) -> None:
        """``cg_steps`` CG steps on every row of one table, all rows at once.

        Each row's system is A x = b with A = (its observed part) + alpha0 G + diagonal Id,
        symmetric positive (semi)definite; the rows are independent, so the scalars alpha
        and beta are per row. ``summed``: the observed parts are partial on each rank and
        are summed across ranks, one collective per pass (step 0 sends b with A x).
        """
        target = self._users if users_side else self._items
        scaled_gram = self._alpha0 * gram
        solution = target.astype(np.float64)
        # step 0: the observed part of A x and b, from one pass and one collective
        products, residual = self._observed_products(chunks, users_side, target,
                                                     with_right_side=True, summed=summed)
        residual -= products + _dense_part(solution, scaled_gram, diagonal)
        direction = residual.copy()
        residual_norm = _row_norms(residual)
        for step in range(self._cg_steps):
            (products,) = self._observed_products(chunks, users_side,
                                                  direction.astype(np.float32),
                                                  with_right_side=False, summed=summed)
            products += _dense_part(direction, scaled_gram, diagonal)
            curvature = np.einsum("rd,rd->r", direction, products)
            step_size = np.divide(residual_norm, curvature, out=np.zeros_like(curvature),
                                  where=curvature > _NO_CURVATURE)
            solution += step_size[:, None] * direction
            if step == self._cg_steps - 1:
                break
            residual -= step_size[:, None] * products
            new_norm = _row_norms(residual)
            ratio = np.divide(new_norm, residual_norm, out=np.zeros_like(new_norm),
                              where=residual_norm > _NO_CURVATURE)
            direction *= ratio[:, None]
            direction += residual
            residual_norm = new_norm
        target[...] = solution

    def _observed_products(self, chunks: Chunks, users_side: bool, direction: np.ndarray, *,
                           with_right_side: bool, summed: bool) -> np.ndarray:
        """One pass over the pairs: each target row's ``sum c y y^T direction`` and, with
        ``with_right_side``, its ``sum c y``, as float64 (1 or 2, rows, d).

        The pass accumulates in float32, as the tables are: with float64 sums a sweep ran
        1.4-2.4x slower (bench/ials_sweep.md), and the rounding of a row's
        sum is far below what 3 CG steps leave unsolved. ``summed``: partial on each rank,
        summed across ranks in one collective.
        """
        sums = np.zeros((2 if with_right_side else 1, *direction.shape), dtype=np.float32)
        right_side = sums[1] if with_right_side else np.zeros((0, direction.shape[1]), np.float32)
        source = self._items if users_side else self._users
        for chunk in chunks():
            users, items, weights = self._as_arrays(chunk)
            targets, sources = (users, items) if users_side else (items, users)
            self._kernels.add_pair_products(targets, sources, weights, source, direction,
                                            sums[0], right_side)
        if summed:
            sums = self._sum_across_ranks(sums)
        return sums.astype(np.float64)

    @staticmethod
    def _as_arrays(chunk: Chunk) -> Chunk:
        users, items, weights = chunk
        return (np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64),
                np.asarray(weights, dtype=np.float32))

    def _sum_across_ranks(self, array: np.ndarray) -> np.ndarray:
        """``array`` summed over ranks (one collective); itself in one process."""
        return all_reduce_tensor(torch.from_numpy(array), self._env).numpy()


def _dense_part(rows: np.ndarray, scaled_gram: np.ndarray, diagonal: np.ndarray) -> np.ndarray:
    """(alpha0 G + diag(diagonal)) applied to each row: the part of A that is not observed."""
    return rows @ scaled_gram + diagonal[:, None] * rows


def _row_norms(rows: np.ndarray) -> np.ndarray:
    """Squared norm of each row, float64."""
    return np.einsum("rd,rd->r", rows, rows, dtype=np.float64)
