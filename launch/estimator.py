"""`MatrixFactorization`: the whole pipeline as an estimator for ratings in hand.

    from shardmf import MatrixFactorization

    model = MatrixFactorization(dim=32, epochs=20).fit(ratings)  # DataFrame, file or shards
    model.predict([196, 186], [242, 302])
    model.recommend(196, n=10)
    model.save("models/ml100k"); MatrixFactorization.load("models/ml100k")

``fit`` runs what ``shardmf run`` runs (prepare shards, train, no clustering) in a work
folder, in this process or on ``n_jobs`` local ranks through torchrun. It lives in
``launch`` because it uses both ``data_shards`` and ``trainer``. Parameters follow
scikit-learn's conventions: every constructor parameter is a config field of the same
name and meaning (`PARAMETERS`), stored as given, validated by ``fit``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_shards import PrepareConfig, SourceOptions
from shardmf.manifest import is_shard_folder
from shardmf.outputs import write_json
from trainer.config import (
    MIN_ITEM_RATINGS,
    SKIP_CLUSTERS,
    TRAIN_CONFIGS,
    RunConfig,
    config_from_values,
)
from trainer.run_files import (
    CHECKPOINT,
    ESTIMATOR_PARAMS,
    EXPORT_DIR,
    FINAL_METRICS,
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
_CONFIGS = (*TRAIN_CONFIGS, PrepareConfig, SourceOptions)


def _config_defaults() -> dict[str, Any]:
    """Every config field's default, first config first (``seed`` seeds split and model)."""
    defaults: dict[str, Any] = {}
    for cls in _CONFIGS:
        for item in dataclasses.fields(cls):
            if item.name not in _NOT_PARAMETERS:
                defaults.setdefault(item.name, item.default)
    return defaults


PARAMETERS = {**_config_defaults(), **_OWN_PARAMETERS}  # name -> default


