"""Helpers shared by the peer scripts: read the exported splits, score, write one result.

Every peer reads the TSV files written by ``shardmf export-split`` (user, item, rating
[, timestamp], tab-separated, no header, original ids), so all of them train, tune and test
on exactly the same rows. Only numpy is needed, so this runs in either venv.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def add_split_args(parser) -> None:
    """The options every peer script takes."""
    parser.add_argument("--split", required=True, type=Path,
                        help="folder with train.tsv, val.tsv, test.tsv from export-split")
    parser.add_argument("--scale", default="1,5",
                        help="MIN,MAX rating scale: predictions are clipped to it")
    parser.add_argument("--out", required=True, type=Path, help="result JSON to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--params", default=None,
                        help="JSON of hyper-parameters to use (skips the defaults)")
    parser.add_argument("--tune", action="store_true",
                        help="run the grid on val, write the chosen params (no test figures)")


def scale_of(text: str) -> tuple[float, float]:
    low, high = (float(x) for x in text.split(","))
    return low, high


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users, items, ratings) of one TSV as (int64, int64, float32) original ids."""
    data = np.loadtxt(path, delimiter="\t", usecols=(0, 1, 2), ndmin=2,
                      dtype=np.float64)
    return data[:, 0].astype(np.int64), data[:, 1].astype(np.int64), data[:, 2].astype(
        np.float32)


def scores(predicted, actual) -> dict:
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    error = predicted - actual
    return {"rmse": float(math.sqrt(np.mean(error * error))),
            "mae": float(np.mean(np.abs(error))), "count": int(len(actual))}


def versions(*modules: str) -> dict:
    found = {"python": platform.python_version()}
    for name in modules:
        try:
            module = __import__(name)
            found[name] = getattr(module, "__version__", "?")
        except ImportError:
            found[name] = None
    return found


def write_result(path: Path, payload: dict) -> None:
    """Atomic write, so the driver never reads half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def write_tuning(path: Path, info: dict, grid: dict, trials: list[dict],
                 started: float) -> None:
    """The grid's result: every trial, and the point with the lowest val RMSE as "chosen"."""
    best = min(trials, key=lambda t: t["val_rmse"])
    write_result(path, {**info, "grid": grid, "trials": trials, "chosen": best["params"],
                        "val_rmse": best["val_rmse"],
                        "tune_seconds": round(time.perf_counter() - started, 3)})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
