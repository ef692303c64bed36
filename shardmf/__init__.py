"""shardmf for Python users: ``from shardmf import MatrixFactorization``; and the pieces
every package shares (``shardmf.errors``, ``shardmf.flags``), which import neither torch
nor Dask.

The estimator lives in ``launch/estimator.py`` (the one package that uses both
``data_shards`` and ``trainer``) and is imported on first use, so importing a shared
module does not load it.
"""

import importlib

__all__ = ["MatrixFactorization"]


def __getattr__(name: str):
    if name == "MatrixFactorization":
        return importlib.import_module("launch.estimator").MatrixFactorization
    raise AttributeError(f"module 'shardmf' has no attribute {name!r}")
