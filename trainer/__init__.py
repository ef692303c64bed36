"""Distributed training of a biased matrix factorisation on shards, and what it learned.

Uses torch and pyarrow, never Dask; reads shards only through their manifest.
"""

from trainer.config import (
    RUN_CONFIGS,
    ClusterConfig,
    ModelConfig,
    OptimConfig,
    RankingConfig,
    TrainConfig,
)
from trainer.distributed import DistEnv, init_distributed, teardown
from trainer.errors import InputError
from trainer.post_step import cluster_run
from trainer.run import TrainedRun, evaluate_run, export_run, load_run
from trainer.train import train

__all__ = ["RUN_CONFIGS", "ClusterConfig", "DistEnv", "InputError", "ModelConfig",
           "OptimConfig", "RankingConfig", "TrainConfig", "TrainedRun", "cluster_run",
           "evaluate_run", "export_run", "init_distributed", "load_run", "teardown", "train"]
