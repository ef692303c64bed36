"""Rank-0 post-step: cluster the learned item embeddings and report how well they match genre.

Matrix factorisation learns item embeddings from ratings alone; if items of
one genre land in one K-Means cluster, the factors captured genre without
ever seeing it. Every genre score is quoted beside a shuffled-label baseline
so that "NMI 0.12" can be read as "far above chance" or "chance".

`cluster_items` is pure computation; `write_cluster_outputs` writes, each file
atomically, into the run directory:

- ``item_clusters.parquet``: one row per clustered item (original_item_id,
  item_id, title, genres, cluster int32, distance float32).
- ``clusters.json``: k, counts, scores with baselines, per-cluster summaries.
- ``clusters_pca.png``: 2-D PCA projection coloured by cluster.
- ``report.md``: the human summary, written last so that its presence means
  the other files are complete.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

logger = logging.getLogger(__name__)

# k-means++ restarts: a few guard against a poor start at little cost; more
# matter only for catalogues far larger than K-Means is worth running on.
_KMEANS_INITS = 4
# Silhouette is O(n^2); above this many items it is estimated on a sample.
_SILHOUETTE_SAMPLE = 10_000
# MovieLens writes this instead of leaving the genres empty.
_NO_GENRE_MARKERS = frozenset({"(no genres listed)"})
_GENRES_PER_CLUSTER = 5  # genre mix entries kept per cluster in clusters.json
_REPORT_GENRES = 3  # of those, shown per cluster in report.md
_REPORT_TITLES = 3  # top titles shown per cluster in report.md
_ANNOTATED_TITLES = 8  # most-rated items labelled on the PCA plot
_GENRE_SCORES = ("nmi", "ari", "purity", "multilabel_purity")
_SCORE_NAMES = {
    "nmi": "NMI (primary genre)",
    "ari": "Adjusted Rand index (primary genre)",
    "purity": "Purity (primary genre)",
    "multilabel_purity": "Multi-label purity (any genre)",
}

PARQUET_NAME = "item_clusters.parquet"
JSON_NAME = "clusters.json"
PNG_NAME = "clusters_pca.png"
REPORT_NAME = "report.md"


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """How item embeddings are clustered and scored; validated on construction."""

    clusters: int = 20  # number of K-Means clusters (k)
    min_item_ratings: int = 20  # items with fewer training ratings are left out (prior-dominated)
    top_items: int = 10  # items listed per cluster, most training ratings first
    seed: int = 0  # random_state for K-Means, PCA, silhouette sampling and the shuffles
    baseline_shuffles: int = 20  # genre-label shuffles for the chance baseline

    def __post_init__(self) -> None:
        # Same wording as the other configs: each field is also a CLI flag.
        minimums = {
            "clusters": 2,
            "min_item_ratings": 0,
            "top_items": 1,
            "seed": 0,
            "baseline_shuffles": 1,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{flag} {value!r}: expected an integer")
            if value < minimum:
                raise ValueError(f"{flag} {value!r}: expected at least {minimum}")
        if self.seed >= 2**32:
            # scikit-learn's random_state accepts 0..2**32-1 only.
            raise ValueError(f"--seed {self.seed!r}: expected less than 2**32")


@dataclass(frozen=True, eq=False)
class ClusterResult:
    """What `cluster_items` found; `write_cluster_outputs` turns it into files.

    Row i of `items`, `labels`, `distances` and `projection` is the same kept item.
    """

    config: ClusterConfig
    # Kept items (train_ratings >= min_item_ratings) in item_id order: item_id,
    # original_item_id, title, genres (null where unknown), train_ratings.
    items: pd.DataFrame
    labels: np.ndarray  # (n_kept,) int32 cluster of each kept item
    distances: np.ndarray  # (n_kept,) float32 Euclidean distance to its centroid
    projection: np.ndarray  # (n_kept, 2) float32 PCA coordinates for the plot
    explained_variance: tuple[float, float]  # variance ratio of the two PCA axes
    items_left_out: int  # items below min_item_ratings
    items_without_genres: int  # kept items excluded from the genre scores
    genres_known: bool  # whether genre scores were computed
    # silhouette: float | None; nmi, ari, purity, multilabel_purity: None when
    # genres are unknown, else {"score", "baseline_mean", "baseline_std", "z"}.
    scores: dict[str, Any]
    # One dict per cluster: cluster, size, top_items, genres (see clusters.json).
    clusters: list[dict[str, Any]]


def cluster_items(
    item_embeddings: np.ndarray, items: pd.DataFrame, config: ClusterConfig
) -> ClusterResult:
    """Cluster the embeddings of well-rated items with K-Means and score them against genres.

    Args:
        item_embeddings: (num_items, dim) float array; row i is contiguous item id i.
        items: one row per contiguous item id, in id order: item_id, original_item_id,
            train_ratings, and optionally title and genres ("|"-joined names, null if unknown).
        config: clustering settings.

    Returns:
        The labels, distances, projection, scores and per-cluster summaries of the kept items.

    Raises:
        ValueError: inputs disagree with the contract, or fewer items than clusters remain.
    """
    embeddings = _check_inputs(item_embeddings, items)
    train_ratings = items["train_ratings"].to_numpy(dtype=np.int64)
    keep = train_ratings >= config.min_item_ratings
    n_kept = int(keep.sum())
    if n_kept < config.clusters:
        raise ValueError(
            f"--clusters {config.clusters} exceeds the number of items with at least "
            f"{config.min_item_ratings} training ratings ({n_kept}); "
            "lower --clusters or --min-item-ratings"
        )
    kept = pd.DataFrame(
        {
            "item_id": items["item_id"].to_numpy()[keep],
            "original_item_id": items["original_item_id"].to_numpy()[keep],
            "title": _optional_column(items, "title")[keep],
            "genres": _optional_column(items, "genres")[keep],
            "train_ratings": train_ratings[keep],
        }
    )
    x = embeddings[keep]
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x).all(axis=1)).sum())
        raise ValueError(
            f"item_embeddings: {bad} kept item(s) have non-finite values; "
            "the checkpoint is corrupt or training diverged"
        )

    kmeans = KMeans(n_clusters=config.clusters, n_init=_KMEANS_INITS, random_state=config.seed)
    labels = kmeans.fit_predict(x).astype(np.int32)
    centers = kmeans.cluster_centers_[labels]
    distances = np.linalg.norm(x.astype(np.float64) - centers, axis=1).astype(np.float32)

    with_genres, vocabulary, membership, primary = _encode_genres(kept["genres"])
    genres_known = len(np.unique(primary)) >= 2

    rng = np.random.default_rng(config.seed)
    scores: dict[str, Any] = {"silhouette": _silhouette(x, labels, rng)}
    if genres_known:
        scores.update(
            _genre_scores(
                labels[with_genres],
                config.clusters,
                primary,
                membership,
                config.baseline_shuffles,
                rng,
            )
        )
    else:
        scores.update(dict.fromkeys(_GENRE_SCORES))

    summaries = _summaries(
        kept, labels, config, membership if genres_known else None, with_genres, vocabulary
    )
    projection, explained = _project(x, config.seed)
    result = ClusterResult(
        config=config,
        items=kept,
        labels=labels,
        distances=distances,
        projection=projection,
        explained_variance=explained,
        items_left_out=len(items) - n_kept,
        items_without_genres=int((~with_genres).sum()),
        genres_known=genres_known,
        scores=scores,
        clusters=summaries,
    )
    logger.info(
        "clustered %d items into %d clusters (%d left out with < %d training ratings): %s",
        n_kept,
        config.clusters,
        result.items_left_out,
        config.min_item_ratings,
        _score_line(scores),
    )
    return result


def write_cluster_outputs(
    result: ClusterResult, run_dir: Path, metrics: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the parquet, JSON, PNG and report into `run_dir`, each atomically, report last.

    Args:
        result: from `cluster_items`.
        run_dir: the run directory (created if missing).
        metrics: the run's final figures (test_rmse, epochs, ...) to quote in the report.

    Returns:
        The dict written to clusters.json.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = _clusters_json(result)

    _write_atomic(run_dir / PARQUET_NAME, _parquet_bytes(result))
    _write_atomic(
        run_dir / JSON_NAME,
        (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode("utf-8"),
    )
    _write_atomic(run_dir / PNG_NAME, _render_pca(result))
    _write_atomic(run_dir / REPORT_NAME, _report(result, metrics).encode("utf-8"))
    logger.info(
        "wrote %s, %s, %s and %s to %s", PARQUET_NAME, JSON_NAME, PNG_NAME, REPORT_NAME, run_dir
    )
    return summary


# --- inputs -----------------------------------------------------------------


def _check_inputs(item_embeddings: np.ndarray, items: pd.DataFrame) -> np.ndarray:
    """Fail with a clear message before K-Means fails with an obscure one."""
    embeddings = np.asarray(item_embeddings)
    if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(
            "item_embeddings: expected a (num_items, dim) float array, got shape "
            f"{embeddings.shape} dtype {embeddings.dtype}"
        )
    missing = [c for c in ("item_id", "original_item_id", "train_ratings") if c not in items]
    if missing:
        raise ValueError(f"items: missing column(s) {missing}; have {list(items.columns)}")
    if len(items) != len(embeddings):
        raise ValueError(
            f"items has {len(items):,} rows but item_embeddings has {len(embeddings):,}; "
            "both must have one row per contiguous item id"
        )
    item_ids = items["item_id"].to_numpy()
    out_of_place = np.flatnonzero(item_ids != np.arange(len(items)))
    if len(out_of_place):
        row = int(out_of_place[0])
        raise ValueError(
            f"items: row {row} has item_id {item_ids[row]}; expected rows in contiguous "
            "item id order 0..n-1"
        )
    return embeddings


def _optional_column(items: pd.DataFrame, name: str) -> np.ndarray:
    """The column's values; all null when the source has no such column."""
    if name not in items:
        return np.full(len(items), None, dtype=object)
    return items[name].to_numpy()


