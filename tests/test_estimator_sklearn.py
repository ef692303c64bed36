"""The estimator as scikit-learn sees it: its own API checks (those that apply to a
recommender), model selection (clone, cross_validate, GridSearchCV), score, pickling into
a new process, parameter errors that name the parameter, the work folder's ownership, and
the small promises of its methods (batch recommend, n, titles, quiet fits)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from sklearn.utils.estimator_checks import estimator_checks_generator

from shardmf import MatrixFactorization
from shardmf.errors import InputError
from trainer.run_files import ESTIMATOR_PARAMS

# Small and quick: the rating model alone (the ranking tables' sweeps cost a second a fit),
# evaluated on every test user.
QUICK = {"dim": 4, "init_std": 0.1, "lr": 0.02, "epochs": 4, "batch_size": 256,
         "objective": "rating", "ranking_users": 0, "verbose": False}


def _tastes(rows: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Users 1-30 love items 1-20 and dislike 21-40; users 31-60 the opposite."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(1, 61, rows), rng.integers(1, 41, rows)
    likes = (users <= 30) == (items <= 20)
    ratings = np.where(likes, 5 - rng.integers(0, 2, rows), 1 + rng.integers(0, 2, rows))
    frame = pd.DataFrame({"user": users, "item": items, "rating": ratings.astype(float)})
    return frame.drop_duplicates(["user", "item"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return _tastes()


@pytest.fixture(scope="module")
def fitted(ratings: pd.DataFrame) -> MatrixFactorization:
    return MatrixFactorization(**QUICK).fit(ratings)


# --------------------------------------------------------------- scikit-learn's checks

# Checks of the estimator API itself: they hold for any estimator, a recommender included.
APPLICABLE = {
    "check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types",
    "check_estimator_repr", "check_no_attributes_set_in_init", "check_estimators_unfitted",
    "check_do_not_raise_errors_in_init_or_set_params", "check_mixin_order",
    "check_parameters_default_constructible", "check_get_params_invariance",
    "check_set_params", "check_non_transformer_estimators_n_iter",
    "check_estimators_partial_fit_n_features", "check_supervised_y_no_nan",
}
# The checks that fit: each feeds a numeric feature matrix (make_regression, random
# floats, sparse, complex, 1 to 10 columns) whose rows are not (user, item) pairs of ids.
# On such data a recommender has nothing to learn, and most of these sets repeat a pair
# with two ratings, which prepare refuses. What each checks is tested below on ratings.
ON_FEATURE_MATRICES = {
    "check_fit_score_takes_y": "test_fit_and_score_take_y",
    "check_estimators_overwrite_params": "test_fit_leaves_parameters_alone",
    "check_dont_overwrite_parameters": "test_fit_leaves_parameters_alone",
    "check_estimators_fit_returns_self": "test_fit_and_score_take_y",
    "check_readonly_memmap_input": "(ratings come as a DataFrame, a file or shards)",
    "check_n_features_in_after_fitting": "(X's columns are ids, not features: no "
                                         "n_features_in_)",
    "check_n_features_in": "(as above)",
    "check_positive_only_tag_during_fit": "(ids may be any number or text)",
    "check_estimators_dtypes": "(ids may be any dtype; ratings are checked by prepare)",
    "check_complex_data": "(prepare refuses a complex rating column)",
    "check_dtype_object": "(object ids are supported: test_fit_learns_text_ids)",
    "check_estimators_empty_data_messages": "(prepare refuses an empty set, naming X)",
    "check_pipeline_consistency": "test_fit_is_idempotent",
    "check_estimators_nan_inf": "(prepare refuses NaN and inf ratings; tests/test_bad_rows)",
    "check_estimator_sparse_tag": "(a user x item matrix is never built)",
    "check_estimator_sparse_array": "(as above)",
    "check_estimator_sparse_matrix": "(as above)",
    "check_estimators_pickle": "test_pickled_fit_behaves_the_same_in_a_new_process",
    "check_array_api_input": "(numpy and pandas input only)",
    "check_f_contiguous_array_estimator": "(as check_estimators_dtypes)",
    "check_regressors_train": "test_fit_and_score_take_y, test_grid_search_over_dim_and_reg",
    "check_regressor_data_not_an_array": "test_fit_and_score_take_y (arrays of rows)",
    "check_regressors_no_decision_function": "(no decision_function: it has none)",
    "check_supervised_y_2d": "(one rating per row)",
    "check_regressors_int": "test_fit_and_score_take_y (integer ratings)",
    "check_methods_sample_order_invariance": "test_predict_ignores_row_order_and_subsets",
    "check_methods_subset_invariance": "test_predict_ignores_row_order_and_subsets",
    "check_fit2d_1sample": "(prepare refuses a set too small to split, naming X)",
    "check_fit2d_1feature": "(X needs a user and an item column)",
    "check_dict_unchanged": "test_predict_and_score_change_nothing",
    "check_fit_idempotent": "test_fit_is_idempotent",
    "check_fit_check_is_fitted": "test_fit_and_score_take_y",
    "check_fit1d": "(a 1-d X is refused, as scikit-learn expects)",
    "check_fit2d_predict1d": "(a 1-d X is refused, as scikit-learn expects)",
}


def _scikit_learn_checks():
    for estimator, check in estimator_checks_generator(MatrixFactorization(**QUICK),
                                                         legacy=True, mark=None):
        name = getattr(check, "func", check).__name__
        yield pytest.param(estimator, check, id=name)


@pytest.mark.parametrize(("estimator", "check"), list(_scikit_learn_checks()))
def test_scikit_learn_estimator_checks(estimator, check) -> None:
    """Every check scikit-learn has is either run here or named in ON_FEATURE_MATRICES with
    the test that covers it on ratings (a new scikit-learn's new check fails here)."""
    name = getattr(check, "func", check).__name__
    if name in APPLICABLE:
        check(estimator)
    else:
        assert name in ON_FEATURE_MATRICES, f"{name}: neither run nor explained"


# --------------------------------------------------------------- model selection

def test_fit_and_score_take_y(ratings: pd.DataFrame) -> None:
    """fit(X, y) with the ratings as y equals fit(X) with them as a column, arrays of rows
    work, fit returns the estimator, and score is minus the RMSE of predict."""
    X, y = ratings[["user", "item"]], ratings["rating"].astype(int)
    model = MatrixFactorization(**QUICK)
    with pytest.raises(NotFittedError):
        model.predict(X)
    assert model.fit(X, y) is model
    as_column = MatrixFactorization(**QUICK).fit(ratings)
    rows = MatrixFactorization(**QUICK).fit(ratings.to_numpy())
    assert np.array_equal(model.predict(X), as_column.predict(X))
    assert np.array_equal(model.predict(X.to_numpy()), rows.predict(X))
    rmse = np.sqrt(np.mean((model.predict(X) - y) ** 2))
    assert model.score(X, y) == pytest.approx(-rmse) == model.score(ratings)


def test_fit_leaves_parameters_alone(ratings: pd.DataFrame) -> None:
    model = MatrixFactorization(**QUICK, ranking_ks=[5])
    before = model.get_params()
    model.fit(ratings)
    assert model.get_params() == before  # stored as given: no list turned into a tuple
    assert model.ranking_ks == [5] and "ndcg@5" in model.metrics_


def test_fit_is_idempotent(ratings: pd.DataFrame, fitted: MatrixFactorization) -> None:
    again = clone(fitted)
    assert not hasattr(again, "run_")
    again.fit(ratings)
    pairs = ratings[["user", "item"]]
    assert np.array_equal(again.predict(pairs), fitted.predict(pairs))


def test_predict_ignores_row_order_and_subsets(ratings: pd.DataFrame,
                                               fitted: MatrixFactorization) -> None:
    pairs = ratings[["user", "item"]]
    whole = fitted.predict(pairs)
    order = np.random.default_rng(1).permutation(len(pairs))
    assert np.array_equal(fitted.predict(pairs.iloc[order]), whole[order])
    assert np.array_equal(fitted.predict(pairs.iloc[:7]), whole[:7])


def test_predict_and_score_change_nothing(ratings: pd.DataFrame,
                                          fitted: MatrixFactorization) -> None:
    state = {k: v for k, v in fitted.__dict__.items() if k != "run_"}
    frame = ratings.copy()
    fitted.predict(frame)
    fitted.score(frame)
    pd.testing.assert_frame_equal(frame, ratings)
    assert {k: v for k, v in fitted.__dict__.items() if k != "run_"}.keys() == state.keys()


def test_grid_search_over_dim_and_reg(ratings: pd.DataFrame) -> None:
    search = GridSearchCV(MatrixFactorization(**QUICK),
                          {"dim": [2, 8], "reg": [0.001, 0.05]}, cv=KFold(2), n_jobs=1)
    search.fit(ratings[["user", "item"]], ratings["rating"])
    assert set(search.best_params_) == {"dim", "reg"}
    assert search.cv_results_["mean_test_score"].shape == (4,)
    assert all(score < 0 for score in search.cv_results_["mean_test_score"])  # -RMSE
    assert search.best_estimator_.dim == search.best_params_["dim"]
    assert search.score(ratings[["user", "item"]], ratings["rating"]) < 0


def test_cross_validate_on_interactions_scores_the_lists() -> None:
    """Without a rating column the fit learns interactions, and score is NDCG@10 of the
    lists against each fold's held-out interactions: above most-popular's on two tastes."""
    plays = _tastes(4000)
    plays = plays[plays["rating"] >= 4][["user", "item"]].reset_index(drop=True)
    model = MatrixFactorization(**{**QUICK, "objective": "auto", "sweeps": 3})
    scores = cross_validate(model, plays, cv=KFold(2, shuffle=True, random_state=0))
    assert all(0.3 < score <= 1 for score in scores["test_score"])


# --------------------------------------------------------------- pickling

_IN_A_NEW_PROCESS = """
import json, pickle, sys
import pandas as pd
model = pickle.loads(open(sys.argv[1], "rb").read())
pairs = pd.DataFrame({"user": [1, 40, 999], "item": [3, 30, 3]})
print(json.dumps({
    "predict": model.predict(pairs).tolist(),
    "recommend": model.recommend([1, 40], n=5, min_item_ratings=0).to_dict("list"),
    "ndcg": model.evaluate(ks=(5,))["ndcg@5"],
}))
"""


def test_pickled_fit_behaves_the_same_in_a_new_process(fitted: MatrixFactorization,
                                                       tmp_path: Path) -> None:
    """The pickle carries the run and its shards: in a process of its own, after the
    original's temporary folder is gone, predict, recommend (seen items left out) and
    evaluate give what the original gives, and save works."""
    original = pickle.loads(pickle.dumps(fitted))  # a fit with a temporary folder of its own
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(original))
    pairs = pd.DataFrame({"user": [1, 40, 999], "item": [3, 30, 3]})
    expected = {"predict": original.predict(pairs).tolist(),
                "recommend": original.recommend([1, 40], n=5, min_item_ratings=0).to_dict("list"),
                "ndcg": original.evaluate(ks=(5,))["ndcg@5"]}
    original._workspace.cleanup()
    assert not original.run_dir_.exists()
    done = subprocess.run([sys.executable, "-c", _IN_A_NEW_PROCESS, str(path)],
                          capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout.splitlines()[-1]) == json.loads(json.dumps(expected))
    copy = pickle.loads(path.read_bytes())
    saved = copy.save(tmp_path / "saved")
    assert MatrixFactorization.load(saved).predict(pairs).tolist() == expected["predict"]


