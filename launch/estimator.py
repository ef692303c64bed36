"""`MatrixFactorization`: the whole pipeline as a scikit-learn estimator for ratings in hand.

    from shardmf import MatrixFactorization

    model = MatrixFactorization(dim=32, epochs=20).fit(ratings)  # DataFrame, file or shards
    model.predict(pd.DataFrame({"user": [196, 186], "item": [242, 302]}))
    model.score(held_out)            # -RMSE (ratings) or NDCG@10 (interactions)
    model.recommend(196, n=10); model.recommend([196, 186], n=10)  # one frame
    model.save("models/ml100k"); MatrixFactorization.load("models/ml100k")

``fit`` runs what ``shardmf run`` runs (prepare shards, train, no clustering) in a work
folder, in this process or on ``n_jobs`` local ranks through torchrun. It lives in
``launch`` because it uses both ``data_shards`` and ``trainer``. Parameters follow
scikit-learn's conventions: every constructor parameter is a config field of the same
name and meaning (`PARAMETERS`), stored as given, checked by ``fit``; ``clone``,
``cross_validate`` and ``GridSearchCV`` work on it, and a pickled fit carries its run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils import RegressorTags

from data_shards import PrepareConfig, SourceOptions
from shardmf.errors import InputError
from shardmf.manifest import is_shard_folder
from shardmf.outputs import MARKER_NAME, read_marker, write_json
from trainer.config import (
    MIN_ITEM_RATINGS,
    SKIP_CLUSTERS,
    TRAIN_CONFIGS,
    RunConfig,
    config_from_values,
    typed_value,
)
from trainer.run_files import (
    CHECKPOINT,
    ESTIMATOR_PARAMS,
    EXPORT_DIRS,
    FINAL_METRICS,
    RUN_KIND,
    SHARDS_DIR,
    checkpoint_slice_pattern,
    read_json,
)

log = logging.getLogger("shardmf")

# Config fields that make no sense for an estimator: it always starts afresh in its own
# folder, and a DataFrame has no storage options.
_NOT_PARAMETERS = ("resume", "overwrite", "storage_options")
_OWN_PARAMETERS = {
    "n_jobs": 1,  # local ranks (processes) training together; 1: in this process
    "work_dir": None,  # folder for shards and run files; None: a temporary one
    "verbose": True,  # progress lines on stderr through the "shardmf" logger
}
_OWN_TYPES = {"n_jobs": int, "work_dir": str | os.PathLike | None, "verbose": bool}
_CONFIGS = (*TRAIN_CONFIGS, PrepareConfig, SourceOptions)
SCORE_K = 10  # score() of a ranking-only fit: NDCG at this list length


def _config_defaults() -> dict[str, Any]:
    """Every config field's default, first config first (``seed`` seeds split and model)."""
    defaults: dict[str, Any] = {}
    for cls in _CONFIGS:
        for item in dataclasses.fields(cls):
            if item.name not in _NOT_PARAMETERS:
                defaults.setdefault(item.name, item.default)
    return defaults


PARAMETERS = {**_config_defaults(), **_OWN_PARAMETERS}  # name -> default


