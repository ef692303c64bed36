"""Cluster the learned item embeddings and score the clusters against genre: pure computation.

Matrix factorisation learns item embeddings from ratings alone; if items of
one genre land in one cluster, the factors captured genre without ever seeing
it. Every genre score is quoted beside a shuffled-label baseline so that
"NMI 0.12" can be read as "far above chance" or "chance".

`cluster_items` takes embeddings and the item table and returns a `ClusterResult`
(K-Means or MiniBatchKMeans from scikit-learn, k given or chosen by silhouette); it
reads and writes no file. `post_step` turns the result into the run folder's cluster
files and reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    pairwise_distances,
    silhouette_score,
)

from trainer.config import ClusterConfig

logger = logging.getLogger(__name__)

# Above this many kept items, algorithm "auto" switches to MiniBatchKMeans: full
# K-Means passes over every item per iteration and per restart.
MINIBATCH_ABOVE = 100_000
# k-means++ restarts: a few guard against a poor start at little cost.
_KMEANS_INITS = 4
_MINIBATCH_SIZE = 4096  # items per MiniBatchKMeans step
# Silhouette is O(n^2); above this many items it is estimated on a seeded sample.
_SILHOUETTE_SAMPLE = 10_000
# --clusters auto fits every k on one seeded sample of at most this many items and
# scores it against one precomputed distance matrix (float64: 8 * n^2 bytes, 128 MB).
_SELECTION_SAMPLE = 4_000
# MovieLens writes this instead of leaving the genres empty.
_NO_GENRE_MARKERS = frozenset({"(no genres listed)"})
_GENRES_PER_CLUSTER = 20  # genre distribution entries kept per cluster in clusters.json
_GENRE_SCORES = ("nmi", "ari", "purity", "multilabel_purity")
SCORE_NAMES = {
    "nmi": "NMI (primary genre)",
    "ari": "Adjusted Rand index (primary genre)",
    "purity": "Purity (primary genre)",
    "multilabel_purity": "Multi-label purity (any genre)",
}


@dataclass(frozen=True, eq=False)
class ClusterResult:
    """What `cluster_items` found; `write_cluster_outputs` turns it into files.

    Row i of `items`, `labels`, `distances` and `projection` is the same kept item.
    """

    config: ClusterConfig
    k: int  # clusters used: config.clusters, or the one chosen by silhouette
    algorithm: str  # "kmeans" or "minibatch" (config "auto" resolved)
    # None unless config.clusters == "auto": method, sample_size, k_min, k_max (as
    # searched), silhouette_by_k [{"k", "silhouette"}], chosen_k.
    k_selection: dict[str, Any] | None
    # Kept items (train_ratings >= min_item_ratings) in item_id order: item_id,
    # original_item_id, title, genres (null where unknown), train_ratings.
    items: pd.DataFrame
    labels: np.ndarray  # (n_kept,) int32 cluster of each kept item
    # (n_kept,) float32 Euclidean distance to its centroid, in the clustered space
    # (unit vectors when config.normalize).
    distances: np.ndarray
    projection: np.ndarray  # (n_kept, 2) float32 PCA coordinates for the plot
    explained_variance: tuple[float, float]  # variance ratio of the two PCA axes
    items_left_out: int  # items below min_item_ratings
    items_without_genres: int  # kept items excluded from the genre scores
    genres_known: bool  # whether genre scores were computed
    # silhouette: float | None; nmi, ari, purity, multilabel_purity: None when
    # genres are unknown, else {"score", "baseline_mean", "baseline_std", "z"}.
    scores: dict[str, Any]
    # Share of the kept items with genres that carry each genre, commonest first:
    # [{"genre", "items", "share"}]; empty when genres are unknown.
    genre_base_rates: list[dict[str, Any]]
    # One dict per cluster: cluster, size, top_items, genres (see clusters.json).
    clusters: list[dict[str, Any]]


def cluster_items(
    item_embeddings: np.ndarray, items: pd.DataFrame, config: ClusterConfig
) -> ClusterResult:
    """Cluster the embeddings of well-rated items and score the clusters against genres.

    Args:
        item_embeddings: (num_items, dim) float array; row i is contiguous item id i.
        items: one row per contiguous item id, in id order: item_id, original_item_id,
            train_ratings, and optionally title and genres ("|"-joined names, null if unknown).
        config: clustering settings.

    Returns:
        The labels, distances, projection, scores and per-cluster summaries of the kept items.

    Raises:
        ValueError: inputs disagree with the contract, or too few items remain for k.
    """
    embeddings = _check_inputs(item_embeddings, items)
    train_ratings = items["train_ratings"].to_numpy(dtype=np.int64)
    keep = train_ratings >= config.min_item_ratings
    n_kept = int(keep.sum())
    if config.clusters != "auto" and n_kept < config.clusters:
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
    x = _clustering_space(x, config.normalize)
    algorithm = _resolve_algorithm(config.algorithm, n_kept)

    k_selection = None
    if config.clusters == "auto":
        k_selection = _choose_k(x, config)
        k = k_selection["chosen_k"]
    else:
        k = config.clusters
    estimator = _estimator(algorithm, k, config.seed)
    labels = estimator.fit_predict(x).astype(np.int32)
    centers = estimator.cluster_centers_[labels]
    distances = np.linalg.norm(x.astype(np.float64) - centers, axis=1).astype(np.float32)

    with_genres, vocabulary, membership, primary = _encode_genres(kept["genres"])
    genres_known = len(np.unique(primary)) >= 2

    # Independent streams, so that e.g. the silhouette sample does not depend on k.
    silhouette_rng, shuffle_rng = (np.random.default_rng([config.seed, i]) for i in (1, 2))
    scores: dict[str, Any] = {"silhouette": _silhouette(x, labels, silhouette_rng)}
    if genres_known:
        scores.update(
            _genre_scores(
                labels[with_genres], k, primary, membership, config.baseline_shuffles, shuffle_rng
            )
        )
    else:
        scores.update(dict.fromkeys(_GENRE_SCORES))

    summaries = _summaries(
        kept, labels, k, config, membership if genres_known else None, with_genres, vocabulary
    )
    projection, explained = _project(x, config.seed)
    result = ClusterResult(
        config=config,
        k=k,
        algorithm=algorithm,
        k_selection=k_selection,
        items=kept,
        labels=labels,
        distances=distances,
        projection=projection,
        explained_variance=explained,
        items_left_out=len(items) - n_kept,
        items_without_genres=int((~with_genres).sum()),
        genres_known=genres_known,
        scores=scores,
        genre_base_rates=_base_rates(membership, vocabulary) if genres_known else [],
        clusters=summaries,
    )
    logger.info(
        "clustered %d items into %d clusters with %s%s (%d left out with < %d training "
        "ratings): %s",
        n_kept,
        k,
        algorithm,
        " (k by silhouette)" if k_selection else "",
        result.items_left_out,
        config.min_item_ratings,
        _score_line(scores),
    )
    return result


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


# --- clustering -------------------------------------------------------------


def _clustering_space(x: np.ndarray, normalize: bool) -> np.ndarray:
    """(n, dim) float32 embeddings, L2-normalised rows when `normalize` (zero rows stay zero)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not normalize:
        return x
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _resolve_algorithm(algorithm: str, n_items: int) -> str:
    if algorithm == "auto":
        return "minibatch" if n_items > MINIBATCH_ABOVE else "kmeans"
    return algorithm


