"""A finished run folder as a thing to use: predictions, recommendations, similar items,
and embeddings keyed by original ids; `export_run` writes those embeddings for other tools,
`evaluate_run` adds ranking figures to its metrics.json.

    run = load_run("runs/ml100k")
    run.recommend(user=196, n=10)
    run.similar_items(run.find_item("Star Wars"), n=10)

A run holds the rating model (objective "rating": factors, biases and the global mean, for
predicted ratings), the ranking tables (objective "ranking", the only one on interaction
data: factors scored by <w_u, h_i>, trained by iALS), or both. When the ranking tables are
there they order `recommend` and place items for `similar_items` and the clusters: their
lists beat most-popular and their clusters follow genres more closely
(bench/ranking_objective.md); `predict` always needs the rating model.
"""

from __future__ import annotations

import difflib
import io
import logging
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shardmf.errors import InputError
from shardmf.manifest import Manifest, is_shard_folder
from shardmf.outputs import output_folder, write_atomic, write_json
from trainer.config import EXPORT_FORMATS, MIN_ITEM_RATINGS, RankingConfig
from trainer.run_files import (
    EXPORT_DIRS,
    EXPORT_KIND,
    EXPORT_SUMMARY,
    FINAL_METRICS,
    ITEMS,
    MODEL,
    MODEL_ARRAYS,
    RANKING_PREFIX,
    RETRAIN,
    SHARDS_DIR,
    TABLES,
    USERS,
    export_names,
    is_ranking_key,
    read_vouched_json,
    vouched,
    write_vouched,
)

if TYPE_CHECKING:
    import pandas as pd

    from trainer.distributed import DistEnv

log = logging.getLogger(__name__)


