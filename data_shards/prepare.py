"""Validate ratings or interactions, encode ids, split them and write Parquet shards plus a
manifest.

Interactions (plays, clicks: no rating) go the same way: their weight (1.0 each without a
weight column) takes the place of the rating, repeated pairs add up by default, and the
manifest's ``kind`` says which the shards hold.

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

import contextlib
import dataclasses
import hashlib
import io
import logging
import math
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.system import CPU_COUNT
from tqdm.dask import TqdmCallback

from data_shards.config import (
    MIN_SHARDS,
    TRAIN_ROWS_PER_SHARD,
    USER_PARTITION_RATINGS,
    PrepareConfig,
)
from data_shards.metadata import read_item_metadata
from data_shards.sources import (
    REJECT_COLUMNS,
    WEIGHT_RANGE,
    RatingSource,
    SourceOptions,
    bad_row_reasons,
    diagnose_text,
    line_numbers,
    read_ratings,
    read_ratings_checked,
    resolve_source,
)
from shardmf.errors import InputError
from shardmf.manifest import (
    ID_FILES_KEY,
    SPLITS,
    Footer,
    id_file_entry,
    manifest_version,
    write_manifest,
)
from shardmf.outputs import is_write_fault, no_interrupts, output_folder
from shardmf.progress import bars_wanted

log = logging.getLogger(__name__)

# Page checksums let a reader find a damaged page as it reads it
# (page_checksum_verification=True); bench/verify_cost.md measures their cost.
SHARD_WRITE_OPTIONS = {"compression": "snappy", "write_page_checksum": True}
_MIX_SHARD = np.uint64(0x9E3779B97F4A7C15)
_MIX_ORDER = np.uint64(0xD1B54A32D192ED03)
_MIX_USER = np.uint64(0x8CB92BA72F3D8DD7)


MAX_REJECT_EXAMPLES = 1000
# The ``given`` column of pre-split inputs: -1 (main input: the split method decides), 1, 2.
GIVEN_CODES = {"train": -1, "val": 1, "test": 2}


@dataclass(frozen=True)
class _Plan:
    """What routing needs to give every rating its split and staging bucket."""

    seed: int
    split: str  # a SPLIT_METHODS entry
    val_fraction: float  # effective, for the main input
    test_fraction: float
    cutoffs: tuple[float, float] | None  # temporal: train < c0 <= val < c1 <= test
    num_shards: int
    partition_by: str

    @property
    def restage(self) -> bool:
        """leave-last needs a user's ratings together; random partition then moves them."""
        return self.split == "leave-last" and self.partition_by == "random"


