"""The fused CPU step against the autograd step and the C yardstick, and the accuracy of
its semantics (batch-summed, as shipped) against per-rating updates (LIBMF/Surprise).

    gcc -O3 -march=native -fopenmp -o /tmp/mf_ref ../shared/perf/mf_ref.c -lm
    python bench/fused_step.py speed --mf-ref /tmp/mf_ref --repeats 3
    shardmf prepare ../shared/data/ml-100k/u.data --out /tmp/b/ml100k
    shardmf synth --out /tmp/b/synth5m-raw --num-users 100000 --num-items 20000 \\
        --num-ratings 5000000 --seed 0
    shardmf prepare /tmp/b/synth5m-raw --out /tmp/b/synth5m
    python bench/fused_step.py accuracy /tmp/b/ml100k /tmp/b/synth5m

speed: ML-25M-shaped tables (162,541 x 59,047), dim 64, one thread, users uniform and
items Zipf (weight ~ 1/rank, ranks shuffled over the ids), pre-cut batches in memory (no
loading): today's autograd step (BiasedMF + RowSGD), the fused step, the per-rating
variant, and mf_ref.c as a subprocess on the same table sizes (its ids are uniform, so the
fused step is also run on uniform ids for the ratio). All are interleaved ``--repeats``
times; medians are reported.

accuracy: ``trainer.train`` at defaults (one process) on each shard set with the fused step
as shipped, and with the per-rating kernel swapped in (this script only), plus the autograd
reference on the first set.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from trainer.data import BATCHES_PER_ITEM  # noqa: E402
from trainer.defaults import SMALL_SET  # noqa: E402
from trainer.fused_step import FusedSGDStep, load_fused_kernel  # noqa: E402
from trainer.model import BiasedMF  # noqa: E402
from trainer.optim import RowSGD  # noqa: E402

ML25M_TABLES = (162_541, 59_047)


@numba.njit(cache=True, fastmath=False, nogil=True)
def per_rating_sgd(users, items, ratings, batch_size, user_factors, item_factors, user_bias,
                   item_bias, mean, lr, reg, bias_reg, old_users, old_items, old_biases, errors,
                   touched_users, touched_items, total):
    """LIBMF/Surprise semantics: each rating updates its rows at once (batch size, scratch
    and row flags unused: one process only).

    Same signature as trainer.fused_step's kernel, so FusedSGDStep can run it.
    """
    dim = user_factors.shape[1]
    step = np.float32(-lr)
    decay = np.float32(2.0 * reg)
    bias_decay = np.float32(2.0 * bias_reg)
    mean32 = np.float32(mean)
    loss = total
    for b in range(len(ratings)):
        user, item = users[b], items[b]
        dot = np.float32(0.0)
        norms = np.float32(0.0)
        for j in range(dim):
            dot += user_factors[user, j] * item_factors[item, j]
            norms += (user_factors[user, j] * user_factors[user, j]
                      + item_factors[item, j] * item_factors[item, j])
        b_u = user_bias[user]
        b_i = item_bias[item]
        error = dot + b_u + b_i + mean32 - ratings[b]
        loss += error * error + reg * norms + bias_reg * (b_u * b_u + b_i * b_i)
        gradient = np.float32(2.0) * error
        for j in range(dim):
            p = user_factors[user, j]
            q = item_factors[item, j]
            user_factors[user, j] = p + step * (p * decay + gradient * q)
            item_factors[item, j] = q + step * (q * decay + gradient * p)
        user_bias[user] = b_u + step * (gradient + bias_decay * b_u)
        item_bias[item] = b_i + step * (gradient + bias_decay * b_i)
    return loss


def ratings_for(count: int, num_users: int, num_items: int, zipf: bool,
                seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count,) int64 users (uniform), items (Zipf 1/rank over shuffled ids, or uniform),
    float32 ratings in 1..5."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, num_users, count)
    if zipf:
        weights = 1.0 / np.arange(1, num_items + 1)
        ranks = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(count))
        items = rng.permutation(num_items)[np.minimum(ranks, num_items - 1)]
    else:
        items = rng.integers(0, num_items, count)
    stars = rng.integers(1, 6, count).astype(np.float32)
    return torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(stars)


def batches(data: tuple, batch: int) -> list[tuple]:
    return list(zip(*(t.split(batch) for t in data)))


def time_steps(step, cut: list[tuple]) -> float:
    """Ratings/s of ``step`` over the pre-cut runs of batches."""
    started = time.perf_counter()
    for users, items, ratings in cut:
        step(users, items, ratings, 0.0)
    return sum(len(r) for _, _, r in cut) / (time.perf_counter() - started)


def autograd_step(model: BiasedMF, optimizer: RowSGD):
    def step(users, items, ratings, total):
        loss = model(users, items, ratings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def run_mf_ref(binary: str, prefetch: int, ratings: int) -> float:
    line = subprocess.run([binary, *map(str, ML25M_TABLES), "64", str(ratings), "2", "sgd",
                           "1", str(prefetch)], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    return json.loads(line)["mratings_per_s"] * 1e6


def speed(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BiasedMF(*ML25M_TABLES, 3.5, ModelConfig(reg=0.05, dim=64))
    optimizer = RowSGD(model.parameters(), lr=SMALL_SET["lr"])
    # The fused steps take a loader item at a time, BATCHES_PER_ITEM batches, as in training.
    def fused(batch: int) -> FusedSGDStep:
        return FusedSGDStep(model, optimizer, load_fused_kernel(), batch)

    per_rating = FusedSGDStep(model, optimizer, per_rating_sgd, 1024)
    run = 1024 * BATCHES_PER_ITEM
    zipf = ratings_for(args.ratings, *ML25M_TABLES, zipf=True, seed=1)
    uniform = ratings_for(args.ratings, *ML25M_TABLES, zipf=False, seed=2)
    small = tuple(t[:args.ratings // 4] for t in zipf)  # the slow step needs fewer ratings
    runs = {
        "autograd_b1024_zipf": lambda: time_steps(autograd_step(model, optimizer),
                                                  batches(small, 1024)),
        "autograd_b8192_zipf": lambda: time_steps(autograd_step(model, optimizer),
                                                  batches(small, 8192)),
        **{f"fused_b{b}_zipf": (lambda b=b: time_steps(fused(b),
                                                        batches(zipf, b * BATCHES_PER_ITEM)))
           for b in args.batches},
        "fused_b1024_uniform": lambda: time_steps(fused(1024), batches(uniform, run)),
        "per_rating_b1024_zipf": lambda: time_steps(per_rating, batches(zipf, run)),
        "per_rating_b1024_uniform": lambda: time_steps(per_rating, batches(uniform, run)),
    }
    if args.mf_ref:
        runs["mf_ref_c_prefetch16_uniform"] = lambda: run_mf_ref(args.mf_ref, 16, args.c_ratings)
        runs["mf_ref_c_prefetch0_uniform"] = lambda: run_mf_ref(args.mf_ref, 0, args.c_ratings)
    time_steps(fused(1024), batches(tuple(t[:4096] for t in zipf), run))  # compile outside
    time_steps(per_rating, batches(tuple(t[:4096] for t in zipf), run))
    raw: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            raw[name].append(run())
            print(f"repeat {repeat + 1}: {name} {raw[name][-1] / 1e6:.2f} M ratings/s",
                  flush=True)
    medians = {name: statistics.median(values) for name, values in raw.items()}
    ratios = {}
    if args.mf_ref:
        c = medians["mf_ref_c_prefetch16_uniform"]
        ratios = {"fused_b1024_uniform / mf_ref_c_prefetch16_uniform":
                  medians["fused_b1024_uniform"] / c,
                  "fused_b1024_uniform / mf_ref_c_prefetch0_uniform":
                  medians["fused_b1024_uniform"] / medians["mf_ref_c_prefetch0_uniform"],
                  "fused_b1024_zipf / mf_ref_c_prefetch16_uniform":
                  medians["fused_b1024_zipf"] / c}
    ratios["fused_b1024_zipf / autograd_b1024_zipf"] = (medians["fused_b1024_zipf"]
                                                         / medians["autograd_b1024_zipf"])
    return {"tables": ML25M_TABLES, "dim": 64, "threads": 1, "ratings_per_run": args.ratings,
            "autograd_ratings_per_run": args.ratings // 4, "c_ratings_per_epoch": args.c_ratings,
            "repeats": args.repeats, "ratings_per_s": raw, "median_ratings_per_s": medians,
            "ratios": ratios}


def accuracy(args: argparse.Namespace) -> dict:
    """trainer.train at defaults, one process, for each semantics on each shard set."""
    from trainer.distributed import init_distributed, teardown

    # (``import trainer.train`` would give the function the package exports under that name)
    train_module = importlib.import_module("trainer.train")
    steps_module = importlib.import_module("trainer.steps")
    torch.set_num_threads(1)
    results = []
    for index, shards in enumerate(args.shards):
        kinds = ["batch_summed", "per_rating"] + (["autograd"] if index == 0 else [])
        for kind in kinds:
            run_dir = Path(args.work) / f"{Path(shards).name}-{kind}"
            steps_module.load_fused_kernel = (
                (lambda: per_rating_sgd) if kind == "per_rating" else load_fused_kernel)
            env = init_distributed("cpu", "auto", 600)
            try:
                metrics = train_module.train(
                    shards, run_dir, ModelConfig(), OptimConfig(),
                    TrainConfig(step="autograd" if kind == "autograd" else "fused"), env)
            finally:
                teardown()
            row = {"shards": str(shards), "semantics": kind, **{k: metrics[k] for k in (
                "test_rmse", "val_rmse", "best_epoch", "epochs", "train_seconds",
                "train_ratings_per_s")}}
            print(json.dumps(row), flush=True)
            results.append(row)
    steps_module.load_fused_kernel = load_fused_kernel
    return {"defaults": "ModelConfig(), OptimConfig(), TrainConfig() with --step fused "
            "(per_rating: its kernel swapped in) or autograd; one process, one thread",
            "runs": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    fast = sub.add_parser("speed")
    fast.add_argument("--mf-ref", help="compiled perf/mf_ref.c (omit to skip the C runs)")
    fast.add_argument("--repeats", type=int, default=3)
    fast.add_argument("--ratings", type=int, default=4_000_000)
    fast.add_argument("--c-ratings", type=int, default=5_000_000)
    fast.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 8192])
    good = sub.add_parser("accuracy")
    good.add_argument("shards", nargs="+")
    good.add_argument("--work", default="/tmp/fused_step_accuracy")
    parser.add_argument("--out", default=str(ROOT / "bench" / "fused_step.json"))
    args = parser.parse_args()
    result = speed(args) if args.part == "speed" else accuracy(args)
    out = Path(args.out)
    recorded = json.loads(out.read_text()) if out.is_file() else {}
    recorded[args.part] = {"command": " ".join(sys.argv), **result}
    out.write_text(json.dumps(recorded, indent=2) + "\n")


if __name__ == "__main__":
    main()