class TrainedRun:
    """The best-epoch tables of RUN_DIR with its id maps; everything in original ids.

    Loading and scoring use numpy and pyarrow only, and the DataFrames are built by pyarrow
    on demand: pandas costs half a second to import, which `shardmf recommend` and
    `shardmf similar` would pay on every call (they use `top_items`, `nearest_items`).

    The rating model's arrays (``user_factors``, ``item_factors``, ``user_bias``,
    ``item_bias``, ``global_mean``) are None when the run trained the ranking tables only;
    ``ranking_user_factors`` and ``ranking_item_factors`` are None when it trained the
    rating model only. ``tables`` names the pair that ranks, finds neighbours and is
    clustered: "ranking" when the run has it, else "rating".
    """

    def __init__(self, run_dir: str | Path, name: str | None = None,
                 shards: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir)
        self._shards_given = shards  # a copy of the run's shards elsewhere (`find_shards`)
        # How errors about ids and tables name the run: the folder, unless the caller has a
        # better name for it (the estimator's folder may be an internal temporary one).
        self.name = name or str(self.run_dir)
        arrays_path = self.run_dir / MODEL_ARRAYS
        if not arrays_path.is_file():
            raise InputError(f"{arrays_path}: not found; {self.run_dir} is not a finished run "
                             "(train it with `shardmf train SHARDS_DIR --out RUN_DIR`)")
        vouched(arrays_path, RETRAIN)
        try:
            self._load_arrays(arrays_path)
        except Exception as e:  # noqa: BLE001 (a damaged zip or array raises any of many)
            raise InputError(f"{arrays_path}: not the model arrays shardmf writes (damaged, cut "
                             f"short or replaced: {type(e).__name__}); {RETRAIN}") from e
        if self.item_factors is None and self.ranking_item_factors is None:
            raise InputError(f"{arrays_path}: holds neither the rating model nor the ranking "
                             f"tables; {RETRAIN}")
        self.tables = "ranking" if self.ranking_item_factors is not None else "rating"
        self._user_table = _id_table(self.run_dir / USERS, "original_user_id", "train_ratings")
        self._item_table = _id_table(self.run_dir / ITEMS, "original_item_id", "train_ratings",
                                     "title", "genres")
        self.item_train_ratings = _numpy(self._item_table.column("train_ratings"))
        self._check_shapes(arrays_path)

    def _load_arrays(self, arrays_path: Path) -> None:
        """model.npz's tables and facts (CRC-checked by zipfile as they are read)."""
        with np.load(arrays_path) as arrays:
            # A run written before the ranking objective has neither key: ratings, rated.
            self.objective = str(arrays["objective"]) if "objective" in arrays else "rating"
            self.kind = str(arrays["kind"]) if "kind" in arrays else "ratings"
            rating = "item_factors.weight" in arrays
            self.user_factors = arrays["user_factors.weight"] if rating else None
            self.item_factors = arrays["item_factors.weight"] if rating else None
            self.user_bias = arrays["user_bias.weight"][:, 0] if rating else None
            self.item_bias = arrays["item_bias.weight"][:, 0] if rating else None
            self.global_mean = float(arrays["global_mean"]) if rating else None
            ranking = RANKING_PREFIX + "item_factors.weight" in arrays
            self.ranking_user_factors = (arrays[RANKING_PREFIX + "user_factors.weight"]
                                         if ranking else None)
            self.ranking_item_factors = (arrays[RANKING_PREFIX + "item_factors.weight"]
                                         if ranking else None)
            self.scale = tuple(float(x) for x in arrays["scale"])
            # Found on first use: only seen items need the shards.
            self._shards_recorded = {name: str(arrays[name]) for name in (
                "shards_dir", "shards_identity") if name in arrays}

    def _check_shapes(self, arrays_path: Path) -> None:
        """The tables fit each other and the id maps: a file from another run is named here,
        not an IndexError (or a wrong answer) later."""
        users, items = self._user_table.num_rows, self._item_table.num_rows
        pairs = [(self.user_factors, self.item_factors, self.user_bias, self.item_bias),
                 (self.ranking_user_factors, self.ranking_item_factors, None, None)]
        for user_f, item_f, user_b, item_b in pairs:
            if user_f is None:
                continue
            fits = (user_f.ndim == item_f.ndim == 2 and user_f.shape[0] == users
                    and item_f.shape[0] == items and user_f.shape[1] == item_f.shape[1]
                    and (user_b is None or (user_b.shape == (users,)
                                            and item_b.shape == (items,))))
            if not fits:
                raise InputError(f"{arrays_path}: tables of shapes {user_f.shape} and "
                                 f"{item_f.shape} do not fit the {users:,} users and "
                                 f"{items:,} items of {USERS} and {ITEMS} (files of "
                                 f"different runs?); {RETRAIN}")

    # Built on first use: a dict of every original id (60 ms for 162k string ids, about
    # 1.3 s for 2M), which `recommend` needs for users only and `similar` for items only.
    @cached_property
    def _user_index(self) -> _IdIndex:
        return _IdIndex(self._user_table.column("original_user_id"))

    @cached_property
    def _item_index(self) -> _IdIndex:
        return _IdIndex(self._item_table.column("original_item_id"))

    @cached_property
    def shards_dir(self) -> Path:
        """The shard folder the run was trained on, found and checked by `find_shards`."""
        return find_shards(self.run_dir, self._shards_recorded, self._shards_given,
                           "leaving out the items each user rated in training")

    @cached_property
    def users(self) -> pd.DataFrame:
        """The users table (original_user_id, ...), row = contiguous user id."""
        return self._user_table.to_pandas()

    @cached_property
    def items(self) -> pd.DataFrame:
        """The items table (original_item_id, title, genres, train_ratings, ...), row =
        contiguous item id."""
        return self._item_table.to_pandas()

    @property
    def item_vectors(self) -> np.ndarray:
        """(num_items, dim) the item table of ``tables``: what `similar_items` compares and
        the clusters group."""
        return self.ranking_item_factors if self.tables == "ranking" else self.item_factors

    def item_fields(self, item_id: int) -> dict:
        """One row of the items table as a dict (contiguous ``item_id``)."""
        return self._item_table.slice(item_id, 1).to_pylist()[0]

    # ------------------------------------------------------------ ids

    def user_id(self, user) -> int:
        """Contiguous id of an original user id (text from a command line is converted)."""
        return _lookup(self._user_index, user, "user", self.name)

    def item_id(self, item) -> int:
        return _lookup(self._item_index, item, "item", self.name)

    def find_item(self, title: str) -> object:
        """Original id of the best title match: exact (any case), else the most-rated
        title containing the text; unknown titles list close matches."""
        titles = [t or "" for t in self._item_table.column("title").to_pylist()]
        wanted = title.strip().lower()
        if not wanted:
            raise InputError(f"an empty `title` ({title!r}): give some words of a title (every "
                             "title contains the empty text, so it would pick the most-rated "
                             "item)")
        found = [i for i, t in enumerate(titles) if t.lower() == wanted] or [
            i for i, t in enumerate(titles) if wanted in t.lower()]
        if not found:
            close = difflib.get_close_matches(title, [t for t in titles if t], n=5, cutoff=0.5)
            hint = f"; close matches: {', '.join(repr(c) for c in close)}" if close else ""
            raise InputError(f"no item title matches {title!r} in {self.name}{hint}")
        # the most-rated match; the first in the table among equals
        best = min(found, key=lambda i: -self.item_train_ratings[i])
        return self._item_index.originals[best]

    # ------------------------------------------------------------ using the model

    def predict(self, users, items) -> np.ndarray:
        """Predicted ratings, clamped to the scale, for pairs of original ids.

        An id unknown to the run (a user or item never seen in training) adds nothing: an
        unknown user gets ``global_mean + item_bias``, an unknown item ``global_mean +
        user_bias``, both unknown ``global_mean`` (no factor term without both factors).
        Needs the rating model: a run of the ranking tables alone raises InputError.
        """
        if self.item_factors is None:
            data, remedy = (
                ("interaction data", " (predicted ratings need rating data, trained with "
                 "objective='rating' or 'both')") if self.kind == "interactions" else
                ("rating data", ", or train it again with objective='both' for predicted "
                 "ratings too"))
            raise InputError(f"{self.name} learned rankings only (objective "
                             f"{self.objective}, {data}): it predicts no ratings; rank items "
                             f"with recommend or top_items{remedy}")
        u = self._user_index.positions(np.atleast_1d(users))
        i = self._item_index.positions(np.atleast_1d(items))
        if len(u) != len(i):
            raise InputError(f"predict: {len(u)} users but {len(i)} items; give one item "
                             "per user")
        known_u, known_i = u >= 0, i >= 0
        both = known_u & known_i
        scores = np.full(len(u), self.global_mean)
        scores[known_u] += self.user_bias[u[known_u]]
        scores[known_i] += self.item_bias[i[known_i]]
        scores[both] += np.einsum("bd,bd->b", self.user_factors[u[both]],
                                  self.item_factors[i[both]])
        return np.clip(scores, *self.scale)

    def recommend(self, user, n: int = 10, exclude_seen: bool = True,
                  min_item_ratings: int = MIN_ITEM_RATINGS) -> pd.DataFrame:
        """The n items with the highest score for one user: <w_u, h_i> of the ranking
        tables when the run has them, else the predicted rating.

        ``exclude_seen`` drops the items the user rated in training, read from the run's
        shards (`find_shards`: InputError when they are gone, never a list with them in).
        Items with fewer training ratings than ``min_item_ratings`` are left out: their
        factors are mostly the prior.
        Columns: original_item_id, title and genres (when the data has them), score (the
        order), and when the rating model ranks, predicted_rating (the score clipped to the
        rating scale, so the best items often tie at its top).
        """
        top, scores = self.top_items(user, n, exclude_seen, min_item_ratings)
        columns = self._item_table.take(top).select(self._described(["original_item_id",
                                                                      "title", "genres"]))
        if self.tables == "rating":
            columns = columns.append_column("predicted_rating",
                                            pa.array(np.clip(scores, *self.scale)))
        return columns.append_column("score", pa.array(scores)).to_pandas()

    def top_items(self, user, n: int = 10, exclude_seen: bool = True,
                  min_item_ratings: int = MIN_ITEM_RATINGS) -> tuple[np.ndarray, np.ndarray]:
        """`recommend` as arrays: contiguous item ids, best first, and their scores (the
        ranking tables' <w_u, h_i>, or the rating model's unclipped prediction)."""
        _check_list_length(n)
        uid = self.user_id(user)
        if self.tables == "ranking":
            scores = self.ranking_item_factors @ self.ranking_user_factors[uid]
        else:
            scores = (self.global_mean + self.user_bias[uid] + self.item_bias
                      + self.item_factors @ self.user_factors[uid])
        if exclude_seen:
            seen = self._seen_items(uid)
            scores[seen] = -np.inf
        scores[self._rarely_rated(min_item_ratings)] = -np.inf
        top = _top(scores, n)
        return top, scores[top]

    def similar_items(self, item, n: int = 10,
                      min_item_ratings: int = MIN_ITEM_RATINGS) -> pd.DataFrame:
        """The n items whose factors point the most the same way (cosine similarity of
        `item_vectors`), among items with at least ``min_item_ratings`` training ratings."""
        top, cosine = self.nearest_items(item, n, min_item_ratings)
        columns = self._item_table.take(top).select(self._described([
            "original_item_id", "title", "genres", "train_ratings"]))
        return columns.append_column("similarity", pa.array(cosine)).to_pandas()

    def nearest_items(self, item, n: int = 10, min_item_ratings: int = MIN_ITEM_RATINGS
                      ) -> tuple[np.ndarray, np.ndarray]:
        """`similar_items` as arrays: contiguous item ids, nearest first, and their cosines."""
        _check_list_length(n)
        iid = self.item_id(item)
        vectors = self.item_vectors
        norms = np.linalg.norm(vectors, axis=1)
        cosine = vectors @ vectors[iid] / np.maximum(norms * norms[iid], 1e-12)
        cosine[iid] = -np.inf
        cosine[self._rarely_rated(min_item_ratings)] = -np.inf
        top = _top(cosine, n)
        return top, cosine[top]

    def item_embeddings(self, tables: str | None = None) -> pd.DataFrame:
        """Item factors (columns f0..f{dim-1}) indexed by original item id: of the rating
        model (with a bias column) or of the ranking tables (no bias); None: the rating
        model's when the run has one, as before the ranking objective, else the ranking
        tables'."""
        factors, bias = self._factors("items", tables)
        return _embedding_frame(factors, bias, self._item_table.select(["original_item_id"]))

    def user_embeddings(self, tables: str | None = None) -> pd.DataFrame:
        """User factors indexed by original user id, as `item_embeddings`."""
        factors, bias = self._factors("users", tables)
        return _embedding_frame(factors, bias, self._user_table.select(["original_user_id"]))

    def trained_tables(self) -> tuple[str, ...]:
        """The pairs of tables this run holds: "rating" (first) and/or "ranking"."""
        present = {"rating": self.item_factors is not None,
                   "ranking": self.ranking_item_factors is not None}
        return tuple(name for name in TABLES if present[name])

    def _factors(self, side: str, tables: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        if tables is None:
            tables = self.trained_tables()[0]  # the rating model first
        if tables not in self.trained_tables():
            raise InputError(f"tables={tables!r}: {self.name} holds "
                             f"{' and '.join(map(repr, self.trained_tables()))} only "
                             f"(objective {self.objective})")
        if tables == "ranking":
            return (self.ranking_item_factors if side == "items"
                    else self.ranking_user_factors), None
        return ((self.item_factors, self.item_bias) if side == "items"
                else (self.user_factors, self.user_bias))

    def _described(self, columns: list[str]) -> list[str]:
        """``columns`` less those the data left empty: items without a title or genres
        (ratings from a DataFrame, or a file without an items table) show none, not NaN."""
        table = self._item_table
        return [name for name in columns if table.column(name).null_count < table.num_rows]

    def _rarely_rated(self, min_item_ratings: int) -> np.ndarray:
        return self.item_train_ratings < min_item_ratings

    def _seen_items(self, uid: int) -> np.ndarray:
        seen = []
        manifest = Manifest.load(self.shards_dir)
        # Row groups whose user_id range leaves uid out are skipped (by user shards: most).
        # By hand, not pyarrow.dataset's filter: that module imports pandas.
        for entry in manifest.files["train"]:
            shard = pq.ParquetFile(manifest.check_file(entry, sha256=False))
            column = shard.schema_arrow.get_field_index("user_id")
            for group in range(shard.num_row_groups):
                stats = shard.metadata.row_group(group).column(column).statistics
                if stats is not None and stats.has_min_max and not (
                        stats.min <= uid <= stats.max):
                    continue
                rows = shard.read_row_group(group, columns=["user_id", "item_id"])
                users = _numpy(rows.column("user_id"))
                seen.append(_numpy(rows.column("item_id"))[users == uid])
        return np.concatenate(seen).astype(np.int64) if seen else np.array([], dtype=np.int64)


def _id_table(path: Path, *columns: str) -> pa.Table:
    """A run's id map, checked before it is parsed, with the columns its readers use."""
    vouched(path, RETRAIN)
    try:
        table = pq.ParquetFile(path).read()
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for damage)
        raise InputError(f"{path}: not a readable id table ({type(e).__name__}); "
                         f"{RETRAIN}") from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: no {', '.join(missing)} column (not the id table shardmf "
                         f"writes there); {RETRAIN}")
    return table


