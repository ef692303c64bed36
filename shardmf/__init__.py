"""shardmf for Python users: ``from shardmf import MatrixFactorization``.

Also the home of what both packages share, importable without Dask or torch: the one
user-error type (`shardmf.errors`), the shard folder's manifest (`shardmf.manifest`) and
the owned output folder (`shardmf.outputs`). The estimator lives in
``launch/estimator.py`` (the one package that may use both ``data_shards`` and
``trainer``) and is imported on first use (PEP 562), so importing a shared module does
not pay for torch.
"""

import importlib

_HOMES = {"MatrixFactorization": "launch.estimator"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'shardmf' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return __all__
