"""Shared fixtures: small real shard sets, made once per session by the real pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

# Small enough for seconds of training on 2 cores, large enough for several row groups
# per shard (so multi-shard, multi-row-group and striding paths all run).
TRAINER_SYNTH = {"num_users": 300, "num_items": 150, "num_ratings": 20_000, "num_genres": 4,
                 "latent_dim": 8, "seed": 1}


@pytest.fixture(scope="session")
def trainer_ratings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Raw synthetic ratings (300 users, 150 items, ~20k ratings, 4 planted genres)."""
    from data_shards.synth import SynthConfig, synthesize

    raw = tmp_path_factory.mktemp("trainer_raw") / "raw"
    with dask.config.set(scheduler="synchronous"):
        synthesize(raw, SynthConfig(**TRAINER_SYNTH))
    return raw


def _prepare_shards(raw: Path, out: Path, num_shards: int, row_group_size: int,
                    partition_by: str = "random") -> Path:
    from data_shards import PrepareConfig, prepare

    with dask.config.set(scheduler="synchronous"):
        prepare([str(raw)], out, PrepareConfig(num_shards=num_shards,
                                               row_group_size=row_group_size, overwrite=True,
                                               partition_by=partition_by))
    return out


@pytest.fixture(scope="session")
def trainer_shards_dir(trainer_ratings_dir: Path,
                       tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 train shards of ~4.5k rows in row groups of 2000: read-only, copy it to change it."""
    return _prepare_shards(trainer_ratings_dir, tmp_path_factory.mktemp("trainer_shards") /
                           "shards", num_shards=4, row_group_size=2000)


@pytest.fixture(scope="session")
def trainer_user_shards_dir(trainer_ratings_dir: Path,
                            tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same ratings in 4 train shards partitioned by user (--partition-by user)."""
    return _prepare_shards(trainer_ratings_dir, tmp_path_factory.mktemp("trainer_user") /
                           "shards", num_shards=4, row_group_size=2000, partition_by="user")


@pytest.fixture(scope="session")
def trainer_uneven_shards_dir(trainer_ratings_dir: Path,
                              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 train shards of ~6k rows in row groups [4000, ~2000]: striding over 2 ranks gives
    rank 0 every 4000-row group and rank 1 every small one (about 2:1). Read-only."""
    return _prepare_shards(trainer_ratings_dir, tmp_path_factory.mktemp("trainer_uneven") /
                           "shards", num_shards=3, row_group_size=4000)


# ------------------------------------------------ data_shards: rating files in each layout
# Used by test_sources.py and test_prepare.py. Fixtures are written by the tests in the
# published formats; no MovieLens data is ever copied into the repository.

# file name and writer settings per layout: (file name, separator, header or None)
RATING_LAYOUTS = {
    "ml-100k": ("u.data", "\t", None),  # user item rating timestamp, whole stars, no header
    "ml-dat": ("ratings.dat", "::", None),  # ML-1M/10M: user::item::rating::timestamp
    "ml-csv": ("ratings.csv", ",", "userId,movieId,rating,timestamp"),  # ML-20M/25M
    "csv": ("ratings.csv", ",", "user,item,rating,timestamp"),
    "tsv": ("ratings.tsv", "\t", None),
}


def random_ratings(num_users: int = 40, num_items: int = 30, num_ratings: int = 300,
                   seed: int = 0, half_stars: bool = True) -> pd.DataFrame:
    """Unique (user, item) pairs with 1-based int ids, ratings on a 1..5 (or 0.5..5) scale."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(num_users * num_items, size=num_ratings, replace=False)
    stars = rng.integers(1, 11, num_ratings) / 2 if half_stars else rng.integers(1, 6,
                                                                                 num_ratings)
    return pd.DataFrame({
        "user": pairs // num_items + 1,
        "item": pairs % num_items + 1,
        "rating": stars.astype(np.float64),
        "timestamp": rng.integers(9 * 10**8, 16 * 10**8, num_ratings),
    })


def write_ratings(frame: pd.DataFrame, path: Path, layout: str) -> Path:
    """Write ``frame`` (user, item, rating[, timestamp]) as ``layout``; ``path`` is a folder
    (the layout's file name is used) or, for "parquet", the file itself."""
    if layout == "parquet":
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
        return path
    name, sep, header = RATING_LAYOUTS[layout]
    path.mkdir(parents=True, exist_ok=True)
    lines = [] if header is None else [header]
    lines += [sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in row)
              for row in frame.itertuples(index=False)]
    (path / name).write_text("\n".join(lines) + "\n")
    return path / name


def read_shard_set(out: Path) -> tuple[dict, pd.DataFrame]:
    """The manifest and every rating of a shard set, with original ids, split and shard."""
    manifest = json.loads((out / "manifest.json").read_text())
    users = pd.read_parquet(out / "users.parquet")["original_user_id"].to_numpy()
    items = pd.read_parquet(out / "items.parquet")["original_item_id"].to_numpy()
    parts = []
    for split, entries in manifest["files"].items():
        for shard, entry in enumerate(entries):
            frame = pq.read_table(out / entry["path"]).to_pandas()
            parts.append(frame.assign(user=users[frame["user_id"]], item=items[frame["item_id"]],
                                      split=split, shard=shard))
    return manifest, pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="session")
def make_ratings():
    """``random_ratings(num_users, num_items, num_ratings, seed, half_stars)``."""
    return random_ratings


@pytest.fixture(scope="session")
def ratings_writer():
    """``write_ratings(frame, path, layout)`` for the layouts in RATING_LAYOUTS and parquet."""
    return write_ratings


@pytest.fixture(scope="session")
def shard_reader():
    """``read_shard_set(out) -> (manifest, ratings with original ids, split, shard)``."""
    return read_shard_set
