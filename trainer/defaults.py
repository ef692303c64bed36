"""Hyper-parameters that scale with the data: the settings a run leaves to ``auto``, from
the manifest's counts, the ranks and the machine.

Two recipes, split at LARGE_SET_RATINGS training ratings (how they were chosen:
bench/defaults-history.md; what they reach: bench/defaults.md):

- small sets: dimension 256, SGD at 0.003 per rating decaying 0.99 an epoch, L2 0.05,
  stopping after 5 epochs without a better validation RMSE;
- large sets: dimension 64, SGD at 0.03 decaying 0.85, L2 0.04, stopping once 2 epochs in
  a row gain less than 0.001 RMSE.

The periodic row exchange (trainer/strategy.py) sets a row to the mean of the ranks'
changes, which divides the step by the number of ranks on rows every rank touches; on a
small set, where an epoch holds a single exchange, the learning rate left to auto is
multiplied by the number of ranks.

Batches are cut ahead in a thread only where a core is spare for it, and decoded row
groups are kept between epochs within 1/CACHE_SHARE_OF_MEMORY of the machine's memory,
shared by its ranks.

Every field chosen here is ``None`` in its config until ``resolve_defaults`` fills it; a
value the user gave (flag, TOML or estimator parameter) is never touched. The choice and
its reason go to ``config.json`` and one log line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.config import (
    CACHE_SHARE_OF_MEMORY,
    LARGE_SET,
    LARGE_SET_RATINGS,
    PREFETCH,
    SMALL_SET,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

# Below this many training ratings per rank, a second rank costs more in start-up and
# communication than it saves (ML-100K: bench/RESULTS.md).
RATINGS_PER_RANK_TO_PAY = 500_000



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
    large = train_ratings >= LARGE_SET_RATINGS
    recipe = LARGE_SET if large else SMALL_SET
    wanted = {**recipe, "prefetch": PREFETCH if spare_core else 0,
              "cache_mb": memory_per_rank // CACHE_SHARE_OF_MEMORY // 2**20}
    if periodic_exchange and not large:
        wanted["lr"] = recipe["lr"] * world_size
    chosen: dict[str, object] = {}
    configs = []
    for config in (model, optim, train):
        auto = {f.name: wanted[f.name] for f in dataclasses.fields(config)
                if f.name in wanted and getattr(config, f.name) is None}
        chosen.update(auto)
        configs.append(dataclasses.replace(config, **auto))
    size = "large" if large else "small"
    reason = (f"{train_ratings:,} training ratings ({size} set: "
              f"{'>=' if large else '<'} {LARGE_SET_RATINGS:,}), {world_size} rank(s)")
    return Resolved(*configs, chosen=chosen, reason=reason)


def ranks_cannot_pay(train_ratings: int, world_size: int) -> bool:
    """True when each rank would train too few ratings for more ranks to be faster."""
    return world_size > 1 and train_ratings / world_size < RATINGS_PER_RANK_TO_PAY
