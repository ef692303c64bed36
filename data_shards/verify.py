"""Check a shard folder against its manifest, and the manifest against itself.

Two depths (``bench/verify_cost.md`` has the measured costs on a 20M-row set):

- quick (the default of ``shardmf verify``): the manifest's own sums (ratings per split
  against per-file rows, rows against row groups, users and items against the id tables),
  every file's size, Parquet footer (rows, row groups, id ranges from column statistics)
  and the SHA-256 of every byte. A flipped byte anywhere is found; hashing costs about a
  tenth of a second per GB.
- full: also decodes every page with Parquet page checksums verified (shards are written
  with ``write_page_checksum=True``) and checks every value: ids inside the vocabularies,
  finite ratings inside the scale.

Readers that stream shards should open them with ``page_checksum_verification=True``
(``pq.ParquetFile``) so that damage after this check is still caught page by page.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_shards.errors import InputError

SPLITS = ("train", "val", "test")
SUPPORTED_MANIFEST_VERSIONS = (1,)
HASH_CHUNK = 8 * 2**20


def verify_shards(shards_dir: str | Path, full: bool = False) -> dict:
    """Raise ``InputError`` naming the first mismatch; return the manifest when all agree."""
    root = Path(shards_dir)
    manifest = _load_manifest(root)
    _check_manifest_sums(root, manifest)
    counts = manifest["counts"]
    for split in SPLITS:
        for entry in manifest["files"][split]:
            path = _check_file(root, entry, counts["users"], counts["items"])
            if full:
                _check_values(path, entry, counts["users"], counts["items"],
                              manifest["rating"]["scale"])
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _load_manifest(root: Path) -> dict:
    path = root / "manifest.json"
    if not path.is_file():
        hint = (" (a folder without manifest.json is an unfinished or foreign folder)"
                if root.is_dir() else "")
        raise InputError(f"{path}: not found{hint}; create shards with "
                         "`shardmf prepare INPUT --out SHARDS_DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version not in SUPPORTED_MANIFEST_VERSIONS:
        raise InputError(f"{path}: format version {version!r}, this shardmf reads "
                         f"{SUPPORTED_MANIFEST_VERSIONS}; re-create the shards")
    return manifest


def _check_manifest_sums(root: Path, manifest: dict) -> None:
    """The manifest's totals must follow from its per-file entries and the id tables."""
    where = root / "manifest.json"
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
            rows = _footer(root, manifest[key]).num_rows
            if rows != counts[side]:
                raise InputError(f"{where}: counts.{side} is {counts[side]:,} but "
                                 f"{manifest[key]} has {rows:,} rows")
    except (KeyError, TypeError) as e:
        raise InputError(f"{where}: a required entry is missing or malformed ({e!r}); "
                         "re-create the shards") from e


def _footer(root: Path, name: str) -> pq.FileMetaData:
    path = root / name
    if not path.is_file():
        raise InputError(f"{path}: missing; the manifest lists it (re-run `shardmf prepare`)")
    try:
        return pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({e})") from e


def _check_file(root: Path, entry: dict, num_users: int, num_items: int) -> Path:
    name = entry["path"]
    path = root / name
    if not path.is_file():
        raise InputError(f"shard {name}: missing from {root}; the manifest lists it "
                         "(re-run `shardmf prepare` or restore the file)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise InputError(f"shard {name}: {size:,} bytes, manifest says {entry['bytes']:,} "
                         "(the file changed after prepare)")
    metadata = _footer(root, name)
    if metadata.num_rows != entry["rows"]:
        raise InputError(f"shard {name}: {metadata.num_rows:,} rows, manifest says "
                         f"{entry['rows']:,}")
    groups = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    if groups != entry["row_groups"]:
        raise InputError(f"shard {name}: row groups {groups} differ from the manifest's "
                         f"{entry['row_groups']}")
    limits = {"user_id": num_users, "item_id": num_items}
    for group in range(metadata.num_row_groups):
        for column in range(metadata.num_columns):
            chunk = metadata.row_group(group).column(column)
            limit = limits.get(chunk.path_in_schema)
            stats = chunk.statistics
            if limit is None or stats is None or not stats.has_min_max:
                continue
            if stats.min < 0 or stats.max >= limit:
                raise InputError(f"shard {name}: {chunk.path_in_schema} in "
                                 f"{stats.min}..{stats.max}, the manifest counts {limit:,}")
    digest = file_sha256(path)
    if digest != entry["sha256"]:
        raise InputError(f"shard {name}: checksum {digest[:12]}… differs from the "
                         f"manifest's {entry['sha256'][:12]}… (corrupt or replaced)")
    return path


def _check_values(path: Path, entry: dict, num_users: int, num_items: int,
                  scale: list[float]) -> None:
    name = entry["path"]
    try:
        table = pq.ParquetFile(path, page_checksum_verification=True).read()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"shard {name}: a damaged page ({e})") from e
    for column, limit in (("user_id", num_users), ("item_id", num_items)):
        ids = table[column].to_numpy()
        if len(ids) and (ids.min() < 0 or ids.max() >= limit):
            raise InputError(f"shard {name}: {column} in {ids.min()}..{ids.max()}, the "
                             f"manifest counts {limit:,}")
    ratings = table["rating"].to_numpy()
    low, high = scale
    bad = ~np.isfinite(ratings) | (ratings < low) | (ratings > high)
    if bad.any():
        value = float(ratings[np.flatnonzero(bad)[0]])
        raise InputError(f"shard {name}: rating {value:g} outside the manifest's scale "
                         f"{low:g}..{high:g}")
