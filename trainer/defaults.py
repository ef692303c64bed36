"""Defaults that scale with the data: the settings a run leaves to ``auto``, from the
manifest's counts and the world size.

Two regimes, split at LARGE_SET_RATINGS training ratings, each measured on the sets in
bench/defaults.md:

- small sets (ML-100K-sized): dimension 256, SGD at 0.003 per rating decaying 0.99 an
  epoch, L2 0.05, stopping after 5 epochs without any better validation RMSE. Tuned on ML-100K's
  validation split; with the fused CPU step the ~75 epochs take a few seconds.
- large sets (millions of ratings): dimension 64, SGD at 0.03 decaying 0.85, L2 0.04,
  stopping once 2 epochs in a row gain less than 0.001 RMSE. A larger step and a faster
  decay reach the plateau in ~15 epochs instead of ~100; a smaller dimension keeps an
  epoch near the memory-bound speed of the step; on these sets dimension 256 was no more
  accurate. Against the first large recipe (decay 0.9, L2 0.05), side by side on one
  process: synth-5m 17 -> 16 epochs, test RMSE 0.8251 -> 0.8206; synth-10m 18 -> 17,
  0.5141 -> 0.5070 (L2 0.02 reached 0.4969 there but overfit the noisier synth-5m,
  0.8314 after 8 epochs).

With several CPU ranks the fused step needs the periodic row sync, so ranks exchange the
rows they changed after every EXCHANGE_EVERY_RATINGS ratings a rank trains instead of
every step: an exchange of a whole item table costs about as much as training 20k
ratings, so exchanging every 32 steps of 512 ratings made two ranks 3x slower than one;
at 262k ratings the exchange (a 5 MB all-reduce of a 20k-item table: 9 ms here) and the
wait for the slower rank still took 16 % of an epoch, at 524k half that, for +0.0003 test
RMSE on synth-5m and none on synth-10m (synth-5m 11.2-11.5 -> 8.0-10.0 s of training,
synth-10m 22.2 -> 20.0 s; the staleness cost of sparser exchanges is in bench/scaling.md).
With nccl every step syncs (DDP).
The exchange sets a row to the mean of the ranks' changes, which divides the per-rating
step by the number of ranks on rows every rank touches; on a small set, where an epoch
holds a single exchange, that halved progress per epoch (ML-100K, 2 ranks: 150 epochs to
test RMSE 0.9123), so there the learning rate left to auto is multiplied by the number of
ranks (79 epochs to 0.9069, the exact per-step sync's figure). Large sets converged in
the same number of epochs without it (bench/defaults.md).

Batches are cut ahead in a thread only where a core is spare for it: with a rank on every
core, the thread competes with the steps (bench/train_throughput.md).

Decoded row groups are kept between epochs within 1/CACHE_SHARE_OF_MEMORY of the
machine's memory, shared by its ranks (trainer/data.py's RowGroupReader): re-reading them
was up to a third of the training time of two ranks on 2 cores.

Every field chosen here is ``None`` in its config until ``resolve_defaults`` fills it; a
value the user gave (flag or TOML) is never touched. The choice and its reason go to
``config.json`` and one log line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from trainer.config import ModelConfig, OptimConfig, TrainConfig

LARGE_SET_RATINGS = 1_000_000  # training ratings from which the large-set recipe applies
EXCHANGE_EVERY_RATINGS = 524_288  # ratings a rank trains between row exchanges
# Below this many training ratings per rank, a second rank costs more in start-up and
# communication than it saves (ML-100K: bench/RESULTS.md).
RATINGS_PER_RANK_TO_PAY = 500_000

SMALL_SET = {"dim": 256, "reg": 0.05, "lr": 0.003, "lr_decay": 0.99, "patience": 5,
             "min_delta": 0.0}
PREFETCH = 4  # batches a loader thread cuts ahead, where a core is spare
CACHE_SHARE_OF_MEMORY = 8  # decoded ratings kept: 1/8 of the machine's memory at most
LARGE_SET = {"dim": 64, "reg": 0.04, "lr": 0.03, "lr_decay": 0.85, "patience": 2,
             "min_delta": 0.001}


@dataclass(frozen=True)
class Resolved:
    """The configs with every ``auto`` field filled, and what was chosen and why."""

    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    chosen: dict[str, object]  # field -> value, only the fields left to auto
    reason: str  # one line: the regime and the facts it was chosen from


def resolve_defaults(model: ModelConfig, optim: OptimConfig, train: TrainConfig, *,
                     train_ratings: int, world_size: int, backend: str | None,
                     spare_core: bool = True, memory_per_rank: int = 0) -> Resolved:
    """Fill the ``None`` (auto) fields of the three configs from the data and the ranks.

    Args:
        train_ratings: the manifest's count of training ratings.
        world_size: number of ranks.
        backend: "gloo", "nccl", or None for one process.
        spare_core: this machine has more cores than local ranks.
        memory_per_rank: bytes of the machine's memory over its local ranks.
    """
    large = train_ratings >= LARGE_SET_RATINGS
    recipe = LARGE_SET if large else SMALL_SET
    # The periodic exchange needs the packed sync of sparse rows: not with DDP or dense.
    periodic = (world_size > 1 and backend == "gloo" and train.sync != "ddp"
                and train.gradients != "dense")
    rank_batch = max(1, train.batch_size // world_size)
    sync_every = max(2, EXCHANGE_EVERY_RATINGS // rank_batch) if periodic else 1
    wanted = {**recipe, "sync_every": sync_every, "prefetch": PREFETCH if spare_core else 0,
              "cache_mb": memory_per_rank // CACHE_SHARE_OF_MEMORY // 2**20}
    if periodic and not large:
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
              f"{'>=' if large else '<'} {LARGE_SET_RATINGS:,}), {world_size} rank(s)"
              + (f", {backend}" if backend else ""))
    return Resolved(*configs, chosen=chosen, reason=reason)


def ranks_cannot_pay(train_ratings: int, world_size: int) -> bool:
    """True when each rank would train too few ratings for more ranks to be faster."""
    return world_size > 1 and train_ratings / world_size < RATINGS_PER_RANK_TO_PAY