class MatrixFactorization(BaseEstimator):
    """Biased matrix factorisation, ``r = mean + b_u + b_i + <p_u, q_i>``, fit on ratings.

    Parameters are the fields of shardmf's configs (``dim``, ``reg``, ``lr``, ``epochs``,
    ``batch_size``, ``seed``, ``val_fraction``, ``user_col``, ... : see `PARAMETERS` and
    ``shardmf run --help``), plus ``n_jobs`` (local training processes), ``work_dir``
    (where shards and run files go; None: a temporary folder that lives as long as the
    estimator; a folder given must be new, empty, or one an earlier fit wrote) and
    ``verbose`` (progress lines through the ``logging`` module; turn them off with
    ``verbose=False`` or ``logging.getLogger("shardmf").setLevel("WARNING")``).

    Fitted attributes: ``run_`` (a `trainer.TrainedRun`), ``metrics_`` (metrics.json:
    test RMSE, ranking figures, ...), ``run_dir_``.
    """

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise TypeError(f"MatrixFactorization got unknown parameter(s) "
                            f"{', '.join(unknown)}; see MatrixFactorization.PARAMETERS")
        for name, default in PARAMETERS.items():
            setattr(self, name, params.get(name, default))

    PARAMETERS = PARAMETERS

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.estimator_type = "regressor"  # predicts ratings; KFold, not stratified, splits
        tags.regressor_tags = RegressorTags(poor_score=True)
        # Rows are (user, item[, rating]) with ids of any type; the rating may come as y.
        tags.target_tags.required = False
        tags.input_tags.string = True
        tags.input_tags.categorical = True
        return tags

    # ------------------------------------------------------------ fitting

    def fit(self, X, y=None) -> MatrixFactorization:
        """Prepare shards from ``X`` and train; returns self.

        Args:
            X: a DataFrame with user, item and rating columns (named by
                ``user_col``/``item_col``/``rating_col``; None: "user", "item",
                "rating"; without a rating column: interactions, each weighing 1, or
                weighted by a ``rating_col`` such as "plays"), an array of (user, item)
                or (user, item, rating) rows, a ratings or interactions file or folder
                (any layout ``shardmf prepare`` reads), or a shard folder written by
                ``shardmf prepare`` (used as it is).
            y: (N,) ratings of X's rows, when X holds none (scikit-learn's split of
                features and target); None otherwise.
        """
        from launch.torchrun import TorchrunOptions, launch_training

        values = self._config_values()
        for cls in _CONFIGS:  # bad parameters fail before any work
            config_from_values(cls, values)
        own = {name: typed_value(name, getattr(self, name), _OWN_TYPES[name])
               for name in _OWN_PARAMETERS}
        options = TorchrunOptions(nproc=own["n_jobs"])
        ratings = X if isinstance(X, (str, os.PathLike)) else self._frame(X, y, fitting=True)
        run_dir, replace = self._new_run_dir()
        with _progress_logging(own["verbose"]):
            shards_dir = self._shards(ratings, run_dir, values)
            # A refit replaces the estimator's own earlier run, never a folder it did not mark.
            config = RunConfig.from_values(str(shards_dir), str(run_dir), {
                **values, "overwrite": replace, "clusters": SKIP_CLUSTERS})
            code = launch_training(config, options)
            if code:
                raise RuntimeError(f"training on {self.n_jobs} processes failed (exit "
                                   f"status {code}); the error is printed above")
        write_json(run_dir / ESTIMATOR_PARAMS, self._saved_params())
        self._load_fitted(run_dir)
        return self

    def _config_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PARAMETERS if name not in _OWN_PARAMETERS}

    def _new_run_dir(self) -> tuple[Path, bool]:
        """(the folder this fit writes, whether it replaces an earlier fit there)."""
        if self.work_dir is None:
            # Removed with the estimator (or at exit): its model and shards back the methods.
            self._workspace = tempfile.TemporaryDirectory(prefix="shardmf-")
            return Path(self._workspace.name), False
        return Path(self.work_dir), _check_work_dir(Path(self.work_dir))

    def _frame(self, X, y, fitting: bool = False) -> pd.DataFrame:
        """X (and y) as a DataFrame of the columns `user`, `item` and, when given, the value
        column (named as in the data: a rating, or a weight such as "plays")."""
        user, item = self.user_col or "user", self.item_col or "item"
        value = self.rating_col or "rating"
        if not isinstance(X, pd.DataFrame):
            rows = np.asarray(X, dtype=object)
            if rows.ndim != 2 or rows.shape[1] not in (2, 3):
                raise ValueError(f"X: expected a DataFrame, or rows of (user, item) or (user, "
                                 f"item, rating); got an array of shape {rows.shape}")
            X = pd.DataFrame(rows, columns=[user, item, value][:rows.shape[1]])
            for name in X.columns[:2]:  # ids: whole numbers, which a float array made floats
                ids = pd.to_numeric(X[name], errors="coerce")
                if ids.notna().all() and (ids == ids.round()).all():
                    X[name] = ids.astype("int64")
            if rows.shape[1] == 3:
                X[value] = pd.to_numeric(X[value])
        columns = {user: "user", item: "item"}
        if y is not None:
            if len(y) != len(X):
                raise ValueError(f"y: {len(y)} values for {len(X)} rows of X; give one "
                                 "rating per row")
            X = X.assign(**{value: np.asarray(y, dtype=float)})
        # The value column keeps its name, which tells a rating from a weight (plays,
        # clicks); a frame without one holds interactions that weigh 1 each.
        if value in X.columns or fitting and (self.rating_col or self.kind == "ratings"):
            columns[value] = value
        if fitting and self.time_col:
            columns[self.time_col] = "timestamp"
        missing = [name for name in columns if name not in X.columns]
        if missing:
            raise ValueError(f"X: no column {', '.join(map(repr, missing))} (columns: "
                             f"{', '.join(map(str, X.columns))}); name them with "
                             "user_col / item_col / rating_col")
        return X[list(columns)].rename(columns=columns)

    def _shards(self, ratings, run_dir: Path, values: dict[str, Any]) -> Path:
        """The shard folder to train on: ``ratings`` itself when it is one, else
        RUN_DIR/shards prepared from it (replacing those of an earlier fit)."""
        from data_shards import prepare

        shards = run_dir / SHARDS_DIR
        config = config_from_values(PrepareConfig, {
            **values, "overwrite": True,
            # Each rank needs row groups of its own.
            "num_shards": values["num_shards"] or (self.n_jobs if self.n_jobs > 1 else None)})
        if not isinstance(ratings, pd.DataFrame):
            path = Path(ratings)
            if is_shard_folder(path):
                return path
            prepare([str(path)], shards, config, config_from_values(SourceOptions, values))
            return shards
        with tempfile.TemporaryDirectory(prefix="shardmf-input-") as folder:
            path = Path(folder) / "ratings.parquet"
            ratings.to_parquet(path, index=False)
            try:
                prepare([str(path)], shards, config, SourceOptions(
                    format="parquet", kind=values["kind"], rating_col=values["rating_col"]))
            except InputError as e:  # about the rows given, never the file they passed through
                raise InputError(str(e).replace(str(path), "X")) from e
        return shards

    def _load_fitted(self, run_dir: Path) -> None:
        from trainer import load_run

        self.run_dir_ = run_dir
        # Errors about ids name the work folder the user chose, never a temporary one.
        name = str(self.work_dir) if self.work_dir is not None else "this MatrixFactorization"
        self.run_ = load_run(run_dir, name=name)
        self.metrics_ = read_json(run_dir / FINAL_METRICS) or {}

    def _fitted(self):
        if not hasattr(self, "run_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this MatrixFactorization is not fitted yet; call "
                                 "fit(ratings) or MatrixFactorization.load(path) first")
        return self.run_

    # ------------------------------------------------------------ using the model

    def predict(self, X) -> np.ndarray:
        """(N,) predicted ratings, clipped to the rating scale, for X's N (user, item) rows
        of original ids (a DataFrame with the user and item columns, or an array of pairs).
        Cold start: an unknown user contributes nothing (mean + item bias), an unknown item
        likewise (mean + user bias), both unknown give the global mean. Needs the rating
        model: a fit that trained the ranking tables alone (interactions, or objective
        'ranking') raises ValueError."""
        run = self._fitted()
        pairs = self._frame(X, None)
        return run.predict(pairs["user"].to_numpy(), pairs["item"].to_numpy())

    def score(self, X, y=None) -> float:
        """Higher is better, as scikit-learn's model selection expects: minus the RMSE of
        `predict` on X's ratings when the fit learned ratings; on interaction data (or a
        ranking-only fit) NDCG@10 of the `recommend` lists of X's users against their
        items in X (held-out interactions; users unknown to the fit are left out)."""
        run = self._fitted()
        frame = self._frame(X, y)
        if run.kind == "ratings" and run.item_factors is not None:
            if frame.shape[1] < 3:
                raise ValueError("score: X has no ratings; pass them as y or as the "
                                 f"{self.rating_col or 'rating'!r} column")
            errors = self.predict(frame.iloc[:, :2]) - frame.iloc[:, 2].to_numpy(dtype=float)
            return -float(np.sqrt(np.mean(errors ** 2)))
        return self._ranking_score(frame)

    def _ranking_score(self, frame: pd.DataFrame) -> float:
        from trainer.ranking import NO_ITEM, user_metrics

        run = self.run_
        users = run._user_index.positions(frame["user"].to_numpy())
        items = run._item_index.positions(frame["item"].to_numpy())
        known = (users >= 0) & (items >= 0)
        scored, rows = np.unique(users[known], return_inverse=True)
        if not len(scored):
            raise ValueError("score: no (user, item) pair of X is known to the fit")
        top = np.full((len(scored), SCORE_K), NO_ITEM, dtype=np.int64)
        for row, uid in enumerate(scored):
            found, _ = run.top_items(run._user_index.originals[uid], SCORE_K,
                                     min_item_ratings=0)
            top[row, :len(found)] = found
        pairs = np.unique(np.stack([rows, items[known]]), axis=1)
        return float(np.nanmean(user_metrics(top, pairs[0], pairs[1])["ndcg"]))

    def recommend(self, users, n: int = 10, exclude_seen: bool = True,
                  min_item_ratings: int = MIN_ITEM_RATINGS) -> pd.DataFrame:
        """The ``n`` items with the highest score for a known user: the ranking tables'
        when the fit trained them, else the predicted rating (see
        `trainer.TrainedRun.recommend`); items with fewer than ``min_item_ratings``
        training ratings are left out (0: none are). ``users`` a list or array: one frame
        of every user's list, with an ``original_user_id`` column first."""
        run = self._fitted()
        if np.ndim(users) == 0:
            return run.recommend(users, n, exclude_seen, min_item_ratings)
        lists = [run.recommend(user, n, exclude_seen, min_item_ratings) for user in users]
        for user, frame in zip(users, lists):
            frame.insert(0, "original_user_id", user)
        return pd.concat(lists, ignore_index=True)

    def similar_items(self, item, n: int = 10,
                      min_item_ratings: int = MIN_ITEM_RATINGS) -> pd.DataFrame:
        """The ``n`` items closest to ``item`` by cosine similarity of their factors (the
        ranking tables' when the fit trained them)."""
        return self._fitted().similar_items(item, n, min_item_ratings)

    def evaluate(self, ks: tuple[int, ...] = (10, 20), threshold: float | None = None,
                 min_item_ratings: int = 0) -> dict:
        """Ranking figures on the test split beside most-popular (`trainer.evaluate_run`);
        also merged into ``metrics_``."""
        from trainer.entry import EvaluateJob, run_job

        self._fitted()
        figures = run_job(EvaluateJob(str(self.run_dir_), tuple(ks), threshold,
                                      min_item_ratings))
        self.metrics_ = read_json(self.run_dir_ / FINAL_METRICS) or {}
        return figures

    # ------------------------------------------------------------ persistence

    def _saved_params(self) -> dict[str, Any]:
        """The parameters as JSON (a grid's numpy numbers as Python ones), less work_dir."""
        return {k: v.item() if isinstance(v, np.generic) else v
                for k, v in self.get_params().items() if k != "work_dir"}

    def _portable_files(self) -> dict[str, Path]:
        """What a copy of the fit needs, by path inside the copy: the run (model, id maps,
        metrics; no checkpoints or exports) and its shards (for seen items and evaluate),
        as RUN/shards even when the fit trained on a shard folder elsewhere."""
        run = self._fitted()
        skipped = shutil.ignore_patterns(CHECKPOINT, checkpoint_slice_pattern("*"),
                                         *EXPORT_DIRS.values(), SHARDS_DIR)
        files = {}
        for folder, prefix in ((self.run_dir_, ""), (run.shards_dir, SHARDS_DIR + "/")):
            for path in sorted(folder.rglob("*")):
                relative = path.relative_to(folder)
                if path.is_file() and not (prefix == "" and skipped(
                        str(folder), [relative.parts[0]])):
                    files[prefix + relative.as_posix()] = path
        return files

    def save(self, path: str | Path) -> Path:
        """Copy the fitted run (model, id maps, metrics and its shards) to ``path``, with
        the parameters; checkpoints are left behind. Returns the folder."""
        files = self._portable_files()
        target = Path(path)
        if target.exists() and any(target.iterdir()):
            raise ValueError(f"{target} already exists and is not empty; choose another path")
        for name, source in files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
        write_json(target / ESTIMATOR_PARAMS, self._saved_params())
        log.info("saved to %s", target)
        return target

    @classmethod
    def load(cls, path: str | Path) -> MatrixFactorization:
        """A fitted estimator from a folder written by `save` (used in place)."""
        folder = Path(path)
        params = read_json(folder / ESTIMATOR_PARAMS)
        if params is None:
            raise ValueError(f"{folder / ESTIMATOR_PARAMS}: not found; {folder} was not "
                             "written by MatrixFactorization.save")
        estimator = cls(**{k: tuple(v) if isinstance(PARAMETERS.get(k), tuple) else v
                           for k, v in params.items()}, work_dir=str(folder))
        estimator._load_fitted(folder)
        return estimator

    def __getstate__(self) -> dict[str, Any]:
        """A fitted estimator pickles with its run's files (`_portable_files`), so that one
        unpickled elsewhere predicts, recommends and evaluates exactly as this one."""
        state = dict(super().__getstate__())  # a copy: object's is the live __dict__
        state.pop("_workspace", None)
        if "run_" in state:
            state["_run_files"] = {name: path.read_bytes()
                                   for name, path in self._portable_files().items()}
            for name in ("run_", "run_dir_"):
                state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        files = state.pop("_run_files", None)
        super().__setstate__(state)
        if files is not None:
            self._workspace = tempfile.TemporaryDirectory(prefix="shardmf-")
            folder = Path(self._workspace.name)
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            work_dir, self.work_dir = self.work_dir, None  # errors must not name a stale one
            self._load_fitted(folder)
            self.work_dir = work_dir