# --------------------------------------------------------------- parameters and folders

@pytest.mark.parametrize(("params", "message"), [
    ({"dim": "abc"}, "dim='abc': expected an integer"),
    ({"epochs": None}, "epochs=None: expected an integer"),
    ({"n_jobs": "2"}, "n_jobs='2': expected an integer"),
    ({"lr": "fast"}, "lr='fast': expected a number"),
    ({"verbose": "yes"}, "verbose='yes': expected True or False"),
    ({"ranking_ks": (5, "ten")}, "ranking_ks=(5, 'ten'): expected a tuple of integers"),
    ({"dim": -1}, "dim=-1: expected at least 1"),
])
def test_bad_parameters_name_the_parameter(params: dict, message: str, tmp_path: Path,
                                           ratings: pd.DataFrame) -> None:
    with pytest.raises(ValueError) as caught:
        MatrixFactorization(**{**QUICK, **params}, work_dir=str(tmp_path / "w")).fit(ratings)
    assert str(caught.value).startswith(message) and "--" not in str(caught.value)
    assert not (tmp_path / "w").exists()


def test_numpy_numbers_from_a_grid_are_taken(ratings: pd.DataFrame) -> None:
    model = MatrixFactorization(**{**QUICK, "dim": np.int64(3), "reg": np.float32(0.01),
                                   "epochs": np.int32(2)})
    assert model.fit(ratings).run_.item_factors.shape[1] == 3


