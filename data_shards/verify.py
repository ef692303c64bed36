"""Check a shard folder against its manifest, and the manifest against itself.

Two depths (``bench/verify_cost.md`` has the measured costs on a 20M-row set):

- quick (the default of ``shardmf verify``): the checks of ``shardmf/manifest.py``, which
  the trainer runs too: the manifest's own sums (ratings per split against per-file rows,
  rows against row groups, users and items against the id tables), every file's size,
  Parquet footer (rows, row groups, id ranges from column statistics) and the SHA-256 of
  every byte. A flipped byte anywhere is found; hashing costs about a tenth of a second
  per GB.
- full: also decodes every page with Parquet page checksums verified (shards are written
  with ``write_page_checksum=True``) and checks every value: ids inside the vocabularies,
  finite ratings inside the scale (interactions: finite weights >= 0); and the manifest's
  facts against the values: training mean, lowest and highest rating, and the training
  ratings per user and item that the id tables record.

Readers that stream shards should open them with ``page_checksum_verification=True``
(``pq.ParquetFile``) so that damage after this check is still caught page by page.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardmf.errors import InputError
from shardmf.manifest import Manifest, ShardFile


def verify_shards(shards_dir: str | Path, full: bool = False) -> Manifest:
    """Raise ``InputError`` naming the first mismatch; return the manifest when all agree."""
    manifest = Manifest.load(shards_dir)
    manifest.check_sums()
    facts = _Facts(manifest)
    for entry in manifest.all_files():
        path = manifest.check_file(entry, sha256=True)
        if full:
            facts.add(entry, _check_values(path, entry, manifest))
    if full:
        facts.check()
    return manifest


class _Facts:
    """What the manifest says about all the values (training mean, lowest and highest
    rating, training ratings per user and item in the id tables), recomputed from them."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.train_sum = 0.0
        self.low, self.high = math.inf, -math.inf
        self.user_counts = np.zeros(manifest.num_users, dtype=np.int64)
        self.item_counts = np.zeros(manifest.num_items, dtype=np.int64)

    def add(self, entry: ShardFile, table: pa.Table) -> None:
        values = table["rating"].to_numpy().astype(np.float64)
        if len(values):
            self.low, self.high = min(self.low, values.min()), max(self.high, values.max())
        if entry.path.startswith("train/"):
            self.train_sum += float(values.sum())
            self.user_counts += np.bincount(table["user_id"].to_numpy(),
                                            minlength=self.manifest.num_users)
            self.item_counts += np.bincount(table["item_id"].to_numpy(),
                                            minlength=self.manifest.num_items)

    def check(self) -> None:
        manifest, rating = self.manifest, self.manifest.data["rating"]
        mean = self.train_sum / manifest.rows("train")
        if not math.isclose(mean, manifest.train_mean, rel_tol=1e-6, abs_tol=1e-9):
            raise InputError(f"{manifest.path}: rating.train_mean is {manifest.train_mean:g} "
                             f"but the train files' mean is {mean:g} (edited or damaged)")
        for key, found in (("min", self.low), ("max", self.high)):
            if not math.isclose(found, rating[key], rel_tol=1e-6, abs_tol=1e-9):
                raise InputError(f"{manifest.path}: rating.{key} is {rating[key]:g} but the "
                                 f"shards' {key} is {found:g} (edited or damaged)")
        for name, counts in ((manifest.users_file, self.user_counts),
                             (manifest.items_file, self.item_counts)):
            table = pq.read_table(manifest.root / name)
            if "train_ratings" not in table.column_names:
                continue  # an older shardmf's id table
            recorded = table["train_ratings"].to_numpy()
            if not np.array_equal(recorded, counts):
                row = int(np.flatnonzero(recorded != counts)[0])
                raise InputError(f"{manifest.root / name}: row {row} counts "
                                 f"{recorded[row]:,} training ratings, the train files "
                                 f"{counts[row]:,} (another set's id table, or damaged)")


def _check_values(path: Path, entry: ShardFile, manifest: Manifest) -> pa.Table:
    name = entry.path
    try:
        table = pq.ParquetFile(path, page_checksum_verification=True).read()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"shard {name}: a damaged page ({e})") from e
    for column, limit in (("user_id", manifest.num_users), ("item_id", manifest.num_items)):
        ids = table[column].to_numpy()
        if len(ids) and (ids.min() < 0 or ids.max() >= limit):
            raise InputError(f"shard {name}: {column} in {ids.min()}..{ids.max()}, the "
                             f"manifest counts {limit:,}")
    values = table["rating"].to_numpy()
    low, high = manifest.scale
    bad = ~np.isfinite(values) | (values < low) | (values > high)
    if bad.any():
        value = float(values[np.flatnonzero(bad)[0]])
        if manifest.kind == "interactions":
            raise InputError(f"shard {name}: weight {value:g} outside the manifest's "
                             f"0..{high:g} (weights are finite and >= 0)")
        raise InputError(f"shard {name}: rating {value:g} outside the manifest's scale "
                         f"{low:g}..{high:g}")
    return table
