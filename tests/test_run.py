"""A finished run folder in use, for each pair of tables a run may hold: the rating model
alone (objective "rating", and runs written before the ranking objective), the ranking
tables alone (objective "ranking": interaction data, or ratings trained as rankings) and
both. recommend, similar, predict, export, evaluate, the clusters and `shardmf recommend`
each take the tables they should.

The run folders are written here by the file contract (model.npz, model.pt, the id maps)
from tables fitted in closed form on real shards: the consumers are under test, not
training. Users 1-40 mostly choose Drama (items 1-30) and rate it high, the others Horror.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import torch

from launch.cli import main
from shardmf.errors import InputError
from shardmf.manifest import Manifest
from trainer import cluster_run, evaluate_run, export_run, load_run
from trainer.config import ClusterConfig, ModelConfig

NUM_USERS, NUM_ITEMS = 80, 60


def _write_choices(folder: Path, seed: int = 0) -> Path:
    """u.data-style ratings where each user mostly picks, and rates high, one genre; and
    the items file (titles, genres)."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, NUM_USERS + 1):
        drama_fan = user <= NUM_USERS // 2
        for item in rng.choice(np.arange(1, NUM_ITEMS + 1), size=40, replace=False):
            likes = drama_fan == (item <= NUM_ITEMS // 2)
            if likes or rng.random() < 0.1:  # mostly their own genre
                rows.append((user, item, int(rng.integers(4, 6) if likes else
                                             rng.integers(1, 3))))
    path = folder / "u.data"
    pd.DataFrame(rows).to_csv(path, sep="\t", header=False, index=False)
    pd.DataFrame({"item_id": range(1, NUM_ITEMS + 1),
                  "title": [f"Film {i}" for i in range(1, NUM_ITEMS + 1)],
                  "genres": ["Drama" if i <= NUM_ITEMS // 2 else "Horror"
                             for i in range(1, NUM_ITEMS + 1)]}
                 ).to_csv(folder / "items.csv", index=False)
    return path


def _prepare(source: Path, out: Path, kind: str) -> Path:
    from data_shards import PrepareConfig, SourceOptions, prepare

    with dask.config.set(scheduler="synchronous"):
        prepare([str(source)], out, PrepareConfig(num_shards=2, overwrite=True,
                                                  items=str(source.parent / "items.csv")),
                SourceOptions(kind=kind))
    return out


def _train_matrix(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    """(users x items) training values and a mask of the observed pairs."""
    train = pd.read_parquet(shards / "train")
    manifest = Manifest.load(shards)
    values = np.zeros((manifest.num_users, manifest.num_items))
    values[train["user_id"], train["item_id"]] = train["rating"]
    return values, values != 0


def _factors(matrix: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``dim`` factors of ``matrix`` (truncated SVD, the root of the singular values on
    each side), float32."""
    left, singular, right = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(singular[:dim])
    return ((left[:, :dim] * root).astype(np.float32),
            (right[:dim].T * root).astype(np.float32))


def write_run(shards: Path, run: Path, objective: str, with_run_keys: bool = True) -> Path:
    """A finished run folder of ``objective`` over ``shards``, by the file contract:
    model.npz and model.pt with the rating tables (rating, both), the ranking tables
    (ranking, both), scale, shards_dir, objective and kind; the id maps beside them.
    ``with_run_keys`` False: a run written before the ranking objective (no objective, no
    kind)."""
    manifest = Manifest.load(shards)
    values, seen = _train_matrix(shards)
    state: dict[str, np.ndarray] = {}
    model_config = ranking_dim = None
    if objective in ("rating", "both"):
        mean = float(values[seen].mean())
        user_factors, item_factors = _factors(np.where(seen, values - mean, 0.0), 2)
        state.update({"user_factors.weight": user_factors, "item_factors.weight": item_factors,
                      "user_bias.weight": np.full((manifest.num_users, 1), 0.1, np.float32),
                      "item_bias.weight": np.full((manifest.num_items, 1), -0.1, np.float32),
                      "global_mean": np.array(mean, dtype=np.float32)})
        model_config = dataclasses.asdict(ModelConfig(dim=2, reg=0.05))
    if objective in ("ranking", "both"):
        user_factors, item_factors = _factors(seen.astype(float), 3)
        state.update({"ranking_user_factors.weight": user_factors,
                      "ranking_item_factors.weight": item_factors})
        ranking_dim = 3
    run.mkdir(parents=True)
    for name in ("users.parquet", "items.parquet"):
        shutil.copy(shards / name, run / name)
    facts = {"scale": list(manifest.scale), "shards_dir": str(shards.resolve())}
    if with_run_keys:
        facts.update(objective=objective, kind=manifest.kind)
    np.savez(run / "model.npz", **state, **{key: np.array(value)
                                            for key, value in facts.items()})
    torch.save({"state_dict": {key: torch.from_numpy(value) for key, value in state.items()},
                "model_config": model_config, "ranking_dim": ranking_dim, **facts},
               run / "model.pt")
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ranking-only on interactions; rating, ranking and both on the same rating shards;
    a rating run written before the ranking objective."""
    root = tmp_path_factory.mktemp("runs")
    source = _write_choices(root)
    ratings = _prepare(source, root / "ratings", "ratings")
    interactions = _prepare(source, root / "interactions", "interactions")
    return {"interactions": write_run(interactions, root / "interactions-run", "ranking"),
            **{objective: write_run(ratings, root / objective, objective)
               for objective in ("rating", "ranking", "both")},
            "older": write_run(ratings, root / "older", "rating", with_run_keys=False)}


def _seen(run, user: int) -> set:
    """Original ids of the items ``user`` has in training."""
    train = pd.read_parquet(run.shards_dir / "train")
    items = train.loc[train["user_id"] == run.user_id(user), "item_id"]
    return set(run.items["original_item_id"].to_numpy()[items])


# --------------------------------------------- the ranking tables alone (interactions)


def test_a_ranking_run_recommends_by_its_tables_and_leaves_seen_items_out(runs) -> None:
    run = load_run(runs["interactions"])
    assert (run.objective, run.kind, run.tables) == ("ranking", "interactions", "ranking")
    assert run.trained_tables() == ("ranking",) and run.item_factors is None
    top = run.recommend(3, n=8, min_item_ratings=0)
    assert list(top.columns) == ["original_item_id", "title", "genres", "score"]
    assert (top["genres"] == "Drama").all()  # user 3 chooses Drama
    assert top["score"].is_monotonic_decreasing
    assert not set(top["original_item_id"]) & _seen(run, 3)
    items = [run.item_id(item) for item in top["original_item_id"]]
    expected = run.ranking_item_factors[items] @ run.ranking_user_factors[run.user_id(3)]
    np.testing.assert_allclose(top["score"], expected, rtol=1e-6)
    with_seen = run.recommend(3, n=8, exclude_seen=False, min_item_ratings=0)
    assert set(with_seen["original_item_id"]) & _seen(run, 3)  # chosen items score high


def test_a_ranking_run_finds_similar_items_in_its_item_table(runs) -> None:
    run = load_run(runs["interactions"])
    near = run.similar_items(45, n=5, min_item_ratings=0)
    assert (near["genres"] == "Horror").all() and 45 not in set(near["original_item_id"])
    vectors = run.ranking_item_factors
    a, b = vectors[run.item_id(45)], vectors[run.item_id(near["original_item_id"][0])]
    assert near["similarity"][0] == pytest.approx(
        a @ b / np.linalg.norm(a) / np.linalg.norm(b), rel=1e-5)


def test_a_ranking_run_predicts_no_ratings_in_one_line(runs) -> None:
    with pytest.raises(InputError) as error:
        load_run(runs["interactions"]).predict([3], [1])
    message = str(error.value)
    assert "\n" not in message
    assert (f"{runs['interactions']} learned rankings only (objective ranking, interaction "
            "data): it predicts no ratings; ") in message
    with pytest.raises(InputError, match=r"objective ranking, rating data\): it predicts no "
                                         r"ratings; .*objective='both'"):
        load_run(runs["ranking"]).predict([3], [1])


@pytest.mark.parametrize("format", ["parquet", "npy"])
def test_export_of_a_ranking_run_writes_the_ranking_tables(runs, tmp_path: Path,
                                                           format: str) -> None:
    out = export_run(runs["interactions"], tmp_path / "export", format=format)
    run = load_run(runs["interactions"])
    if format == "parquet":
        items = pd.read_parquet(out / "ranking_items_embeddings.parquet")
        assert list(items.columns) == ["original_item_id", "f0", "f1", "f2"]  # no bias
        np.testing.assert_array_equal(items[["f0", "f1", "f2"]], run.ranking_item_factors)
        assert (out / "ranking_users_embeddings.parquet").is_file()
    else:
        np.testing.assert_array_equal(np.load(out / "ranking_users_factors.npy"),
                                      run.ranking_user_factors)
        ids = pd.read_parquet(out / "ranking_items_ids.parquet")
        assert list(ids.columns) == ["original_item_id"]
        assert ids["original_item_id"].tolist() == list(range(1, NUM_ITEMS + 1))
    assert not list(out.glob("items_*")) and not list(out.glob("users_*"))  # no rating tables
    summary = json.loads((out / "model.json").read_text())
    assert summary["objective"] == "ranking" and summary["tables"] == ["ranking"]
    assert summary["ranking_dim"] == 3 and "global_mean" not in summary
    assert "bias" not in run.item_embeddings().columns  # the ranking tables: all there is


def test_evaluate_scores_the_ranking_tables(runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["interactions"], run)
    figures = evaluate_run(run, ks=(5,))
    assert figures["ranking_users"] > 40
    assert figures["ndcg@5"] > figures["popular_ndcg@5"] + 0.2  # one genre per user
    assert json.loads((run / "metrics.json").read_text())["ndcg@5"] == figures["ndcg@5"]


def test_shardmf_evaluate_says_which_tables_ranked(runs, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    for name in ("interactions", "rating"):
        run = tmp_path / name
        shutil.copytree(runs[name], run)
        assert main(["evaluate", str(run), "--k", "5"]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert ("users with a held-out interaction" if name == "interactions"
                else "users with a rating >= 4") in first
        assert f"by the {load_run(run).tables} tables" in first


def test_clusters_of_a_ranking_run_use_its_item_table_and_say_so(runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["interactions"], run)
    summary = cluster_run(run, ClusterConfig(clusters=2, min_item_ratings=0,
                                             baseline_shuffles=2))
    assert summary["tables"] == "ranking"
    clusters = pd.read_parquet(run / "item_clusters.parquet")
    assert (clusters.groupby("genres")["cluster"].nunique() == 1).all()
    assert "embeddings are the ranking tables' item factors" in (run / "report.md").read_text()
    assert "ranking tables&#x27; item factors" in (run / "report.html").read_text()


def test_shardmf_recommend_prints_ranking_scores(runs, capsys: pytest.CaptureFixture) -> None:
    assert main(["recommend", str(runs["interactions"]), "--user", "3", "-n", "4",
                 "--min-item-ratings", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "score of the ranking tables" in lines[0] and "predicted rating" not in lines[0]
    assert len(lines) == 5
    assert all(line.lstrip().startswith("score ") and "Drama" in line for line in lines[1:])
    assert main(["similar", str(runs["interactions"]), "--title", "Film 45", "-n", "3",
                 "--min-item-ratings", "0"]) == 0
    assert all("Horror" in line for line in capsys.readouterr().out.splitlines()[1:])


# --------------------------------------------- both pairs of tables


def test_both_recommends_by_the_ranking_tables_and_predicts_by_the_rating_model(runs) -> None:
    both, rating = load_run(runs["both"]), load_run(runs["rating"])
    assert both.tables == "ranking" and both.trained_tables() == ("rating", "ranking")
    ranked = both.recommend(50, n=6, min_item_ratings=0)
    pd.testing.assert_frame_equal(ranked, load_run(runs["ranking"]).recommend(
        50, n=6, min_item_ratings=0))
    assert "predicted_rating" not in ranked.columns
    users, items = [3, 3, 50, "nobody"], [1, 45, 45, 1]
    np.testing.assert_array_equal(both.predict(users, items), rating.predict(users, items))
    u, i = both.user_id(3), both.item_id(45)
    assert both.predict([3], [45])[0] == pytest.approx(np.clip(
        both.global_mean + both.user_bias[u] + both.item_bias[i]
        + both.user_factors[u] @ both.item_factors[i], *both.scale))
    np.testing.assert_array_equal(both.item_vectors, both.ranking_item_factors)
    assert "bias" in both.item_embeddings().columns  # the rating model's first, as before
    np.testing.assert_array_equal(both.user_embeddings("ranking"), both.ranking_user_factors)


def test_export_of_both_writes_both_pairs(runs, tmp_path: Path) -> None:
    out = export_run(runs["both"], tmp_path / "export")
    rating_items = pd.read_parquet(out / "items_embeddings.parquet")
    assert list(rating_items.columns) == ["original_item_id", "f0", "f1", "bias"]
    assert list(pd.read_parquet(out / "ranking_items_embeddings.parquet").columns) == [
        "original_item_id", "f0", "f1", "f2"]
    summary = json.loads((out / "model.json").read_text())
    assert summary["tables"] == ["rating", "ranking"] and summary["dim"] == 2
    assert summary["ranking_dim"] == 3 and summary["rating_scale"] == [1.0, 5.0]
    out = export_run(runs["both"], tmp_path / "npy", format="npy")
    assert sorted(p.name for p in out.glob("*items*")) == [
        "items_factors.npy", "items_ids.parquet", "ranking_items_factors.npy",
        "ranking_items_ids.parquet"]
    assert list(pd.read_parquet(out / "items_ids.parquet").columns) == ["original_item_id",
                                                                        "bias"]


def test_evaluate_of_both_gives_the_ranking_tables_figures(runs, tmp_path: Path) -> None:
    figures = {}
    for objective in ("rating", "ranking", "both"):
        run = tmp_path / objective
        shutil.copytree(runs[objective], run)
        figures[objective] = evaluate_run(run, ks=(5,))
    assert figures["both"] == figures["ranking"]
    assert figures["both"]["ndcg@5"] != figures["rating"]["ndcg@5"]


# --------------------------------------------- the rating model alone, as before


def test_a_rating_run_and_an_older_one_rank_by_predicted_rating(runs) -> None:
    for name in ("rating", "older"):
        run = load_run(runs[name])
        assert (run.objective, run.kind, run.tables) == ("rating", "ratings", "rating")
        assert run.ranking_item_factors is None
        top = run.recommend(3, n=5, min_item_ratings=0)
        assert list(top.columns) == ["original_item_id", "title", "genres",
                                     "predicted_rating", "score"]
        np.testing.assert_array_equal(top["predicted_rating"], np.clip(top["score"], 1, 5))
        np.testing.assert_array_equal(run.item_vectors, run.item_factors)
    with pytest.raises(InputError, match=r"tables='ranking': .* holds 'rating' only"):
        load_run(runs["older"]).item_embeddings("ranking")