def test_work_dir_follows_the_owned_folder_rule(ratings: pd.DataFrame,
                                                tmp_path: Path) -> None:
    """A fit writes into a new or empty folder, or one a fit wrote (replacing that fit);
    never into a folder of the user's own or a run the command line wrote."""
    own = tmp_path / "mine"
    own.mkdir()
    (own / "config.json").write_text("{\"mine\": true}")
    with pytest.raises(InputError, match=r"work_dir=.*mine holds files that shardmf did not"):
        MatrixFactorization(**QUICK, work_dir=str(own)).fit(ratings)
    assert [p.name for p in own.iterdir()] == ["config.json"]
    assert (own / "config.json").read_text() == "{\"mine\": true}"

    work = tmp_path / "work"
    first = MatrixFactorization(**QUICK, work_dir=str(work)).fit(ratings)
    model = (work / "model.npz").read_bytes()
    MatrixFactorization(**{**QUICK, "dim": 2}, work_dir=str(work)).fit(ratings)  # replaced
    assert (work / "model.npz").read_bytes() != model
    assert first.run_.item_factors.shape[1] == 4  # the first fit's arrays stay in memory

    # Without the estimator's parameters file, the folder is a run as `shardmf` writes it.
    (work / ESTIMATOR_PARAMS).unlink()
    model = (work / "model.npz").read_bytes()
    with pytest.raises(InputError, match="holds a run that `shardmf` wrote"):
        MatrixFactorization(**QUICK, work_dir=str(work)).fit(ratings)
    assert (work / "model.npz").read_bytes() == model


