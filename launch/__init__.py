"""The shardmf command line and the launchers behind it (torchrun, Dask clusters)."""

from launch.torchrun import TorchrunOptions, launch_training

__all__ = ["TorchrunOptions", "launch_training"]
