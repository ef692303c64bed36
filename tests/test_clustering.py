"""Tests for the rank-0 clustering post-step, on embeddings with a planted answer."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardmf.errors import InputError
from shardmf.flags import add_config_arguments
from trainer.analysis import clustering
from trainer.analysis.clustering import ClusterResult, cluster_items
from trainer.analysis.post_step import write_cluster_outputs
from trainer.config import ClusterConfig

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Thriller", "Western"]
OUTPUTS = {
    "checksums.json",  # what a reader checks the files against (trainer/run_files.py)
    "item_clusters.parquet",
    "clusters.json",
    "clusters_pca.png",
    "report.html",
    "report.md",
}


def planted(
    n_per_blob: int = 40, dim: int = 8, seed: int = 0, blobs: int = 6
) -> tuple[np.ndarray, pd.DataFrame]:
    """Well-separated blobs, blob b's items tagged with genre b (every third also b+1)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(blobs, dim)) * 10
    blob = np.repeat(np.arange(blobs), n_per_blob)
    embeddings = centers[blob] + rng.normal(scale=0.1, size=(len(blob), dim))
    genres = [
        f"{GENRES[b]}|{GENRES[(b + 1) % blobs]}" if i % 3 == 0 else GENRES[b]
        for i, b in enumerate(blob)
    ]
    return embeddings.astype(np.float32), catalogue(genres, rng)


def catalogue(genres: list[str | None], rng: np.random.Generator) -> pd.DataFrame:
    """An items table in the contract's layout, every item with 20..499 training ratings."""
    n = len(genres)
    return pd.DataFrame(
        {
            "item_id": np.arange(n, dtype=np.int32),
            "original_item_id": np.arange(1000, 1000 + n, dtype=np.int64),
            "title": [f"Movie {i}" for i in range(n)],
            "genres": genres,
            "train_ratings": rng.integers(20, 500, size=n).astype(np.int64),
        }
    )


def strict_json(text: str) -> dict:
    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_planted_genres_are_recovered_far_above_chance() -> None:
    embeddings, items = planted()
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6))

    scores = result.scores
    assert result.genres_known
    assert scores["silhouette"] > 0.9
    for name in ("nmi", "ari", "purity", "multilabel_purity"):
        assert scores[name]["score"] == pytest.approx(1.0), name
        assert scores[name]["baseline_mean"] < 0.4, name
        assert scores[name]["z"] > 10, name
    assert scores["nmi"]["baseline_mean"] < 0.1
    # Each cluster is one blob: its genre is in every member; lift is 1 / catalogue share.
    for summary in result.clusters:
        assert summary["size"] == 40
        top = summary["genres"][0]
        assert top["share"] == 1.0
        tagged = sum(top["genre"] in genres.split("|") for genres in items["genres"])
        assert top["lift"] == pytest.approx(len(items) / tagged)
        assert top["lift"] > 4
        assert len(summary["top_items"]) == 10
        counts = [item["train_ratings"] for item in summary["top_items"]]
        assert counts == sorted(counts, reverse=True)


def test_random_embeddings_score_near_chance() -> None:
    rng = np.random.default_rng(1)
    genres = [GENRES[g] for g in rng.integers(0, len(GENRES), size=300)]
    embeddings = rng.normal(size=(300, 8)).astype(np.float32)
    result = cluster_items(embeddings, catalogue(genres, rng), ClusterConfig(clusters=6))

    nmi = result.scores["nmi"]
    assert nmi["score"] < 0.1
    assert abs(nmi["z"]) < 4
    assert abs(result.scores["ari"]["z"]) < 4


