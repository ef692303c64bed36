"""A finished run folder as a thing to use: its model, its id maps, its post-step."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import torch

from trainer.clustering import ClusterConfig, cluster_items, write_cluster_outputs
from trainer.errors import InputError

log = logging.getLogger(__name__)


def load_item_embeddings(run_dir: str | Path) -> tuple[torch.Tensor, pd.DataFrame]:
    """(num_items, dim) float32 item factors and the items table, from RUN_DIR alone."""
    run = Path(run_dir)
    model_path = run / "model.pt"
    if not model_path.is_file():
        raise InputError(f"{model_path}: not found; {run} is not a finished run (train it "
                         "with `shardmf train SHARDS_DIR --out RUN_DIR`)")
    payload = torch.load(model_path, map_location="cpu", weights_only=True)
    items = pd.read_parquet(run / "items.parquet")
    return payload["state_dict"]["item_factors.weight"], items


def cluster_run(run_dir: str | Path, config: ClusterConfig) -> dict:
    """The rank-0 post-step: K-Means on item embeddings, scores and report in RUN_DIR."""
    run = Path(run_dir)
    embeddings, items = load_item_embeddings(run)
    metrics_path = run / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    try:
        result = cluster_items(embeddings.numpy(), items, config)
    except ValueError as e:
        raise InputError(str(e)) from e
    summary = write_cluster_outputs(result, run, metrics)
    log.info("clusters: k=%d over %d items; %s", summary["k"], summary["items_clustered"],
             _score_line(summary))
    return summary


def _score_line(summary: dict) -> str:
    scores = summary["scores"]
    parts = [f"silhouette {scores['silhouette']:.3f}"] if scores.get("silhouette") else []
    for name in ("nmi", "ari", "purity", "multilabel_purity"):
        score = scores.get(name)
        if score and score.get("score") is not None:
            parts.append(f"{name} {score['score']:.3f} (chance {score['baseline_mean']:.3f})")
    return ", ".join(parts) or "no scores"
