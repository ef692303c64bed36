"""trainer/ownership.py: users owned by rank on --partition-by user shards, built for
"rank r of n" without a process group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import copy_shards, edit_manifest, rank_env

from shardmf.errors import InputError
from trainer.data import localise_users, read_piece
from trainer.ownership import resolve_user_embeddings, user_ownership
from trainer.shards import open_shards


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_owned_users_cover_every_user_once_and_only_their_ratings(
        trainer_user_shards_dir: Path, world_size: int) -> None:
    shards = open_shards(trainer_user_shards_dir)
    owners = [user_ownership(shards, rank_env(r, world_size)) for r in range(world_size)]
    users = np.concatenate([o.users for o in owners])
    assert sorted(users.tolist()) == list(range(shards.num_users))
    assert sorted(n for o in owners for n in o.shards) == list(range(4))
    for owner in owners:
        assert np.array_equal(owner.local_rows[owner.users], np.arange(len(owner.users)))
        assert (owner.local_rows >= 0).sum() == len(owner.users)
        for split in ("train", "val", "test"):
            for piece in owner.pieces(shards, split):
                local = localise_users(read_piece(piece), piece, owner.local_rows)[0]
                assert local.min() >= 0 and local.max() < len(owner.users)
    rows = [sum(p.rows for p in o.pieces(shards, "train")) for o in owners]
    assert sum(rows) == shards.rows("train")


def test_user_embeddings_auto_and_its_errors(trainer_user_shards_dir: Path,
                                             trainer_shards_dir: Path) -> None:
    by_user = open_shards(trainer_user_shards_dir)
    random = open_shards(trainer_shards_dir)
    two = rank_env(0, 2)
    assert resolve_user_embeddings("auto", by_user, two, "auto") is not None
    assert resolve_user_embeddings("auto", by_user, two, "dense") is None
    assert resolve_user_embeddings("auto", by_user, rank_env(0, 1, None), "auto") is None
    assert resolve_user_embeddings("auto", random, two, "auto") is None
    assert resolve_user_embeddings("replicated", by_user, two, "auto") is None
    with pytest.raises(InputError, match="--partition-by user"):
        resolve_user_embeddings("owned", random, two, "auto")
    with pytest.raises(InputError, match="drop --gradients dense"):
        resolve_user_embeddings("owned", by_user, two, "dense")
    with pytest.raises(InputError, match="4 non-empty train shards for 5 ranks"):
        resolve_user_embeddings("owned", by_user, rank_env(0, 5), "auto")


def test_owned_users_need_numbered_shards(trainer_user_shards_dir: Path,
                                          tmp_path: Path) -> None:
    shards = copy_shards(trainer_user_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: [e.pop("shard") for e in m["files"]["train"]])
    with pytest.raises(InputError, match="prepare the shards again"):
        user_ownership(open_shards(shards), rank_env(0, 2))


def test_a_foreign_user_in_a_shard_is_an_error(trainer_user_shards_dir: Path) -> None:
    shards = open_shards(trainer_user_shards_dir)
    mine, theirs = (user_ownership(shards, rank_env(r, 2)) for r in (0, 1))
    piece = theirs.pieces(shards, "train")[0]
    with pytest.raises(ValueError, match="users of another rank's shard"):
        localise_users(read_piece(piece), piece, mine.local_rows)