def test_purity_lift_and_multilabel_purity_by_hand() -> None:
    # Two blobs of four; multi-label purity credits "Comedy|Action" in the Action cluster.
    embeddings = np.array([[0, 0]] * 4 + [[10, 10]] * 4, dtype=np.float32)
    embeddings += (
        np.random.default_rng(0).normal(scale=0.01, size=embeddings.shape).astype(np.float32)
    )
    genres = ["Action", "Action", "Comedy|Action", "Drama"]
    genres += ["Horror", "Horror|Action", "Horror", "Comedy"]
    items = catalogue(genres, np.random.default_rng(0))
    result = cluster_items(embeddings, items, ClusterConfig(clusters=2, min_item_ratings=0))

    assert result.scores["purity"]["score"] == pytest.approx(5 / 8)
    assert result.scores["multilabel_purity"]["score"] == pytest.approx(6 / 8)
    first = result.clusters[result.labels[0]]["genres"]
    assert first[0] == {"genre": "Action", "items": 3, "share": 0.75, "lift": pytest.approx(1.5)}
    # The whole distribution is kept, commonest first, each genre with its lift.
    assert [g["genre"] for g in first] == ["Action", "Comedy", "Drama"]
    assert first[1]["lift"] == pytest.approx((1 / 4) / (2 / 8))
    assert result.genre_base_rates[0] == {"genre": "Action", "items": 4, "share": 0.5}


def test_min_item_ratings_leaves_items_out_and_counts_them() -> None:
    embeddings, items = planted()
    items.loc[::4, "train_ratings"] = 19  # 60 of 240 items just below the default 20
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6))

    assert len(result.items) == len(result.labels) == 180
    assert result.items_left_out == 60
    assert not set(result.items["item_id"]) & set(range(0, 240, 4))
    assert sum(summary["size"] for summary in result.clusters) == 180


def test_more_clusters_than_kept_items_is_a_clear_error() -> None:
    embeddings, items = planted(n_per_blob=7)  # 42 items
    with pytest.raises(
        ValueError,
        match=r"clusters=50 exceeds the number of items with at least 20 training ratings "
        r"\(42\); lower `clusters` or `min_item_ratings`",
    ):
        cluster_items(embeddings, items, ClusterConfig(clusters=50))


@pytest.mark.parametrize("layout", ["all_null", "column_absent"])
def test_unknown_genres_give_silhouette_only(layout: str, tmp_path: Path) -> None:
    embeddings, items = planted(n_per_blob=10)
    if layout == "all_null":
        items["genres"] = None
    else:
        items = items.drop(columns="genres")
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6))

    assert not result.genres_known
    assert result.scores["silhouette"] > 0.9
    for name in ("nmi", "ari", "purity", "multilabel_purity"):
        assert result.scores[name] is None
    summary = write_cluster_outputs(result, tmp_path)
    assert summary["genres_known"] is False
    assert summary["scores"]["nmi"] is None
    assert all(cluster["genres"] == [] for cluster in summary["clusters"])
    assert "Genres are unknown" in (tmp_path / "report.md").read_text()
    assert pq.read_table(tmp_path / "item_clusters.parquet").column("genres").null_count == 60


def test_items_without_genres_are_excluded_from_genre_scores() -> None:
    embeddings, items = planted()
    items.loc[0:9, "genres"] = None
    items.loc[40:44, "genres"] = "(no genres listed)"  # MovieLens's marker for none
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6))

    assert result.items_without_genres == 15
    assert result.scores["nmi"]["score"] == pytest.approx(1.0)


def test_same_seed_gives_identical_results() -> None:
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(200, 8)).astype(np.float32)  # no clear answer to agree on
    items = catalogue([GENRES[g] for g in rng.integers(0, 6, size=200)], rng)
    config = ClusterConfig(clusters=5, seed=7)

    first = cluster_items(embeddings, items, config)
    second = cluster_items(embeddings, items, config)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.distances, second.distances)
    assert first.scores == second.scores
    assert first.clusters == second.clusters


