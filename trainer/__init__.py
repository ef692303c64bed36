"""Distributed training of a biased matrix factorisation on shards, and what it learned.

Uses torch and pyarrow, never Dask; reads shards only through their manifest.
"""

from trainer.clustering import ClusterConfig
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.distributed import DistEnv, init_distributed, teardown
from trainer.errors import InputError
from trainer.run import cluster_run
from trainer.train import train

__all__ = ["ClusterConfig", "DistEnv", "InputError", "ModelConfig", "OptimConfig",
           "TrainConfig", "cluster_run", "init_distributed", "teardown", "train"]