def prepare(inputs: list[str], out_dir: str | Path, config: PrepareConfig,
            source_options: SourceOptions | None = None, *,
            val_inputs: list[str] | None = None, test_inputs: list[str] | None = None) -> dict:
    """Write SHARDS_DIR from rating or interaction files; return its manifest. Uses the
    current Dask scheduler.

    ``val_inputs``/``test_inputs`` are already-split files (read like ``inputs``) that become
    the val/test shards as given; ``inputs`` then all go to train, except for a split not
    given, which the split method takes from ``inputs`` as usual.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    if (val_inputs or test_inputs) and config.split != "random":
        raise InputError(f"split={config.split!r} and `val_input`/`test_input` exclude each "
                         "other: pre-split inputs are used as given")
    options = source_options or SourceOptions()
    sources = {"train": resolve_source(inputs, options)}
    for role, given in (("val", val_inputs), ("test", test_inputs)):
        if given:
            sources[role] = resolve_source(list(given), options)
    _check_same_kind(sources)
    for role, source in sources.items():
        log.info("reading %d %s file(s) as %s %s", len(source.paths), role, source.layout,
                 source.kind)
    read = [p for s in sources.values() for p in (*s.paths, s.items_path) if p]
    with (output_folder(out, "shards", overwrite=config.overwrite,
                        inputs=read + ([config.items] if config.items else [])) as tmp,
          tasks_end_before_cleanup()):
        manifest = _prepare_into(tmp, sources, config)
        manifest["seconds"] = round(time.perf_counter() - started, 3)
        write_manifest(tmp, manifest)
    return manifest


@contextlib.contextmanager
def tasks_end_before_cleanup() -> Iterator[None]:
    """Run threaded Dask tasks on a pool this block owns, and wait for them when it ends.

    On an error or Ctrl-C, Dask's threaded scheduler returns at once and leaves its
    threads running: a task still writing (``to_parquet`` creates its folders) would
    re-create the temporary folder after it was removed. Waiting here first makes the
    cleanup final. Other schedulers ignore the pool (a synchronous run has no threads; a
    distributed cluster's workers are ended by whoever owns the cluster).
    """
    pool = ThreadPoolExecutor(dask.config.get("num_workers", None) or CPU_COUNT)
    try:
        with dask.config.set(pool=pool):
            yield
    finally:
        with no_interrupts():  # a second Ctrl-C must not cut the wait short
            pool.shutdown(wait=True, cancel_futures=True)


def _all_paths(sources: dict[str, RatingSource]) -> str:
    return ", ".join(p for s in sources.values() for p in s.paths)


def _check_same_kind(sources: dict[str, RatingSource]) -> None:
    """Pre-split inputs must hold what the main input holds, weighted or not alike."""
    main = sources["train"]
    for role, source in sources.items():
        if (source.kind, "rating" in source.columns) != (main.kind, "rating" in main.columns):
            raise InputError(f"{source.paths[0]} ({role}) holds {_described(source)} but "
                             f"{main.paths[0]} holds {_described(main)}; pass `kind` (and "
                             "`rating_col`) so that both are read alike")


def _described(source: RatingSource) -> str:
    if source.kind == "ratings":
        return "ratings"
    column = source.columns.get("rating")
    return f"interactions weighted by {column!r}" if column else "unweighted interactions"


def _noun(sources: dict[str, RatingSource]) -> str:
    """What the rows are, for messages: "ratings" or "interactions" (the kind's name)."""
    return sources["train"].kind


def _duplicates_policy(duplicates: str | None, kind: str) -> str:
    """``duplicates`` resolved for the kind of data: by default interactions add their
    weights (two plays weigh 2) and ratings stop; adding up ratings is refused."""
    if duplicates is None:
        return "sum" if kind == "interactions" else "error"
    if duplicates == "sum" and kind == "ratings":
        raise InputError("duplicates='sum' adds up the weights of interactions, not ratings; "
                         "use duplicates='last' or 'mean' (or kind='interactions')")
    return duplicates


def _read_all(sources: dict[str, RatingSource], scale, skip: bool):
    """One frame over every input (a ``given`` column when there are pre-split ones)."""
    frames, blocks = [], []
    for role, source in sources.items():
        if skip:
            frame, found = _guarded(sources, scale,
                                    lambda s=source: read_ratings_checked(s, scale))
            if found:  # block numbers index one list over all inputs
                frame = frame.assign(block=frame["block"].where(frame["block"] < 0,
                                                                frame["block"] + len(blocks)))
                blocks.extend(found)
        else:
            frame = _guarded(sources, scale, lambda s=source: read_ratings(s))
        if len(sources) > 1:
            frame = frame.assign(given=np.int8(GIVEN_CODES[role]))
        frames.append(frame)
    with_time = all("timestamp" in f.columns for f in frames)
    if not with_time:
        frames = [f.drop(columns="timestamp") if "timestamp" in f.columns else f
                  for f in frames]
    checked = frames[0] if len(frames) == 1 else dd.concat(frames)
    return checked, blocks, with_time


def _prepare_into(tmp: Path, sources: dict[str, RatingSource], config: PrepareConfig) -> dict:
    main = sources["train"]
    interactions = main.kind == "interactions"
    if interactions and config.rating_range is not None:
        raise InputError(f"rating_range={config.rating_range}: {_all_paths(sources)} holds "
                         "interactions, whose weights need only be finite and >= 0; leave "
                         "rating_range out, or pass kind='ratings'")
    config = dataclasses.replace(config,
                                 duplicates=_duplicates_policy(config.duplicates, main.kind))
    # What a value may be: a weight finite and >= 0, a rating inside the declared scale.
    valid = WEIGHT_RANGE if interactions else config.rating_range or main.rating_scale
    skip = config.on_bad_rows == "skip"
    checked, blocks, with_time = _read_all(sources, valid, skip)
    if config.split in ("temporal", "leave-last") and not with_time:
        raise InputError(f"{_all_paths(sources)}: split={config.split!r} needs a timestamp "
                         f"column and found none (columns: {', '.join(main.columns.values())}); "
                         "pass `time_col` or use split='random'")
    ratings = checked
    if skip:
        ratings = checked[checked["reason"] == 0].drop(columns=list(REJECT_COLUMNS))
    stats = _statistics(ratings, sources, valid, config, checked if skip else None)
    user_vocab = _vocabulary(stats["users"])
    item_vocab = _vocabulary(stats["items"])
    # Interactions' scale is 0..the largest weight once repeats are added (in _finish).
    scale = None if interactions else valid or (stats["min"], stats["max"])
    fillable = max(MIN_SHARDS, int(stats["rows"]))
    if config.num_shards is not None and config.num_shards > fillable:
        # Each shard costs tasks and three files however empty it is.
        raise InputError(f"num_shards={config.num_shards}: more shards than "
                         f"{int(stats['rows']):,} {_noun(sources)} can fill; use at most "
                         f"{fillable:,} or leave it out for the automatic count")
    config = dataclasses.replace(
        config, partition_by=partition_scheme(config.partition_by, int(stats["rows"])))
    given = set(sources) - {"train"}
    plan = _Plan(
        seed=config.seed, split=config.split,
        val_fraction=0.0 if "val" in given else config.val_fraction,
        test_fraction=0.0 if "test" in given else config.test_fraction,
        cutoffs=_cutoffs(stats, config), partition_by=config.partition_by,
        num_shards=config.num_shards or max(MIN_SHARDS, math.ceil(
            stats["rows"] * (1 - config.val_fraction - config.test_fraction)
            / TRAIN_ROWS_PER_SHARD)))
    num_shards = plan.num_shards
    staging = tmp / "_staging"
    routed = ratings.map_partitions(
        _route_partition, dask.delayed(user_vocab), dask.delayed(item_vocab), plan,
        meta=_routed_meta(with_time, plan.restage),
    )
    with TqdmCallback(desc="encode and split", mininterval=1.0, leave=False,
                      disable=not bars_wanted(log)):
        _guarded(sources, valid, lambda: routed.to_parquet(
            staging, partition_on=["shard"], write_index=False))
    for split in SPLITS:
        (tmp / split).mkdir()
    sizes = (len(user_vocab), len(item_vocab))
    early_duplicates = []
    if plan.restage:
        # Round 1 per user bucket: duplicates, then each user's latest ratings to val/test;
        # rows then move on to the shard of their pair, where round 2 writes them.
        restaged = tmp / "_restaged"
        tasks = [dask.delayed(_finalise_shard)(staging, tmp, shard, sizes, with_time, config,
                                               plan, restaged)
                 for shard in range(num_shards)]
        with TqdmCallback(desc="leave-last per user", mininterval=1.0, leave=False,
                          disable=not bars_wanted(log)):
            early_duplicates = list(dask.compute(*tasks))
        shutil.rmtree(staging)
        staging = restaged
    tasks = [dask.delayed(_finalise_shard)(staging, tmp, shard, sizes, with_time, config,
                                           plan, None)
             for shard in range(num_shards)]
    with TqdmCallback(desc="write shards", mininterval=1.0, leave=False,
                      disable=not bars_wanted(log)):
        shards = [entry for group in dask.compute(*tasks) for entry in group]
    shutil.rmtree(staging, ignore_errors=True)
    if skip:
        _write_rejects(tmp / "rejects.csv", stats["rejects"], blocks, sources)
    manifest = _finish(tmp, sources, config, shards, early_duplicates, user_vocab, item_vocab,
                       scale, plan)
    manifest["bad_rows"] = {reason: int(stats["reasons"].get(code + 1, 0))
                            for code, reason in enumerate(bad_row_reasons(main.kind))
                            } if skip else {}
    manifest["on_bad_rows"] = config.on_bad_rows
    manifest["rejects_file"] = "rejects.csv" if skip else None
    if skip and sum(manifest["bad_rows"].values()):
        log.warning("skipped %d bad rows (%s); examples in %s",
                    sum(manifest["bad_rows"].values()),
                    ", ".join(f"{k} {v}" for k, v in manifest["bad_rows"].items() if v),
                    "rejects.csv")
    return manifest


def partition_scheme(choice: str, ratings: int) -> str:
    """The partition for ``--partition-by`` (auto: by user from USER_PARTITION_RATINGS)."""
    if choice != "auto":
        return choice
    return "user" if ratings >= USER_PARTITION_RATINGS else "random"


def _cutoffs(stats: dict, config: PrepareConfig) -> tuple[float, float] | None:
    if config.split != "temporal":
        return None
    low, high = (float(q) for q in stats["quantiles"])
    # A zero fraction must take nothing, not the ratings tied at the latest time.
    if config.test_fraction == 0:
        high = math.inf
    if config.val_fraction == 0:
        low = high
    return low, high


def _write_rejects(path: Path, rejects: pd.DataFrame, blocks: list[tuple[str, int]],
                   sources: dict[str, RatingSource]) -> None:
    rejects = rejects.head(MAX_REJECT_EXAMPLES)
    block_ids = rejects["block"].to_numpy()
    options = next(iter(sources.values())).storage_options
    lines = line_numbers(blocks, block_ids, rejects["line"].to_numpy(), options)
    parquet_paths = ", ".join(p for s in sources.values() if s.is_parquet for p in s.paths)
    frame = pd.DataFrame({
        "file": [blocks[b][0] if b >= 0 else parquet_paths for b in block_ids],
        "line": pd.array([n if n > 0 else None for n in lines], dtype="Int64"),
        "reason": [bad_row_reasons(sources["train"].kind)[c - 1]
                   for c in rejects["reason"].to_numpy()],
        "raw": rejects["raw"].to_numpy(dtype=object),
    })
    frame.to_csv(path, index=False)


def _reject_sample(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.loc[frame["reason"].to_numpy() > 0, list(REJECT_COLUMNS)].head(
        MAX_REJECT_EXAMPLES)


def _guarded(sources: dict[str, RatingSource], scale, action):
    """Turn a parse failure deep inside Dask into one message naming the file and line."""
    try:
        return action()
    except InputError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, pa.ArrowException, OSError,
            EOFError) as e:
        if is_write_fault(e):  # a full disk is no fault of the input
            raise
        raise _diagnose(sources, scale, str(e).splitlines()[-1] if str(e) else "") from e


def _diagnose(sources: dict[str, RatingSource], scale, detail: str = "") -> InputError:
    """The first bad line of any text input; else a message naming the Parquet inputs."""
    generic = None
    for source in sources.values():
        if source.is_parquet:
            continue
        error = diagnose_text(source, scale)
        if not str(error).endswith(f"could not be parsed as {source.layout} {source.kind}"):
            return error
        generic = generic or error
    parquet = [p for s in sources.values() if s.is_parquet for p in s.paths]
    if parquet:
        return InputError(f"{', '.join(parquet)}: cannot be read as {_noun(sources)} "
                          f"({detail})")
    return generic


def _statistics(ratings: dd.DataFrame, sources: dict[str, RatingSource], scale,
                config: PrepareConfig, checked: dd.DataFrame | None) -> dict:
    rating = ratings["rating"]
    bad = ~np.isfinite(rating)
    if scale is not None:
        bad = bad | (rating < scale[0]) | (rating > scale[1])
    tasks = {
        "rows": ratings.shape[0],
        "bad": bad.sum(),
        "missing_ids": ratings["user"].isna().sum() + ratings["item"].isna().sum(),
        "bad_times": ratings["timestamp"].isna().sum() if "timestamp" in ratings.columns else 0,
        "min": rating.min(),
        "max": rating.max(),
        "users": ratings["user"].dropna().unique(),
        "items": ratings["item"].dropna().unique(),
    }
    if checked is not None:
        tasks["reasons"] = checked["reason"].value_counts()
        tasks["rejects"] = checked.map_partitions(_reject_sample,
                                                  meta=checked._meta[list(REJECT_COLUMNS)])
    if config.split == "temporal":
        first = 1.0 - config.val_fraction - config.test_fraction
        # float64: dask cannot take quantiles of a nullable Int64 (seconds fit exactly)
        tasks["quantiles"] = ratings["timestamp"].astype("float64").quantile(
            [first, 1.0 - config.test_fraction])
    with TqdmCallback(desc="read and validate", mininterval=1.0, leave=False,
                      disable=not bars_wanted(log)):
        values = _guarded(sources, scale,
                          lambda: dict(zip(tasks, dask.compute(*tasks.values()))))
    if values["rows"] == 0:
        rejected = int(values["reasons"].sum()) if checked is not None else 0
        raise InputError(f"{_all_paths(sources)}: no {_noun(sources)} found (" + (
            f"all {rejected} rows were rejected as bad; see the reasons with `on_bad_rows` "
            "error)" if rejected else "only a header, or empty files)"))
    if values["bad"] or values["missing_ids"] or values["bad_times"]:
        if all(s.is_parquet for s in sources.values()):
            if sources["train"].kind == "interactions":
                values_wrong, expected = "negative weight", "finite weights >= 0"
            else:
                values_wrong = "out-of-range rating"
                expected = "finite ratings" + (f" in {scale[0]:g}..{scale[1]:g}" if scale
                                               else "")
            raise InputError(
                f"{_all_paths(sources)}: {int(values['bad'])} rows with a missing, "
                f"non-finite or {values_wrong}, {int(values['missing_ids'])} missing "
                f"ids and {int(values['bad_times'])} missing or unreadable timestamps "
                f"(expected {expected}); pass on_bad_rows='skip' to drop them")
        raise _diagnose(sources, scale)
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


def user_hash(users: pd.Series, seed: int) -> np.ndarray:
    """A 64-bit hash of (user, seed): the shard of a user under --partition-by user."""
    hu = pd.util.hash_pandas_object(users, index=False).to_numpy()
    salt = np.uint64((seed + 1) * int(_MIX_ORDER) % 2**64)
    return _mix(hu ^ _mix(hu + salt) ^ _MIX_USER)


def _route_partition(frame: pd.DataFrame, user_vocab: pd.Index, item_vocab: pd.Index,
                     plan: _Plan, partition_info: dict | None = None) -> pd.DataFrame:
    users = _canonical(frame["user"], user_vocab)
    items = _canonical(frame["item"], item_vocab)
    hashes = pair_hash(users, items, plan.seed)
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
    if plan.split == "random":
        split = split_codes(hashes, plan.val_fraction, plan.test_fraction)
    elif plan.split == "temporal":
        stamps = out["timestamp"].to_numpy()
        low, high = plan.cutoffs
        split = np.where(stamps < low, 0, np.where(stamps < high, 1, 2)).astype(np.int8)
    else:  # leave-last: decided per user when the bucket is finalised
        split = np.full(len(frame), -1, dtype=np.int8)
    if "given" in frame:
        given = frame["given"].to_numpy(dtype=np.int8)
        split = np.where(given >= 0, given, split).astype(np.int8)
    out["split"] = split
    pair_shard = (_mix(hashes ^ _MIX_SHARD) % np.uint64(plan.num_shards)).astype(np.int32)
    if plan.partition_by == "user" or plan.split == "leave-last":
        user_shard = (user_hash(users, plan.seed) % np.uint64(plan.num_shards))
        out["shard"] = user_shard.astype(np.int32)
        if plan.restage:
            out["pair_shard"] = pair_shard
    else:
        out["shard"] = pair_shard
    return out


def _routed_meta(with_time: bool, restage: bool = False) -> pd.DataFrame:
    dtypes = {"user_id": "int32", "item_id": "int32", "rating": "float32"}
    if with_time:
        dtypes["timestamp"] = "int64"
    dtypes.update({"seq": "int64", "order": "int64", "split": "int8", "shard": "int32"})
    if restage:
        dtypes["pair_shard"] = "int32"
    return pd.DataFrame({k: pd.Series(dtype=v) for k, v in dtypes.items()})


def _leave_last_codes(frame: pd.DataFrame, count: int) -> np.ndarray:
    """Each user's latest ``count`` ratings -> test (2), the ``count`` before -> val (1).

    Latest by (timestamp, input order). A user's earliest rating always stays in train, so
    no user is left without training ratings by the split itself.
    """
    n = len(frame)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    users = frame["user_id"].to_numpy()
    order = np.lexsort((-frame["seq"].to_numpy(), -frame["timestamp"].to_numpy(), users))
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)  # 0: the user's latest rating
    codes = np.where(rank < count, 2, np.where(rank < 2 * count, 1, 0)).astype(np.int8)
    codes[rank == np.repeat(sizes, sizes) - 1] = 0
    out = np.empty(n, dtype=np.int8)
    out[order] = codes
    return out


_NO_DUPLICATES = {"pairs": 0, "rows": 0, "examples": []}


def _finalise_shard(staging: Path, out: Path, shard: int, sizes: tuple[int, int],
                    with_time: bool, config: PrepareConfig, plan: _Plan,
                    restage: Path | None) -> list[dict] | dict:
    """Resolve repeated pairs, settle leave-last splits, shuffle and write one shard's files.

    A pair always lands in one bucket (its shard depends on the pair or on its user), so
    repeats are found here, across splits. Returns the train/val/test manifest entries, or,
    with ``restage``, writes the rows on to the bucket of their pair and returns the
    duplicates found.
    """
    bucket = staging / f"shard={shard}"
    table = pq.read_table(bucket) if bucket.exists() else None
    # An empty shard keeps the full schema (timestamp included), like every other shard.
    frame = table.to_pandas() if table is not None else _routed_meta(
        with_time, restage is not None)
    frame = frame.drop(columns=["shard"], errors="ignore")
    frame, duplicates = _resolve_duplicates(frame, config.duplicates)
    if plan.split == "leave-last" and len(frame) and (frame["split"].to_numpy() < 0).any():
        frame["split"] = _leave_last_codes(frame, config.leave_last)
    if restage is not None:
        for target, part in frame.groupby("pair_shard", sort=True):
            folder = restage / f"shard={int(target)}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(part.drop(columns=["pair_shard"]),
                                                preserve_index=False),
                           folder / f"part-{shard:05d}.parquet")
        return duplicates
    frame = frame.drop(columns=["pair_shard"], errors="ignore")
    frame = frame.sort_values("order", kind="stable")
    codes = frame["split"].to_numpy()
    frame = frame.drop(columns=["order", "seq", "split"])
    return [_write_shard(out, split, shard, frame[codes == code],
                         duplicates if code == 0 else _NO_DUPLICATES, sizes, config)
            for code, split in enumerate(SPLITS)]