def test_outputs_are_complete_strict_and_typed(tmp_path: Path) -> None:
    embeddings, items = planted()
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6))
    metrics = {"test_rmse": 0.8731, "val_rmse": 0.8702, "epochs": 10, "world_size": 2}
    summary = write_cluster_outputs(result, tmp_path, metrics)

    # Nothing else, and in particular no temporary file, is left behind.
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS

    written = strict_json((tmp_path / "clusters.json").read_text())
    assert written == summary
    assert written["k"] == 6
    assert written["k_requested"] == 6
    assert written["k_selection"] is None
    assert written["algorithm"] == "kmeans"
    assert written["normalize"] is False
    assert written["items_clustered"] == 240
    assert written["items_left_out"] == 0
    assert written["min_item_ratings"] == 20
    assert written["seed"] == 0
    assert set(written["scores"]) == {"silhouette", "nmi", "ari", "purity", "multilabel_purity"}
    assert set(written["scores"]["nmi"]) == {"score", "baseline_mean", "baseline_std", "z"}
    rates = {rate["genre"]: rate["share"] for rate in written["genre_base_rates"]}
    tagged = sum("Action" in genres.split("|") for genres in items["genres"])
    assert rates["Action"] == pytest.approx(tagged / 240)
    assert sum(c["items_with_genres"] for c in written["clusters"]) == 240
    top = written["clusters"][0]["top_items"][0]
    assert isinstance(top["original_item_id"], int)
    assert top["title"].startswith("Movie ")

    table = pq.read_table(tmp_path / "item_clusters.parquet")
    assert table.schema.names == [
        "original_item_id",
        "item_id",
        "title",
        "genres",
        "cluster",
        "distance",
    ]
    assert table.schema.field("original_item_id").type == pa.int64()
    assert table.schema.field("item_id").type == pa.int32()
    assert table.schema.field("cluster").type == pa.int32()
    assert table.schema.field("distance").type == pa.float32()
    assert table.num_rows == 240
    np.testing.assert_array_equal(table.column("cluster").to_numpy(), result.labels)
    assert (table.column("distance").to_numpy() >= 0).all()

    png = (tmp_path / "clusters_pca.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000

    report = (tmp_path / "report.md").read_text()
    assert "0.8731" in report
    assert "std above chance" in report
    assert "](clusters_pca.png)" in report
    assert report.count("\n| ") >= 6 + 4 + 4  # cluster rows, score rows, run figures
    assert "](report.html)" not in report  # the HTML is named, not linked as a figure


def test_string_ids_missing_titles_two_clusters_and_a_singleton(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    embeddings = np.vstack([rng.normal(size=(20, 4)), [[50.0, 50.0, 50.0, 50.0]]])
    items = pd.DataFrame(
        {
            "item_id": np.arange(21, dtype=np.int32),
            "original_item_id": [f"tt{i:07d}" for i in range(21)],
            "title": [f"Film | {i}" if i % 2 else None for i in range(21)],
            "genres": [GENRES[i % 2] for i in range(20)] + ["Horror"],
            "train_ratings": np.full(21, 30, dtype=np.int64),
        }
    )
    result = cluster_items(embeddings.astype(np.float32), items, ClusterConfig(clusters=2))
    summary = write_cluster_outputs(result, tmp_path)

    assert sorted(c["size"] for c in summary["clusters"]) == [1, 20]
    singleton = next(c for c in summary["clusters"] if c["size"] == 1)
    assert singleton["top_items"] == [
        {"item_id": 20, "original_item_id": "tt0000020", "title": "tt0000020", "train_ratings": 30}
    ]
    assert summary["scores"]["silhouette"] is not None
    table = pq.read_table(tmp_path / "item_clusters.parquet")
    assert table.schema.field("original_item_id").type == pa.string()
    assert table.column("title").null_count == 11
    assert "Film \\| 1" in (tmp_path / "report.md").read_text()  # pipe escaped in the table


def test_one_item_per_cluster_leaves_silhouette_undefined(tmp_path: Path) -> None:
    embeddings, items = planted(n_per_blob=1)
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6))
    summary = write_cluster_outputs(result, tmp_path)

    assert summary["scores"]["silhouette"] is None
    strict_json((tmp_path / "clusters.json").read_text())


def test_a_failed_write_leaves_no_temporary_files_and_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embeddings, items = planted(n_per_blob=10)
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6))
    real_replace = os.replace

    def failing_replace(source: str | Path, target: str | Path) -> None:
        if Path(target).name == "clusters_pca.png":
            raise OSError("disk full")
        real_replace(source, target)

    write_cluster_outputs(result, tmp_path)  # an earlier, complete clustering of the run
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises((OSError, InputError), match="disk full"):
        write_cluster_outputs(result, tmp_path)
    # The old reports went first and the new ones come last, so no report is left to
    # vouch for a half-rewritten set.
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS - {"report.md", "report.html"}


