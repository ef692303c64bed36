"""A short grid over shardmf's dim, lr and reg, chosen on the val split via `shardmf train`.

    python tune_shardmf.py --shardmf .venv/bin/shardmf --shards SHARDS --work DIR --out chosen.json

Every grid point is a real `shardmf train` run (one process, one torch thread, no K-Means
post-step, at most --epochs epochs with --patience); the point with the lowest best-epoch
val RMSE (metrics.json `val_rmse`) wins. One thread because these runs are about accuracy,
not speed, and on a shared 2-core machine a second OpenMP thread mostly spins. The chosen
point is then run again by the driver like any other row. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

GRIDS = {
    # lr above the default 0.003 converges in ~20 epochs instead of ~75 on ML-100K.
    "full": {"dim": [64, 256], "lr": [0.01, 0.02], "reg": [0.05, 0.1]},
    "small": {"dim": [64], "lr": [0.01, 0.02], "reg": [0.05, 0.1]},
}
RUN_FLAGS = ["--clusters", "0", "--nproc", "1", "--threads", "1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shardmf", required=True, help="the shardmf executable")
    parser.add_argument("--shards", required=True, type=Path)
    parser.add_argument("--work", required=True, type=Path, help="folder for the grid's runs")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=3)
    args = parser.parse_args()
    grid = GRIDS[args.grid]
    started = time.perf_counter()
    trials = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        run_dir = args.work / "-".join(f"{k}{v}" for k, v in params.items())
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [args.shardmf, "train", str(args.shards), "--out", str(run_dir),
                   "--epochs", str(args.epochs), "--patience", str(args.patience),
                   *RUN_FLAGS, *(x for k, v in params.items() for x in (f"--{k}", str(v)))]
        t0 = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            print(f"{params}: failed ({done.returncode}): {done.stderr[-500:]}", file=sys.stderr)
            trials.append({"params": params, "val_rmse": None, "error": done.stderr[-500:]})
            continue
        metrics = json.loads((run_dir / "metrics.json").read_text())
        trials.append({"params": params, "val_rmse": metrics["val_rmse"],
                       "best_epoch": metrics["best_epoch"], "epochs": metrics["epochs"],
                       "train_seconds": metrics["train_seconds"],
                       "process_seconds": round(seconds, 3)})
        print(f"{params}: val RMSE {metrics['val_rmse']:.4f}, {metrics['epochs']} epochs, "
              f"{seconds:.1f} s", file=sys.stderr, flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints add up; figures are kept
    scored = [t for t in trials if t.get("val_rmse") is not None]
    if not scored:
        sys.exit("every grid point failed")
    best = min(scored, key=lambda t: t["val_rmse"])
    payload = {"peer": "shardmf-tune", "grid": grid, "run_flags": RUN_FLAGS,
               "epochs": args.epochs, "patience": args.patience, "trials": trials,
               "chosen": best["params"], "val_rmse": best["val_rmse"],
               "tune_seconds": round(time.perf_counter() - started, 3)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
