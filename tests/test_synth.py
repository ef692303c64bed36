"""Tests of the synthetic rating generator: layout, determinism, planted structure."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_shards import synth
from data_shards.synth import SynthConfig, SynthSummary, synthesize

# Small but dense enough that de-duplication and several files are exercised.
SMALL = SynthConfig(num_users=300, num_items=200, num_ratings=20_000, rows_per_file=4_000)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    return synthesize(tmp_path_factory.mktemp("synth") / "small", SMALL)


def _ratings(summary: SynthSummary) -> pd.DataFrame:
    return pq.read_table(summary.out_dir / "ratings").to_pandas()


def test_layout_schema_and_metadata(small_set: SynthSummary) -> None:
    out = small_set.out_dir
    assert sorted(p.name for p in out.iterdir()) == [".shardmf-output.json", "items.csv", "ratings",
                                                    "synth.json"]
    assert small_set.files == sorted((out / "ratings").glob("part-*.parquet"))
    assert [f.name for f in small_set.files][:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert len(small_set.files) >= 4
    meta = json.loads((out / "synth.json").read_text())
    assert meta["layout"] == "shardmf-synth"
    assert meta["format_version"] == 1
    assert SynthConfig(**meta["config"]) == SMALL
    assert meta["num_ratings"] == small_set.num_ratings
    assert sum(meta["rating_counts"].values()) == small_set.num_ratings
    for entry, path in zip(meta["files"], small_set.files, strict=True):
        rows = pq.read_metadata(path).num_rows
        assert entry == {"path": f"ratings/{path.name}", "rows": rows}
        assert 0 < rows <= SMALL.rows_per_file
        assert pq.read_schema(path).remove_metadata() == synth.RATINGS_SCHEMA


def test_ratings_content(small_set: SynthSummary) -> None:
    ratings = _ratings(small_set)
    assert not ratings.duplicated(["user_id", "item_id"]).any()
    # Every user's ratings live in exactly one file.
    files_per_user = (
        pd.concat(
            pq.read_table(path, columns=["user_id"]).to_pandas().drop_duplicates().assign(file=k)
            for k, path in enumerate(small_set.files)
        )
        .groupby("user_id")["file"]
        .nunique()
    )
    assert (files_per_user == 1).all()
    assert ratings["rating"].isin([1.0, 2.0, 3.0, 4.0, 5.0]).all()
    assert ratings["user_id"].between(1, SMALL.num_users).all()
    assert ratings["item_id"].between(1, SMALL.num_items).all()
    assert ratings["timestamp"].between(946_684_800, 1_672_531_200).all()
    assert len(ratings) == small_set.num_ratings
    assert 0.98 * SMALL.num_ratings <= small_set.num_ratings <= SMALL.num_ratings
    assert small_set.num_users == ratings["user_id"].nunique()
    assert small_set.num_items == ratings["item_id"].nunique()
    per_user = ratings.groupby("user_id").size()
    assert per_user.min() >= 5
    assert per_user.max() <= SMALL.max_ratings_per_user


def test_heavy_tailed_activity_and_popularity(tmp_path: Path) -> None:
    config = SynthConfig(num_users=2_000, num_items=1_000, num_ratings=40_000)
    ratings = _ratings(synthesize(tmp_path / "sparse", config))
    per_user = ratings.groupby("user_id").size()
    per_item = ratings.groupby("item_id").size()
    assert per_user.min() >= 5
    assert per_user.max() > 8 * per_user.median()
    assert per_item.max() > 8 * per_item.median()


def test_star_distribution_looks_like_movielens(small_set: SynthSummary) -> None:
    stars = _ratings(small_set)["rating"]
    assert 3.0 < stars.mean() < 4.0
    assert 0.9 < stars.std() < 1.4
    shares = stars.value_counts(normalize=True)
    assert shares.reindex([1.0, 2.0, 3.0, 4.0, 5.0]).min() > 0.02


def test_items_csv_covers_every_item(small_set: SynthSummary) -> None:
    items = pd.read_csv(small_set.out_dir / "items.csv")
    assert list(items.columns) == ["item_id", "title", "genres"]
    assert items["item_id"].tolist() == list(range(1, SMALL.num_items + 1))
    genre_names = {f"genre-{g:02d}" for g in range(1, SMALL.num_genres + 1)}
    assert set(items["genres"]) == genre_names  # every genre has items
    assert (
        items["title"] == "Synthetic " + items["item_id"].astype(str) + " (" + items["genres"] + ")"
    ).all()


def _top_genre_margin(ratings: pd.DataFrame, genres: pd.Series) -> float:
    """Held-out margin of a user's favourite genre, in stars, averaged over users.

    The favourite is the genre with the highest mean rating in one half of a
    user's ratings; the margin is how much higher the other half rates that
    genre's items than the rest. Without user-genre structure it is ~0.
    """
    frame = ratings.assign(genre=genres.loc[ratings["item_id"]].to_numpy())
    half = np.random.default_rng(0).random(len(frame)) < 0.5
    fit, held = frame[half], frame[~half]
    by_genre = fit.groupby(["user_id", "genre"])["rating"].agg(["mean", "size"])
    by_genre = by_genre[by_genre["size"] >= 3].reset_index()
    top = by_genre.loc[by_genre.groupby("user_id")["mean"].idxmax(), ["user_id", "genre"]]
    held = held.merge(top.rename(columns={"genre": "top"}), on="user_id")
    in_top = held["genre"] == held["top"]
    per_user = held.groupby(["user_id", in_top.rename("in_top")])["rating"].mean().unstack()
    return float((per_user[True] - per_user[False]).dropna().mean())


def test_ratings_follow_planted_genre_taste(small_set: SynthSummary) -> None:
    ratings = _ratings(small_set)
    genres = pd.read_csv(small_set.out_dir / "items.csv").set_index("item_id")["genres"]
    assert _top_genre_margin(ratings, genres) > 0.8
    # Control: the same statistic on ratings shuffled across rows is ~0, so the
    # assertion above fails when the planted structure is missing.
    shuffled = ratings.assign(rating=np.random.default_rng(1).permutation(ratings["rating"]))
    assert abs(_top_genre_margin(shuffled, genres)) < 0.2


def _digest(summary: SynthSummary) -> list[bytes]:
    return [f.read_bytes() for f in summary.files] + [(summary.out_dir / "items.csv").read_bytes()]


def test_same_seed_same_bytes_on_any_scheduler(tmp_path: Path, small_set: SynthSummary) -> None:
    with dask.config.set(scheduler="synchronous"):
        again = synthesize(tmp_path / "again", SMALL)
    assert _digest(again) == _digest(small_set)
    assert json.loads((again.out_dir / "synth.json").read_text()) == json.loads(
        (small_set.out_dir / "synth.json").read_text()
    )


def test_different_seed_different_data(tmp_path: Path, small_set: SynthSummary) -> None:
    config = dataclasses.replace(SMALL, seed=1)
    other = synthesize(tmp_path / "other", config)
    assert not _ratings(other).equals(_ratings(small_set))
    assert not pq.read_table(other.files[0]).equals(pq.read_table(small_set.files[0]))


def test_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        synthesize(out, SMALL)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_accepts_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    config = SynthConfig(num_users=50, num_items=40, num_ratings=500)
    summary = synthesize(out, config)
    assert summary.num_ratings == 500
    assert (out / "synth.json").is_file()


def test_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(synth, "_write_items", broken)
    with pytest.raises(OSError, match="disk full"):
        synthesize(tmp_path / "out", SMALL)
    assert list(tmp_path.iterdir()) == []


def test_fewer_ratings_than_users(tmp_path: Path) -> None:
    config = SynthConfig(num_users=1_000, num_items=30, num_ratings=400, num_genres=3)
    summary = synthesize(tmp_path / "sparse", config)
    assert summary.num_ratings == 400
    assert summary.num_users <= 400
    assert len(summary.files) == 1


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_users": 0}, "num_users"),
        ({"num_items": -1}, "num_items"),
        ({"num_ratings": 0}, "num_ratings"),
        ({"num_genres": 0}, "num_genres"),
        ({"latent_dim": 0}, "latent_dim"),
        ({"num_users": 1.5}, "num_users"),
        ({"seed": True}, "seed"),
        ({"seed": -1}, "seed"),
        ({"noise": -0.1}, "noise"),
        ({"noise": math.nan}, "noise"),
        ({"noise": "0.4"}, "noise"),
        ({"rows_per_file": 0}, "rows_per_file"),
        ({"num_genres": 300, "num_items": 200}, "num_genres=300"),
        ({"num_users": 10, "num_items": 20, "num_ratings": 101}, "num_ratings=101"),
        ({"num_items": 2_000, "rows_per_file": 1_999}, "rows_per_file=1,999"),
    ],
)
def test_config_validation(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SynthConfig(**changes)


def test_config_is_frozen_and_keyword_only() -> None:
    with pytest.raises(TypeError):
        SynthConfig(300)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        SMALL.seed = 3  # type: ignore[misc]
