"""The Python estimator on a DataFrame in hand: fit, predict (cold start too), recommend,
save and load, scikit-learn's parameter protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shardmf import MatrixFactorization

SMALL = {"dim": 8, "init_std": 0.1, "lr": 0.02, "epochs": 12, "batch_size": 256,
         "verbose": False}


def _two_tastes(rows: int = 5000, seed: int = 0) -> pd.DataFrame:
    """Users "u1".."u40" love items 1-30 and hate 31-60; users "u41".."u80" the opposite."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 81, rows)
    items = rng.integers(1, 61, rows)
    likes = (users <= 40) == (items <= 30)
    ratings = np.where(likes, 5 - rng.integers(0, 2, rows), 1 + rng.integers(0, 2, rows))
    frame = pd.DataFrame({"who": [f"u{u}" for u in users], "movie": items,
                          "stars": ratings.astype(float)})
    return frame.drop_duplicates(["who", "movie"])


def _pairs(users: list, items: list) -> pd.DataFrame:
    return pd.DataFrame({"who": users, "movie": items})


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> MatrixFactorization:
    work = tmp_path_factory.mktemp("estimator") / "work"
    model = MatrixFactorization(**SMALL, user_col="who", item_col="movie", rating_col="stars",
                                work_dir=str(work))
    return model.fit(_two_tastes())


def test_fit_learns_the_two_tastes(fitted: MatrixFactorization) -> None:
    predicted = fitted.predict(_pairs(["u1", "u1", "u80", "u80"], [1, 60, 1, 60]))
    assert predicted[0] > 4 and predicted[3] > 4
    assert predicted[1] < 2 and predicted[2] < 2
    assert fitted.metrics_["test_rmse"] < fitted.metrics_["baseline_test_rmse"]
    assert fitted.metrics_["ndcg@10"] > fitted.metrics_["popular_ndcg@10"]
    top = fitted.recommend("u3", n=5, min_item_ratings=0)
    assert len(top) == 5 and (top["original_item_id"] <= 30).all()  # u3 loves 1-30
    near = fitted.similar_items(45, n=3, min_item_ratings=0)
    assert (near["original_item_id"] > 30).all()


def test_unknown_ids_fall_back_to_mean_plus_known_biases(fitted: MatrixFactorization) -> None:
    run = fitted.run_
    mean = run.global_mean
    item_bias = run.item_embeddings().loc[7, "bias"]
    user_bias = run.user_embeddings().loc["u2", "bias"]
    low, high = run.scale
    predicted = fitted.predict(_pairs(["nobody", "u2", "nobody", "u2"], [7, 999, 999, 7]))
    assert predicted[0] == pytest.approx(np.clip(mean + item_bias, low, high))
    assert predicted[1] == pytest.approx(np.clip(mean + user_bias, low, high))
    assert predicted[2] == pytest.approx(np.clip(mean, low, high))
    assert predicted[3] == pytest.approx(fitted.run_.predict(["u2"], [7])[0])


def test_save_and_load_give_the_same_model(fitted: MatrixFactorization,
                                           tmp_path: Path) -> None:
    saved = fitted.save(tmp_path / "saved")
    assert not list(saved.glob("checkpoint*"))
    loaded = MatrixFactorization.load(saved)
    assert {k: v for k, v in loaded.get_params().items() if k != "work_dir"} == {
        k: v for k, v in fitted.get_params().items() if k != "work_dir"}
    pairs = _pairs(["u1", "u50", "nobody"], [3, 40, 3])
    assert np.array_equal(loaded.predict(pairs), fitted.predict(pairs))
    pd.testing.assert_frame_equal(loaded.recommend("u9", n=4, min_item_ratings=0),
                                  fitted.recommend("u9", n=4, min_item_ratings=0))
    # The saved folder carries its own shards: seen items are still excluded, and
    # evaluation still runs, after the work folder is gone.
    assert loaded.run_.shards_dir == saved / "shards"
    assert loaded.evaluate(ks=(5,))["ndcg@5"] > 0
    with pytest.raises(ValueError, match="not empty"):
        fitted.save(saved)


def test_scikit_learn_parameter_protocol() -> None:
    from sklearn.base import clone

    model = MatrixFactorization(dim=4, lr=0.1)
    assert model.get_params()["dim"] == 4 and model.get_params()["epochs"] > 0
    copy = clone(model)
    assert copy.get_params() == model.get_params() and copy is not model
    assert model.set_params(dim=6) is model and model.dim == 6
    with pytest.raises(ValueError, match="Invalid parameter"):
        model.set_params(dimension=3)
    with pytest.raises(TypeError, match="unknown parameter"):
        MatrixFactorization(dimension=3)
    assert "dim=6" in repr(model)


def test_bad_parameters_and_columns_fail_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dim=0"):
        MatrixFactorization(dim=0, work_dir=str(tmp_path / "a")).fit(_two_tastes(100))
    with pytest.raises(ValueError, match="no column 'user'"):
        MatrixFactorization(work_dir=str(tmp_path / "b"), verbose=False).fit(_two_tastes(100))
    with pytest.raises(ValueError, match="not fitted"):
        MatrixFactorization().predict(_pairs([1], [1]))
    assert not (tmp_path / "a").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_fit_on_two_local_ranks(tmp_path: Path) -> None:
    model = MatrixFactorization(**{**SMALL, "epochs": 2}, n_jobs=2, user_col="who",
                                item_col="movie", rating_col="stars",
                                ranking_ks=(5,), work_dir=str(tmp_path / "work"))
    model.fit(_two_tastes(2000))
    assert model.metrics_["world_size"] == 2
    assert "ndcg@5" in model.metrics_ and "ndcg@10" not in model.metrics_
    assert not (tmp_path / "work" / "clusters.json").exists()  # no clustering post-step
