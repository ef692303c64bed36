"""Ranking quality: how good are the top-k lists a model recommends, against a most-popular
baseline. Computed by every rank on its own users, reduced like RMSE.

Definitions, binary relevance. For a user u, R_u is the set of its relevant test items, L_u
its top k items by score among those it did NOT rate in training, and h_j = 1 when the j-th
of L_u is in R_u (j = 1..k):

    precision@k  = sum_j h_j / k           (k even when fewer than k unseen items remain)
    recall@k     = sum_j h_j / |R_u|
    NDCG@k       = sum_j h_j / log2(j + 1)  /  sum_{j=1..min(k, |R_u|)} 1 / log2(j + 1)
    AP@k         = sum_j h_j * precision@j  /  min(k, |R_u|)       (MAP@k is its mean)
    hit_rate@k   = 1 if any h_j = 1, else 0
    coverage@k   = |union of L_u over the evaluated users| / num_items

A test rating is relevant when it is >= the threshold, by default lo + 0.75 (hi - lo) on the
data's rating scale (4 on 1..5, 3.875 on 0.5..5). Users with no relevant test item are left
out of every mean (they are not even scored), so precision is not diluted by users there is
nothing to find for. The baseline recommends, to every user, the items rated most often in
training (ties: lower item id first) minus the ones that user rated, scored the same way.
Optionally (``min_item_ratings``), items with few training ratings are never recommended,
by either, as ``shardmf recommend`` does: their factors are mostly the prior.

Who evaluates whom. The items a user rated in training must all be known to the rank that
scores the user, and with users replicated a rank's train row groups hold only part of a
user's ratings. So the users themselves are split: replicated, rank r evaluates the users
with ``user_id % world_size == r`` and streams EVERY train and test row group once, keeping
only its users' (user, item) pairs; with users owned by rank (trainer/ownership.py), a
rank's own row groups already hold all of its users' ratings, so it reads only those. The
training counts per item (the baseline's popularity) are summed from each rank's users and
all-reduced; per-user metric sums, user counts and the recommended-item flags are
all-reduced at the end, so every rank returns the same figures. There is no collective
inside the scoring loop: ranks with different numbers of users cannot hang each other.

On large sets the users are sampled (``max_users``, ``--ranking-users``): scoring every
user against every item costs ~the training itself there (ML-25M's shape: 127 s on 2
ranks, bench/ranking.md), while the means over 10,000 random users differ from the full
ones by about their standard error (a few thousandths on NDCG). A user is kept when a hash
of its global id falls below max_users / eligible users, so the sample is the same for any
number of ranks, for ``shardmf evaluate`` and for training, and holds about max_users.

Memory per rank: 8 bytes per train or relevant test rating of its users (sorted int64 keys
``row * num_items + item``), plus one block of ``user_block x num_items`` float32 scores
(ML-25M: 256 x 59,047 x 4 B = 60 MB) and a few num_items-long vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from shardmf.errors import InputError
from trainer.config import RankingConfig
from trainer.data import read_piece
from trainer.distributed import DistEnv, all_reduce, all_reduce_tensor, unwrap
from trainer.model import BiasedMF
from trainer.ownership import UserOwnership
from trainer.shards import Piece, ShardSet

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate")  # per-user means
DEFAULT_KS = RankingConfig.ranking_ks  # (10, 20)
DEFAULT_USER_BLOCK = 256  # users scored at once: memory is this x num_items float32
RELEVANT_FRACTION = 0.75  # default threshold: this far up the rating scale (4 on 1..5)
POPULAR_PREFIX = "popular_"
SE_SUFFIX = "_se"  # ndcg@10_se: the standard error of ndcg@10, a mean over users
NO_ITEM = -1  # a top-k slot left empty: fewer than k unseen items


def relevance_threshold(scale: tuple[float, float], threshold: float | None = None,
                        interactions: bool = False) -> float:
    """The rating at or above which a test item counts as relevant.

    Default ``lo + 0.75 (hi - lo)``: 4 on a 1..5 scale, the same place on any other scale.
    On interaction data (plays, clicks: ``scale`` is 0..largest weight) every held-out
    interaction is relevant by default (0). An explicit threshold outside the scale would
    make nothing (or everything) relevant.
    """
    low, high = scale
    if threshold is None:
        return low if interactions else low + RELEVANT_FRACTION * (high - low)
    if not low < threshold <= high:
        raise InputError(f"relevance threshold {threshold:g}: outside the rating scale "
                         f"({low:g}, {high:g}]; choose a rating a liked item gets, e.g. "
                         f"{low + RELEVANT_FRACTION * (high - low):g}")
    return float(threshold)


def user_metrics(top_items: np.ndarray, relevant_users: np.ndarray,
                 relevant_items: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user precision, recall, NDCG, AP and hit at k = ``top_items.shape[1]``.

    Args:
        top_items: (U, k) int64 recommended item ids, best first, distinct within a row;
            ``NO_ITEM`` (-1) for an empty slot.
        relevant_users, relevant_items: (R,) int64 pairs: user row (0..U-1) and one of its
            relevant items; each pair once.

    Returns:
        ``METRICS`` -> (U,) float64; "map" holds each user's AP@k (MAP@k is the mean).
        Users with no relevant item get NaN everywhere: they are excluded from means.
    """
    num_users, k = top_items.shape
    if k < 1:
        raise ValueError("top_items needs at least one column (k >= 1)")
    num_relevant = np.bincount(relevant_users, minlength=num_users)
    hits = _hit_matrix(top_items, relevant_users, relevant_items)
    found = np.cumsum(hits, axis=1)  # (U, k): hits among the first j
    positions = np.arange(1, k + 1)
    discounts = 1.0 / np.log2(positions + 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # users without relevant items
        ideal_hits = np.minimum(k, num_relevant)
        ideal_dcg = np.concatenate([[0.0], np.cumsum(discounts)])[ideal_hits]
        metrics = {
            "precision": found[:, -1] / k,
            "recall": found[:, -1] / num_relevant,
            "ndcg": (hits @ discounts) / ideal_dcg,
            "map": (hits * found / positions).sum(axis=1) / ideal_hits,
            "hit_rate": (found[:, -1] > 0).astype(np.float64),
        }
    unscored = num_relevant == 0
    for values in metrics.values():
        values[unscored] = np.nan
    return metrics


def recommended_items(top_items: np.ndarray) -> np.ndarray:
    """The distinct item ids in a block of top-k lists (for catalogue coverage)."""
    return np.unique(top_items[top_items != NO_ITEM])


def _hit_matrix(top_items: np.ndarray, relevant_users: np.ndarray,
                relevant_items: np.ndarray) -> np.ndarray:
    """(U, k) float64: 1 where the recommended item is relevant to that row's user."""
    num_users, _ = top_items.shape
    width = int(max(top_items.max(initial=0), relevant_items.max(initial=0))) + 1
    wanted = np.sort(relevant_users * width + relevant_items)
    keys = np.arange(num_users)[:, None] * width + top_items
    at = np.minimum(np.searchsorted(wanted, keys), max(len(wanted) - 1, 0))
    hits = (top_items != NO_ITEM) & (wanted[at] == keys) if len(wanted) else \
        np.zeros(top_items.shape, dtype=bool)
    return hits.astype(np.float64)


# ------------------------------------------------------------------ distributed evaluation

@torch.no_grad()
def ranking_metrics(model: BiasedMF, shards: ShardSet, env: DistEnv, *,
                    ownership: UserOwnership | None = None, split: str = "test",
                    ks: Sequence[int] = DEFAULT_KS, threshold: float | None = None,
                    min_item_ratings: int = 0, max_users: int = 0,
                    user_block: int = DEFAULT_USER_BLOCK) -> dict:
    """Ranking figures of ``model`` and of the most-popular baseline on ``split``.

    Every rank calls this at the same point (it holds collectives) and gets the same dict.

    Args:
        model: the trained model (DDP-wrapped or not), on ``env.device``: every user's row
            when users are replicated, this rank's owned rows when ``ownership`` is given.
        shards: the shard set it was trained on (the train split gives the seen items).
        ownership: this rank's owned users (trainer/ownership.py), or None: replicated.
        split: "test" or "val": whose ratings are the relevant items.
        ks: list lengths, e.g. (10, 20).
        threshold: relevance threshold; None: 4 on 1..5, scaled to the data's range.
        min_item_ratings: recommend only items with at least this many training ratings,
            for the model and the baseline alike (``shardmf recommend`` uses 20); 0: all.
        max_users: evaluate a seeded random sample of about this many of the users with a
            relevant item (``sampled_users``); 0: every one.
        user_block: users scored at once (memory: user_block x num_items float32).

    Returns:
        ``precision@k``, ``recall@k``, ``ndcg@k``, ``map@k``, ``hit_rate@k``,
        ``coverage@k`` for each k, the standard error of each mean over users as
        ``ndcg@k_se`` (None for one user), the same with the ``popular_`` prefix for the
        baseline (None when no user has a relevant item), ``ranking_threshold``,
        ``ranking_users`` (users evaluated, over all ranks), ``ranking_users_eligible``
        (users with >= 1 relevant item) and ``ranking_min_item_ratings``.
    """
    ks = _checked_ks(ks)
    if split not in ("test", "val"):
        raise ValueError(f"split {split!r}: expected 'test' or 'val'")
    if min_item_ratings < 0:
        raise InputError(f"min_item_ratings={min_item_ratings}: expected 0 (every item) "
                         "or more")
    if max_users < 0:
        raise InputError(f"ranking_users={max_users}: expected 0 (every user) or more")
    if user_block < 1:
        raise ValueError(f"user_block {user_block}: expected >= 1")
    module = unwrap(model)
    num_items = shards.num_items
    if module.item_factors.num_embeddings != num_items:
        raise ValueError(f"the model has {module.item_factors.num_embeddings} items, the "
                         f"shards {num_items}")
    cutoff = relevance_threshold(shards.scale, threshold, shards.kind == "interactions")
    rows_of = _row_map(env, ownership)
    pieces = {name: ownership.pieces(shards, name) if ownership else shards.pieces(name)
              for name in ("train", split)}
    relevant = _rating_keys(pieces[split], rows_of, num_items, cutoff)
    seen = _rating_keys(pieces["train"], rows_of, num_items)
    # Every train rating belongs to exactly one rank's users: the sum is the whole count.
    popularity = all_reduce_tensor(torch.from_numpy(np.bincount(seen % num_items,
                                                                minlength=num_items)), env)
    order = np.argsort(-popularity.numpy(), kind="stable")  # ties: lower item id first
    popular_scores = torch.empty(num_items, dtype=torch.float32)
    popular_scores[torch.from_numpy(order)] = torch.arange(num_items, 0, -1,
                                                           dtype=torch.float32)
    popular_scores = popular_scores.to(env.device)
    rarely_rated = (popularity < min_item_ratings).to(env.device)
    module.eval()
    eval_rows = np.unique(relevant // num_items)
    eligible = int(all_reduce([float(len(eval_rows))], env)[0])
    if max_users and eligible > max_users:
        global_ids = ownership.users[eval_rows] if ownership else eval_rows
        eval_rows = eval_rows[sampled_users(global_ids, max_users / eligible)]

    # Both write into one (user_block, num_items) buffer, reused by every block.
    scorers: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
        module.score_all_items,
        lambda users, out: out.copy_(popular_scores.expand_as(out)))
    buffer = torch.empty((min(user_block, len(eval_rows)), num_items), device=env.device)
    sums = np.zeros((len(scorers), len(ks), len(METRICS)))
    squares = np.zeros_like(sums)  # for the standard errors of the means over users
    shown = torch.zeros((len(scorers), len(ks), num_items), dtype=torch.int32)
    for start in range(0, len(eval_rows), user_block):
        rows = eval_rows[start:start + user_block]
        relevant_users, relevant_items = _block_pairs(relevant, rows, num_items)
        seen_users, seen_items = _block_pairs(seen, rows, num_items)
        users = torch.from_numpy(rows).to(env.device)
        for which, scorer in enumerate(scorers):
            scores = scorer(users, buffer[:len(rows)])
            if min_item_ratings:
                scores.masked_fill_(rarely_rated, -torch.inf)
            top = top_unseen_items(scores, seen_users, seen_items, max(ks))
            for index, k in enumerate(ks):
                per_user = user_metrics(top[:, :k], relevant_users, relevant_items)
                sums[which, index] += [per_user[name].sum() for name in METRICS]
                squares[which, index] += [np.square(per_user[name]).sum() for name in METRICS]
                shown[which, index, torch.from_numpy(recommended_items(top[:, :k]))] = 1

    totals = all_reduce([*sums.ravel().tolist(), *squares.ravel().tolist(),
                         float(len(eval_rows))], env)
    sums, squares = np.array(totals[:-1]).reshape((2, *sums.shape))
    num_users = int(totals[-1])
    covered = (all_reduce_tensor(shown, env) > 0).sum(dim=2).numpy() / num_items
    result: dict = {"ranking_threshold": cutoff, "ranking_users": num_users,
                    "ranking_users_eligible": eligible,
                    "ranking_min_item_ratings": min_item_ratings}
    for which, prefix in enumerate(("", POPULAR_PREFIX)):
        for index, k in enumerate(ks):
            for position, name in enumerate(METRICS):
                mean, se = _mean_and_se(sums[which, index, position],
                                        squares[which, index, position], num_users)
                result[f"{prefix}{name}@{k}"] = mean
                result[f"{prefix}{name}@{k}{SE_SUFFIX}"] = se
            result[f"{prefix}coverage@{k}"] = (float(covered[which, index]) if num_users
                                               else None)
    return result


def _mean_and_se(total: float, squares: float, count: int) -> tuple[float | None,
                                                                    float | None]:
    """The mean over ``count`` users and its standard error (sample sd / sqrt(count))."""
    if not count:
        return None, None
    mean = total / count
    if count < 2:
        return float(mean), None
    variance = max(squares / count - mean ** 2, 0.0) * count / (count - 1)
    return float(mean), float(np.sqrt(variance / count))


def sampled_users(user_ids: np.ndarray, fraction: float) -> np.ndarray:
    """A mask keeping about ``fraction`` of ``user_ids``, decided by each id alone.

    Fibonacci hashing: the id times 2^64 / golden ratio, modulo 2^64, spreads consecutive
    ids evenly over [0, 1), so the kept share is close to ``fraction`` and the same id is
    kept on every rank and in every run.
    """
    hashed = user_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2^64
    return (hashed >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def _checked_ks(ks: Sequence[int]) -> tuple[int, ...]:
    values = tuple(ks)
    if not values or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                         for k in values):
        raise InputError(f"list lengths k {' '.join(map(str, values)) or '(none)'}: expected "
                         "one or more whole numbers >= 1, e.g. 10 20")
    return tuple(sorted(set(int(k) for k in values)))


def _row_map(env: DistEnv, ownership: UserOwnership | None
             ) -> Callable[[np.ndarray], np.ndarray]:
    """Global user ids -> the model rows this rank evaluates them at, -1 for other ranks'."""
    if ownership is not None:
        return lambda users: ownership.local_rows[users].astype(np.int64)
    return lambda users: np.where(users % env.world_size == env.rank, users, -1)


def _rating_keys(pieces: list[Piece], rows_of: Callable[[np.ndarray], np.ndarray],
                 num_items: int, min_rating: float | None = None) -> np.ndarray:
    """Sorted ``row * num_items + item`` of this rank's users' ratings (those >= min)."""
    parts = [np.empty(0, dtype=np.int64)]
    for piece in pieces:
        users, items, ratings = read_piece(piece)
        rows = rows_of(users)
        keep = rows >= 0
        if min_rating is not None:
            keep &= ratings >= min_rating
        parts.append(rows[keep] * num_items + items[keep])
    # Each (user, item) pair is in the shards once (prepare resolves duplicates), so a
    # sort in place is enough: np.unique would hold two more copies of the keys.
    keys = np.concatenate(parts)
    del parts
    keys.sort()
    return keys


def _block_pairs(keys: np.ndarray, rows: np.ndarray,
                 num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The (position in ``rows``, item) pairs of ``keys`` whose row is in sorted ``rows``."""
    low, high = np.searchsorted(keys, [rows[0] * num_items, (rows[-1] + 1) * num_items])
    part = keys[low:high]
    owners = part // num_items
    position = np.searchsorted(rows, owners)  # rows between two evaluated ones: not ours
    inside = rows[np.minimum(position, len(rows) - 1)] == owners
    return position[inside], part[inside] % num_items


def top_unseen_items(scores: torch.Tensor, seen_users: np.ndarray, seen_items: np.ndarray,
                     k: int) -> np.ndarray:
    """The k best-scored items of each row that its user did not rate in training.

    Args:
        scores: (B, num_items) float scores, on any device; overwritten (seen -> -inf).
        seen_users, seen_items: (S,) int64 pairs: row in the block, item rated in training.

    Returns:
        (B, k) int64 item ids, best first; ``NO_ITEM`` where fewer than k items are unseen.
    """
    device = scores.device
    scores[torch.from_numpy(seen_users).to(device),
           torch.from_numpy(seen_items).to(device)] = -torch.inf
    values, items = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    items[values == -torch.inf] = NO_ITEM
    top = items.cpu().numpy()
    if top.shape[1] < k:  # a catalogue smaller than k
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=NO_ITEM)
    return top
