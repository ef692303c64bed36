"""Seconds per iALS sweep (trainer/ials.py) at ~1M pairs, and its ranking quality on shards.

    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1
    python bench/ials_sweep.py speed --out bench/ials_sweep.json
    python bench/ials_sweep.py quality SHARDS_DIR --liked-weight 1 --alpha0 1 --reg 0.012 \
        --sweeps 7

speed: ML-1M-shaped pairs (6,040 users x 3,706 items x 1,000,209 pairs): users uniform,
items Zipf (weight ~ 1 / rank, ranks shuffled over the ids), duplicates kept (they are
simply two pairs), confidence 1 + [r >= 4] on uniform ratings 1..5. The pairs are streamed
as chunks of ``--chunk-size`` (a row group), either in random order (a randomly
partitioned shard) or sorted by user (a user-partitioned shard sorted inside). Reported:
``count``'s pass, the median of ``--sweeps`` sweeps, and one compiled pass of each side
alone, so that a sweep splits into its 2 (K + 1) passes and the dense CG bookkeeping.

quality: trains on a shard set's train split, streamed row group by row group as the
trainer streams it, and scores test NDCG@10 and recall@10 with trainer/ranking.py's own
functions (candidates: items the user did not rate in training; relevant: test rating >=
the relevance threshold), for ``--seeds`` initialisations N(0, 0.1 / sqrt(d)).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.distributed import DistEnv  # noqa: E402
from trainer.ials import ImplicitALS, confidence, load_ials_kernels  # noqa: E402
from trainer.ranking import relevance_threshold, top_unseen_items, user_metrics  # noqa: E402
from trainer.shards import open_shards  # noqa: E402

ML1M_SHAPE = (6_040, 3_706, 1_000_209)
SINGLE = DistEnv(0, 0, 1, 1, torch.device("cpu"), None)


def make_pairs(num_users: int, num_items: int, num_pairs: int, order: str,
               seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_items + 1)
    popularity = rng.permutation(popularity / popularity.sum())
    users = rng.integers(0, num_users, size=num_pairs)
    items = rng.choice(num_items, size=num_pairs, p=popularity)
    weights = confidence(rng.integers(1, 6, size=num_pairs), interactions=False, threshold=4)
    if order == "user":
        by_user = np.argsort(users, kind="stable")
        users, items, weights = users[by_user], items[by_user], weights[by_user]
    return users, items, weights


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def bench_speed(args: argparse.Namespace, order: str) -> dict:
    num_users, num_items, num_pairs = ML1M_SHAPE
    users, items, weights = make_pairs(num_users, num_items, num_pairs, order, args.seed)

    def chunks():
        for start in range(0, num_pairs, args.chunk_size):
            stop = start + args.chunk_size
            yield users[start:stop], items[start:stop], weights[start:stop]

    generator = torch.Generator().manual_seed(args.seed)
    std = 0.1 / args.dim ** 0.5
    user_table = torch.randn(num_users, args.dim, generator=generator) * std
    item_table = torch.randn(num_items, args.dim, generator=generator) * std
    model = ImplicitALS(user_table, item_table, alpha0=args.alpha0, cg_steps=args.cg_steps,
                        num_users=num_users, users_owned=True, env=SINGLE)
    count_s = timed(lambda: model.count(chunks))
    model.sweep(chunks, args.reg)  # warm-up: compiles or loads the kernels
    sweep_s = [timed(lambda: model.sweep(chunks, args.reg)) for _ in range(args.sweeps)]
    kernel = load_ials_kernels().add_pair_products
    no_right_side = np.zeros((0, args.dim), np.float32)

    def one_pass(users_side: bool) -> float:
        source = (item_table if users_side else user_table).numpy()
        rows = num_users if users_side else num_items
        direction = np.random.default_rng(0).normal(size=(rows, args.dim)).astype(np.float32)
        products = np.zeros_like(direction)
        start = time.perf_counter()
        for user_ids, item_ids, chunk_weights in chunks():
            targets, sources = (user_ids, item_ids) if users_side else (item_ids, user_ids)
            kernel(targets, sources, chunk_weights, source, direction, products, no_right_side)
        return time.perf_counter() - start

    user_pass_s = statistics.median(one_pass(True) for _ in range(3))
    item_pass_s = statistics.median(one_pass(False) for _ in range(3))
    passes_s = (args.cg_steps + 1) * (user_pass_s + item_pass_s)
    sweep = statistics.median(sweep_s)
    return {"order": order, "count_s": count_s, "sweep_s": sweep, "sweeps_s": sweep_s,
            "user_pass_s": user_pass_s, "item_pass_s": item_pass_s,
            "passes_share": passes_s / sweep, "pairs_per_s_per_pass":
                num_pairs / ((user_pass_s + item_pass_s) / 2),
            "loss": model.loss(chunks, args.reg)}


def read_split(shards: Path, split: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each row group of a split as (user ids, item ids, ratings)."""
    pieces = []
    for piece in open_shards(shards).pieces(split):
        table = pq.ParquetFile(piece.path).read_row_group(
            piece.row_group, columns=["user_id", "item_id", "rating"])
        pieces.append(tuple(table.column(name).to_numpy() for name in table.column_names))
    return pieces


