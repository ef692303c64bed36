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
  finite ratings inside the scale.

Readers that stream shards should open them with ``page_checksum_verification=True``
(``pq.ParquetFile``) so that damage after this check is still caught page by page.
"""

from __future__ import annotations

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
    for entry in manifest.all_files():
        path = manifest.check_file(entry, sha256=True)
        if full:
            _check_values(path, entry, manifest)
    return manifest


def _check_values(path: Path, entry: ShardFile, manifest: Manifest) -> None:
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
    ratings = table["rating"].to_numpy()
    low, high = manifest.scale
    bad = ~np.isfinite(ratings) | (ratings < low) | (ratings > high)
    if bad.any():
        value = float(ratings[np.flatnonzero(bad)[0]])
        raise InputError(f"shard {name}: rating {value:g} outside the manifest's scale "
                         f"{low:g}..{high:g}")