def test_large_catalogues_estimate_silhouette_on_a_seeded_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    embeddings, items = planted(n_per_blob=100)
    config = ClusterConfig(clusters=6)
    exact = cluster_items(embeddings, items, config).scores["silhouette"]
    # Lowered from 10,000 so that the sampled path runs in milliseconds.
    monkeypatch.setattr(clustering, "_SILHOUETTE_SAMPLE", 200)

    sampled = cluster_items(embeddings, items, config).scores["silhouette"]
    assert sampled != exact
    assert sampled == pytest.approx(exact, abs=0.02)
    assert sampled == cluster_items(embeddings, items, config).scores["silhouette"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clusters", 1),
        ("clusters", 0),
        ("clusters", -3),
        ("clusters", "Auto"),
        ("clusters", "20"),
        ("clusters", None),
        ("k_min", 1),
        ("k_max", 1),
        ("algorithm", "dbscan"),
        ("normalize", "yes"),
        ("min_item_ratings", -1),
        ("top_items", 0),
        ("seed", -1),
        ("seed", 2**32),
        ("baseline_shuffles", 0),
        ("clusters", 2.5),
        ("clusters", True),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^{field}={re.escape(repr(value))}: expected"):
        ClusterConfig(**{field: value})


def test_inputs_that_break_the_contract_are_rejected() -> None:
    embeddings, items = planted(n_per_blob=5)
    config = ClusterConfig(clusters=2)
    with pytest.raises(ValueError, match="items has 30 rows but item_embeddings has 29"):
        cluster_items(embeddings[:-1], items, config)
    with pytest.raises(ValueError, match="row 0 has item_id 29"):
        cluster_items(embeddings, items.iloc[::-1], config)
    with pytest.raises(ValueError, match="missing column.*train_ratings"):
        cluster_items(embeddings, items.drop(columns="train_ratings"), config)
    broken = embeddings.copy()
    broken[3, 0] = np.nan
    with pytest.raises(ValueError, match="1 kept item.*non-finite"):
        cluster_items(broken, items, config)


def test_result_is_frozen() -> None:
    embeddings, items = planted(n_per_blob=5)
    result = cluster_items(embeddings, items, ClusterConfig(clusters=2))
    assert isinstance(result, ClusterResult)
    with pytest.raises(AttributeError):
        result.labels = np.zeros(1)  # type: ignore[misc]


def test_config_rejects_k_max_below_k_min() -> None:
    with pytest.raises(ValueError, match=r"^k_max=5: expected at least `k_min` \(8\)"):
        ClusterConfig(clusters="auto", k_min=8, k_max=5)


def test_flags_parse_clusters_as_a_number_or_auto() -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ClusterConfig)

    def parse(*argv: str) -> dict:
        return vars(parser.parse_args(argv))

    assert parse("--clusters", "12") == {"clusters": 12}
    assert parse("--clusters", "auto", "--k-max", "12") == {"clusters": "auto", "k_max": 12}
    assert parse("--algorithm", "minibatch", "--normalize") == {
        "algorithm": "minibatch",
        "normalize": True,
    }
    # A typo reaches the config, which names the field and what it expects.
    with pytest.raises(ValueError, match=r"^clusters='atuo': expected"):
        ClusterConfig(**parse("--clusters", "atuo"))
    help_text = " ".join(parser.format_help().split())
    assert "k (2 or more), or auto: best silhouette over k-min..k-max" in help_text


