"""Defaults chosen from the data (trainer/defaults.py) and early stopping with min_delta."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_config, spawn_ranks

from trainer.checkpoint import TrainState
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.defaults import (
    CACHE_SHARE_OF_MEMORY,
    LARGE_SET,
    LARGE_SET_RATINGS,
    SMALL_SET,
    SMALL_SET_RATINGS,
    ranks_cannot_pay,
    ranks_that_pay,
    recipe_for,
    resolve_defaults,
)
from trainer.distributed import DistEnv
from trainer.strategy import EXCHANGE_EVERY_RATINGS
from trainer.train import train


def _resolve(ratings: int, world_size: int = 1, periodic: bool = False, **given):
    model = ModelConfig(**{k: v for k, v in given.items() if k in ("dim",)})
    optim = OptimConfig(**{k: v for k, v in given.items() if k in ("lr", "lr_decay")})
    train = TrainConfig(**{k: v for k, v in given.items()
                           if k not in ("dim", "lr", "lr_decay")})
    return resolve_defaults(model, optim, train, train_ratings=ratings,
                            world_size=world_size, periodic_exchange=periodic)


@pytest.mark.parametrize(("ratings", "recipe"), [(90_000, SMALL_SET),
                                                 (SMALL_SET_RATINGS, SMALL_SET),
                                                 (LARGE_SET_RATINGS, LARGE_SET),
                                                 (100_000_000, LARGE_SET)])
def test_the_recipes_hold_beyond_their_anchors(ratings: int, recipe: dict) -> None:
    resolved = _resolve(ratings)
    assert resolved.model.dim == recipe["dim"]
    assert resolved.optim.lr == recipe["lr"] and resolved.optim.lr_decay == recipe["lr_decay"]
    assert resolved.train.patience == recipe["patience"]
    assert resolved.train.min_delta == recipe["min_delta"]
    assert resolved.chosen == {**recipe, "prefetch": 4, "cache_mb": 0}
    assert f"{ratings:,} training ratings" in resolved.reason


def test_between_the_anchors_every_value_moves_smoothly_with_the_size() -> None:
    """No cliff: over sizes 5% apart, each value moves one way only and by little, and the
    work a run does (ratings x dimension x the epochs its step takes to decay) never jumps."""
    sizes = [int(SMALL_SET_RATINGS * 1.05 ** k) for k in range(90)]
    assert sizes[-1] > LARGE_SET_RATINGS
    recipes = [recipe_for(n) for n in sizes]
    for name in SMALL_SET:
        values = [r[name] for r in recipes]
        falling = SMALL_SET[name] > LARGE_SET[name]
        assert values == sorted(values, reverse=falling), name
    work = [n * r["dim"] / (1 - r["lr_decay"]) for n, r in zip(sizes, recipes)]
    assert max(b / a for a, b in zip(work, work[1:])) < 1.1
    assert min(b / a for a, b in zip(work, work[1:])) > 0.85  # falls a little: no cliff either
    middle = recipe_for(1_000_000)
    assert LARGE_SET["dim"] < middle["dim"] < SMALL_SET["dim"]
    assert SMALL_SET["lr"] < middle["lr"] < LARGE_SET["lr"]
    assert "of the way from the small-set recipe" in _resolve(1_000_000).reason


def test_values_given_by_the_user_are_never_replaced() -> None:
    resolved = _resolve(5_000_000, dim=16, lr=0.5, patience=0, world_size=2, periodic=True)
    assert (resolved.model.dim, resolved.optim.lr, resolved.train.patience) == (16, 0.5, 0)
    assert set(resolved.chosen) == {"reg", "lr_decay", "min_delta", "prefetch", "cache_mb"}


def test_periodic_averaging_on_a_small_set_keeps_the_per_rating_step() -> None:
    assert _resolve(90_000, 2, periodic=True).optim.lr == SMALL_SET["lr"] * 2
    assert _resolve(90_000, 2, periodic=True, lr=0.01).optim.lr == 0.01  # given: kept
    assert _resolve(LARGE_SET_RATINGS, 2, periodic=True).optim.lr == LARGE_SET["lr"]
    middle = _resolve(1_000_000, 2, periodic=True).optim.lr / recipe_for(1_000_000)["lr"]
    assert 1 < middle < 2  # fading from twice to once
    assert _resolve(90_000, 2, periodic=False).optim.lr == SMALL_SET["lr"]


def test_batches_are_cut_ahead_only_with_a_spare_core() -> None:
    model, optim, train = ModelConfig(), OptimConfig(), TrainConfig()
    busy = resolve_defaults(model, optim, train, train_ratings=10, world_size=2,
                            periodic_exchange=True, spare_core=False)
    assert busy.train.prefetch == 0 and _resolve(10).train.prefetch == 4
    assert _resolve(10, prefetch=2).train.prefetch == 2


def test_decoded_ratings_are_kept_within_a_share_of_the_machine_memory() -> None:
    model, optim, train = ModelConfig(), OptimConfig(), TrainConfig()
    resolved = resolve_defaults(model, optim, train, train_ratings=10, world_size=2,
                                periodic_exchange=True, memory_per_rank=12 * 2**30)
    assert resolved.train.cache_mb == 12 * 1024 // CACHE_SHARE_OF_MEMORY
    given = resolve_defaults(model, optim, TrainConfig(cache_mb=0), train_ratings=10,
                             world_size=1, periodic_exchange=False, memory_per_rank=12 * 2**30)
    assert given.train.cache_mb == 0 and "cache_mb" not in given.chosen


def test_a_second_rank_pays_only_with_enough_ratings_per_rank() -> None:
    assert ranks_cannot_pay(90_000, 2)
    assert not ranks_cannot_pay(90_000, 1)
    assert ranks_that_pay(90_000, 2) == 1  # --nproc auto: one process where ranks cannot pay
    assert ranks_that_pay(10_000_000, 2) == 2 and ranks_that_pay(10_000_000, 64) == 20
    assert not ranks_cannot_pay(10_000_000, ranks_that_pay(10_000_000, 64))
    assert not ranks_cannot_pay(5_000_000, 2)


def _epochs(values: list[float], min_delta: float, patience: int) -> tuple[int, int]:
    """(epochs run, best epoch) for a sequence of validation RMSEs."""
    state, model = TrainState(), torch.nn.Linear(1, 1)
    for epoch, value in enumerate(values, 1):
        state.end_epoch({"epoch": epoch}, value, model, min_delta)
        if patience and state.bad_epochs >= patience:
            break
    return state.epoch, state.best_epoch


def test_min_delta_stops_on_negligible_gains_but_keeps_the_best_epoch() -> None:
    # Gains of 0.0004 an epoch after epoch 3: below a min_delta of 0.001 for 2 epochs.
    values = [1.0, 0.9, 0.85, 0.8496, 0.8492, 0.8488, 0.8484, 0.8480]
    assert _epochs(values, min_delta=0.001, patience=2) == (5, 5)
    # Without min_delta every gain counts: it runs to the end.
    assert _epochs(values, min_delta=0.0, patience=2) == (8, 8)
    # Small gains add up: 0.0004 + 0.0004 + 0.0004 >= 0.001 resets the count.
    assert _epochs(values, min_delta=0.001, patience=3) == (8, 8)


def test_a_worse_epoch_is_never_kept_as_best() -> None:
    state, model = TrainState(), torch.nn.Linear(1, 1)
    for epoch, value in enumerate([0.9, 0.95, 0.91], 1):
        state.end_epoch({"epoch": epoch}, value, model, 0.001)
    assert state.best_epoch == 1 and state.best_val == 0.9 and state.bad_epochs == 2
    assert math.isinf(TrainState().progress_val)


# ---------------------------------------------------------------- through train()

def test_train_records_and_uses_the_choice(trainer_shards_dir: Path, tmp_path: Path) -> None:
    single = DistEnv(0, 0, 1, 1, torch.device("cpu"), None)
    metrics = train(run_config(trainer_shards_dir, tmp_path / "run",
                               ModelConfig(),
                               OptimConfig(),
                               TrainConfig(epochs=2, threads=1)), single)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    chosen = config["chosen_from_data"]
    assert {k: chosen[k] for k in SMALL_SET} == SMALL_SET  # ~18k ratings: a small set
    assert "training ratings (0% of the way" in chosen["reason"]
    assert config["model"]["dim"] == SMALL_SET["dim"] == metrics["dim"]
    assert config["optim"]["lr"] == SMALL_SET["lr"] and config["step"] == "fused"


def _default_job(env: DistEnv, shards: str, out: str) -> None:
    train(run_config(shards, Path(out) / "run",
                     ModelConfig(),
                     OptimConfig(),
                     TrainConfig(epochs=6, threads=1, timeout_s=60)), env)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_gloo_ranks_at_defaults_take_the_fused_periodic_path(trainer_user_shards_dir: Path,
                                                                 tmp_path: Path) -> None:
    spawn_ranks(_default_job, str(trainer_user_shards_dir), str(tmp_path),
                folder=tmp_path / "ranks")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert config["step"] == "fused" and config["user_embeddings"] == "owned"
    assert config["train"]["sync_every"] == EXCHANGE_EVERY_RATINGS // 512
    assert metrics["world_size"] == 2
    assert metrics["test_rmse"] < metrics["baseline_test_rmse"]
