"""Ranking evaluation (trainer/ranking.py) measured: a trained run's figures, and time and
memory on an ML-25M-shaped catalogue.

    # one process (or under torchrun): the figures of a finished run against the baseline
    python bench/ranking.py run RUN_DIR --k 10 20 --json out.json

    # 2 ranks, a random dim-64 model on every user of SHARDS_DIR: seconds and peak RSS
    torchrun --standalone --nproc-per-node=2 bench/ranking.py scale SHARDS_DIR \
        --user-block 256 --json out.json

Each rank runs one thread (2 ranks on 2 cores). Memory is reported per rank as resident
memory before the evaluation (interpreter, torch, the model) and its peak after, from
/proc/self/status (VmRSS, VmHWM): the difference is what the evaluation itself added.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.checkpoint import load_model  # noqa: E402
from trainer.config import ModelConfig  # noqa: E402
from trainer.distributed import DistEnv, all_reduce, init_distributed, teardown  # noqa: E402
from trainer.model import BiasedMF  # noqa: E402
from trainer.ranking import DEFAULT_KS, DEFAULT_USER_BLOCK, ranking_metrics  # noqa: E402
from trainer.run_files import MODEL  # noqa: E402
from trainer.shards import open_shards  # noqa: E402


def resident_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


def per_rank(value: float, env: DistEnv) -> list[float]:
    """Every rank's number, by rank (a sum of one-hot vectors)."""
    one_hot = [0.0] * env.world_size
    one_hot[env.rank] = value
    return all_reduce(one_hot, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="ranking figures of a finished run")
    run.add_argument("run_dir", type=Path, help="RUN_DIR written by `shardmf train`")
    scale = sub.add_parser("scale", help="time and memory with a random model")
    scale.add_argument("shards_dir", type=Path, help="SHARDS_DIR written by `shardmf prepare`")
    scale.add_argument("--dim", type=int, default=64, help="embedding dimension")
    for command in (run, scale):
        command.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS),
                             help="list lengths")
        command.add_argument("--min-item-ratings", type=int, default=0,
                             help="recommend only items with this many training ratings")
        command.add_argument("--user-block", type=int, default=DEFAULT_USER_BLOCK,
                             help="users scored at once")
        command.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        if args.command == "run":
            tables, payload = load_model(args.run_dir / MODEL)
            model = tables.lists
            shards_dir = payload["shards_dir"]
        else:
            shards_dir = args.shards_dir
        shards = open_shards(shards_dir)
        if args.command == "scale":
            torch.manual_seed(0)
            model = BiasedMF(shards.num_users, shards.num_items, shards.train_mean,
                             ModelConfig(reg=0.05, dim=args.dim, init_std=0.1))
        before, _ = resident_mib()
        started = time.perf_counter()
        result = ranking_metrics(model, shards, env, ks=args.k,
                                  min_item_ratings=args.min_item_ratings,
                                  user_block=args.user_block)
        seconds = time.perf_counter() - started
        _, peak = resident_mib()
        result.update({
            "seconds": round(seconds, 2), "world_size": env.world_size,
            "user_block": args.user_block, "num_users": shards.num_users,
            "num_items": shards.num_items, "train_ratings": shards.rows("train"),
            "dim": model.config.dim,
            "rss_before_mib": [round(v, 1) for v in per_rank(before, env)],
            "peak_rss_mib": [round(v, 1) for v in per_rank(peak, env)],
        })
        if env.is_main:
            print(json.dumps(result, indent=2))
            if args.json:
                args.json.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        teardown()


if __name__ == "__main__":
    main()
