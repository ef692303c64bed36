"""Fit the `implicit` library's ALS or BPR on a shard set's train split; write the factors.

Runs in the ranking peers' venv (implicit, scipy, pyarrow; no torch, no project code), driven
by bench/ranking_peers.py, which scores the factors with the project's own ranking code:

    OPENBLAS_NUM_THREADS=1 bench/.venv-ranking-peers/bin/python bench/peers/ranking_peer.py \
        --shards SHARDS_DIR --jobs JOBS.json --out-dir DIR

JOBS.json is a list of {"key", "algo": "als"|"bpr", "values": "binary"|"ratings",
"params": {...}, "seed", "threads"}; for each job DIR/KEY.npz gets ``user_factors``
(num_users, d) and ``item_factors`` (num_items, d) float32, so that the score of (u, i) is
their dot product (BPR's item bias is a factor column whose user side is 1), and
DIR/fits.json the fit seconds of each job (the fit alone, reading and writing excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import implicit
import numpy as np
import pyarrow.parquet as pq
import scipy
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from implicit.bpr import BayesianPersonalizedRanking

ALS_ITERATIONS = 15
BPR_ITERATIONS = 100


def train_matrix(shards: Path, values: str) -> sp.csr_matrix:
    """(num_users, num_items) float32 CSR of the train split: 1 per pair, or the rating."""
    manifest = json.loads((shards / "manifest.json").read_text())
    tables = [pq.read_table(path, columns=["user_id", "item_id", "rating"])
              for path in sorted((shards / "train").glob("*.parquet"))]
    users = np.concatenate([t.column("user_id").to_numpy() for t in tables])
    items = np.concatenate([t.column("item_id").to_numpy() for t in tables])
    weights = (np.ones(len(users), np.float32) if values == "binary" else
               np.concatenate([t.column("rating").to_numpy() for t in tables]).astype(np.float32))
    shape = (manifest["counts"]["users"], manifest["counts"]["items"])
    return sp.csr_matrix((weights, (users, items)), shape=shape, dtype=np.float32)


def fit(job: dict, matrix: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, float]:
    """(user factors, item factors, fit seconds) of one job."""
    common = {"random_state": job["seed"], "num_threads": job["threads"]}
    if job["algo"] == "als":
        model = AlternatingLeastSquares(**job["params"], **common, iterations=ALS_ITERATIONS,
                                        calculate_training_loss=False)
    elif job["algo"] == "bpr":
        model = BayesianPersonalizedRanking(**job["params"], **common,
                                            iterations=BPR_ITERATIONS)
    else:
        raise ValueError(f"algo {job['algo']!r}: expected 'als' or 'bpr'")
    started = time.perf_counter()
    model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - started
    return (np.asarray(model.user_factors, np.float32),
            np.asarray(model.item_factors, np.float32), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, type=Path, help="SHARDS_DIR")
    parser.add_argument("--jobs", required=True, type=Path, help="JSON list of fits")
    parser.add_argument("--out-dir", required=True, type=Path, help="factors and fits.json")
    args = parser.parse_args()
    jobs = json.loads(args.jobs.read_text())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    matrices = {values: train_matrix(args.shards, values)
                for values in sorted({job["values"] for job in jobs})}
    seconds = {}
    for job in jobs:
        users, items, seconds[job["key"]] = fit(job, matrices[job["values"]])
        np.savez(args.out_dir / f"{job['key']}.npz", user_factors=users, item_factors=items)
    report = {"seconds": seconds,
              "versions": {"python": platform.python_version(),
                           "implicit": implicit.__version__, "numpy": np.__version__,
                           "scipy": scipy.__version__},
              "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS")}
    (args.out_dir / "fits.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