def bench_quality(args: argparse.Namespace) -> dict:
    shard_set = open_shards(args.shards)
    threshold = relevance_threshold(shard_set.scale)
    train = [(users.astype(np.int64), items.astype(np.int64),
              confidence(ratings, interactions=args.liked_weight is None,
                         threshold=None if args.liked_weight is None else threshold,
                         liked_weight=args.liked_weight or 0.0))
             for users, items, ratings in read_split(args.shards, "train")]
    train_users = np.concatenate([users for users, _, _ in train])
    train_items = np.concatenate([items for _, items, _ in train])
    test_users, test_items, test_ratings = (np.concatenate(column) for column in
                                            zip(*read_split(args.shards, "test")))
    relevant = test_ratings >= threshold
    num_users, num_items = shard_set.num_users, shard_set.num_items
    runs = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        std = 0.1 / args.dim ** 0.5
        user_table = torch.from_numpy(rng.normal(0, std, (num_users, args.dim)).astype(np.float32))
        item_table = torch.from_numpy(rng.normal(0, std, (num_items, args.dim)).astype(np.float32))
        model = ImplicitALS(user_table, item_table, alpha0=args.alpha0, cg_steps=args.cg_steps,
                            num_users=num_users, users_owned=True, env=SINGLE)
        model.count(lambda: train)
        start_s = time.perf_counter()
        for _ in range(args.sweeps):
            model.sweep(lambda: train, args.reg)
        seconds = time.perf_counter() - start_s
        top = np.empty((num_users, 10), dtype=np.int64)
        for start in range(0, num_users, 1024):
            block = slice(start, min(start + 1024, num_users))
            seen = (train_users >= block.start) & (train_users < block.stop)
            top[block] = top_unseen_items(user_table[block] @ item_table.T,
                                          train_users[seen] - start, train_items[seen], 10)
        metrics = user_metrics(top, test_users[relevant], test_items[relevant])
        runs.append({"seed": seed, "train_s": seconds,
                     "ndcg@10": float(np.nanmean(metrics["ndcg"])),
                     "recall@10": float(np.nanmean(metrics["recall"]))})
        print(f"seed {seed}: NDCG@10 {runs[-1]['ndcg@10']:.4f}, recall@10 "
              f"{runs[-1]['recall@10']:.4f}, {seconds:.2f} s for {args.sweeps} sweeps")
    return {"shards": str(args.shards), "runs": runs,
            "ndcg@10_median": statistics.median(run["ndcg@10"] for run in runs),
            "recall@10_median": statistics.median(run["recall@10"] for run in runs)}


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dim", type=int, default=64)
    common.add_argument("--cg-steps", type=int, default=3)
    common.add_argument("--alpha0", type=float, default=1.0)
    common.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    speed = modes.add_parser("speed", parents=[common],
                             help="seconds per sweep on ML-1M-shaped pairs")
    speed.add_argument("--seed", type=int, default=0)
    speed.add_argument("--reg", type=float, default=0.01)
    speed.add_argument("--sweeps", type=int, default=3, help="timed sweeps (median)")
    speed.add_argument("--chunk-size", type=int, default=65_536, help="pairs per chunk")
    speed.add_argument("--orders", nargs="+", default=["random", "user"],
                       choices=["random", "user"])
    quality = modes.add_parser("quality", parents=[common],
                               help="test NDCG@10 and recall@10 on a shard set")
    quality.add_argument("shards", type=Path)
    quality.add_argument("--liked-weight", type=float,
                         help="confidence 1 + this * [rating >= threshold]; absent: the "
                              "ratings are dropped (interactions, c = 1)")
    quality.add_argument("--reg", type=float, required=True)
    quality.add_argument("--sweeps", type=int, required=True)
    quality.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {"dim": args.dim, "cg_steps": args.cg_steps, "alpha0": args.alpha0,
                "reg": args.reg, "sweeps": args.sweeps, "machine": platform.node()}
    if args.mode == "quality":
        results = {**settings, "liked_weight": args.liked_weight, **bench_quality(args)}
        print(f"median: NDCG@10 {results['ndcg@10_median']:.4f}, recall@10 "
              f"{results['recall@10_median']:.4f}")
    else:
        results = {**settings, "chunk_size": args.chunk_size,
                   "shape": dict(zip(("num_users", "num_items", "num_pairs"), ML1M_SHAPE)),
                   "runs": [bench_speed(args, order) for order in args.orders]}
        for run in results["runs"]:
            print(f"{run['order']:>6} order: sweep {run['sweep_s']:.2f} s (passes "
                  f"{run['passes_share']:.0%}), count {run['count_s']:.2f} s, one pass: users "
                  f"{run['user_pass_s']:.3f} s, items {run['item_pass_s']:.3f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
