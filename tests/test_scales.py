"""Rating scales: one step size and one L2 weight suit every scale, because training works in
units of the ratings' standard deviation (trainer/model.py); predictions, metrics and the
model files stay in the user's scale."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from helpers import SINGLE, run_config

from data_shards import PrepareConfig, prepare
from trainer.config import LARGE_SET, ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig
from trainer.run import TrainedRun
from trainer.train import train

# (low, high, step): step 0 is continuous.
SCALES = {"jokes -10..10": (-10.0, 10.0, 0.0), "half stars 0.5..4": (0.5, 4.0, 0.5),
          "1..10": (1.0, 10.0, 1.0), "0..1": (0.0, 1.0, 0.0), "stars 1..5": (1.0, 5.0, 1.0)}


def _ratings(low: float, high: float, step: float, seed: int = 0) -> pd.DataFrame:
    """A dense low-rank world (300 users x 80 items, ~9k ratings) mapped onto the scale."""
    rng = np.random.default_rng(seed)
    users, items = rng.normal(size=(300, 4)), rng.normal(size=(80, 4))
    pairs = rng.random((300, 80)) < 0.4
    u, i = np.nonzero(pairs)
    taste = (users[u] * items[i]).sum(1) + rng.normal(0.0, 0.7, len(u))
    unit = (taste - taste.min()) / (taste.max() - taste.min())  # 0..1
    rating = low + unit * (high - low)
    if step:
        rating = low + np.round((rating - low) / step) * step
    return pd.DataFrame({"user": u + 1, "item": i + 1, "rating": rating})


@pytest.fixture(scope="module", params=list(SCALES))
def scaled_shards(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                  ) -> tuple[Path, tuple[float, float], pd.DataFrame]:
    low, high, step = SCALES[request.param]
    folder = tmp_path_factory.mktemp("scale")
    frame = _ratings(low, high, step)
    frame.to_csv(folder / "ratings.csv", index=False)
    with dask.config.set(scheduler="synchronous"):
        prepare([str(folder / "ratings.csv")], folder / "shards",
                PrepareConfig(rating_range=(low, high), num_shards=2))
    return folder / "shards", (low, high), frame


def test_the_large_set_step_trains_on_every_scale(scaled_shards, tmp_path: Path) -> None:
    """The large-set recipe's step (0.035 per rating, the one that diverged on -10..10 when
    it acted on raw ratings) beats the bias-only baseline on every scale, and predictions
    come back in the user's scale."""
    shards, (low, high), frame = scaled_shards
    manifest = json.loads((shards / "manifest.json").read_text())
    train_std = manifest["rating"]["train_std"]
    assert train_std == pytest.approx(frame["rating"].std(), rel=0.1)
    run = tmp_path / "run"
    metrics = train(run_config(
        shards, run, ModelConfig(dim=LARGE_SET["dim"]),
        OptimConfig(lr=LARGE_SET["lr"], lr_decay=LARGE_SET["lr_decay"]),
        TrainConfig(epochs=8, patience=0, batch_size=256, threads=1),
        objective=ObjectiveConfig(objective="rating")), SINGLE)
    assert metrics["test_rmse"] < 0.9 * metrics["baseline_test_rmse"]
    # RMSE in the user's units: a fraction of the spread, not of a standard unit.
    assert 0.1 * train_std < metrics["test_rmse"] < train_std
    predicted = TrainedRun(run).predict(frame["user"].to_numpy()[:500],
                                        frame["item"].to_numpy()[:500])
    assert low <= predicted.min() and predicted.max() <= high
    assert abs(predicted.mean() - frame["rating"].mean()) < 0.2 * train_std
    error = predicted - frame["rating"].to_numpy()[:500]
    assert np.sqrt(np.mean(error ** 2)) < train_std  # better than the mean, in user units
