"""The configs of data_shards' commands, apart from the code that does the work.

Why a module of its own: the command line builds its flags (and ``--help``) from these
dataclasses' field metadata, and the modules that read, prepare and synthesise ratings
import Dask, pandas and pyarrow at load. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import codecs
import math
from dataclasses import dataclass, field

from shardmf.errors import InputError

FORMATS = (
    "auto", "movielens-100k", "movielens-dat", "movielens-csv", "shardmf-synth",
    "csv", "tsv", "parquet",
)
DUPLICATE_POLICIES = ("error", "last", "mean")
SPLIT_METHODS = ("random", "temporal", "leave-last")
BAD_ROW_POLICIES = ("error", "skip")
TRAIN_ROWS_PER_SHARD = 2_000_000  # auto shard count: enough shards to keep each this small
MIN_SHARDS = 8
PARTITION_SCHEMES = ("auto", "user", "random")
# auto: by user from this many ratings, so several ranks can own their users (the trainer's
# large-set threshold, trainer/defaults.py); below it one process is the faster choice and a
# random partition mixes every user into every row group (ML-100K: test RMSE 0.9067 against
# 0.9068 by user, from the data order alone).
USER_PARTITION_RATINGS = 1_000_000


@dataclass(frozen=True, kw_only=True)
class SourceOptions:
    """What the user said about the input; everything left None is detected."""

    format: str = field(default="auto", metadata={
        "help": "input layout (auto: from the file names and first lines)", "choices": FORMATS})
    user_col: str | None = field(default=None, metadata={"metavar": "NAME|N",
        "help": "user id column: name, or 0-based position as digits (default: detected from "
        "the header, e.g. userId, or the layout's first field)"})
    item_col: str | None = field(default=None, metadata={"metavar": "NAME|N",
        "help": "item id column, as --user-col (default: detected, e.g. movieId, or the "
        "second field)"})
    rating_col: str | None = field(default=None, metadata={"metavar": "NAME|N",
        "help": "rating column, as --user-col (default: detected, e.g. rating, or the third "
        "field)"})
    time_col: str | None = field(default=None, metadata={"metavar": "NAME|N",
        "help": "timestamp column, as --user-col (default: detected, e.g. timestamp, or the "
        "fourth field when there is one; needed by --split temporal and leave-last)"})
    delimiter: str | None = field(default=None, metadata={"metavar": "SEP",
        "help": "field separator of text files (default: detected from the first lines)"})
    header: bool | None = field(default=None, metadata={
        "help": "whether text files start with a header line (default: detected: a "
        "non-numeric rating field means a header)"})
    encoding: str = field(default="utf-8", metadata={
        "metavar": "CODEC", "help": "text encoding of the inputs"})
    storage_options: dict = field(default_factory=dict, metadata={
        "help": "passed to fsspec (s3 keys, ...)"})

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InputError(f"--format {self.format!r} is not one of {', '.join(FORMATS)}")
        try:
            codecs.lookup(self.encoding)
        except LookupError as e:
            raise InputError(f"--encoding {self.encoding!r}: not an encoding Python knows "
                             "(e.g. utf-8, latin-1)") from e


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    """How ratings become shards; every field has a CLI flag of the same name."""

    val_fraction: float = field(default=0.05, metadata={
        "help": "share of ratings for validation (random and temporal splits)"})
    test_fraction: float = field(
        default=0.05, metadata={"help": "share of ratings for test (random and temporal splits)"})
    seed: int = field(
        default=0, metadata={"help": "drives the split, the shard assignment and the row order"})
    num_shards: int | None = field(default=None, metadata={
        "help": "train shards (val/test get as many) (default: one per "
        f"{TRAIN_ROWS_PER_SHARD:,} training ratings, at least {MIN_SHARDS})"})
    row_group_size: int = field(
        default=65_536, metadata={"help": "rows per Parquet row group: the unit a rank streams"})
    rating_range: tuple[float, float] | None = field(default=None, metadata={
        "help": "the rating scale, e.g. 1,5 (default: the layout's, e.g. MovieLens 1-5, "
        "else the lowest and highest rating in the data)"})
    items: str | None = field(default=None, metadata={"metavar": "FILE",
        "help": "item metadata file (titles, genres) (default: a MovieLens file beside the "
        "ratings when there is one, else none)"})
    genre_sep: str | None = field(default=None, metadata={"metavar": "SEP",
        "help": "separator of genres in --items (default: detected, e.g. |)"})
    duplicates: str = field(default="error", metadata={
        "help": "repeated (user, item) pairs: stop, keep the last, or average them",
        "choices": DUPLICATE_POLICIES})
    split: str = field(default="random", metadata={
        "help": "random (by hash), temporal (latest overall to val/test) or leave-last "
        "(per user)", "choices": SPLIT_METHODS})
    leave_last: int = field(default=1, metadata={
        "help": "leave-last: each user's latest N ratings to test, the N before to val"})
    partition_by: str = field(default="auto", metadata={
        "help": "shard of a rating: user (all of a user's in one, so ranks own their users) "
        "or random (by pair) (default: auto, by user from 1M ratings, else random)",
        "choices": PARTITION_SCHEMES})
    on_bad_rows: str = field(default="error", metadata={
        "help": "error: stop at the first bad row; skip: drop, count and list them in "
        "rejects.csv", "choices": BAD_ROW_POLICIES})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output folder"})

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
        for flag, value, allowed in (("duplicates", self.duplicates, DUPLICATE_POLICIES),
                                     ("split", self.split, SPLIT_METHODS),
                                     ("partition-by", self.partition_by, PARTITION_SCHEMES),
                                     ("on-bad-rows", self.on_bad_rows, BAD_ROW_POLICIES)):
            if value not in allowed:
                raise InputError(f"--{flag} {value!r}: expected one of {', '.join(allowed)}")
        if self.leave_last < 1:
            raise InputError(f"--leave-last {self.leave_last}: expected at least 1")


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Size and shape of a synthetic rating set; the same config gives the same bytes."""

    num_users: int = field(default=6_000, metadata={"help": "users in the world, ids 1..num_users"})
    num_items: int = field(default=2_000, metadata={"help": "items in the world, ids 1..num_items"})
    num_ratings: int = field(default=600_000, metadata={
        "help": "target number of ratings (repeats removed, may end slightly lower)"})
    num_genres: int = field(default=8, metadata={"help": "planted genres, one per item"})
    latent_dim: int = field(
        default=16, metadata={"help": "dimension of the planted taste/genre space"})
    noise: float = field(
        default=0.4, metadata={"help": "std of rating noise before rounding to stars"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw"})
    rows_per_file: int = field(default=2_000_000, metadata={
        "help": "upper bound on rows per Parquet file (one Dask task each)"})

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "num_ratings", "num_genres", "latent_dim"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("rows_per_file", self.rows_per_file, minimum=1)
        if isinstance(self.noise, bool) or not isinstance(self.noise, (int, float)):
            raise ValueError(f"noise must be a number of stars, got {self.noise!r}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ValueError(f"noise must be finite and >= 0 stars, got {self.noise!r}")
        if self.num_genres > self.num_items:
            raise ValueError(
                f"num_genres={self.num_genres} exceeds num_items={self.num_items}: "
                "every genre needs at least one item"
            )
        capacity = self.num_users * self.max_ratings_per_user
        if self.num_ratings > capacity:
            raise ValueError(
                f"num_ratings={self.num_ratings:,} exceeds num_users * max ratings per user "
                f"({self.num_users:,} * {self.max_ratings_per_user:,} = {capacity:,}); "
                "lower num_ratings or raise num_users or num_items"
            )
        if self.rows_per_file < 2 * self.max_ratings_per_user:
            raise ValueError(
                f"rows_per_file={self.rows_per_file:,} is below twice the max ratings per user "
                f"(2 * {self.max_ratings_per_user:,}); one user's ratings must fit in one file"
            )

    @property
    def max_ratings_per_user(self) -> int:
        """Half the items: denser users would need most of the catalogue drawn without repeats."""
        return max(1, self.num_items // 2)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
