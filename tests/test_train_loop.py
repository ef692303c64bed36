"""trainer/train.py in one process: evaluation, a diverging loss, early stopping.
Resuming is in test_checkpoint.py, real ranks in test_distributed.py."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import SINGLE, SMALL, run_config

from shardmf.errors import InputError
from trainer.checkpoint import load_model
from trainer.config import ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig
from trainer.model import BiasedMF
from trainer.shards import Piece, open_shards
from trainer.train import evaluate, train


def test_evaluate_known_rmse_and_mae(tmp_path: Path) -> None:
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"user_id": pa.array([0, 1, 2, 3], pa.int64()),
                             "item_id": pa.array([0, 1, 0, 1], pa.int64()),
                             "rating": pa.array([1.0, 2.0, 4.0, 5.0], pa.float32())}), path)
    pieces = [Piece(path, 0, 4)]
    model = BiasedMF(4, 2, 3.0, ModelConfig(reg=0.05, dim=2))
    with torch.no_grad():
        model.user_factors.weight.zero_()  # predictions are exactly the global mean
    config = TrainConfig(eval_batch_size=3)  # two evaluation batches
    rmse, mae = evaluate(model, pieces, (1.0, 5.0), config, SINGLE)
    assert rmse == pytest.approx(math.sqrt((4 + 1 + 1 + 4) / 4))
    assert mae == pytest.approx(1.5)
    with torch.no_grad():
        model.global_mean.fill_(9.0)  # clamped to 5 stars before scoring
    rmse, mae = evaluate(model, pieces, (1.0, 5.0), config, SINGLE)
    assert rmse == pytest.approx(math.sqrt((16 + 9 + 1 + 0) / 4))
    assert mae == pytest.approx(2.0)
    assert evaluate(model, [], (1.0, 5.0), config, SINGLE) == (None, None)


def test_a_loss_that_diverges_twice_is_one_clear_error(trainer_shards_dir: Path,
                                                       tmp_path: Path) -> None:
    """The first non-finite loss lowers the step 4x and goes on; the second ends the run."""
    with pytest.raises(InputError, match=r"non-finite by step \d+ of epoch 1; lower `lr` "
                                         r"\(now 250000\)"):
        train(run_config(trainer_shards_dir, tmp_path / "run",
                         ModelConfig(reg=0.05, dim=8, init_std=1.0),
                         OptimConfig(lr=1e6),
                         TrainConfig(**SMALL, epochs=1)), SINGLE)


def test_a_loss_that_diverges_once_goes_on_at_a_lower_step(
        trainer_shards_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="trainer.train"):
        metrics = train(run_config(trainer_shards_dir, run,
                                   ModelConfig(reg=0.05, dim=8, init_std=1.0),
                                   OptimConfig(lr=0.1, lr_decay=0.5),
                                   TrainConfig(**SMALL, epochs=2),
                                   objective=ObjectiveConfig(objective="rating")), SINGLE)
    lowered = [r.message for r in caplog.records if "non-finite" in r.message]
    assert len(lowered) == 1 and "epoch 1 at lr 0.1: going on from the initial weights" in (
        lowered[0]) and "divided by 4" in lowered[0]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["lr"] for e in epochs] == [0.025, 0.0125]  # the lowered step, decaying on
    assert math.isfinite(metrics["test_rmse"]) and metrics["test_rmse"] < 1.2


def test_early_stopping_keeps_the_best_epoch(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """Patience 1 without lr decay: validation RMSE turns up after a few epochs (epoch 5 of
    this data and seed), training stops one epoch later and the model kept is the best."""
    run = tmp_path / "run"
    metrics = train(run_config(trainer_shards_dir, run,
                               ModelConfig(dim=8, reg=0.017),
                               OptimConfig(optimizer="sgd", lr=0.035, lr_decay=1.0),
                               TrainConfig(**{**SMALL, "patience": 1}, epochs=8)), SINGLE)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min(history, key=lambda h: h["val_rmse"])
    assert metrics["best_epoch"] == best["epoch"] < metrics["epochs"] == len(history) < 8
    assert metrics["epochs"] == best["epoch"] + 1
    assert metrics["val_rmse"] == best["val_rmse"]
    shards = open_shards(trainer_shards_dir)
    tables, _ = load_model(run / "model.pt")
    rmse, _ = evaluate(tables.rating, shards.pieces("val"), shards.scale, TrainConfig(), SINGLE)
    assert rmse == pytest.approx(best["val_rmse"], abs=1e-9)


def test_a_run_resumed_after_early_stopping_trains_no_more_epochs(trainer_shards_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Resumed after its rating epochs had stopped early (as when the ranking sweeps that
    follow are cut short), a run keeps the same epochs and figures: none is added."""
    run = tmp_path / "run"
    configs = (ModelConfig(dim=8, reg=0.017), OptimConfig(optimizer="sgd", lr=0.035,
                                                          lr_decay=1.0))
    first = train(run_config(trainer_shards_dir, run, *configs,
                             TrainConfig(**{**SMALL, "patience": 1}, epochs=8)), SINGLE)
    assert first["epochs"] < 8
    resumed = run_config(trainer_shards_dir, run, *configs,
                         TrainConfig(**{**SMALL, "patience": 1}, epochs=8, resume=True))
    with pytest.raises(InputError, match="is a finished run"):
        train(resumed, SINGLE)  # metrics.json written: nothing is left to resume
    (run / "metrics.json").unlink()  # as if the phase after the epochs had been cut short
    again = train(resumed, SINGLE)
    for key in ("epochs", "best_epoch", "test_rmse", "val_rmse", "ndcg@10"):
        assert again[key] == first[key], key
