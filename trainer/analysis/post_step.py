"""The rank-0 post-step: read a finished run, cluster its item embeddings, render, write.

    cluster_run("runs/ml100k", ClusterConfig(clusters="auto"))

`clustering` computes (embeddings in, `ClusterResult` out), `report` renders (bytes and
text out); this module is the only one of the three that touches the run folder.
Written into RUN_DIR, each file atomically:

- ``item_clusters.parquet``: one row per clustered item (original_item_id, item_id,
  title, genres, cluster int32, distance float32).
- ``clusters.json``: k (and how it was chosen), counts, scores with baselines, genre
  base rates, per-cluster summaries.
- ``clusters_pca.png``, ``training_curves.png`` (when the run has per-epoch metrics),
  ``silhouette_by_k.png`` (with ``--clusters auto``).
- ``report.html`` (self-contained) and ``report.md``, written last: their presence
  means the other files are complete and belong to the same clustering.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shardmf.errors import InputError
from shardmf.outputs import os_error, write_atomic, write_json
from trainer.analysis.clustering import ClusterResult, cluster_items
from trainer.config import ClusterConfig
from trainer.run import load_run
from trainer.run_files import (
    CLUSTERS,
    FINAL_METRICS,
    ITEM_CLUSTERS,
    OPTIONAL_FIGURES,
    REPORT_HTML,
    REPORT_MD,
    REPORTS,
    read_json,
    read_run_files,
    write_vouched,
)

if TYPE_CHECKING:
    from trainer.analysis.report import Rendered

logger = logging.getLogger(__name__)


def cluster_run(run_dir: str | Path, config: ClusterConfig) -> dict[str, Any]:
    """K-Means on a finished run's item embeddings, scores and report in RUN_DIR.

    The embeddings are the ranking tables' items when the run trained them (their clusters
    follow genres more closely), else the rating model's item factors.
    Returns the clusters.json document.
    """
    run = load_run(run_dir)
    try:
        result = cluster_items(run.item_vectors, run.items, config)
    except ValueError as e:
        raise InputError(str(e)) from e
    return write_cluster_outputs(result, run.run_dir, read_json(run.run_dir / FINAL_METRICS),
                                 tables=run.tables)


def write_cluster_outputs(
    result: ClusterResult,
    run_dir: Path,
    metrics: dict[str, Any] | None = None,
    tables: str | None = None,
) -> dict[str, Any]:
    """Write the parquet, JSON, figures and reports into `run_dir`, each atomically.

    The reports of an earlier clustering are removed first and the new ones written
    last, so that a report in the folder always describes the files beside it.

    Args:
        result: from `cluster_items`.
        run_dir: the run directory (created if missing); its final metrics (when
            `metrics` is None), per-epoch metrics and config are quoted if present.
        metrics: the run's final figures (test_rmse, epochs, ...) to quote in the reports.
        tables: whose item embeddings were clustered, "ranking" or "rating" (clusters.json
            ``tables``; the reports say it); None: embeddings from elsewhere, not said.

    Returns:
        The clusters.json document.
    """
    # Imported here: matplotlib is needed only by rank 0, and only at this point.
    from trainer.analysis.report import render_all

    run_dir = Path(run_dir)
    summary = _clusters_json(result, tables)
    # Everything is rendered before anything is written: a rendering error leaves
    # the folder as it was.
    rendered = render_all(result, summary, read_run_files(run_dir, metrics))
    try:
        _write_rendered(result, summary, rendered, run_dir)
    except OSError as e:  # a read-only run folder, a full disk
        raise os_error(e, "writing the clusters and reports") from e
    logger.info(
        "wrote %s to %s",
        ", ".join([ITEM_CLUSTERS, CLUSTERS, *rendered.figures, REPORT_HTML, REPORT_MD]),
        run_dir,
    )
    return summary


def _write_rendered(result: ClusterResult, summary: dict[str, Any], rendered: Rendered,
                    run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in REPORTS:
        (run_dir / name).unlink(missing_ok=True)
    write_vouched(run_dir / ITEM_CLUSTERS,
                  lambda: write_atomic(run_dir / ITEM_CLUSTERS, _parquet_bytes(result)))
    write_vouched(run_dir / CLUSTERS, lambda: write_json(run_dir / CLUSTERS, summary))
    for name, data in rendered.figures.items():
        write_atomic(run_dir / name, data)
    for name in OPTIONAL_FIGURES:
        if name not in rendered.figures:  # stale from an earlier clustering of this run
            (run_dir / name).unlink(missing_ok=True)
    write_atomic(run_dir / REPORT_HTML, rendered.html.encode("utf-8"))
    write_atomic(run_dir / REPORT_MD, rendered.markdown.encode("utf-8"))


def _clusters_json(result: ClusterResult, tables: str | None) -> dict[str, Any]:
    """The clusters.json document: plain Python types, no NaN."""
    config = result.config
    return {
        "tables": tables,
        "k": result.k,
        "k_requested": config.clusters,
        "k_selection": _finite_floats(result.k_selection),
        "algorithm": result.algorithm,
        "normalize": config.normalize,
        "items_clustered": len(result.items),
        "items_left_out": result.items_left_out,
        "min_item_ratings": config.min_item_ratings,
        "seed": config.seed,
        "genres_known": result.genres_known,
        "items_without_genres": result.items_without_genres,
        "baseline_shuffles": config.baseline_shuffles,
        "scores": _finite_floats(result.scores),
        "genre_base_rates": _finite_floats(result.genre_base_rates),
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


def _finite_floats(value: Any) -> Any:
    """Deep copy with non-finite floats as None: clusters.json must be strict JSON."""
    if isinstance(value, dict):
        return {key: _finite_floats(v) for key, v in value.items()}
    if isinstance(value, list):
        return [_finite_floats(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
