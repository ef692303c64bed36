"""How long a shardmf run takes to match each peer's validation RMSE, from its own curve.

    python bench/peers/time_to_rmse.py bench/results-10m.json synth-10m RUN_DIR [RUN_DIR ...]

RUN_DIR is a finished `shardmf train` run on the data set's shards (run_peers.py deletes its
own run folders, so train one with the same flags and keep it). For every peer row of the
data set in the results file, prints the peer's validation RMSE and training seconds, and
the training seconds (validation passes excluded, as in `train_seconds`) after which the
run's validation RMSE first reached the peer's: a time-to-accuracy comparison that does not
depend on when each tool stops. Writes the same as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path) -> list[tuple[float, float]]:
    """(training seconds so far, validation RMSE) after each epoch."""
    total, points = 0.0, []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        total += record["seconds"]
        points.append((round(total, 1), record["val_rmse"]))
    return points


def seconds_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((seconds for seconds, rmse in points if rmse <= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("dataset")
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    summary = json.loads(args.results.read_text())["summary"][args.dataset]
    peers = [e for e in summary if e.get("status") == "ok" and e.get("val_rmse") is not None]
    table = []
    for run in args.runs:
        points = curve(run)
        config = json.loads((run / "config.json").read_text())
        for peer in peers:
            table.append({"run": str(run), "world_size": config["world_size"],
                          "peer": peer["label"], "peer_val_rmse": peer["val_rmse"],
                          "peer_train_seconds": peer["train_seconds"],
                          "run_seconds_to_peer_val_rmse": seconds_to(points, peer["val_rmse"])})
    print("| run | peer | peer val RMSE | peer train s | run's train s to that val RMSE |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in table:
        reached = row["run_seconds_to_peer_val_rmse"]
        print(f"| {row['world_size']} rank(s) | {row['peer']} | {row['peer_val_rmse']:.4f} | "
              f"{row['peer_train_seconds']:.1f} | "
              f"{'not reached' if reached is None else f'{reached:.1f}'} |")
    if args.out:
        args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