MatrixFactorization.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
       for name, default in PARAMETERS.items()])


def _check_work_dir(folder: Path) -> bool:
    """Whether a fit into ``work_dir`` replaces an earlier fit there; InputError when the
    folder is neither new, nor empty, nor one a fit wrote (the owned-folder rule of
    shardmf/outputs.py: a run the command line wrote or a folder of the user's own is
    never replaced)."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"work_dir={folder} is a file, not a folder; choose another work_dir")
    entries = {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()
    marker = read_marker(folder)
    if ESTIMATOR_PARAMS in entries and marker is not None and marker.get("kind") == RUN_KIND:
        return True  # an earlier fit's (or a saved model's): replaced
    shards = read_marker(folder / SHARDS_DIR)
    if not entries - {MARKER_NAME, SHARDS_DIR} and (
            SHARDS_DIR not in entries or shards is not None and shards.get("kind") == "shards"):
        return False  # empty, or the shards of a fit that stopped before its run
    what = ("a run that `shardmf` wrote" if marker is not None
            else "files that shardmf did not write")
    raise InputError(f"work_dir={folder} holds {what}; a fit writes only into a new or empty "
                     "folder, or one an earlier fit wrote: choose another work_dir")


_PACKAGE_LOGGERS = ("shardmf", "trainer", "data_shards")


@contextlib.contextmanager
def _progress_logging(verbose: bool) -> Iterator[None]:
    """While fitting: the packages' INFO lines on stderr, when ``verbose`` and the
    application has not configured logging itself (then its handlers decide). The
    "shardmf" logger's level filters all three packages, so one setting silences them.
    Progress bars follow the same lines (`shardmf.progress`); ``verbose=False`` quiets
    the ranks of ``n_jobs`` > 1 too, which configure their own logging."""
    from trainer.entry import QUIET_ENV

    if not verbose:
        before = os.environ.get(QUIET_ENV)
        os.environ[QUIET_ENV] = "1"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(QUIET_ENV, None)
            else:
                os.environ[QUIET_ENV] = before
        return
    if logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: log.isEnabledFor(record.levelno))
    loggers = [logging.getLogger(name) for name in _PACKAGE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm(loggers=loggers):  # lines above progress bars
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(handler)
            logger.setLevel(level)
