"""Read SHARDS_DIR through its manifest, check the files match it, and share them among ranks.

The manifest is the only contract with ``data_shards``: global facts (number of users and
items, the training mean, the rating scale) come from it, never from a rank's own shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from trainer.config import VERIFY_MODES
from trainer.errors import InputError

SUPPORTED_MANIFEST_VERSIONS = (1,)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Piece:
    """One Parquet row group: the unit of work a rank streams."""

    path: Path
    row_group: int
    rows: int


@dataclass(frozen=True)
class ShardSet:
    """A verified shard folder and the global facts its manifest records."""

    root: Path
    manifest: dict

    @property
    def num_users(self) -> int:
        return int(self.manifest["counts"]["users"])

    @property
    def num_items(self) -> int:
        return int(self.manifest["counts"]["items"])

    @property
    def train_mean(self) -> float:
        return float(self.manifest["rating"]["train_mean"])

    @property
    def scale(self) -> tuple[float, float]:
        low, high = self.manifest["rating"]["scale"]
        return float(low), float(high)

    @property
    def identity(self) -> str:
        """A short hash of the manifest's file entries (paths, sizes, rows, SHA-256s): equal
        for the same shards wherever they lie, different for another split or data set."""
        entries = json.dumps(self.manifest["files"], sort_keys=True).encode("utf-8")
        return hashlib.sha256(entries).hexdigest()[:16]

    def rows(self, split: str) -> int:
        return int(self.manifest["counts"]["ratings"][split])

    def pieces(self, split: str, shards: frozenset[int] | None = None) -> list[Piece]:
        """Every row group of a split in manifest order, or of the given shard numbers only."""
        return [Piece(self.root / entry["path"], index, rows)
                for entry in self.manifest["files"][split]
                if shards is None or entry.get("shard") in shards
                for index, rows in enumerate(entry["row_groups"]) if rows > 0]


def open_shards(shards_dir: str | Path, verify: str = "quick") -> ShardSet:
    """Load the manifest and check every file against it.

    ``quick`` checks the manifest's counts against its file entries and the id tables,
    and compares sizes, row counts, row groups and id ranges (reads Parquet footers only);
    ``full`` also compares SHA-256 checksums; ``none`` trusts the manifest. Pages are
    checked as they are read (trainer/data.py), where the shards carry page checksums.
    """
    if verify not in VERIFY_MODES:
        raise InputError(f"--verify {verify!r}: expected one of {', '.join(VERIFY_MODES)}")
    root = Path(shards_dir)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        hint = (" (a folder without manifest.json is an unfinished or foreign folder)"
                if root.is_dir() else "")
        raise InputError(f"{manifest_path}: not found{hint}; create shards with "
                         "`shardmf prepare INPUT --out SHARDS_DIR`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{manifest_path}: not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if version not in SUPPORTED_MANIFEST_VERSIONS:
        raise InputError(f"{manifest_path}: format version {version!r}, this trainer reads "
                         f"{SUPPORTED_MANIFEST_VERSIONS}; re-create the shards with this version")
    shard_set = ShardSet(root, manifest)
    if verify != "none":
        _check_manifest_sums(manifest_path, manifest)
        limits = {"user_id": shard_set.num_users, "item_id": shard_set.num_items}
        for split in SPLITS:
            for entry in manifest["files"][split]:
                _verify_file(root, entry, limits, full=verify == "full")
    return shard_set


def _check_manifest_sums(where: Path, manifest: dict) -> None:
    """The manifest's counts must follow from its own file entries and the id tables
    (the same checks as data_shards/verify.py), so an edited count is named, not an
    IndexError in the middle of training."""
    root = where.parent
    try:
        counts = manifest["counts"]
        for split in SPLITS:
            entries = manifest["files"][split]
            for entry in entries:
                if sum(entry["row_groups"]) != entry["rows"]:
                    raise InputError(f"{where}: {entry['path']} has {entry['rows']:,} rows "
                                     f"but row groups of {sum(entry['row_groups']):,}")
            listed = sum(int(entry["rows"]) for entry in entries)
            if listed != counts["ratings"][split]:
                raise InputError(f"{where}: counts.ratings.{split} is "
                                 f"{counts['ratings'][split]:,} but its files hold "
                                 f"{listed:,} rows (the manifest was edited or is damaged)")
        for side, key in (("users", "users_file"), ("items", "items_file")):
            rows = _footer(root / manifest[key]).num_rows
            if rows != counts[side]:
                raise InputError(f"{where}: counts.{side} is {counts[side]:,} but "
                                 f"{manifest[key]} has {rows:,} rows (the manifest was "
                                 "edited or is damaged)")
    except (KeyError, TypeError) as e:
        raise InputError(f"{where}: a required entry is missing or malformed ({e!r}); "
                         "re-create the shards") from e


def _footer(path: Path) -> pq.FileMetaData:
    if not path.is_file():
        raise InputError(f"{path}: missing; the manifest lists it (re-run `shardmf prepare` "
                         "or restore the file)")
    try:
        return pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a damaged footer
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e


def _verify_file(root: Path, entry: dict, limits: dict[str, int], full: bool) -> None:
    path = root / entry["path"]
    if not path.is_file():
        raise InputError(f"shard {entry['path']}: missing from {root}; the manifest lists it "
                         "(re-run `shardmf prepare` or restore the file)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise InputError(f"shard {entry['path']}: {size:,} bytes, manifest says "
                         f"{entry['bytes']:,} (the file changed after prepare)")
    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a damaged footer
        raise InputError(f"shard {entry['path']}: not a readable Parquet file ({e})") from e
    if metadata.num_rows != entry["rows"]:
        raise InputError(f"shard {entry['path']}: {metadata.num_rows:,} rows, manifest says "
                         f"{entry['rows']:,}")
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    if groups != entry["row_groups"]:
        raise InputError(f"shard {entry['path']}: row groups {groups} differ from the "
                         f"manifest's {entry['row_groups']}")
    for group in range(metadata.num_row_groups):  # id ranges from the footer's statistics
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            limit, stats = limits.get(chunk.path_in_schema), chunk.statistics
            if limit is None or stats is None or not stats.has_min_max:
                continue
            if stats.min < 0 or stats.max >= limit:
                raise InputError(f"shard {entry['path']}: {chunk.path_in_schema} in "
                                 f"{stats.min}..{stats.max}, the manifest counts {limit:,}")
    if full:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise InputError(f"shard {entry['path']}: checksum {digest[:12]}… differs from "
                             f"the manifest's {entry['sha256'][:12]}… (corrupt or replaced)")


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