def _estimator(
    algorithm: str, k: int, seed: int, n_init: int = _KMEANS_INITS
) -> KMeans | MiniBatchKMeans:
    if algorithm == "minibatch":
        return MiniBatchKMeans(
            n_clusters=k, n_init=n_init, batch_size=_MINIBATCH_SIZE, random_state=seed
        )
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed)


def _choose_k(x: np.ndarray, config: ClusterConfig) -> dict[str, Any]:
    """--clusters auto: the k in k_min..k_max with the highest mean silhouette.

    Every k is fitted and scored on one seeded sample (all items when few), against
    one precomputed distance matrix; the smallest k wins a tie. The scan uses plain
    K-Means with one k-means++ start whatever the algorithm: on a sample of a few
    thousand items that is the fastest, and the final fit has its restarts.
    """
    rng = np.random.default_rng([config.seed, 0])
    if len(x) > _SELECTION_SAMPLE:
        sample = x[np.sort(rng.choice(len(x), size=_SELECTION_SAMPLE, replace=False))]
    else:
        sample = x
    # Silhouette is defined for 2..n-1 clusters.
    k_max = min(config.k_max, len(sample) - 1)
    if k_max < config.k_min:
        raise ValueError(
            f"--clusters auto: --k-min {config.k_min} needs at least {config.k_min + 1} items "
            f"with at least {config.min_item_ratings} training ratings, found {len(x)}; "
            "lower --k-min or --min-item-ratings, or give --clusters a number"
        )
    distances = pairwise_distances(sample.astype(np.float64))
    by_k = []
    for k in range(config.k_min, k_max + 1):
        labels = _estimator("kmeans", k, config.seed, n_init=1).fit_predict(sample)
        found = len(np.unique(labels))  # fewer than k when points coincide
        score = (
            float(silhouette_score(distances, labels, metric="precomputed"))
            if 2 <= found <= len(sample) - 1
            else None
        )
        by_k.append({"k": k, "silhouette": score})
    scored = [entry for entry in by_k if entry["silhouette"] is not None]
    if not scored:
        raise ValueError(
            f"--clusters auto: the silhouette is undefined for every k in {config.k_min}.."
            f"{k_max} (too few distinct embeddings); give --clusters a number"
        )
    best = max(scored, key=lambda entry: (entry["silhouette"], -entry["k"]))
    logger.info(
        "--clusters auto: k=%d has the best silhouette (%.3f) of k=%d..%d on %d items",
        best["k"],
        best["silhouette"],
        config.k_min,
        k_max,
        len(sample),
    )
    return {
        "method": "silhouette",
        "sample_size": len(sample),
        "k_min": config.k_min,
        "k_max": k_max,
        "silhouette_by_k": by_k,
        "chosen_k": best["k"],
    }


