"""Write a shard set's splits back as plain TSV with original ids, so that other tools
(Surprise, Spark, LibRec, a notebook) can train and test on exactly the same rows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from shardmf.manifest import SPLITS, Manifest
from shardmf.outputs import output_folder


def export_split(shards_dir: str | Path, out_dir: str | Path,
                 overwrite: bool = False) -> dict[str, int]:
    """OUT/train.tsv, val.tsv, test.tsv: user, item, rating[, timestamp], no header.

    Returns the rows written per split. Shards are read one file at a time, so memory is
    bounded by the largest shard, not the split. OUT is written whole or not at all, and
    replaced (``overwrite``) only when it is an earlier export-split.
    """
    root = Path(shards_dir)
    manifest = Manifest.load(root)
    users = pd.read_parquet(root / manifest.users_file)["original_user_id"].to_numpy()
    items = pd.read_parquet(root / manifest.items_file)["original_item_id"].to_numpy()
    written = {}
    with output_folder(out_dir, "export-split", overwrite=overwrite,
                       inputs=[str(root)]) as tmp:
        for split in SPLITS:
            rows = 0
            with (tmp / f"{split}.tsv").open("w", newline="") as handle:
                for entry in manifest.files[split]:
                    frame = pq.read_table(root / entry.path).to_pandas()
                    frame["user_id"] = users[frame["user_id"].to_numpy()]
                    frame["item_id"] = items[frame["item_id"].to_numpy()]
                    frame.to_csv(handle, sep="\t", header=False, index=False,
                                 lineterminator="\n")
                    rows += len(frame)
            written[split] = rows
    return written