def _encode_genres(
    column: pd.Series,
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Genre strings as arrays, for the items that have genres.

    Returns:
        with_genres: (n,) bool, the item has at least one genre.
        vocabulary: sorted genre names.
        membership: (n_with, len(vocabulary)) int64, 1 where the item has the genre.
        primary: (n_with,) int64 vocabulary index of each item's first genre.
    """
    genre_sets = [_parse_genres(value) for value in column]
    with_genres = np.array([bool(g) for g in genre_sets], dtype=bool)
    vocabulary = sorted({g for genres in genre_sets for g in genres})
    index = {g: j for j, g in enumerate(vocabulary)}
    membership = np.zeros((int(with_genres.sum()), len(vocabulary)), dtype=np.int64)
    primary = np.empty(len(membership), dtype=np.int64)
    for row, genres in enumerate(g for g in genre_sets if g):
        membership[row, [index[g] for g in genres]] = 1
        primary[row] = index[genres[0]]
    return with_genres, vocabulary, membership, primary


def _parse_genres(value: Any) -> list[str]:
    """'Action|Sci-Fi' -> ['Action', 'Sci-Fi']: order kept (first is primary), no duplicates."""
    if pd.isna(value):
        return []
    names = (name.strip() for name in str(value).split("|"))
    return list(dict.fromkeys(n for n in names if n and n not in _NO_GENRE_MARKERS))


# --- scores -----------------------------------------------------------------


def _silhouette(x: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> float | None:
    """Mean silhouette, on a seeded sample for large catalogues; None where undefined."""
    if len(x) > _SILHOUETTE_SAMPLE:
        sample = np.sort(rng.choice(len(x), size=_SILHOUETTE_SAMPLE, replace=False))
        x, labels = x[sample], labels[sample]
    # Defined only for 2..n-1 distinct labels (k == n leaves every item alone).
    if not 2 <= len(np.unique(labels)) <= len(x) - 1:
        return None
    return float(silhouette_score(x, labels))


def _purity(labels: np.ndarray, membership: np.ndarray, k: int) -> float:
    """Share of items carrying their cluster's most frequent genre.

    With one-hot `membership` this is classic purity; with multi-hot it is
    multi-label purity (the dominant genre is counted across genre sets).
    """
    counts = np.zeros((k, membership.shape[1]), dtype=np.int64)
    np.add.at(counts, labels, membership)
    return float(counts.max(axis=1).sum() / len(labels))


def _genre_scores(
    labels: np.ndarray,
    k: int,
    primary: np.ndarray,
    membership: np.ndarray,
    shuffles: int,
    rng: np.random.Generator,
) -> dict[str, dict[str, float | None]]:
    """NMI, ARI, purity and multi-label purity of items with genres, each with its baseline.

    The baseline permutes genres among the same items, which keeps cluster
    sizes and genre frequencies and destroys only the link between them.
    """
    one_hot = np.eye(membership.shape[1], dtype=np.int64)[primary]

    def all_scores(order: np.ndarray) -> dict[str, float]:
        return {
            "nmi": float(normalized_mutual_info_score(primary[order], labels)),
            "ari": float(adjusted_rand_score(primary[order], labels)),
            "purity": _purity(labels, one_hot[order], k),
            "multilabel_purity": _purity(labels, membership[order], k),
        }

    real = all_scores(np.arange(len(labels)))
    shuffled = [all_scores(rng.permutation(len(labels))) for _ in range(shuffles)]
    out: dict[str, dict[str, float | None]] = {}
    for name in _GENRE_SCORES:
        values = np.array([s[name] for s in shuffled])
        mean, std = float(values.mean()), float(values.std())
        out[name] = {
            "score": real[name],
            "baseline_mean": mean,
            "baseline_std": std,
            # A constant baseline (std 0) makes "standard deviations above" meaningless.
            "z": (real[name] - mean) / std if std > 1e-12 else None,
        }
    return out


def _summaries(
    kept: pd.DataFrame,
    labels: np.ndarray,
    config: ClusterConfig,
    membership: np.ndarray | None,
    with_genres: np.ndarray,
    vocabulary: list[str],
) -> list[dict[str, Any]]:
    """Per cluster: size, most-rated items, and genre mix with lift over the catalogue."""
    # Most training ratings first, item id breaking ties so the order is stable.
    order = np.lexsort((kept["item_id"].to_numpy(), -kept["train_ratings"].to_numpy()))
    summaries = []
    for cluster in range(config.clusters):
        members = order[labels[order] == cluster]
        top = [
            {
                "item_id": int(kept["item_id"].iat[i]),
                "original_item_id": _json_scalar(kept["original_item_id"].iat[i]),
                "title": _display_title(kept, i),
                "train_ratings": int(kept["train_ratings"].iat[i]),
            }
            for i in members[: config.top_items]
        ]
        genres = (
            _genre_mix(membership[labels[with_genres] == cluster], membership, vocabulary)
            if membership is not None
            else []
        )
        summaries.append(
            {"cluster": cluster, "size": len(members), "top_items": top, "genres": genres}
        )
    return summaries


def _genre_mix(
    in_cluster: np.ndarray, membership: np.ndarray, vocabulary: list[str]
) -> list[dict[str, Any]]:
    """The cluster's most common genres, with lift over all clustered items with genres."""
    if not len(in_cluster):
        return []
    share = in_cluster.mean(axis=0)
    catalogue_share = membership.mean(axis=0)
    # Highest share first, genre name breaking ties (vocabulary is sorted).
    ranked = sorted(np.flatnonzero(share), key=lambda j: (-share[j], j))
    return [
        {
            "genre": vocabulary[j],
            "share": float(share[j]),
            "lift": float(share[j] / catalogue_share[j]),
        }
        for j in ranked[:_GENRES_PER_CLUSTER]
    ]


def _project(x: np.ndarray, seed: int) -> tuple[np.ndarray, tuple[float, float]]:
    """2-D PCA coordinates; a 1-D embedding gets a zero second axis."""
    n_components = min(2, x.shape[1])
    pca = PCA(n_components=n_components, random_state=seed)
    projection = np.zeros((len(x), 2), dtype=np.float32)
    projection[:, :n_components] = pca.fit_transform(x)
    ratios = [float(r) for r in pca.explained_variance_ratio_] + [0.0] * (2 - n_components)
    return projection, (ratios[0], ratios[1])


# --- outputs ----------------------------------------------------------------


def _clusters_json(result: ClusterResult) -> dict[str, Any]:
    """The clusters.json document: plain Python types, no NaN."""
    config = result.config
    return {
        "k": config.clusters,
        "items_clustered": len(result.items),
        "items_left_out": result.items_left_out,
        "min_item_ratings": config.min_item_ratings,
        "seed": config.seed,
        "genres_known": result.genres_known,
        "items_without_genres": result.items_without_genres,
        "baseline_shuffles": config.baseline_shuffles,
        "scores": _finite_floats(result.scores),
        "clusters": _finite_floats(result.clusters),
    }


def _parquet_bytes(result: ClusterResult) -> bytes:
    """item_clusters.parquet with explicit types (original ids stay int64 or become string)."""
    items = result.items
    original = items["original_item_id"]
    if pd.api.types.is_integer_dtype(original.infer_objects()):
        original_array = pa.array(original.to_numpy(dtype=np.int64), type=pa.int64())
    else:
        original_array = pa.array([str(v) for v in original], type=pa.string())
    table = pa.table(
        {
            "original_item_id": original_array,
            "item_id": pa.array(items["item_id"].to_numpy(dtype=np.int32), type=pa.int32()),
            "title": pa.array(items["title"], type=pa.string(), from_pandas=True),
            "genres": pa.array(items["genres"], type=pa.string(), from_pandas=True),
            "cluster": pa.array(result.labels, type=pa.int32()),
            "distance": pa.array(result.distances, type=pa.float32()),
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _render_pca(result: ClusterResult) -> bytes:
    """PNG of the PCA projection, one colour and legend entry per cluster."""
    # Imported here: only rank 0 draws, and the object-oriented Agg API keeps
    # pyplot's global state (and any interactive backend) out of the process.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = result.config.clusters
    if k <= 20:
        # tab20 pairs each hue dark then light; all darks first keeps neighbours distinct.
        tab20 = colormaps["tab20"].colors
        colours = (tab20[0::2] + tab20[1::2])[:k]
    else:
        colours = colormaps["turbo"](np.linspace(0, 1, k))
    figure = Figure(figsize=(11, 7.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    xy = result.projection
    # Small, translucent points stay readable for tens of thousands of items.
    point_size = float(np.clip(20_000 / len(xy), 3, 30))
    for cluster, summary in enumerate(result.clusters):
        members = result.labels == cluster
        if not members.any():
            continue
        axes.scatter(
            xy[members, 0],
            xy[members, 1],
            s=point_size,
            color=colours[cluster],
            alpha=0.7,
            linewidths=0,
            rasterized=True,
            label=_legend_label(summary),
        )
    train_ratings = result.items["train_ratings"].to_numpy()
    most_rated = np.lexsort((result.items["item_id"].to_numpy(), -train_ratings))
    for i in most_rated[:_ANNOTATED_TITLES]:
        axes.annotate(
            _shorten(_display_title(result.items, i), 32),
            xy=(xy[i, 0], xy[i, 1]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=7,
        )
    first, second = result.explained_variance
    axes.set_xlabel(f"PC1 ({first:.1%} of variance)")
    axes.set_ylabel(f"PC2 ({second:.1%} of variance)")
    nmi = result.scores.get("nmi")
    nmi_text = f", NMI with genre {nmi['score']:.3f}" if nmi else ""
    # A figure title: constrained layout centres it on the figure, never clipped by the legend.
    figure.suptitle(
        f"Item embeddings (PCA) coloured by K-Means cluster\nk={k}, {len(xy):,} items{nmi_text}"
    )
    axes.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        markerscale=max(1.0, 20 / point_size) ** 0.5,
        ncols=max(1, math.ceil(k / 30)),
        title="cluster (size): most over-represented genre",
        title_fontsize=8,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _report(result: ClusterResult, metrics: dict[str, Any] | None) -> str:
    """report.md: run figures, scores against chance, one row per cluster, the plot."""
    config = result.config
    n_kept = len(result.items)
    lines = [
        "# Item clusters",
        "",
        f"K-Means (k={config.clusters}, seed {config.seed}) on the learned embeddings of "
        f"{n_kept:,} items with at least {config.min_item_ratings} training ratings; "
        f"{result.items_left_out:,} items with fewer were left out, since their embeddings "
        "are mostly the prior.",
        "",
    ]
    scalar_metrics = {
        key: value
        for key, value in (metrics or {}).items()
        if isinstance(value, (int, float, str)) and not isinstance(value, bool)
    }
    if scalar_metrics:
        lines += ["## Run", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {_cell(key)} | {_cell(_number(v))} |" for key, v in scalar_metrics.items()]
        lines.append("")

    lines += ["## Does the clustering match genre?", ""]
    silhouette = result.scores["silhouette"]
    silhouette_text = "undefined (every item alone)" if silhouette is None else f"{silhouette:.3f}"
    lines.append(
        f"Silhouette: {silhouette_text} (-1 to 1; higher means tighter, better separated "
        "clusters; it does not involve genres)."
    )
    lines.append("")
    if result.genres_known:
        n_genre = n_kept - result.items_without_genres
        lines += [
            f"Genre scores use the {n_genre:,} clustered items with known genres"
            + (
                f" ({result.items_without_genres:,} without genres excluded)"
                if result.items_without_genres
                else ""
            )
            + ". The primary genre is the first one listed. Chance baseline: the same score "
            f"with genres shuffled among those items, {config.baseline_shuffles} times "
            "(mean ± std).",
            "",
            "| score | value | chance baseline | std above chance |",
            "| --- | --- | --- | --- |",
        ]
        for name in _GENRE_SCORES:
            s = result.scores[name]
            z = "n/a (constant baseline)" if s["z"] is None else f"{s['z']:.1f}"
            lines.append(
                f"| {_SCORE_NAMES[name]} | {s['score']:.3f} | "
                f"{s['baseline_mean']:.3f} ± {s['baseline_std']:.3f} | {z} |"
            )
    else:
        lines.append(
            "Genres are unknown for these items, so only the silhouette is reported; the "
            "clusters below are described by their most-rated items."
        )
    lines += [
        "",
        "## Clusters",
        "",
        "Genre shares count items tagged with the genre; lift = share in the cluster / "
        "share among all clustered items.",
        "",
        "| cluster | size | dominant genres (lift) | most-rated items |",
        "| --- | --- | --- | --- |",
    ]
    for summary in result.clusters:
        genres = ", ".join(
            f"{g['genre']} {g['share']:.0%} (×{g['lift']:.1f})"
            for g in summary["genres"][:_REPORT_GENRES]
        )
        titles = "; ".join(item["title"] for item in summary["top_items"][:_REPORT_TITLES])
        lines.append(
            f"| {summary['cluster']} | {summary['size']:,} | {_cell(genres or '-')} | "
            f"{_cell(titles or '-')} |"
        )
    lines += [
        "",
        f"![Item embeddings, PCA projection coloured by cluster]({PNG_NAME})",
        "",
        f"Per-item assignments: `{PARQUET_NAME}`; all figures: `{JSON_NAME}`.",
        "",
    ]
    return "\n".join(lines)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write under a temporary name in the same directory, then rename over `path`."""
    # A unique name rather than tempfile.mkstemp, whose 0600 mode would make
    # the report unreadable to others; open(..., "xb") honours the umask.
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --- formatting helpers -----------------------------------------------------


def _display_title(items: pd.DataFrame, row: int) -> str:
    """The title, or the original id when the source has none."""
    title = items["title"].iat[row]
    if pd.isna(title) or not str(title).strip():
        return str(items["original_item_id"].iat[row])
    return str(title)


def _json_scalar(value: Any) -> Any:
    """numpy scalars to Python ones, so json can write original ids."""
    return value.item() if isinstance(value, np.generic) else value


def _finite_floats(value: Any) -> Any:
    """Deep copy with non-finite floats as None: clusters.json must be strict JSON."""
    if isinstance(value, dict):
        return {key: _finite_floats(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite_floats(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _legend_label(summary: dict[str, Any]) -> str:
    """'7 (60): Adventure ×2.9': the highest lift among the cluster's commonest genres.

    The commonest genre alone would read "Drama" for most clusters of a film
    catalogue; lift says what sets the cluster apart.
    """
    common = summary["genres"][:_REPORT_GENRES]
    if not common:
        return f"{summary['cluster']} ({summary['size']:,})"
    telling = max(common, key=lambda g: g["lift"])
    return f"{summary['cluster']} ({summary['size']:,}): {telling['genre']} ×{telling['lift']:.1f}"


def _score_line(scores: dict[str, Any]) -> str:
    silhouette = scores["silhouette"]
    parts = ["silhouette " + ("n/a" if silhouette is None else f"{silhouette:.3f}")]
    parts += [
        f"{name} {scores[name]['score']:.3f} (chance {scores[name]['baseline_mean']:.3f})"
        for name in _GENRE_SCORES
        if scores.get(name)
    ]
    return ", ".join(parts)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(text: str) -> str:
    """Escape a value for a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")