def find_shards(run_dir: Path, recorded: dict, given: str | Path | None, needed_for: str
                ) -> Path:
    """The shards a run was trained on: ``given`` (a copy, moved or restored), else
    RUN_DIR/shards (`shardmf run`, a saved estimator: they move with the folder), else the
    folder training read. Checked against the identity the run recorded (runs written
    before it was recorded are taken on trust). InputError when none is there or the one
    found holds other shards: nothing goes on without them, ``needed_for`` says why."""
    candidates = ([Path(given)] if given is not None
                  else [run_dir / SHARDS_DIR, Path(recorded["shards_dir"])])
    found = next((folder for folder in candidates if is_shard_folder(folder)), None)
    if found is None:
        raise InputError(f"{run_dir}: its shards are gone (looked in "
                         f"{', '.join(map(str, candidates))}); {needed_for} needs them: pass "
                         "`shards` with a copy of them (checked against the run)")
    identity = recorded.get("shards_identity")
    if identity is not None:
        found_identity = Manifest.load(found).identity
        if found_identity != identity:
            raise InputError(f"{found}: other shards than {run_dir} was trained on (manifest "
                             f"identity {found_identity}, the run's {identity}); pass `shards` "
                             "with the ones it was trained on")
    return found


def load_run(run_dir: str | Path, name: str | None = None,
             shards: str | Path | None = None) -> TrainedRun:
    """A finished run, ready for predict / recommend / similar_items; ``name``: how its
    errors call it (default: the folder); ``shards``: where its shards are now, when they
    are neither in the run folder nor where training read them."""
    return TrainedRun(run_dir, name, shards)


