"""Peer: LIBMF's own command-line tools (mf-train / mf-predict), built from its sources.

    python peer_libmf_cli.py --libmf DIR --split SPLIT_DIR --out result.json [--params '{"k": 32}']

DIR holds `mf-train` and `mf-predict` built with LIBMF's own Makefile (SSE and OpenMP on),
in a folder outside this repository: LIBMF is a yardstick, never a dependency. Its
settings follow the issue's protocol by default: k 32, 20 iterations, 2 threads, LIBMF's
defaults otherwise (lr 0.1 with its adaptive per-coordinate steps, L2 0.1).

Trains on train.tsv only; ids are mapped to 0-based rows from train (LIBMF indexes rows
by id); test rows of users or items absent from train get the train mean, as the other
peers do. `train_seconds` is mf-train's wall time, text parsing included (LIBMF has no
separate timer). Predictions are clipped to the rating scale, as shardmf's are.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import _common as common
import numpy as np

DEFAULTS = {"k": 32, "iterations": 20, "threads": 2}


def write_libmf(path: Path, rows: np.ndarray, cols: np.ndarray, ratings: np.ndarray) -> None:
    np.savetxt(path, np.column_stack([rows, cols, ratings]), fmt=["%d", "%d", "%.6g"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_split_args(parser)
    parser.add_argument("--libmf", required=True, type=Path,
                        help="folder with LIBMF's mf-train and mf-predict")
    args = parser.parse_args()
    params = {**DEFAULTS, **(json.loads(args.params) if args.params else {})}
    scale = common.scale_of(args.scale)
    users, items, ratings = common.read_split(args.split / "train.tsv")
    test_users, test_items, test_ratings = common.read_split(args.split / "test.tsv")
    user_rows = {u: r for r, u in enumerate(np.unique(users))}
    item_rows = {i: r for r, i in enumerate(np.unique(items))}
    mean = float(ratings.mean())
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        write_libmf(work / "train.txt", np.vectorize(user_rows.get)(users),
                    np.vectorize(item_rows.get)(items), ratings)
        known = np.array([u in user_rows and i in item_rows
                          for u, i in zip(test_users, test_items)])
        write_libmf(work / "test.txt",
                    np.array([user_rows[u] for u in test_users[known]], dtype=np.int64),
                    np.array([item_rows[i] for i in test_items[known]], dtype=np.int64),
                    test_ratings[known])
        command = [str(args.libmf / "mf-train"), "-k", str(params["k"]), "-t",
                   str(params["iterations"]), "-s", str(params["threads"]), "--quiet"]
        for flag in ("l2", "r"):
            if flag in params:
                command += [f"-{flag}", str(params[flag])]
        started = time.perf_counter()
        subprocess.run([*command, str(work / "train.txt"), str(work / "model")], check=True)
        train_seconds = time.perf_counter() - started
        subprocess.run([str(args.libmf / "mf-predict"), str(work / "test.txt"),
                        str(work / "model"), str(work / "predicted.txt")], check=True,
                       stdout=subprocess.DEVNULL)
        predicted = np.full(len(test_ratings), mean)
        predicted[known] = np.loadtxt(work / "predicted.txt", ndmin=1)
    predicted = np.clip(predicted, *scale)
    test = common.scores(predicted, test_ratings)
    common.write_result(args.out, {
        "peer": "libmf-cli", "params": params, "command": " ".join(command),
        "train_seconds": round(train_seconds, 3), "epochs": params["iterations"],
        "train_ratings": int(len(ratings)),
        "ratings_per_s_per_epoch": round(len(ratings) * params["iterations"] / train_seconds, 1),
        "test_rmse": test["rmse"], "test_mae": test["mae"], "test_count": test["count"],
        "test_rows_filled_with_train_mean": int((~known).sum())})


if __name__ == "__main__":
    main()
