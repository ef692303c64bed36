"""Scaling to 2 ranks at equal RMSE: real `shardmf train` runs side by side, to convergence.

    shardmf synth --out /tmp/bench_tp/raw --num-users 162541 --num-items 59047 \\
        --num-ratings 5000000
    shardmf prepare /tmp/bench_tp/raw --out /tmp/bench_tp/user_shards --partition-by user \\
        --num-shards 4
    python bench/scaling.py /tmp/bench_tp/user_shards --out bench/scaling.json

Each configuration trains the same shards (partitioned by user, so the same files serve
replicated and owned user rows) with the same model and learning rate for the same number
of epochs, 1 torch thread per rank, 8,192 ratings per step (per rank with the periodic
sync, whose ranks step alone; over both ranks with the per-step sync, which sums their
gradients into one step). Reported per run, from
the run's own metrics.json / metrics.jsonl: the best validation RMSE and the test RMSE, the
median over epochs of training ratings/s (per-epoch figures exclude validation), the
training seconds to come within 0.005 of the 1-rank run's best validation RMSE, and each
rank's user-table bytes and peak resident memory. Ratios are taken against the 1-rank run
of the same invocation; the machine is shared, so only ratios within one file compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.run_files import EPOCH_METRICS, FINAL_METRICS  # noqa: E402

SHARDMF = [str(Path(sys.executable).with_name("shardmf"))]  # the venv's entry point

CONFIGS = {  # name: (processes, ratings per step over all ranks, extra flags)
    "1-rank": (1, 8192, []),
    # Per-step sync sums gradients over ranks: the same optimisation as 1 rank needs the
    # same global batch (at 16,384 a step, lr 0.01 diverged in epoch 1: popular rows get
    # twice the summed gradient).
    "2-replicated-every-1": (2, 8192, ["--user-embeddings", "replicated"]),
    "2-owned-every-1": (2, 8192, ["--user-embeddings", "owned"]),
    # Periodic sync: each rank takes local steps of its own batch, as 1 rank does.
    "2-owned-every-32": (2, 16384, ["--user-embeddings", "owned", "--sync-every", "32"]),
    "2-owned-every-48": (2, 16384, ["--user-embeddings", "owned", "--sync-every", "48"]),
    "2-owned-every-64": (2, 16384, ["--user-embeddings", "owned", "--sync-every", "64"]),
    # Half the rank batch, twice the steps between exchanges: the same ratings per exchange
    # as every 32 at 8,192 a rank, with fresher local steps (the synth-10m fast schedule).
    "2-owned-4096-every-64": (2, 8192, ["--user-embeddings", "owned", "--sync-every", "64"]),
}


def run(shards: str, out: Path, nproc: int, batch: int, extra: list[str], args) -> dict:
    command = [*SHARDMF, "train", shards, "--out", str(out), "--nproc", str(nproc),
               "--batch-size", str(batch), "--dim", str(args.dim),
               "--lr", str(args.lr), "--epochs", str(args.epochs), "--patience",
               str(args.patience), "--threads", "1", "--prefetch", str(args.prefetch),
               "--clusters", "0", *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    metrics = json.loads((out / FINAL_METRICS).read_text())
    history = [json.loads(line) for line in (out / EPOCH_METRICS).read_text().splitlines()]
    return {"command": "shardmf " + " ".join(command[1:]), "wall_s": round(wall, 1),
            "metrics": metrics, "history": history}


def seconds_to(history: list[dict], target: float) -> float | None:
    """Training seconds (validation excluded) until val RMSE first reaches ``target``."""
    total = 0.0
    for record in history:
        total += record["seconds"]
        if record["val_rmse"] <= target:
            return round(total, 1)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="SHARDS_DIR prepared with --partition-by user")
    parser.add_argument("--out", default=str(ROOT / "bench" / "scaling.json"))
    parser.add_argument("--work", default="/tmp/bench_scaling")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=4,
                        help="batches each rank's thread cuts ahead (0: one thread per rank)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated names from: " + ", ".join(CONFIGS))
    args = parser.parse_args()
    names = args.configs.split(",")
    if names[0] != "1-rank":
        raise SystemExit("the first configuration must be 1-rank: ratios are taken to it")
    results = {}
    for index, name in enumerate(names):
        nproc, batch, extra = CONFIGS[name]
        results[name] = run(args.shards, Path(args.work) / f"run-{index}", nproc, batch, extra,
                            args)
        print(f"{name}: {json.dumps(results[name]['metrics'])}", flush=True)

    base = results["1-rank"]
    target = base["metrics"]["val_rmse"] + 0.005
    base_rate = statistics.median(h["ratings_per_s"] for h in base["history"])
    base_user_bytes = base["metrics"]["ranks"][0]["user_table_bytes"]
    rows = []
    for name, result in results.items():
        metrics, history = result["metrics"], result["history"]
        rate = statistics.median(h["ratings_per_s"] for h in history)
        ranks = metrics["ranks"]
        rows.append({
            "config": name, "epochs": metrics["epochs"], "best_epoch": metrics["best_epoch"],
            "val_rmse": round(metrics["val_rmse"], 4), "test_rmse": round(metrics["test_rmse"], 4),
            "val_rmse_minus_1_rank": round(metrics["val_rmse"] - base["metrics"]["val_rmse"], 4),
            "median_ratings_per_s": round(rate), "speedup_vs_1_rank": round(rate / base_rate, 2),
            "train_s_to_1_rank_best_plus_0.005": seconds_to(history, target),
            "sync_bytes_per_step": history[-1].get("sync_bytes_per_step"),
            "user_table_mib_per_rank": [round(r["user_table_bytes"] / 2**20, 1) for r in ranks],
            "user_table_vs_1_rank": [round(r["user_table_bytes"] / base_user_bytes, 3)
                                     for r in ranks],
            "peak_rss_mib_per_rank": [round(r["peak_rss_bytes"] / 2**20) for r in ranks],
            "wall_s": result["wall_s"],
        })
    facts = {"shards": args.shards, "dim": args.dim, "lr": args.lr, "epochs": args.epochs,
             "patience": args.patience, "prefetch": args.prefetch,
             "num_users": base["metrics"]["num_users"], "num_items": base["metrics"]["num_items"],
             "train_ratings": base["metrics"]["train_ratings"], "cpus": os.cpu_count(),
             "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    Path(args.out).write_text(json.dumps({"facts": facts, "rows": rows, "runs": results},
                                         indent=1) + "\n")
    print(json.dumps({"facts": facts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
