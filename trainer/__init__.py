"""Distributed training of a biased matrix factorisation on shards, and what it learned.

Uses torch and pyarrow, never Dask; reads shards only through their manifest. The names
below are imported on first use (PEP 562), so ``import trainer.config`` (the command
line's help) does not pay for torch.
"""

import importlib
import sys
import types

_HOMES = {
    "RUN_CONFIGS": "trainer.config", "ClusterConfig": "trainer.config",
    "ModelConfig": "trainer.config", "OptimConfig": "trainer.config",
    "RankingConfig": "trainer.config", "TrainConfig": "trainer.config",
    "DistEnv": "trainer.distributed", "init_distributed": "trainer.distributed",
    "teardown": "trainer.distributed", "InputError": "shardmf.errors",
    "cluster_run": "trainer.analysis", "TrainedRun": "trainer.run",
    "evaluate_run": "trainer.run", "export_run": "trainer.run", "load_run": "trainer.run",
    "train": "trainer.train",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """The submodule ``trainer.train`` and the function ``train`` share a name: when the
    import system binds the submodule here, the package keeps the function instead (as
    an eager ``from trainer.train import train`` in this file used to)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "train" and isinstance(value, types.ModuleType):
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