def export_run(run_dir: str | Path, out: str | Path | None = None,
               format: str = "parquet", overwrite: bool = False) -> Path:
    """Write a run's user and item embeddings with their original ids, for other tools.

    Each pair of tables the run holds, per side: the rating model's as
    ``{side}_embeddings.parquet`` (original id, f0.., bias) with ``parquet``, or
    ``{side}_factors.npy`` (float32, one row per id) beside ``{side}_ids.parquet``
    (original id, bias) with ``npy``; the ranking tables' under the same names prefixed
    ``ranking_`` (no bias: ``ranking_items_embeddings.parquet``, ``ranking_items_factors.npy``,
    ...). ``model.json`` says which tables the run trained and how each scores: a rating is
    ``clip(global_mean + user bias + item bias + <f_u, f_i>, rating_scale)``, a ranking
    score ``<f_u, f_i>`` of the ranking tables. ``out`` defaults to RUN_DIR/export
    (parquet) or RUN_DIR/export-npy (npy), each replaced by the next export of its format;
    a folder given as ``out`` that holds an earlier export is replaced only with
    ``overwrite``. Returns the folder.
    """
    if format not in EXPORT_FORMATS:
        raise InputError(f"format={format!r}: expected {' | '.join(EXPORT_FORMATS)}")
    run = load_run(run_dir)
    folder = Path(out) if out is not None else run.run_dir / EXPORT_DIRS[format]
    summary: dict = {"objective": run.objective, "kind": run.kind,
                     "tables": list(run.trained_tables())}
    with output_folder(folder, EXPORT_KIND, overwrite=overwrite or out is None) as building:
        for tables in run.trained_tables():
            for side, frame in (("items", run.item_embeddings(tables)),
                                ("users", run.user_embeddings(tables))):
                _write_embeddings(building, frame.rename_axis(f"original_{side[:-1]}_id"),
                                  export_names(side, tables), format)
        if run.item_factors is not None:
            summary.update({
                "global_mean": run.global_mean, "rating_scale": list(run.scale),
                "dim": int(run.item_factors.shape[1]),
                "rating": "clip(global_mean + user bias + item bias + <user f, item f>, "
                          "rating_scale)"})
        if run.ranking_item_factors is not None:
            summary.update({
                "ranking_dim": int(run.ranking_item_factors.shape[1]),
                "ranking_score": f"<user f, item f> of the {RANKING_PREFIX} files: higher "
                                 "is a likelier choice; no scale"})
        write_json(building / EXPORT_SUMMARY, summary)
    log.info("wrote %s embeddings to %s", format, folder)
    return folder


