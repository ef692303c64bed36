"""What a run tells its user along the way: a line while ranks start, and one when the
factors ended worse than the bias-only baseline."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from launch.cli import main
from trainer import load_run


def test_a_run_worse_than_the_baseline_says_so(trainer_shards_dir: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """Factors started far too large and barely moved predict worse than mean + biases:
    the run still finishes, and one warning says so with both figures."""
    caplog.set_level(logging.INFO)
    assert main(["train", str(trainer_shards_dir), "--out", str(tmp_path / "run"),
                 "--objective", "rating", "--dim", "8", "--init-std", "2", "--lr", "1e-7",
                 "--epochs", "1", "--clusters", "0"]) == 0
    worse = [r.getMessage() for r in caplog.records if "bias-only baseline's" in r.getMessage()]
    assert len(worse) == 1 and worse[0].startswith("the factors made predictions worse")
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.getMessage() in worse)


def test_a_good_run_adds_no_such_line(trainer_shards_dir: Path, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert main(["train", str(trainer_shards_dir), "--out", str(tmp_path / "run"),
                 "--objective", "rating", "--dim", "8", "--epochs", "3",
                 "--clusters", "0"]) == 0
    assert not [r for r in caplog.records if "made predictions worse" in r.getMessage()]
    epochs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert "left" in epochs[0] and "left" not in epochs[-1]


def test_test_rmse_carries_its_standard_error(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """metrics.json's test_rmse_se is the delta-method error of the RMSE, computed here
    from the run's own predictions on the test split."""
    run = tmp_path / "run"
    assert main(["train", str(trainer_shards_dir), "--out", str(run), "--objective", "rating",
                 "--dim", "8", "--epochs", "2", "--clusters", "0"]) == 0
    test = pd.concat([pd.read_parquet(path) for path in
                      sorted((trainer_shards_dir / "test").glob("*.parquet"))])
    trained = load_run(run)
    users = trained.users["original_user_id"].to_numpy()[test["user_id"]]
    items = trained.items["original_item_id"].to_numpy()[test["item_id"]]
    squared = (trained.predict(users, items) - test["rating"].to_numpy()) ** 2
    rmse = np.sqrt(squared.mean())
    expected = squared.std(ddof=1) / np.sqrt(len(squared)) / (2 * rmse)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test_rmse"] == pytest.approx(rmse, rel=1e-5)
    assert metrics["test_rmse_se"] == pytest.approx(expected, rel=1e-4)
    assert metrics["ndcg@10_se"] > 0


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_starting_ranks_is_announced(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """The seconds ranks take to start are not silent: a line comes before the first epoch."""
    done = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(trainer_shards_dir),
                           "--out", str(tmp_path / "run"), "--nproc", "2", "--objective",
                           "rating", "--epochs", "1", "--clusters", "0"],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert "starting 2 processes per node for training (torchrun)..." in done.stderr
    assert done.stderr.index("starting 2 processes") < done.stderr.index("epoch 1/1")