def _write_shard(out: Path, split: str, shard: int, frame: pd.DataFrame, duplicates: dict,
                 sizes: tuple[int, int], config: PrepareConfig) -> dict:
    name = f"{split}/part-{shard:05d}.parquet"
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer,
                   row_group_size=config.row_group_size, **SHARD_WRITE_OPTIONS)
    data = buffer.getvalue()
    (out / name).write_bytes(data)
    metadata = pq.ParquetFile(io.BytesIO(data)).metadata
    ratings = frame["rating"].to_numpy(dtype=np.float64)
    entry = {
        "path": name,
        "shard": shard,  # under --partition-by user, train/val/test shard k share their users
        "rows": len(frame),
        "row_groups": [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "footer": asdict(Footer.of(data)),
        "duplicates": duplicates,
        "rating_sum": float(ratings.sum()),
        "rating_square_sum": float(np.dot(ratings, ratings)),
        "rating_min": float(frame["rating"].min()) if len(frame) else None,
        "rating_max": float(frame["rating"].max()) if len(frame) else None,
    }
    users = frame["user_id"].to_numpy()
    if split == "train":
        # int32 halves what the driver holds until the counts are summed (a shard < 2**31).
        entry["user_counts"] = np.bincount(users, minlength=sizes[0]).astype(np.int32)
        entry["item_counts"] = np.bincount(frame["item_id"], minlength=sizes[1]).astype(
            np.int32)
        if config.partition_by == "user":
            entry["users"] = int(np.count_nonzero(entry["user_counts"]))
            entry["user_id_min"] = int(users.min()) if len(users) else None
            entry["user_id_max"] = int(users.max()) if len(users) else None
    else:
        entry["distinct_users"] = np.unique(users)
        entry["distinct_items"] = np.unique(frame["item_id"].to_numpy())
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
    # The last row of a pair stays (its time, and its split where rows of a pair differ);
    # mean and sum then replace its value.
    kept = ordered.drop_duplicates(["user_id", "item_id"], keep="last")
    if policy in ("mean", "sum"):
        values = ordered["rating"].astype(np.float64).groupby(
            [ordered["user_id"], ordered["item_id"]], sort=False)
        combined = values.mean() if policy == "mean" else values.sum()
        index = pd.MultiIndex.from_frame(kept[["user_id", "item_id"]])
        kept = kept.assign(rating=combined.reindex(index).to_numpy(dtype=np.float32))
    return kept, found


def _finish(tmp: Path, sources: dict[str, RatingSource], config: PrepareConfig,
            shards: list[dict], early_duplicates: list[dict], user_vocab: pd.Index,
            item_vocab: pd.Index, scale, plan: _Plan) -> dict:
    source = sources["train"]
    by_split = {s: [e for e in shards if e["path"].startswith(f"{s}/")] for s in SPLITS}
    found = [e["duplicates"] for e in shards] + list(early_duplicates)
    repeated = sum(d["pairs"] for d in found)
    if repeated and config.duplicates == "error":
        examples = [ex for d in found for ex in d["examples"]][:3]
        shown = ", ".join(f"(user {user_vocab[u]!s}, item {item_vocab[i]!s})"
                          for u, i in examples)
        if source.kind == "interactions":
            raise InputError(f"{_all_paths(sources)}: {repeated} (user, item) pairs occur "
                             f"more than once, e.g. {shown}; pass duplicates='sum' (the "
                             "default for interactions) to add their weights, or 'last' or "
                             "'mean'")
        raise InputError(f"{_all_paths(sources)}: {repeated} (user, item) pairs are rated "
                         f"more than once, e.g. {shown}; pass duplicates='last' or "
                         "duplicates='mean' to keep one rating per pair")
    train = by_split["train"]
    user_counts = np.zeros(len(user_vocab), dtype=np.int64)
    item_counts = np.zeros(len(item_vocab), dtype=np.int64)
    for entry in train:
        user_counts += entry.pop("user_counts")
        item_counts += entry.pop("item_counts")
    counts = {s: sum(e["rows"] for e in by_split[s]) for s in SPLITS}
    if counts["train"] == 0:
        raise InputError(f"{_all_paths(sources)}: no {source.row_name} fell into the training "
                         "split")
    held_out = {}
    for split in ("val", "test"):
        users = np.unique(np.concatenate([e.pop("distinct_users") for e in by_split[split]]))
        items = np.unique(np.concatenate([e.pop("distinct_items") for e in by_split[split]]))
        held_out[split] = {"users": len(users), "items": len(items),
                           "users_unseen_in_train": int((user_counts[users] == 0).sum()),
                           "items_unseen_in_train": int((item_counts[items] == 0).sum())}
    train_mean = sum(e["rating_sum"] for e in train) / counts["train"]
    train_variance = sum(e["rating_square_sum"] for e in train) / counts["train"] - train_mean**2
    kept_min = min(e["rating_min"] for e in shards if e["rating_min"] is not None)
    kept_max = max(e["rating_max"] for e in shards if e["rating_max"] is not None)
    if scale is None:  # interactions: weights from 0 up to the largest, repeats added
        scale = (0.0, kept_max)
    for entry in shards:
        for key in ("rating_sum", "rating_square_sum", "rating_min", "rating_max"):
            entry.pop(key)
        entry["duplicates"] = {k: entry["duplicates"][k] for k in ("pairs", "rows")}

    users_table = pd.DataFrame({
        "user_id": np.arange(len(user_vocab), dtype=np.int32),
        "original_user_id": user_vocab.to_numpy(),
        "train_ratings": user_counts,
    })
    partition = {"scheme": plan.partition_by, "num_shards": plan.num_shards,
                 "row_group_size": config.row_group_size}
    if plan.partition_by == "user":
        # The train shard that holds all of a user's ratings: the rank that reads it can own
        # those users' embeddings alone.
        vocab = pd.Series(user_vocab.to_numpy())
        vocab = vocab.astype("int64") if _id_type(user_vocab) == "int64" else vocab.astype("str")
        users_table["shard"] = (user_hash(vocab, config.seed)
                                % np.uint64(plan.num_shards)).astype(np.int32)
        partition["users_file_column"] = "shard"
    _write_parquet(tmp / "users.parquet", users_table)
    items_source = next((s for s in sources.values() if s.items_path), source)
    items = _item_table(items_source, config, item_vocab, item_counts)
    _write_parquet(tmp / "items.parquet", items)
    split_info = {"method": "given" if len(sources) > 1 else config.split, "seed": config.seed}
    if config.split in ("random", "temporal") or len(sources) > 1:
        split_info["fractions"] = {
            "train": round(1 - config.val_fraction - config.test_fraction, 10),
            "val": config.val_fraction, "test": config.test_fraction}
    if len(sources) > 1:
        split_info["given"] = sorted(set(sources) - {"train"})
        split_info["fractions"] = {"val": plan.val_fraction, "test": plan.test_fraction}
    if plan.cutoffs is not None:
        split_info["cutoffs"] = {"val_from": _json_number(plan.cutoffs[0]),
                                 "test_from": _json_number(plan.cutoffs[1])}
    if config.split == "leave-last":
        split_info["leave_last"] = config.leave_last
    split_info.update(held_out)
    described = []
    for role, src in sources.items():
        described += [{**d, "split": role} if len(sources) > 1 else d for d in src.describe()]
    kind = {"kind": source.kind}
    if source.kind == "interactions":  # None: every interaction weighs 1
        kind["weight_column"] = source.columns.get("rating")
    return {
        "format_version": manifest_version(source.kind),
        "created_by": "shardmf prepare",
        **kind,
        "sources": described,
        "item_metadata": {
            "path": config.items or items_source.items_path,
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
                   "train_std": math.sqrt(max(train_variance, 0.0)),
                   "scale": [float(scale[0]), float(scale[1])]},
        "split": split_info,
        "partition": partition,
        "duplicates": config.duplicates,
        "config": {k: v for k, v in asdict(config).items() if k != "overwrite"},
        "files": {s: sorted(by_split[s], key=lambda e: e["path"]) for s in SPLITS},
        "users_file": "users.parquet",
        "items_file": "items.parquet",
        ID_FILES_KEY: {name: id_file_entry(tmp / name)
                       for name in ("users.parquet", "items.parquet")},
    }


def _json_number(value: float) -> float | None:
    return None if math.isinf(value) else float(value)


def _item_table(source: RatingSource, config: PrepareConfig, vocab: pd.Index,
                counts: np.ndarray) -> pd.DataFrame:
    items = pd.DataFrame({"item_id": np.arange(len(vocab), dtype=np.int32),
                          "original_item_id": vocab.to_numpy()})
    path = config.items or source.items_path
    if path:
        meta = read_item_metadata(path, config.genre_sep, source.storage_options)
        example = meta["item"].iloc[0] if len(meta) else None  # before ids that match no type
        keys = (pd.to_numeric(meta["item"], errors="coerce").astype("Int64")
                if pd.api.types.is_integer_dtype(vocab.dtype) else meta["item"])
        meta = meta.assign(key=keys).dropna(subset=["key"]).drop_duplicates("key")
        joined = meta.set_index("key").reindex(vocab)
        items["title"] = joined["title"].to_numpy(dtype=object)
        items["genres"] = joined["genres"].to_numpy(dtype=object)
        matched = int(joined["item"].notna().sum())
        if matched == 0:
            raise InputError(f"{path}: none of its item ids match the {source.kind}' item ids "
                             f"(e.g. {example!r} vs {vocab[:1].tolist()[0]!r})")
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