def _write_embeddings(folder: Path, frame: pd.DataFrame, names: dict[str, str],
                      format: str) -> None:
    """One side of one pair of tables (``frame`` indexed by original id) in ``format``."""
    frame = frame.reset_index()
    if format == "parquet":
        write_atomic(folder / names["embeddings"], _parquet_bytes(frame))
        return
    factors = frame.filter(regex=r"^f\d+$")
    buffer = io.BytesIO()
    np.save(buffer, factors.to_numpy(dtype="float32"))
    write_atomic(folder / names["factors"], buffer.getvalue())
    write_atomic(folder / names["ids"], _parquet_bytes(frame.drop(columns=factors.columns)))


def evaluate_run(run_dir: str | Path, ks: tuple[int, ...] = RankingConfig.ranking_ks,
                 threshold: float | None = None, min_item_ratings: int = 0,
                 max_users: int = RankingConfig.ranking_users,
                 env: DistEnv | None = None, shards: str | Path | None = None) -> dict:
    """Ranking figures of a finished run (model.pt) on its test split, beside most-popular:
    the lists of the ranking tables when the run trained them, else of the rating model.

    ``max_users``: a seeded sample of about this many test users (0: every one), the same
    users training evaluated. Needs the run's shards (`find_shards`; ``shards``: where a
    copy of them is now). With ``env`` (ranks already joined,
    as `shardmf evaluate --nproc N` does) every rank must call this: each scores its share
    of the users, as at the end of training, and gets the same figures; None: this one
    process scores them all. The figures replace the ranking figures in
    RUN_DIR/metrics.json (rank 0 writes it, atomically; the other figures are kept) and
    are returned. See `trainer.ranking.ranking_metrics` for the keys.
    """
    # Here, not at the top: recommending from a run must not wait for torch to import.
    import torch

    from trainer.checkpoint import load_model
    from trainer.distributed import DistEnv
    from trainer.ranking import ranking_metrics
    from trainer.shards import open_shards

    run = Path(run_dir)
    tables, payload = load_model(run / MODEL)
    model = tables.lists  # the ranking tables when the run trained them
    kept = {k: v for k, v in (read_vouched_json(run / FINAL_METRICS, RETRAIN) or {}).items()
            if not is_ranking_key(k)}
    shards = open_shards(find_shards(run, payload, shards, "evaluation on the test split"))
    rows = (model.user_factors.num_embeddings, model.item_factors.num_embeddings)
    if rows != (shards.num_users, shards.num_items):
        raise InputError(f"{run / MODEL}: tables of {rows[0]:,} users and {rows[1]:,} items, "
                         f"but its shards {shards.root} hold {shards.num_users:,} and "
                         f"{shards.num_items:,} (files of different runs?); {RETRAIN}")
    if env is None:
        env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                      device=torch.device("cpu"), backend=None)
    figures = ranking_metrics(model.to(env.device), shards, env, ks=ks, threshold=threshold,
                              min_item_ratings=min_item_ratings, max_users=max_users)
    if env.is_main:
        write_vouched(run / FINAL_METRICS,
                      lambda: write_json(run / FINAL_METRICS, {**kept, **figures}))
    return figures


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


