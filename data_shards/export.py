"""Write a shard set's splits back as plain TSV with original ids, so that other tools
(Surprise, Spark, LibRec, implicit, a notebook) can train and test on exactly the same rows.

A header line names the columns: ``user item rating [timestamp]`` for ratings, ``user item
weight [timestamp]`` for interactions (their weight; 1 each when the input had none), so
that ``shardmf prepare`` reads an export back as the same kind."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from shardmf.manifest import SPLITS, Manifest
from shardmf.outputs import output_folder


def export_split(shards_dir: str | Path, out_dir: str | Path,
                 overwrite: bool = False) -> dict[str, int]:
    """OUT/train.tsv, val.tsv, test.tsv: a header, then user, item, rating or weight
    [, timestamp] per row.

    Returns the rows written per split. Shards are read one file at a time, so memory is
    bounded by the largest shard, not the split. OUT is written whole or not at all, and
    replaced (``overwrite``) only when it is an earlier export-split.
    """
    root = Path(shards_dir)
    manifest = Manifest.load(root)
    users = pd.read_parquet(root / manifest.users_file)["original_user_id"].to_numpy()
    items = pd.read_parquet(root / manifest.items_file)["original_item_id"].to_numpy()
    names = {"user_id": "user", "item_id": "item",
             "rating": "rating" if manifest.kind == "ratings" else "weight"}
    written = {}
    with output_folder(out_dir, "export-split", overwrite=overwrite,
                       inputs=[str(root)]) as tmp:
        for split in SPLITS:
            rows = 0
            with (tmp / f"{split}.tsv").open("w", newline="") as handle:
                for number, entry in enumerate(manifest.files[split]):
                    path = manifest.check_file(entry, sha256=True)  # never parse damage
                    frame = pq.read_table(path).to_pandas().rename(columns=names)
                    frame["user"] = users[frame["user"].to_numpy()]
                    frame["item"] = items[frame["item"].to_numpy()]
                    frame.to_csv(handle, sep="\t", header=number == 0, index=False,
                                 lineterminator="\n")
                    rows += len(frame)
            written[split] = rows
    return written