def _project(x: np.ndarray, seed: int) -> tuple[np.ndarray, tuple[float, float]]:
    """2-D PCA coordinates; a 1-D embedding gets a zero second axis."""
    n_components = min(2, x.shape[1])
    pca = PCA(n_components=n_components, random_state=seed)
    projection = np.zeros((len(x), 2), dtype=np.float32)
    projection[:, :n_components] = pca.fit_transform(x)
    ratios = [float(r) for r in pca.explained_variance_ratio_] + [0.0] * (2 - n_components)
    return projection, (ratios[0], ratios[1])


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


def _base_rates(membership: np.ndarray, vocabulary: list[str]) -> list[dict[str, Any]]:
    """Each genre's share of the clustered items with genres: the denominator of lift."""
    counts = membership.sum(axis=0)
    ranked = sorted(range(len(vocabulary)), key=lambda j: (-counts[j], j))
    return [
        {
            "genre": vocabulary[j],
            "items": int(counts[j]),
            "share": float(counts[j] / len(membership)),
        }
        for j in ranked
        if counts[j]
    ]


def _summaries(
    kept: pd.DataFrame,
    labels: np.ndarray,
    k: int,
    config: ClusterConfig,
    membership: np.ndarray | None,
    with_genres: np.ndarray,
    vocabulary: list[str],
) -> list[dict[str, Any]]:
    """Per cluster: size, most-rated items, and genre distribution with lift."""
    # Most training ratings first, item id breaking ties so the order is stable.
    order = np.lexsort((kept["item_id"].to_numpy(), -kept["train_ratings"].to_numpy()))
    summaries = []
    for cluster in range(k):
        members = order[labels[order] == cluster]
        top = [
            {
                "item_id": int(kept["item_id"].iat[i]),
                "original_item_id": _json_scalar(kept["original_item_id"].iat[i]),
                "title": display_title(kept, i),
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
            {
                "cluster": cluster,
                "size": len(members),
                "items_with_genres": int((labels[with_genres] == cluster).sum()),
                "top_items": top,
                "genres": genres,
            }
        )
    return summaries


def _genre_mix(
    in_cluster: np.ndarray, membership: np.ndarray, vocabulary: list[str]
) -> list[dict[str, Any]]:
    """The cluster's genres, commonest first, with lift over the base rate.

    Shares count the cluster's items with genres that carry the genre (an item
    may carry several); lift = share in the cluster / share among all clustered
    items with genres, so 1 is "as common as anywhere" and 3 is "three times".
    """
    if not len(in_cluster):
        return []
    counts = in_cluster.sum(axis=0)
    share = counts / len(in_cluster)
    catalogue_share = membership.mean(axis=0)
    # Highest share first, genre name breaking ties (vocabulary is sorted).
    ranked = sorted(np.flatnonzero(counts), key=lambda j: (-counts[j], j))
    return [
        {
            "genre": vocabulary[j],
            "items": int(counts[j]),
            "share": float(share[j]),
            "lift": float(share[j] / catalogue_share[j]),
        }
        for j in ranked[:_GENRES_PER_CLUSTER]
    ]


# --- helpers ----------------------------------------------------------------


def display_title(items: pd.DataFrame, row: int) -> str:
    """The title of the item in row `row`, or its original id when the source has none."""
    title = items["title"].iat[row]
    if pd.isna(title) or not str(title).strip():
        return str(items["original_item_id"].iat[row])
    return str(title)


def _json_scalar(value: Any) -> Any:
    """numpy scalars to Python ones, so json can write original ids."""
    return value.item() if isinstance(value, np.generic) else value


def _score_line(scores: dict[str, Any]) -> str:
    silhouette = scores["silhouette"]
    parts = ["silhouette " + ("n/a" if silhouette is None else f"{silhouette:.3f}")]
    parts += [
        f"{name} {scores[name]['score']:.3f} (chance {scores[name]['baseline_mean']:.3f})"
        for name in _GENRE_SCORES
        if scores.get(name)
    ]
    return ", ".join(parts)
