"""Seconds per iALS sweep (trainer/ials.py) at ~1M pairs, one process, one thread.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \\
        python bench/ials_sweep.py --out bench/ials_sweep.json

ML-1M-shaped pairs (6,040 users x 3,706 items x 1,000,209 pairs): users uniform, items
Zipf (weight ~ 1 / rank, ranks shuffled over the ids), duplicates kept (they are simply
two pairs), confidence 1 + [r >= 4] on uniform ratings 1..5. The pairs are streamed as
chunks of ``--chunk-size`` (a row group), either in random order (a randomly partitioned
shard) or sorted by user (a user-partitioned shard sorted inside). Reported: ``count``'s
pass, the median of ``--sweeps`` sweeps, and one compiled pass of each side alone, so
that a sweep splits into its 2 (K + 1) passes and the dense CG bookkeeping.
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.distributed import DistEnv  # noqa: E402
from trainer.ials import ImplicitALS, confidence, load_ials_kernels  # noqa: E402

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


def bench(args: argparse.Namespace, order: str) -> dict:
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
    model = ImplicitALS(user_table, item_table, alpha0=1.0, cg_steps=args.cg_steps,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--cg-steps", type=int, default=3)
    parser.add_argument("--reg", type=float, default=0.01)
    parser.add_argument("--sweeps", type=int, default=3, help="timed sweeps (median)")
    parser.add_argument("--chunk-size", type=int, default=65_536, help="pairs per chunk")
    parser.add_argument("--orders", nargs="+", default=["random", "user"],
                        choices=["random", "user"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {"shape": dict(zip(("num_users", "num_items", "num_pairs"), ML1M_SHAPE)),
               "dim": args.dim, "cg_steps": args.cg_steps, "chunk_size": args.chunk_size,
               "machine": platform.node(), "runs": [bench(args, order) for order in args.orders]}
    for run in results["runs"]:
        print(f"{run['order']:>6} order: sweep {run['sweep_s']:.2f} s (passes "
              f"{run['passes_share']:.0%}), count {run['count_s']:.2f} s, one pass: users "
              f"{run['user_pass_s']:.3f} s, items {run['item_pass_s']:.3f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