class _IdIndex:
    """Original ids -> contiguous ids (rows of the users or items table)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.integer = pa.types.is_integer(column.type)
        self.originals = column.to_pylist()
        self._rows = {original: row for row, original in enumerate(self.originals)}

    def key(self, original) -> object:
        """An original id in the table's type (text from a command line becomes a number);
        None when it cannot be one."""
        if self.integer:
            if isinstance(original, str):
                try:
                    return int(original)
                except ValueError:
                    return None
            return original
        return str(original)

    def positions(self, originals) -> np.ndarray:
        """(N,) int64 rows of original ids; -1 for ids not in the table."""
        return np.array([self._rows.get(self.key(original), -1) for original in originals],
                        dtype=np.int64)


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A null-free numeric column as numpy, through a tensor: pyarrow's own ``to_numpy``
    imports pandas, half a second of every `shardmf recommend`."""
    return np.asarray(column.combine_chunks().to_tensor())


def _lookup(index: _IdIndex, original, kind: str, run_name: str) -> int:
    position = index.positions([original])[0]
    if position < 0:
        raise InputError(f"{kind} {original!r} is not in {run_name} (ids are the original "
                         f"ones from the ratings, e.g. {index.originals[0]!r})")
    return int(position)


def _check_list_length(n: object) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n={n!r}: expected an integer of at least 1 (the list's length)")


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    n = min(n, int(np.isfinite(scores).sum()))
    top = np.argpartition(-scores, n - 1)[:n] if n else np.array([], dtype=np.int64)
    return top[np.argsort(-scores[top], kind="stable")]


def _embedding_frame(factors: np.ndarray, bias: np.ndarray | None,
                     ids: pa.Table) -> pd.DataFrame:
    import pandas as pd  # here: the rest of this module serves the command line without it

    frame = pd.DataFrame(factors, index=pd.Index(ids.to_pandas().iloc[:, 0]),
                         columns=[f"f{k}" for k in range(factors.shape[1])])
    if bias is not None:
        frame["bias"] = bias
    return frame