# --------------------------------------------------------------- the methods' promises

def test_recommend_for_many_users_is_one_frame(fitted: MatrixFactorization) -> None:
    lists = fitted.recommend([1, 45], n=3, min_item_ratings=0)
    assert list(lists.columns[:2]) == ["original_user_id", "original_item_id"]
    assert lists["original_user_id"].tolist() == [1, 1, 1, 45, 45, 45]
    one = fitted.recommend(45, n=3, min_item_ratings=0)
    pd.testing.assert_frame_equal(lists.iloc[3:].drop(columns="original_user_id")
                                  .reset_index(drop=True), one)
    assert not lists.isna().any().any()  # no title or genres columns of NaN
    assert "title" not in lists.columns


def test_list_length_and_unknown_users_are_refused_clearly(
        fitted: MatrixFactorization) -> None:
    for bad in (-5, 0, 2.5):
        with pytest.raises(ValueError, match=rf"^n={bad!r}: expected an integer of at least 1"):
            fitted.recommend(1, n=bad)
    with pytest.raises(ValueError, match=r"^n=-1"):
        fitted.similar_items(3, n=-1)
    with pytest.raises(ValueError) as caught:
        fitted.recommend(99999)
    assert "user 99999 is not in this MatrixFactorization" in str(caught.value)
    assert "/tmp" not in str(caught.value) and "shardmf-" not in str(caught.value)


_FIT_WITH_STDERR_TO_A_FILE = """
import sys
import pandas as pd
from shardmf import MatrixFactorization
ratings = pd.read_parquet(sys.argv[1])
MatrixFactorization(dim=4, epochs=3, objective="rating", verbose=sys.argv[2] == "1").fit(ratings)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_quiet_and_verbose_fits(verbose: bool, ratings: pd.DataFrame, tmp_path: Path) -> None:
    """In a script whose stderr goes to a log file: verbose=False prints nothing;
    verbose=True one line per epoch, numbered against the most, with the time left, and
    no progress-bar fragments."""
    data = tmp_path / "ratings.parquet"
    ratings.to_parquet(data)
    log = tmp_path / "fit.log"
    with log.open("w") as stderr:
        done = subprocess.run([sys.executable, "-c", _FIT_WITH_STDERR_TO_A_FILE, str(data),
                               str(int(verbose))], stderr=stderr, stdout=subprocess.PIPE,
                              text=True, timeout=120)
    text = log.read_text()
    assert done.returncode == 0, text
    assert done.stdout == ""
    if not verbose:
        assert text == ""
        return
    assert "epoch 1/3:" in text and "epoch 3/3:" in text and "left" in text
    assert "\r" not in text and "%|" not in text
