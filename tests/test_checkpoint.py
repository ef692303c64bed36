"""trainer/checkpoint.py through the loop in one process: a run resumed at an epoch
boundary or mid-epoch ends as an uninterrupted one, the best weights are saved once, and a
checkpoint that is missing, stale or of another shape is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SINGLE, SMALL, run_config, run_train

from shardmf.errors import InputError
from trainer.checkpoint import load_trusted
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.distributed import DistEnv, TestFault
from trainer.train import train


def test_train_resume_equals_uninterrupted(trainer_shards_dir: Path, tmp_path: Path) -> None:
    straight = run_train(trainer_shards_dir, tmp_path / "straight", epochs=3)
    run_train(trainer_shards_dir, tmp_path / "resumed", epochs=1)
    resumed = run_train(trainer_shards_dir, tmp_path / "resumed", epochs=3, resume=True)
    assert resumed["test_rmse"] == straight["test_rmse"]
    assert resumed["epochs"] == 3
    history = [json.loads(line) for line in
               (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    straight_history = [json.loads(line) for line in
                        (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [h["val_rmse"] for h in history] == [h["val_rmse"] for h in straight_history]
    assert straight["test_rmse"] < 0.8 * straight["baseline_test_rmse"]


def test_resume_without_checkpoint(trainer_shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"`resume`: .*checkpoint\.pt not found"):
        run_train(trainer_shards_dir, tmp_path / "run", epochs=1, resume=True)


def test_a_resumed_run_ends_on_the_best_weights_saved_once(trainer_shards_dir: Path,
                                                           tmp_path: Path) -> None:
    """Checkpointed right after its best epoch, a run holds those weights once (as the
    model); resumed, it never improves again and must end on exactly them."""
    configs = (ModelConfig(dim=8, reg=0.02), OptimConfig(optimizer="sgd", lr=0.03,
                                                         lr_decay=1.0))
    loop = {**SMALL, "patience": 1}
    straight = train(run_config(trainer_shards_dir, tmp_path / "straight", *configs,
                                TrainConfig(**loop, epochs=8)), SINGLE)
    best = straight["best_epoch"]
    assert best < straight["epochs"]
    run = tmp_path / "resumed"
    train(run_config(trainer_shards_dir, run, *configs, TrainConfig(**loop, epochs=best)), SINGLE)
    saved = load_trusted(run / "checkpoint.pt", "")
    assert saved["best_is_model"] and saved["best_model"] is None
    resumed = train(run_config(trainer_shards_dir, run, *configs,
                               TrainConfig(**loop, epochs=8, resume=True)), SINGLE)
    assert resumed["best_epoch"] == best and resumed["test_rmse"] == straight["test_rmse"]


def test_mid_epoch_resume_equals_uninterrupted(trainer_shards_dir: Path,
                                               tmp_path: Path) -> None:
    """Crash 7 steps into epoch 2, with a checkpoint every 5 steps: the resumed run redoes
    the steps after the last checkpoint and ends with the same figures."""
    straight = run_train(trainer_shards_dir, tmp_path / "straight", epochs=2)
    steps = json.loads((tmp_path / "straight" / "config.json").read_text())["steps_per_epoch"]
    crashing = DistEnv(**{**SINGLE.__dict__, "test_fault": TestFault("raise", 0, steps + 7)})
    run = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match=f"injected failure on rank 0 before step {steps + 7}"):
        train(run_config(trainer_shards_dir, run,
                         ModelConfig(dim=8, reg=0.02),
                         OptimConfig(optimizer="sgd", lr=0.03),
                         TrainConfig(**SMALL, epochs=2, checkpoint_every=5)), crashing)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and 1 <= saved["step"] <= 6
    assert (steps + saved["step"]) % 5 == 0
    assert len(saved["history"]) == 1 and len(saved["loss_sums"]) == 1
    resumed = run_train(trainer_shards_dir, run, epochs=2, resume=True, checkpoint_every=5)
    assert without_measured(resumed) == without_measured(straight)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    straight_lines = [json.loads(x) for x in
                      (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "train_loss", "val_rmse", "val_mae", "lr"):
        assert [h[key] for h in lines] == [h[key] for h in straight_lines], key


def without_measured(metrics: dict) -> dict:
    """Final metrics less what is measured, not computed: times and each rank's peak RSS."""
    kept = {k: v for k, v in metrics.items()
            if k not in ("train_seconds", "train_ratings_per_s", "ranking_seconds")}
    kept["ranks"] = [{k: v for k, v in rank.items() if k != "peak_rss_bytes"}
                     for rank in metrics["ranks"]]
    return kept


def test_mid_epoch_checkpoint_refuses_another_shape(trainer_shards_dir: Path,
                                                    tmp_path: Path) -> None:
    crashing = DistEnv(**{**SINGLE.__dict__, "test_fault": TestFault("raise", 0, 10)})
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train(run_config(trainer_shards_dir, run,
                         ModelConfig(dim=8, reg=0.02),
                         OptimConfig(optimizer="sgd", lr=0.03),
                         TrainConfig(**SMALL, epochs=1, checkpoint_every=4)), crashing)
    with pytest.raises(InputError, match=r"written mid-epoch by a run with 1 rank\(s\), 256 "
                                         r"ratings .* this run has 1 rank\(s\), 512"):
        run_train(trainer_shards_dir, run, epochs=1, resume=True, batch_size=512)


def test_fresh_run_removes_a_stale_checkpoint(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """So that a torchrun restart before this run's first checkpoint cannot resume another."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"an older run's")
    crashing = DistEnv(**{**SINGLE.__dict__, "test_fault": TestFault("raise", 0, 1)})
    with pytest.raises(RuntimeError, match="injected"):
        train(run_config(trainer_shards_dir, run,
                         ModelConfig(reg=0.05, dim=8),
                         OptimConfig(),
                         TrainConfig(**SMALL, epochs=1)), crashing)
    assert not (run / "checkpoint.pt").exists()
