"""Helpers shared by several test modules (no test module imports another)."""

from __future__ import annotations

from pathlib import Path

from trainer.config import ModelConfig, OptimConfig, RankingConfig, RunConfig, TrainConfig


def run_config(shards: str | Path, run: str | Path, model: ModelConfig | None = None,
               optim: OptimConfig | None = None, train: TrainConfig | None = None,
               ranking: RankingConfig | None = None) -> RunConfig:
    """A training run's config, every section defaulted unless given, no clustering."""
    return RunConfig(shards_dir=str(shards), run_dir=str(run), model=model or ModelConfig(),
                     optim=optim or OptimConfig(), train=train or TrainConfig(),
                     ranking=ranking or RankingConfig())
