"""Read SHARDS_DIR through its manifest, check the files match it, and share them among ranks.

The manifest is the only contract with ``data_shards``: global facts (number of users and
items, the training mean, the rating scale) come from it, never from a rank's own shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardmf.errors import InputError
from shardmf.manifest import Manifest
from trainer.config import VERIFY_MODES


@dataclass(frozen=True)
class Piece:
    """One Parquet row group: the unit of work a rank streams."""

    path: Path
    row_group: int
    rows: int


@dataclass(frozen=True)
class ShardSet(Manifest):
    """A checked shard folder: its manifest's global facts, and its row groups as pieces."""

    def pieces(self, split: str, shards: frozenset[int] | None = None) -> list[Piece]:
        """Every row group of a split in manifest order, or of the given shard numbers only."""
        return [Piece(self.root / entry.path, index, rows)
                for entry in self.files[split]
                if shards is None or entry.shard in shards
                for index, rows in enumerate(entry.row_groups) if rows > 0]


def open_shards(shards_dir: str | Path, verify: str = "quick") -> ShardSet:
    """Load the manifest and check every file against it.

    ``quick`` checks the manifest's counts against its file entries and the id tables,
    and compares sizes, row counts, row groups and id ranges (reads Parquet footers only);
    ``full`` also compares SHA-256 checksums; ``none`` trusts the manifest. Pages are
    checked as they are read (trainer/data.py), where the shards carry page checksums.
    """
    if verify not in VERIFY_MODES:
        raise InputError(f"--verify {verify!r}: expected one of {', '.join(VERIFY_MODES)}")
    shard_set = ShardSet.load(shards_dir)
    if verify != "none":
        shard_set.check_sums()
        for entry in shard_set.all_files():
            shard_set.check_file(entry, sha256=verify == "full")
    return shard_set


def pieces_for_rank(pieces: list[Piece], rank: int, world_size: int) -> list[Piece]:
    """A deterministic share of the row groups, balanced by rows rather than by count.

    Ranks end within one row group of each other, so none wraps around its data much more
    often.
    """
    owners = balanced_owners([piece.rows for piece in pieces], world_size)
    return [piece for piece, owner in zip(pieces, owners) if owner == rank]


def balanced_owners(sizes: list[int], world_size: int) -> list[int]:
    """The rank of each item: largest first, each to the rank holding the least so far."""
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        lightest = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = lightest
        loads[lightest] += sizes[index]
    return owners
