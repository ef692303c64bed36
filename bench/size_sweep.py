"""Training time and test RMSE against the size of the set, at the defaults, old and new.

    python bench/size_sweep.py --old-tree /tmp/old --repeats 3 --old-repeats 1

One `shardmf synth` world per size, shaped as MovieLens grows (about 150 ratings a user;
items 4 x sqrt(ratings): 30k ratings over 200 users x 700 items up to 10M over 67k x
12.6k), each prepared once (random 90/5/5 split), then `--repeats` rounds of `shardmf
train SHARDS --out RUN --objective rating --clusters 0 --nproc 1` on this tree and, in
the first `--old-repeats` rounds, on `--old-tree` (a checkout of an earlier commit, run
with this venv), one after the other so both see the same machine (test RMSE does not
depend on the round: a run is deterministic for its seed). Training time is the run's own
`train_seconds` (rating epochs only). Medians go to bench/size_sweep.json, a table to
bench/size_sweep.md and the two curves to bench/size_sweep.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SIZES = (30_000, 100_000, 300_000, 700_000, 1_100_000, 1_500_000, 3_000_000, 10_000_000)


def shardmf(tree: Path, *args: str) -> tuple[list[str], dict]:
    """`shardmf ARGS` from the code of ``tree`` with this venv's Python."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return [sys.executable, "-c", "from launch.cli import main; main()", *args], env


def run(tree: Path, args: list[str], log: Path) -> None:
    command, env = shardmf(tree, *args)
    with log.open("a") as handle:
        handle.write("$ " + " ".join(args) + "\n")
        handle.flush()
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, env=env,
                       cwd=tree)


def data_set(size: int, work: Path, log: Path) -> Path:
    shards = work / f"n{size}" / "shards"
    if (shards / "manifest.json").is_file():
        return shards
    users, items = max(200, size // 150), int(4 * math.sqrt(size))
    raw = shards.parent / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    run(REPO, ["synth", "--out", str(raw), "--num-ratings", str(size), "--num-users",
               str(users), "--num-items", str(items), "--seed", "0"], log)
    run(REPO, ["prepare", str(raw), "--out", str(shards), "--overwrite"], log)
    return shards


def train(tree: Path, shards: Path, out: Path, log: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    run(tree, ["train", str(shards), "--out", str(out), "--objective", "rating",
               "--clusters", "0", "--nproc", "1"], log)
    metrics = json.loads((out / "metrics.json").read_text())
    chosen = json.loads((out / "config.json").read_text())["chosen_from_data"]
    return {"seconds": metrics["train_seconds"], "test_rmse": metrics["test_rmse"],
            "baseline_test_rmse": metrics["baseline_test_rmse"], "epochs": metrics["epochs"],
            "dim": chosen.get("dim"), "lr": chosen.get("lr")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-tree", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-repeats", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/shardmf-size-sweep"))
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    sizes = [int(s) for s in args.sizes.split(",")]
    trees = {"new": REPO, "old": args.old_tree.resolve()}
    runs: dict = {name: {size: [] for size in sizes} for name in trees}
    for round_ in range(args.repeats):
        for size in sizes:
            shards = data_set(size, args.work, log)
            for name, tree in trees.items():
                if name == "old" and round_ >= args.old_repeats:
                    continue
                result = train(tree, shards, args.work / f"n{size}" / f"run-{name}", log)
                runs[name][size].append(result)
                print(f"round {round_ + 1} {size:>10,} {name}: {result}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    old_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=trees["old"],
                                capture_output=True, text=True).stdout.strip()
    rows = []
    for size in sizes:
        row = {"size": size}
        for name in trees:
            results = runs[name][size]
            row[name] = {**results[0], "seconds": statistics.median(r["seconds"]
                                                                    for r in results),
                         "seconds_per_run": [r["seconds"] for r in results]}
        rows.append(row)
    record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
              "new_commit": commit, "old_commit": old_commit, "rows": rows}
    (BENCH / "size_sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(rows, trees, commit, old_commit)
    print(table(rows, commit, old_commit))


def table(rows: list[dict], commit: str, old_commit: str) -> str:
    lines = [f"| ratings | new ({commit}): s | test RMSE | dim, epochs | "
             f"old ({old_commit}): s | test RMSE | dim, epochs | bias-only |",
             "| ---: | ---: | ---: | --- | ---: | ---: | --- | ---: |"]
    for row in rows:
        new, old = row["new"], row["old"]
        lines.append(f"| {row['size']:,} | {new['seconds']:.1f} | {new['test_rmse']:.4f} | "
                     f"{new['dim']}, {new['epochs']} | {old['seconds']:.1f} | "
                     f"{old['test_rmse']:.4f} | {old['dim']}, {old['epochs']} | "
                     f"{new['baseline_test_rmse']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], trees: dict, commit: str, old_commit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["size"] for row in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("new", f"new ({commit})"), ("old", f"old ({old_commit})")):
        left.plot(sizes, [row[name]["seconds"] for row in rows], "o-", label=label)
        right.plot(sizes, [row[name]["test_rmse"] for row in rows], "o-", label=label)
    right.plot(sizes, [row["new"]["baseline_test_rmse"] for row in rows], ":",
               color="grey", label="bias-only")
    for axis, title in ((left, "training seconds (median), 1 process"),
                        (right, "test RMSE")):
        axis.set_xscale("log")
        axis.set_xlabel("ratings in the set")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    left.set_yscale("log")
    figure.tight_layout()
    figure.savefig(BENCH / "size_sweep.png", dpi=110)


if __name__ == "__main__":
    main()
