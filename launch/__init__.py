"""The shardmf command line and the launchers behind it (torchrun, Dask clusters).

The exports are imported on first use (PEP 562): the ``shardmf`` console script
(`launch.console`) must start in a few milliseconds, so that a Ctrl-C at any moment ends
in its one line.
"""

import importlib

_HOMES = {"TorchrunOptions": "launch.torchrun", "launch_training": "launch.torchrun"}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'launch' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return __all__