class MatrixFactorization:
    """Biased matrix factorisation, ``r = mean + b_u + b_i + <p_u, q_i>``, fit on ratings.

    Parameters are the fields of shardmf's configs (``dim``, ``reg``, ``lr``, ``epochs``,
    ``batch_size``, ``seed``, ``val_fraction``, ``user_col``, ... : see `PARAMETERS` and
    ``shardmf run --help``), plus ``n_jobs`` (local training processes), ``work_dir``
    (where shards and run files go; None: a temporary folder that lives as long as the
    estimator) and ``verbose`` (progress lines through the ``logging`` module; turn them
    off with ``verbose=False`` or ``logging.getLogger("shardmf").setLevel("WARNING")``).

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

    # ------------------------------------------------------------ scikit-learn protocol

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor parameters by name (``deep`` is accepted for scikit-learn)."""
        return {name: getattr(self, name) for name in PARAMETERS}

    def set_params(self, **params: Any) -> MatrixFactorization:
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"invalid parameter(s) {', '.join(unknown)} for "
                             "MatrixFactorization; valid: " + ", ".join(PARAMETERS))
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != PARAMETERS[k]}
        return f"MatrixFactorization({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    # ------------------------------------------------------------ fitting

    def fit(self, ratings: pd.DataFrame | str | Path) -> MatrixFactorization:
        """Prepare shards from ``ratings`` and train; returns self.

        Args:
            ratings: a DataFrame with user, item and rating columns (named by
                ``user_col``/``item_col``/``rating_col``; None: "user", "item",
                "rating"; without a rating column: interactions, each weighing 1, or
                weighted by a ``rating_col`` such as "plays"), a ratings or interactions
                file or folder (any layout ``shardmf prepare`` reads), or a shard folder
                written by ``shardmf prepare`` (used as it is).
        """
        from launch.torchrun import TorchrunOptions, launch_training

        values = self._config_values()
        for cls in _CONFIGS:  # bad parameters fail before any work
            config_from_values(cls, values)
        run_dir = self._new_run_dir()
        with _progress_logging(self.verbose):
            shards_dir = self._shards(ratings, run_dir, values)
            # A refit replaces the estimator's own earlier run, never a folder it did not mark.
            config = RunConfig.from_values(str(shards_dir), str(run_dir), {
                **values, "overwrite": True, "clusters": SKIP_CLUSTERS})
            code = launch_training(config, TorchrunOptions(nproc=self.n_jobs))
            if code:
                raise RuntimeError(f"training on {self.n_jobs} processes failed (exit "
                                   f"status {code}); the error is printed above")
        self._load_fitted(run_dir)
        return self

    def _config_values(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PARAMETERS if name not in _OWN_PARAMETERS}

    def _new_run_dir(self) -> Path:
        if self.work_dir is not None:
            return Path(self.work_dir)
        # Removed with the estimator (or at exit): its model and shards back the methods.
        self._workspace = tempfile.TemporaryDirectory(prefix="shardmf-")
        return Path(self._workspace.name)

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
        columns = {values["user_col"] or "user": "user", values["item_col"] or "item": "item"}
        # The value column keeps its name, which tells a rating from a weight (plays,
        # clicks); a frame without one holds interactions that weigh 1 each.
        value = values["rating_col"] or "rating"
        if values["rating_col"] or values["kind"] == "ratings" or value in ratings.columns:
            columns[value] = value
        if values["time_col"]:
            columns[values["time_col"]] = "timestamp"
        missing = [name for name in columns if name not in ratings.columns]
        if missing:
            raise ValueError(f"ratings: no column {', '.join(map(repr, missing))} (columns: "
                             f"{', '.join(map(str, ratings.columns))}); name them with "
                             "user_col / item_col / rating_col")
        with tempfile.TemporaryDirectory(prefix="shardmf-input-") as folder:
            path = Path(folder) / "ratings.parquet"
            ratings[list(columns)].rename(columns=columns).to_parquet(path, index=False)
            prepare([str(path)], shards, config, SourceOptions(
                format="parquet", kind=values["kind"], rating_col=values["rating_col"]))
        return shards

    def _load_fitted(self, run_dir: Path) -> None:
        from trainer import load_run

        self.run_dir_ = run_dir
        self.run_ = load_run(run_dir)
        self.metrics_ = read_json(run_dir / FINAL_METRICS) or {}

    def _fitted(self):
        if not hasattr(self, "run_"):
            raise ValueError("this MatrixFactorization is not fitted yet; call fit(ratings) "
                             "or MatrixFactorization.load(path) first")
        return self.run_

    # ------------------------------------------------------------ using the model

    def predict(self, users, items) -> np.ndarray:
        """(N,) predicted ratings, clipped to the rating scale, for N (user, item) pairs of
        original ids. Cold start: an unknown user contributes nothing (mean + item bias),
        an unknown item likewise (mean + user bias), both unknown give the global mean.
        Needs the rating model: a fit that trained the ranking tables alone (interactions,
        or objective 'ranking') raises ValueError."""
        return self._fitted().predict(users, items)

    def recommend(self, user, n: int = 10, exclude_seen: bool = True,
                  min_item_ratings: int = MIN_ITEM_RATINGS) -> pd.DataFrame:
        """The ``n`` items with the highest score for a known user: the ranking tables'
        when the fit trained them, else the predicted rating (see
        `trainer.TrainedRun.recommend`); items with fewer than ``min_item_ratings``
        training ratings are left out (0: none are)."""
        return self._fitted().recommend(user, n, exclude_seen, min_item_ratings)

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

    def save(self, path: str | Path) -> Path:
        """Copy the fitted run (model, id maps, metrics and the shards it made) to ``path``,
        with the parameters; checkpoints are left behind. Returns the folder."""
        self._fitted()
        target = Path(path)
        if target.exists() and any(target.iterdir()):
            raise ValueError(f"{target} already exists and is not empty; choose another path")
        ignore = shutil.ignore_patterns(CHECKPOINT, checkpoint_slice_pattern("*"), EXPORT_DIR)
        shutil.copytree(self.run_dir_, target, ignore=ignore, dirs_exist_ok=True)
        params = {k: v for k, v in self.get_params().items() if k != "work_dir"}
        write_json(target / ESTIMATOR_PARAMS, params)
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


MatrixFactorization.__init__.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
       for name, default in PARAMETERS.items()])


_PACKAGE_LOGGERS = ("shardmf", "trainer", "data_shards")


@contextlib.contextmanager
def _progress_logging(verbose: bool) -> Iterator[None]:
    """While fitting: the packages' INFO lines on stderr, when ``verbose`` and the
    application has not configured logging itself (then its handlers decide). The
    "shardmf" logger's level filters all three packages, so one setting silences them."""
    if not verbose or logging.getLogger().handlers:
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
