"""Hyper-parameters that scale with the data: the settings a run leaves to ``auto``, from
the manifest's counts, the ranks and the machine.

Two recipes anchor them (trainer/config.py; how they were chosen: bench/defaults-history.md;
what they reach: bench/defaults.md, bench/size_sweep.md):

- small sets (up to SMALL_SET_RATINGS training ratings; tuned on MovieLens-100K):
  dimension 256, SGD at 0.0035 per rating decaying 0.99 an epoch, L2 0.045, stopping after
  5 epochs without a better validation RMSE;
- large sets (from LARGE_SET_RATINGS; tuned on 5M and 10M synthetic sets): dimension 64,
  SGD at 0.035 decaying 0.85, L2 0.035, stopping once 2 epochs in a row gain less than
  0.001 RMSE.

Between the two every value moves with the logarithm of the size: the dimension, the step
size and the number of epochs over which the step decays geometrically, the rest linearly.
So training time changes smoothly with the size instead of jumping 30-fold at one line
(the small recipe runs ~100 epochs at dimension 256, the large ~15 at 64): it falls a
little from the small anchor to the large one (fewer, narrower epochs over more ratings)
and grows linearly above (bench/size_sweep.md).

The periodic row exchange (trainer/sync.py) moves a row by the ranks' summed changes over
the square root of their number; on a small set, where an epoch holds a single exchange
and each rank's change is most of a step, the learning rate left to auto is multiplied by
the number of ranks, and by less as the set grows (once at LARGE_SET_RATINGS).

Batches are cut ahead in a thread only where a core is spare for it, and decoded row
groups are kept between epochs within 1/CACHE_SHARE_OF_MEMORY of the machine's memory,
shared by its ranks.

Every field chosen here is ``None`` in its config until ``resolve_defaults`` fills it; a
value the user gave (flag, TOML or estimator parameter) is never touched. The choice and
its reason go to ``config.json`` and one log line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from trainer.config import (
    CACHE_SHARE_OF_MEMORY,
    LARGE_SET,
    LARGE_SET_RATINGS,
    PREFETCH,
    SMALL_SET,
    SMALL_SET_RATINGS,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

# Below this many training ratings per rank, a second rank costs more in start-up and
# communication than it saves (ML-100K: bench/RESULTS.md).
RATINGS_PER_RANK_TO_PAY = 500_000
DIM_MULTIPLE = 8  # chosen dimensions are multiples of this (vector-friendly rows)


@dataclass(frozen=True)
class Resolved:
    """The configs with every ``auto`` field filled, and what was chosen and why."""

    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    chosen: dict[str, object]  # field -> value, only the fields left to auto
    reason: str  # one line: the recipe and the facts it was chosen from


def resolve_defaults(model: ModelConfig, optim: OptimConfig, train: TrainConfig, *,
                     train_ratings: int, world_size: int, periodic_exchange: bool,
                     spare_core: bool = True, memory_per_rank: int = 0) -> Resolved:
    """Fill the ``None`` (auto) hyper-parameters of the three configs.

    Args:
        train_ratings: the manifest's count of training ratings.
        world_size: number of ranks.
        periodic_exchange: ranks exchange changed rows every few steps (the strategy's
            ``sync_every`` > 1 with several ranks).
        spare_core: this machine has more cores than local ranks.
        memory_per_rank: bytes of the machine's memory over its local ranks.
    """
    largeness = size_position(train_ratings)
    recipe = recipe_for(train_ratings)
    wanted = {**recipe, "prefetch": PREFETCH if spare_core else 0,
              "cache_mb": memory_per_rank // CACHE_SHARE_OF_MEMORY // 2**20}
    if periodic_exchange:
        wanted["lr"] = recipe["lr"] * world_size ** (1 - largeness)
    chosen: dict[str, object] = {}
    configs = []
    for config in (model, optim, train):
        auto = {f.name: wanted[f.name] for f in dataclasses.fields(config)
                if f.name in wanted and getattr(config, f.name) is None}
        chosen.update(auto)
        configs.append(dataclasses.replace(config, **auto))
    reason = (f"{train_ratings:,} training ratings ({largeness:.0%} of the way from the "
              f"small-set recipe at {SMALL_SET_RATINGS:,} to the large-set one at "
              f"{LARGE_SET_RATINGS:,}), {world_size} rank(s)")
    return Resolved(*configs, chosen=chosen, reason=reason)


def size_position(train_ratings: int) -> float:
    """0 up to SMALL_SET_RATINGS, 1 from LARGE_SET_RATINGS, linear in log(size) between."""
    span = math.log(LARGE_SET_RATINGS / SMALL_SET_RATINGS)
    return min(max(math.log(max(train_ratings, 1) / SMALL_SET_RATINGS) / span, 0.0), 1.0)


def recipe_for(train_ratings: int) -> dict[str, float | int]:
    """The hyper-parameters for a set of this many training ratings, between the recipes."""
    t = size_position(train_ratings)

    def geometric(name: str) -> float:
        return SMALL_SET[name] ** (1 - t) * LARGE_SET[name] ** t

    def linear(name: str) -> float:
        return SMALL_SET[name] * (1 - t) + LARGE_SET[name] * t

    # The epochs a step takes to shrink e-fold, 1 / (1 - decay), move geometrically.
    decay_epochs = (1 / (1 - SMALL_SET["lr_decay"])) ** (1 - t) * (
        1 / (1 - LARGE_SET["lr_decay"])) ** t
    return {"dim": DIM_MULTIPLE * round(geometric("dim") / DIM_MULTIPLE),
            "reg": round(linear("reg"), 6), "lr": round(geometric("lr"), 6),
            "lr_decay": round(1 - 1 / decay_epochs, 6), "patience": round(linear("patience")),
            "min_delta": round(linear("min_delta"), 6)}


def ranks_that_pay(train_ratings: int, slots: int) -> int:
    """How many ranks ``--nproc auto`` starts: one per slot (core or GPU), as long as each
    trains at least RATINGS_PER_RANK_TO_PAY ratings; one below that."""
    return max(1, min(slots, train_ratings // RATINGS_PER_RANK_TO_PAY))


def ranks_cannot_pay(train_ratings: int, world_size: int) -> bool:
    """True when each rank would train too few ratings for more ranks to be faster."""
    return world_size > 1 and train_ratings / world_size < RATINGS_PER_RANK_TO_PAY