def test_auto_k_finds_the_planted_number_of_blobs(tmp_path: Path) -> None:
    embeddings, items = planted(n_per_blob=15, blobs=7)
    result = cluster_items(embeddings, items, ClusterConfig(clusters="auto", baseline_shuffles=5))

    assert result.k == 7
    selection = result.k_selection
    assert selection["chosen_k"] == 7
    assert selection["sample_size"] == 105
    assert [entry["k"] for entry in selection["silhouette_by_k"]] == list(range(4, 31))
    best = max(entry["silhouette"] for entry in selection["silhouette_by_k"])
    assert best == next(e["silhouette"] for e in selection["silhouette_by_k"] if e["k"] == 7)
    assert result.scores["nmi"]["score"] == pytest.approx(1.0)
    assert len(result.clusters) == 7

    summary = write_cluster_outputs(result, tmp_path)
    written = strict_json((tmp_path / "clusters.json").read_text())
    assert written == summary
    assert written["k"] == 7
    assert written["k_requested"] == "auto"
    assert written["k_selection"]["silhouette_by_k"][0]["k"] == 4
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS | {"silhouette_by_k.png"}

    # Clustering the run again with a fixed k removes the now stale k-selection figure.
    fixed = ClusterConfig(clusters=7, baseline_shuffles=2)
    write_cluster_outputs(cluster_items(embeddings, items, fixed), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == OUTPUTS


def test_auto_k_scans_a_seeded_sample_and_caps_k_max(monkeypatch: pytest.MonkeyPatch) -> None:
    embeddings, items = planted(n_per_blob=6, blobs=5)  # 30 items
    monkeypatch.setattr(clustering, "_SELECTION_SAMPLE", 20)
    config = ClusterConfig(clusters="auto", k_min=3, k_max=40, seed=3, baseline_shuffles=2)

    first = cluster_items(embeddings, items, config)
    assert first.k_selection["sample_size"] == 20
    assert first.k_selection["k_max"] == 19  # silhouette needs k <= n - 1
    assert first.k == 5
    assert len(first.labels) == 30  # the final fit covers every kept item
    second = cluster_items(embeddings, items, config)
    assert first.k_selection == second.k_selection
    np.testing.assert_array_equal(first.labels, second.labels)


def test_auto_k_with_too_few_items_is_a_clear_error() -> None:
    embeddings, items = planted(n_per_blob=1, blobs=4)
    with pytest.raises(
        ValueError,
        match=r"clusters='auto': k_min=4 needs at least 5 items with at least 20 training "
        r"ratings, found 4",
    ):
        cluster_items(embeddings, items, ClusterConfig(clusters="auto"))


def test_minibatch_recovers_planted_blobs_deterministically() -> None:
    embeddings, items = planted(n_per_blob=15)
    config = ClusterConfig(clusters=6, algorithm="minibatch", seed=5, baseline_shuffles=5)

    first = cluster_items(embeddings, items, config)
    assert first.algorithm == "minibatch"
    assert first.scores["nmi"]["score"] == pytest.approx(1.0)
    second = cluster_items(embeddings, items, config)
    np.testing.assert_array_equal(first.labels, second.labels)
    np.testing.assert_array_equal(first.distances, second.distances)
    assert first.scores == second.scores


def test_algorithm_auto_switches_to_minibatch_for_large_catalogues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    embeddings, items = planted(n_per_blob=10)  # 60 items
    config = ClusterConfig(clusters=6, baseline_shuffles=2)
    assert cluster_items(embeddings, items, config).algorithm == "kmeans"
    # Lowered from 100,000 so that the switch happens on a small catalogue.
    monkeypatch.setattr(clustering, "MINIBATCH_ABOVE", 59)
    result = cluster_items(embeddings, items, config)
    assert result.algorithm == "minibatch"
    assert result.scores["nmi"]["score"] == pytest.approx(1.0)


def test_normalize_clusters_by_direction_not_length() -> None:
    # Three directions; the lengths of the vectors spread over 1..50 (as popularity can
    # spread them), so Euclidean K-Means on the raw vectors splits by length instead.
    rng = np.random.default_rng(4)
    directions = np.eye(3, 6) + 0.5
    blob = np.repeat(np.arange(3), 40)
    lengths = np.exp(rng.uniform(0, np.log(50), size=(len(blob), 1)))
    noise = rng.normal(scale=0.02, size=(len(blob), 6))
    embeddings = (directions[blob] + noise) * lengths
    items = catalogue([GENRES[b] for b in blob], rng)

    raw = cluster_items(embeddings.astype(np.float32), items, ClusterConfig(clusters=3))
    cosine = cluster_items(
        embeddings.astype(np.float32), items, ClusterConfig(clusters=3, normalize=True)
    )
    assert raw.scores["nmi"]["score"] < 0.5
    assert cosine.scores["nmi"]["score"] == pytest.approx(1.0)
    # Distances and the projection are measured in the clustered (unit-vector) space.
    assert cosine.distances.max() < 0.2
    assert np.abs(cosine.projection).max() <= 2.0


def test_normalize_keeps_zero_vectors_finite() -> None:
    embeddings, items = planted(n_per_blob=10)
    embeddings[0] = 0.0
    result = cluster_items(embeddings, items, ClusterConfig(clusters=6, normalize=True))
    assert np.isfinite(result.distances).all()
    assert result.scores["silhouette"] is not None
