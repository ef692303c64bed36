"""trainer/steps.py: the choice between sparse and dense gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import rank_env

from shardmf.errors import InputError
from trainer.shards import open_shards


def test_gradients_auto(trainer_shards_dir: Path) -> None:
    from trainer.steps import use_sparse_gradients

    shards = open_shards(trainer_shards_dir)  # 450 rows in all: small next to 1,024 a step
    two = rank_env(0, 2)
    assert use_sparse_gradients("auto", shards, 1024, two) is False
    assert use_sparse_gradients("auto", shards, 64, two) is True
    assert use_sparse_gradients("auto", shards, 1024, two, sync_every=4) is True
    assert use_sparse_gradients("auto", shards, 1024, rank_env(0, 1, None)) is True
    assert use_sparse_gradients("auto", shards, 64, rank_env(0, 2, "nccl")) is False
    with pytest.raises(InputError, match="--gradients sparse needs gloo"):
        use_sparse_gradients("sparse", shards, 64, rank_env(0, 2, "nccl"))
