"""The ranking objective's loop: iALS sweeps over this rank's training pairs into the
ranking tables, kept at the sweep with the best validation NDCG@10.

    for sweep: ImplicitALS.sweep (every user row, then every item row: trainer/ials.py)
               validation NDCG@10 (trainer/ranking.py, every rank its own users)
               keep the best tables; stop after `sweep_patience` sweeps without a gain

The regularisation is not a constant to tune: left to auto it follows a path, from
REG_PATH_START shrinking by REG_PATH_FACTOR each sweep, and the sweep with the best
validation NDCG@10 is kept, which is what a search over it would pick, in one run
(bench/ranking_objective.md). Too strong a regularisation makes every list the
most-popular one; while the validation lists are no better than most-popular's the path
halves it each sweep instead, and patience starts counting once they are.

Every rank runs the same sweeps on its own pairs: the collectives are inside ImplicitALS
(the item half-sweep's sums) and ranking_metrics (the figures), so every rank takes the
same decisions from the same numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.config import REG_PATH_FACTOR, REG_PATH_START, ObjectiveConfig, RankingConfig
from trainer.data import RowGroupReader
from trainer.distributed import DistEnv
from trainer.ials import ImplicitALS, confidence
from trainer.model import RankingMF
from trainer.ownership import UserOwnership
from trainer.ranking import ranking_metrics, relevance_threshold
from trainer.shards import Piece, ShardSet

log = logging.getLogger(__name__)

COLLAPSE_LIFT = 1.05  # lists no better than this x most-popular's: the tables collapsed
VAL_K = 10


@dataclass
class RankingResult:
    """The ranking tables at their best sweep, and how they got there."""

    model: RankingMF
    best_sweep: int = 0
    best_val_ndcg: float | None = None
    best_reg: float | None = None
    seconds: float = 0.0  # in sweeps, not in validation
    history: list[dict] = field(default_factory=list)  # one record per sweep


def train_ranking(shards: ShardSet, pieces: list[Piece], ownership: UserOwnership | None,
                  reader: RowGroupReader, config: ObjectiveConfig, ranking: RankingConfig,
                  seed: int, env: DistEnv) -> RankingResult:
    """Ranking tables fit to this rank's training ``pieces`` (user rows local when owned).

    Every rank calls it with the same arguments but its own pieces and gets the same
    item table and the same result figures.
    """
    interactions = shards.kind == "interactions"
    threshold = relevance_threshold(shards.scale, ranking.ranking_threshold, interactions)

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for piece in pieces:
            users, items, values = reader(piece)
            yield users, items, confidence(values, interactions=interactions,
                                           threshold=None if interactions else threshold,
                                           liked_weight=config.liked_weight)

    num_users = len(ownership.users) if ownership else shards.num_users
    torch.manual_seed(seed)
    model = RankingMF(num_users, shards.num_items, config.ranking_dim)
    solver = ImplicitALS(model.user_factors.weight.data, model.item_factors.weight.data,
                         alpha0=config.unobserved_weight, cg_steps=config.cg_steps,
                         num_users=shards.num_users, users_owned=ownership is not None,
                         env=env)
    solver.count(chunks)
    path = config.ranking_reg is None
    reg = REG_PATH_START if path else config.ranking_reg
    result = RankingResult(model)
    best_tables = None
    lifted = not path  # a fixed regularisation counts patience from the first sweep
    since = 0
    for sweep in range(1, config.sweeps + 1):
        started = time.perf_counter()
        solver.sweep(chunks, reg)
        seconds = time.perf_counter() - started
        figures = ranking_metrics(model, shards, env, ownership=ownership, split="val",
                                  ks=(VAL_K,), threshold=ranking.ranking_threshold,
                                  max_users=ranking.ranking_users)
        val = figures[f"ndcg@{VAL_K}"] or 0.0
        popular = figures[f"popular_ndcg@{VAL_K}"] or 0.0
        result.seconds += seconds
        result.history.append({"sweep": sweep, "reg": reg, f"val_ndcg@{VAL_K}": val,
                               f"val_popular_ndcg@{VAL_K}": popular,
                               "seconds": round(seconds, 4)})
        improved = val > (result.best_val_ndcg if result.best_val_ndcg is not None
                          else -math.inf)
        if improved:
            result.best_sweep, result.best_val_ndcg, result.best_reg = sweep, val, reg
            best_tables = {k: v.clone() for k, v in model.state_dict().items()}
        collapsed = val <= COLLAPSE_LIFT * popular
        lifted = lifted or not collapsed
        since = 0 if improved or not lifted else since + 1
        if env.is_main:
            log.info("ranking sweep %d: val NDCG@%d %.4f (most-popular %.4f), reg %.3g, "
                     "%.2f s%s", sweep, VAL_K, val, popular, reg, seconds,
                     "" if improved else f" (best {result.best_val_ndcg:.4f} at "
                     f"{result.best_sweep})")
        if config.sweep_patience and since >= config.sweep_patience:
            break
        if path:
            reg *= 0.5 if collapsed and not lifted else REG_PATH_FACTOR
    if best_tables is not None:
        model.load_state_dict(best_tables)
    return result
