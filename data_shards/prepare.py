"""Validate ratings, encode ids, split them and write Parquet shards plus a manifest.

The source is read twice with Dask, so memory stays bounded by partitions and distinct
ids, never by the number of ratings:

1. statistics: row count, bad values, rating range and the distinct user and item ids
   (the global vocabularies; never per-partition codes, dask#1836);
2. encode and route: every rating gets contiguous ids, a split and a shard from a hash
   of its (user, item, seed), and lands in a staging folder per (split, shard).

Then each (split, shard) bucket is finalised on its own: repeated (user, item) pairs are
found there (a pair always hashes to one bucket), rows are put in a seeded random order,
and the shard is written with row groups sized for streaming. Everything goes to a
temporary folder renamed into place at the end, manifest last.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.dask import TqdmCallback

from data_shards.errors import InputError
from data_shards.metadata import read_item_metadata
from data_shards.sources import (
    RatingSource,
    SourceOptions,
    diagnose_text,
    read_ratings,
    resolve_source,
)

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
SPLITS = ("train", "val", "test")
DUPLICATE_POLICIES = ("error", "last", "mean")
TRAIN_ROWS_PER_SHARD = 2_000_000  # auto shard count: enough shards to keep each this small
MIN_SHARDS = 8
_MIX_SHARD = np.uint64(0x9E3779B97F4A7C15)
_MIX_ORDER = np.uint64(0xD1B54A32D192ED03)


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """How ratings become shards; every field has a CLI flag of the same name."""

    val_fraction: float = 0.05  # share of ratings for validation, by hash of (user, item, seed)
    test_fraction: float = 0.05  # share of ratings for test
    seed: int = 0  # drives the split, the shard assignment and the row order
    num_shards: int | None = None  # train shards (val/test get as many); None: auto
    row_group_size: int = 65_536  # rows per Parquet row group: the unit a rank streams
    rating_range: tuple[float, float] | None = None  # declared scale; None: the layout's or data's
    items: str | None = None  # item metadata file; MovieLens siblings are found automatically
    genre_sep: str | None = None  # separator of genres in --items; None: detected
    duplicates: str = "error"  # repeated (user, item) pairs: error | last | mean
    overwrite: bool = False  # replace an existing output folder

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InputError(f"--{name.replace('_', '-')} {value}: expected 0 <= x < 1")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise InputError(f"--val-fraction {self.val_fraction} plus --test-fraction "
                             f"{self.test_fraction} leave no training ratings")
        if self.num_shards is not None and self.num_shards < 1:
            raise InputError(f"--num-shards {self.num_shards}: expected at least 1")
        if self.row_group_size < 1:
            raise InputError(f"--row-group-size {self.row_group_size}: expected at least 1")
        if self.rating_range is not None and not self.rating_range[0] < self.rating_range[1]:
            raise InputError(f"--rating-range {self.rating_range}: expected MIN < MAX")
        if self.duplicates not in DUPLICATE_POLICIES:
            raise InputError(f"--duplicates {self.duplicates!r}: expected one of "
                             f"{', '.join(DUPLICATE_POLICIES)}")


def prepare(inputs: list[str], out_dir: str | Path, config: PrepareConfig,
            source_options: SourceOptions | None = None) -> dict:
    """Write SHARDS_DIR from rating files; return its manifest. Uses the current Dask scheduler."""
    started = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise InputError(f"{out} already exists and is not empty; pass --overwrite to "
                         "replace it or choose another --out")
    source = resolve_source(inputs, source_options or SourceOptions())
    log.info("reading %d file(s) as %s", len(source.paths), source.layout)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    created = next((p for p in reversed(out.parents) if not p.exists()), None)
    tmp.mkdir(parents=True)
    try:
        manifest = _prepare_into(tmp, source, config)
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        _write_json(tmp / "manifest.json", manifest)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:  # folders made for --out go too: nothing is left behind
            shutil.rmtree(created, ignore_errors=True)
        raise
    return manifest


def _prepare_into(tmp: Path, source: RatingSource, config: PrepareConfig) -> dict:
    scale = config.rating_range or source.rating_scale
    ratings = _guarded(source, scale, lambda: read_ratings(source))
    stats = _statistics(ratings, source, scale)
    user_vocab = _vocabulary(stats["users"])
    item_vocab = _vocabulary(stats["items"])
    scale = scale or (stats["min"], stats["max"])
    num_shards = config.num_shards or max(
        MIN_SHARDS, math.ceil(stats["rows"] * (1 - config.val_fraction - config.test_fraction)
                              / TRAIN_ROWS_PER_SHARD))
    staging = tmp / "_staging"
    routed = ratings.map_partitions(
        _route_partition, dask.delayed(user_vocab), dask.delayed(item_vocab),
        config.seed, config.val_fraction, config.test_fraction, num_shards,
        meta=_routed_meta("timestamp" in ratings.columns),
    )
    with TqdmCallback(desc="encode and split", mininterval=1.0, leave=False):
        _guarded(source, scale, lambda: routed.to_parquet(
            staging, partition_on=["split", "shard"], write_index=False))
    for split in SPLITS:
        (tmp / split).mkdir()
    tasks = [
        dask.delayed(_finalise_shard)(staging, tmp, split_code, shard, len(user_vocab),
                                      len(item_vocab), "timestamp" in ratings.columns, config)
        for split_code in range(len(SPLITS)) for shard in range(num_shards)
    ]
    with TqdmCallback(desc="write shards", mininterval=1.0, leave=False):
        shards = dask.compute(*tasks)
    shutil.rmtree(staging)
    return _finish(tmp, source, config, shards, user_vocab, item_vocab, scale, num_shards)


def _guarded(source: RatingSource, scale, action):
    """Turn a parse failure deep inside Dask into one message naming the file and line."""
    try:
        return action()
    except InputError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, pa.ArrowException, OSError) as e:
        if source.is_parquet:
            raise InputError(f"{', '.join(source.paths)}: cannot be read as ratings "
                             f"({str(e).splitlines()[-1]})") from e
        raise diagnose_text(source, scale) from e


def _statistics(ratings: dd.DataFrame, source: RatingSource, scale) -> dict:
    rating = ratings["rating"]
    bad = ~np.isfinite(rating)
    if scale is not None:
        bad = bad | (rating < scale[0]) | (rating > scale[1])
    tasks = {
        "rows": ratings.shape[0],
        "bad": bad.sum(),
        "missing_ids": ratings["user"].isna().sum() + ratings["item"].isna().sum(),
        "min": rating.min(),
        "max": rating.max(),
        "users": ratings["user"].dropna().unique(),
        "items": ratings["item"].dropna().unique(),
    }
    with TqdmCallback(desc="read and validate", mininterval=1.0, leave=False):
        values = _guarded(source, scale, lambda: dict(zip(tasks, dask.compute(*tasks.values()))))
    if values["rows"] == 0:
        raise InputError(f"{', '.join(source.paths)}: no ratings found (only a header, or "
                         "empty files)")
    if values["bad"] or values["missing_ids"]:
        if source.is_parquet:
            raise InputError(
                f"{', '.join(source.paths)}: {int(values['bad'])} rows with a missing, "
                f"non-finite or out-of-range rating and {int(values['missing_ids'])} missing "
                f"ids (expected finite ratings" +
                (f" in {scale[0]:g}..{scale[1]:g})" if scale else ")"))
        raise diagnose_text(source, scale)
    return values


def _vocabulary(uniques: pd.Series) -> pd.Index:
    """Sorted distinct ids: numeric order when every id is a canonical integer."""
    values = pd.Series(uniques)
    if pd.api.types.is_integer_dtype(values.dtype):
        return pd.Index(np.sort(values.to_numpy(dtype="int64")))
    text = values.astype("str")
    if text.str.fullmatch(r"0|-?[1-9][0-9]{0,17}").all():  # "-0", "007": text, not 0 and 7
        return pd.Index(np.sort(text.astype("int64").to_numpy()))
    return pd.Index(np.sort(text.to_numpy(dtype=object)).astype(str), dtype="str")


def _canonical(values: pd.Series, vocab: pd.Index) -> pd.Series:
    if pd.api.types.is_integer_dtype(vocab.dtype):
        return values.astype("int64")
    return values.astype("str")


def pair_hash(users: pd.Series, items: pd.Series, seed: int) -> np.ndarray:
    """A 64-bit hash of (user, item, seed) that no partitioning or shard count can change."""
    hu = pd.util.hash_pandas_object(users, index=False).to_numpy()
    hi = pd.util.hash_pandas_object(items, index=False).to_numpy()
    # The seed term wraps modulo 2**64 in Python: numpy warns on scalar uint64 overflow.
    salt = np.uint64(seed * int(_MIX_SHARD) % 2**64)
    return _mix(hu ^ _mix(hi + salt))


def split_codes(hashes: np.ndarray, val_fraction: float, test_fraction: float) -> np.ndarray:
    """0 train, 1 val, 2 test, from the top 53 bits of the hash as a uniform [0, 1)."""
    uniform = (hashes >> np.uint64(11)).astype(np.float64) * 2.0**-53
    train_end = 1.0 - val_fraction - test_fraction
    return np.where(uniform < train_end, 0, np.where(uniform < train_end + val_fraction, 1, 2)
                    ).astype(np.int8)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole word."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _route_partition(frame: pd.DataFrame, user_vocab: pd.Index, item_vocab: pd.Index,
                     seed: int, val_fraction: float, test_fraction: float, num_shards: int,
                     partition_info: dict | None = None) -> pd.DataFrame:
    users = _canonical(frame["user"], user_vocab)
    items = _canonical(frame["item"], item_vocab)
    hashes = pair_hash(users, items, seed)
    number = partition_info["number"] if partition_info else 0
    out = pd.DataFrame({
        "user_id": user_vocab.get_indexer(users).astype(np.int32),
        "item_id": item_vocab.get_indexer(items).astype(np.int32),
        "rating": frame["rating"].to_numpy(dtype=np.float32),
    })
    if "timestamp" in frame:
        out["timestamp"] = frame["timestamp"].to_numpy(dtype=np.int64)
    # Input order, for --duplicates last when there is no timestamp.
    out["seq"] = (np.int64(number) << np.int64(40)) + np.arange(len(frame), dtype=np.int64)
    out["order"] = _mix(hashes ^ _MIX_ORDER).view(np.int64)
    out["split"] = split_codes(hashes, val_fraction, test_fraction)
    out["shard"] = (_mix(hashes ^ _MIX_SHARD) % np.uint64(num_shards)).astype(np.int32)
    return out


def _routed_meta(with_time: bool) -> pd.DataFrame:
    dtypes = {"user_id": "int32", "item_id": "int32", "rating": "float32"}
    if with_time:
        dtypes["timestamp"] = "int64"
    dtypes.update({"seq": "int64", "order": "int64", "split": "int8", "shard": "int32"})
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in dtypes.items()})


def _finalise_shard(staging: Path, out: Path, split_code: int, shard: int, num_users: int,
                    num_items: int, with_time: bool, config: PrepareConfig) -> dict:
    """Resolve repeated pairs, shuffle and write one shard; returns its manifest entry."""
    bucket = staging / f"split={split_code}" / f"shard={shard}"
    table = pq.read_table(bucket) if bucket.exists() else None
    # An empty shard keeps the full schema (timestamp included), like every other shard.
    frame = table.to_pandas() if table is not None else _routed_meta(with_time).drop(
        columns=["split", "shard"])
    frame = frame.drop(columns=[c for c in ("split", "shard") if c in frame], errors="ignore")
    frame, duplicates = _resolve_duplicates(frame, config.duplicates)
    frame = frame.sort_values("order", kind="stable").drop(columns=["order", "seq"])
    split = SPLITS[split_code]
    name = f"{split}/part-{shard:05d}.parquet"
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer,
                   row_group_size=config.row_group_size, compression="snappy")
    data = buffer.getvalue()
    (out / name).write_bytes(data)
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    entry = {
        "path": name,
        "rows": len(frame),
        "row_groups": [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "duplicates": duplicates,
        "rating_sum": float(frame["rating"].to_numpy(dtype=np.float64).sum()),
        "rating_min": float(frame["rating"].min()) if len(frame) else None,
        "rating_max": float(frame["rating"].max()) if len(frame) else None,
    }
    if split == "train":
        entry["user_counts"] = np.bincount(frame["user_id"], minlength=num_users)
        entry["item_counts"] = np.bincount(frame["item_id"], minlength=num_items)
    return entry


def _resolve_duplicates(frame: pd.DataFrame, policy: str) -> tuple[pd.DataFrame, dict]:
    repeated = frame.duplicated(["user_id", "item_id"], keep=False)
    if not repeated.any():
        return frame, {"pairs": 0, "rows": 0, "examples": []}
    examples = frame.loc[repeated, ["user_id", "item_id"]].drop_duplicates().head(5)
    found = {"pairs": int(frame.loc[repeated, ["user_id", "item_id"]].drop_duplicates().shape[0]),
             "rows": int(repeated.sum()),
             "examples": examples.to_numpy().tolist()}
    if policy == "error":
        return frame, found
    by_time = ["timestamp", "seq"] if "timestamp" in frame else ["seq"]
    ordered = frame.sort_values(by_time, kind="stable")
    kept = ordered.drop_duplicates(["user_id", "item_id"], keep="last")
    if policy == "mean":
        means = ordered.groupby(["user_id", "item_id"], sort=False)["rating"].mean()
        index = pd.MultiIndex.from_frame(kept[["user_id", "item_id"]])
        kept = kept.assign(rating=means.reindex(index).to_numpy(dtype=np.float32))
    return kept, found


def _finish(tmp: Path, source: RatingSource, config: PrepareConfig, shards: tuple[dict, ...],
            user_vocab: pd.Index, item_vocab: pd.Index, scale, num_shards: int) -> dict:
    by_split = {s: [e for e in shards if e["path"].startswith(f"{s}/")] for s in SPLITS}
    repeated = sum(e["duplicates"]["pairs"] for e in shards)
    if repeated and config.duplicates == "error":
        examples = [ex for e in shards for ex in e["duplicates"]["examples"]][:3]
        shown = ", ".join(f"(user {user_vocab[u]!s}, item {item_vocab[i]!s})"
                          for u, i in examples)
        raise InputError(f"{', '.join(source.paths)}: {repeated} (user, item) pairs are rated "
                         f"more than once, e.g. {shown}; pass --duplicates last or "
                         "--duplicates mean to keep one rating per pair")
    train = by_split["train"]
    user_counts = sum(e.pop("user_counts") for e in train)
    item_counts = sum(e.pop("item_counts") for e in train)
    counts = {s: sum(e["rows"] for e in by_split[s]) for s in SPLITS}
    if counts["train"] == 0:
        raise InputError(f"{', '.join(source.paths)}: no rating fell into the training split")
    train_mean = sum(e["rating_sum"] for e in train) / counts["train"]
    kept_min = min(e["rating_min"] for e in shards if e["rating_min"] is not None)
    kept_max = max(e["rating_max"] for e in shards if e["rating_max"] is not None)
    for entry in shards:
        for key in ("rating_sum", "rating_min", "rating_max"):
            entry.pop(key)
        entry["duplicates"] = {k: entry["duplicates"][k] for k in ("pairs", "rows")}

    _write_parquet(tmp / "users.parquet", pd.DataFrame({
        "user_id": np.arange(len(user_vocab), dtype=np.int32),
        "original_user_id": user_vocab.to_numpy(),
        "train_ratings": user_counts.astype(np.int64),
    }))
    items = _item_table(source, config, item_vocab, item_counts)
    _write_parquet(tmp / "items.parquet", items)
    return {
        "format_version": MANIFEST_VERSION,
        "created_by": "shardmf prepare",
        "sources": source.describe(),
        "item_metadata": {
            "path": config.items or source.items_path,
            "titles": bool(items["title"].notna().any()),
            "genres": bool(items["genres"].notna().any()),
        },
        "columns": dict(source.columns),
        "id_types": {"user": _id_type(user_vocab), "item": _id_type(item_vocab)},
        "counts": {
            "users": len(user_vocab),
            "items": len(item_vocab),
            "ratings": counts,
            "users_without_train_ratings": int((user_counts == 0).sum()),
            "items_without_train_ratings": int((item_counts == 0).sum()),
            "duplicate_pairs": repeated,
        },
        "rating": {"min": kept_min, "max": kept_max, "train_mean": train_mean,
                   "scale": [float(scale[0]), float(scale[1])]},
        "split": {"method": "hash", "seed": config.seed,
                  "fractions": {"train": round(1 - config.val_fraction
                                               - config.test_fraction, 10),
                                "val": config.val_fraction, "test": config.test_fraction}},
        "partition": {"scheme": "random", "num_shards": num_shards,
                      "row_group_size": config.row_group_size},
        "duplicates": config.duplicates,
        "config": {k: v for k, v in asdict(config).items() if k != "overwrite"},
        "files": {s: sorted(by_split[s], key=lambda e: e["path"]) for s in SPLITS},
        "users_file": "users.parquet",
        "items_file": "items.parquet",
    }


def _item_table(source: RatingSource, config: PrepareConfig, vocab: pd.Index,
                counts: np.ndarray) -> pd.DataFrame:
    items = pd.DataFrame({"item_id": np.arange(len(vocab), dtype=np.int32),
                          "original_item_id": vocab.to_numpy()})
    path = config.items or source.items_path
    if path:
        meta = read_item_metadata(path, config.genre_sep, source.storage_options)
        keys = (pd.to_numeric(meta["item"], errors="coerce").astype("Int64")
                if pd.api.types.is_integer_dtype(vocab.dtype) else meta["item"])
        meta = meta.assign(key=keys).dropna(subset=["key"]).drop_duplicates("key")
        joined = meta.set_index("key").reindex(vocab)
        items["title"] = joined["title"].to_numpy(dtype=object)
        items["genres"] = joined["genres"].to_numpy(dtype=object)
        matched = int(joined["item"].notna().sum())
        if matched == 0:
            raise InputError(f"{path}: none of its item ids match the ratings' item ids "
                             f"(e.g. {meta['item'].iloc[0]!r} vs {vocab[0]!r})")
        log.info("item metadata for %d of %d items from %s", matched, len(vocab), path)
    else:
        items["title"] = None
        items["genres"] = None
    items["title"] = items["title"].astype("str").where(items["title"].notna())
    items["genres"] = items["genres"].astype("str").where(items["genres"].notna())
    items["train_ratings"] = counts.astype(np.int64)
    return items


def _id_type(vocab: pd.Index) -> str:
    return "int64" if pd.api.types.is_integer_dtype(vocab.dtype) else "string"


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an old one is moved aside first, then removed."""
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
