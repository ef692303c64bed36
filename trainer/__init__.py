"""Distributed training of a biased matrix factorisation on shards, and what it learned.

Uses torch and pyarrow, never Dask; reads shards only through their manifest.
"""

from trainer.clustering import ClusterConfig
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.distributed import DistEnv, init_distributed, teardown
from trainer.errors import InputError
from trainer.run import TrainedRun, cluster_run, load_run
from trainer.train import train

__all__ = ["ClusterConfig", "DistEnv", "InputError", "ModelConfig", "OptimConfig",
           "TrainConfig", "TrainedRun", "cluster_run", "init_distributed", "load_run",
           "teardown", "train"]
