"""trainer/baseline.py: the bias-only baseline RMSE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from helpers import SINGLE

from trainer.baseline import bias_baseline_rmse
from trainer.data import read_piece
from trainer.shards import open_shards


def test_bias_baseline_beats_the_mean(trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir)
    mean = shards.train_mean
    ratings = np.concatenate([read_piece(p)[2] for p in shards.pieces("test")])
    mean_rmse = float(np.sqrt(np.mean((ratings - mean) ** 2)))
    baseline = bias_baseline_rmse(shards, SINGLE)
    assert baseline < mean_rmse
