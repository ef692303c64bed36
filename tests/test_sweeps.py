"""The ranking objective in a training run (trainer/sweeps.py, trainer/train.py): which
objective runs on which data, what it writes, and that 2 ranks give the lists of one."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pytest
import torch
from helpers import SINGLE, run_config, spawn_ranks

from data_shards import PrepareConfig, prepare
from shardmf.errors import InputError
from trainer.checkpoint import load_model
from trainer.config import ObjectiveConfig, TrainConfig
from trainer.distributed import DistEnv
from trainer.train import resolve_objectives, train

QUICK = {"epochs": 3, "patience": 0, "threads": 1, "batch_size": 256, "timeout_s": 60}


def test_the_objective_follows_the_data() -> None:
    assert resolve_objectives("auto", "ratings") == ("rating", "ranking")
    assert resolve_objectives("auto", "interactions") == ("ranking",)
    assert resolve_objectives("rating", "ratings") == ("rating",)
    assert resolve_objectives("ranking", "interactions") == ("ranking",)
    assert resolve_objectives("auto", "ratings", "cuda") == ("rating",)
    for choice, kind in (("ranking", "ratings"), ("both", "ratings"),
                         ("auto", "interactions")):
        with pytest.raises(InputError, match="train on CPU ranks for now"):
            resolve_objectives(choice, kind, "cuda")
    for choice in ("rating", "both"):
        with pytest.raises(InputError, match=rf"objective='{choice}' predicts ratings, but "
                                             "the shards hold interactions"):
            resolve_objectives(choice, "interactions")


@pytest.fixture(scope="module")
def interaction_shards(trainer_ratings_dir: Path, tmp_path_factory) -> Path:
    """The trainer's synthetic ratings as bare (user, item) pairs: what a play log holds."""
    frame = _read_ratings(trainer_ratings_dir)
    raw = tmp_path_factory.mktemp("interactions") / "plays.csv"
    frame[["user_id", "item_id"]].to_csv(raw, index=False)
    out = raw.parent / "shards"
    with dask.config.set(scheduler="synchronous"):
        prepare([str(raw)], out, PrepareConfig(num_shards=4, row_group_size=2000))
    return out


def _read_ratings(raw: Path):
    import pandas as pd

    return pd.concat(pd.read_parquet(path) for path in sorted(raw.rglob("*.parquet")))


def test_rating_data_trains_both_pairs_of_tables(trainer_shards_dir: Path,
                                                 tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = train(run_config(trainer_shards_dir, run, train=TrainConfig(**QUICK)), SINGLE)
    assert metrics["objective"] == "both" and metrics["test_rmse"] is not None
    # The lists come from the ranking tables, and beat most-popular clearly (0.32 vs 0.23).
    assert metrics["ndcg@10"] > 1.2 * metrics["popular_ndcg@10"]
    assert 1 <= metrics["ranking_best_sweep"] <= metrics["ranking_sweeps"]
    tables, payload = load_model(run / "model.pt")
    assert tables.rating is not None and tables.ranking is not None
    assert payload["objective"] == "both" and payload["ranking_dim"] == 64
    with np.load(run / "model.npz") as arrays:
        assert arrays["ranking_item_factors.weight"].shape == (150, 64)
        assert arrays["item_factors.weight"].shape[0] == 150 and str(arrays["kind"]) == "ratings"
    config = json.loads((run / "config.json").read_text())
    assert config["objective"]["objective"] == "auto"


def test_a_rating_run_alone_keeps_todays_lists(trainer_shards_dir: Path,
                                               tmp_path: Path) -> None:
    metrics = train(run_config(trainer_shards_dir, tmp_path / "run", train=TrainConfig(**QUICK),
                               objective=ObjectiveConfig(objective="rating")), SINGLE)
    tables, _ = load_model(tmp_path / "run" / "model.pt")
    assert metrics["objective"] == "rating" and tables.ranking is None
    assert "ranking_best_sweep" not in metrics


def test_interactions_train_the_ranking_tables_alone(interaction_shards: Path,
                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = train(run_config(interaction_shards, run, train=TrainConfig(**QUICK)), SINGLE)
    assert metrics["objective"] == "ranking" and metrics["kind"] == "interactions"
    assert metrics.get("test_rmse") is None
    assert metrics["ranking_threshold"] == 0  # every held-out interaction is relevant
    # Without ratings, on a set 44 % dense, most-popular is hard to beat by much (ML-100K's
    # pairs: 0.242 against 0.092, bench/ranking_objective.md).
    assert metrics["ndcg@10"] > metrics["popular_ndcg@10"]
    tables, payload = load_model(run / "model.pt")
    assert tables.rating is None and payload["model_config"] is None
    with pytest.raises(InputError, match="objective='rating' predicts ratings"):
        train(run_config(interaction_shards, tmp_path / "other", train=TrainConfig(**QUICK),
                         objective=ObjectiveConfig(objective="rating")), SINGLE)


def test_a_fixed_regularisation_and_patience(trainer_shards_dir: Path, tmp_path: Path) -> None:
    objective = ObjectiveConfig(objective="ranking", ranking_reg=0.01, sweeps=6,
                                sweep_patience=0)
    metrics = train(run_config(trainer_shards_dir, tmp_path / "run", train=TrainConfig(**QUICK),
                               objective=objective), SINGLE)
    assert metrics["ranking_sweeps"] == 6  # no patience: every sweep runs
    sweeps = [json.loads(line) for line in (tmp_path / "run" / "sweeps.jsonl").read_text()
              .splitlines()]
    assert [h["sweep"] for h in sweeps] == [1, 2, 3, 4, 5, 6]
    assert {h["reg"] for h in sweeps} == {0.01}
    assert metrics["ranking_best_sweep"] == 1 + int(np.argmax([h["val_ndcg@10"]
                                                               for h in sweeps]))


def _ranking_job(env: DistEnv, shards: str, out: str) -> None:
    train(run_config(shards, Path(out) / "run", train=TrainConfig(**QUICK),
                     objective=ObjectiveConfig(objective="ranking", sweeps=5)), env)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_two_ranks_owning_their_users_give_the_lists_of_one(trainer_user_shards_dir: Path,
                                                           tmp_path: Path) -> None:
    spawn_ranks(_ranking_job, str(trainer_user_shards_dir), str(tmp_path / "two"),
                folder=tmp_path / "ranks")
    _ranking_job(SINGLE, str(trainer_user_shards_dir), str(tmp_path / "one"))
    two = json.loads((tmp_path / "two" / "run" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "run" / "metrics.json").read_text())
    assert two["user_embeddings"] == "owned" and two["world_size"] == 2
    # The same loss, each rank starting its own users at random: the same lists up to noise.
    assert two["ndcg@10"] == pytest.approx(one["ndcg@10"], abs=0.03)
    tables, _ = load_model(tmp_path / "two" / "run" / "model.pt")
    assert tables.ranking.user_factors.weight.shape == (300, 64)  # every user, assembled
    assert torch.isfinite(tables.ranking.user_factors.weight).all()
