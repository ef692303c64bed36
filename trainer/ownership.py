"""Users owned by one rank: shards partitioned by user let each rank keep only its users' rows.

``shardmf prepare --partition-by user`` puts all of a user's ratings (train, val and test)
in shard k of each split, and records every user's shard in users.parquet. A rank that
reads whole shards then sees every rating of its users and of no one else's, so their
embeddings can live on that rank alone: nothing about users is ever communicated, only
item rows are synchronised, and the user table per rank shrinks with the world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from shardmf.errors import InputError
from trainer.config import USER_EMBEDDINGS
from trainer.distributed import DistEnv
from trainer.shards import Piece, ShardSet, balanced_owners


@dataclass(frozen=True)
class UserOwnership:
    """The shards a rank reads and the users whose rows it holds.

    Attributes:
        shards: train shard numbers of this rank (val and test shards of the same numbers).
        users: (n,) sorted global ids of the owned users; local row j is user ``users[j]``.
        local_rows: (num_users,) int32, global id -> local row, -1 for other ranks' users.
    """

    shards: frozenset[int]
    users: np.ndarray
    local_rows: np.ndarray

    def pieces(self, shard_set: ShardSet, split: str) -> list[Piece]:
        return shard_set.pieces(split, self.shards)


def resolve_user_embeddings(choice: str, shards: ShardSet, env: DistEnv,
                            gradients: str) -> UserOwnership | None:
    """This rank's ownership when user rows are owned, None when they are replicated.

    auto: owned for several ranks on gloo over shards partitioned by user (unless dense
    gradients are asked for); replicated otherwise.
    """
    if choice not in USER_EMBEDDINGS:
        raise InputError(f"--user-embeddings {choice!r}: expected one of "
                         f"{' | '.join(USER_EMBEDDINGS)}")
    partitioned = shards.partition_scheme == "user"
    if choice == "auto":
        wanted = (partitioned and env.world_size > 1 and env.backend == "gloo"
                  and gradients != "dense")
        if not wanted:
            return None
    elif choice == "replicated":
        return None
    if not partitioned:
        raise InputError(f"--user-embeddings owned: {shards.root} is not partitioned by user; "
                         "prepare it with `shardmf prepare ... --partition-by user`")
    if gradients == "dense":
        raise InputError("--user-embeddings owned synchronises item rows only, as sparse "
                         "gradients; drop --gradients dense (or use --user-embeddings "
                         "replicated)")
    if env.backend == "nccl":
        raise InputError("--user-embeddings owned runs on gloo (CPU) for now; on GPUs use "
                         "--user-embeddings replicated")
    return user_ownership(shards, env)


def user_ownership(shards: ShardSet, env: DistEnv) -> UserOwnership:
    """Whole train shards to ranks, balanced by rows; a rank owns the users of its shards."""
    entries = shards.files["train"]
    if any(entry.shard is None for entry in entries):
        raise InputError(f"{shards.root}: the manifest does not number its shards (made by an "
                         "older shardmf); prepare the shards again to own users by rank")
    rows = {entry.shard: entry.rows for entry in entries}
    numbers = sorted(rows)
    filled = sum(1 for n in numbers if rows[n] > 0)
    if filled < env.world_size:
        # Largest first, one to each rank: with enough non-empty shards none goes without.
        raise InputError(f"{shards.root}: {filled} non-empty train shards for "
                         f"{env.world_size} ranks; a rank owns whole shards, so prepare with "
                         f"--num-shards at least {env.world_size} (a multiple of it balances "
                         "best), or use fewer processes")
    owners = balanced_owners([rows[n] for n in numbers], env.world_size)
    mine = frozenset(n for n, owner in zip(numbers, owners) if owner == env.rank)
    user_shards = pq.read_table(shards.root / shards.users_file,
                                columns=[shards.users_file_column]).column(0).to_numpy()
    users = np.flatnonzero(np.isin(user_shards, list(mine)))
    local_rows = np.full(len(user_shards), -1, dtype=np.int32)
    local_rows[users] = np.arange(len(users), dtype=np.int32)
    return UserOwnership(mine, users, local_rows)
