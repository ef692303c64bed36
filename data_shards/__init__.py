"""Ratings in, Parquet shards and a manifest out: reading, validation, id encoding, splits.

Uses Dask and pyarrow, never torch; the manifest is the only contract with ``trainer``.
The names below are imported on first use (PEP 562), so ``import data_shards.config``
(the command line's help) does not pay for Dask.
"""

import importlib
import sys
import types

_HOMES = {
    "InputError": "shardmf.errors", "PrepareConfig": "data_shards.config",
    "SourceOptions": "data_shards.config", "SynthConfig": "data_shards.config",
    "fetch_movielens": "data_shards.movielens", "movielens_path": "data_shards.movielens",
    "prepare": "data_shards.prepare", "synthesize": "data_shards.synth",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'data_shards' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """The submodule ``data_shards.prepare`` and the function ``prepare`` share a name: when
    the import system binds the submodule here, the package keeps the function instead (as
    trainer's package does for ``train``)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "prepare" and isinstance(value, types.ModuleType):
            value = value.prepare
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
