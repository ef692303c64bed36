"""Training throughput: the trainer's step (1 and 2 ranks, sparse and dense gradients) against
a best-case hand-written PyTorch kernel on the same table sizes, with a per-step breakdown.

    shardmf synth --out /tmp/bench_tp/raw --num-users 162541 --num-items 59047 \\
        --num-ratings 5000000
    shardmf prepare /tmp/bench_tp/raw --out /tmp/bench_tp/shards --num-shards 4
    python bench/train_throughput.py /tmp/bench_tp/shards --repeats 3

Every configuration runs in its own process (2 ranks through torchrun, gloo), one torch
thread per process, and the configurations are interleaved ``--repeats`` times so that
noise from other users of the machine hits all of them alike; medians are reported.

What one trainer measurement does (rank batch B, the trainer's own components:
TrainBatches, BiasedMF, wrap_model/DDP, build_optimizer, the same loss):

* ``loop``: ``trainer.train._train_epoch`` itself over ``--steps`` steps (the real loop,
  with its progress bar and loss checks), ratings/s over all ranks.
* a timed loop of the same steps, synchronous timers around each phase: data (next batch
  from the DataLoader), forward (+loss), backward (under DDP this includes the gradient
  all-reduce), optimizer (zero_grad + step).
* the same timed loop inside ``model.no_sync()``: backward without the all-reduce.
  communication = backward - backward(no_sync).

The kernel: index_select the touched rows, score, gradients by hand, scatter_add_ updates
with an expanded (B, k) index; no data loading, no communication (PERF_FACTS.md's
"hand-written" row).
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


def kernel(num_users: int, num_items: int, dim: int, batch: int, steps: int,
           seed: int = 0) -> dict:
    """Best-case plain-PyTorch biased-MF SGD: ratings/s of the update alone."""
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(num_users, dim, generator=gen) * 0.01
    q = torch.randn(num_items, dim, generator=gen) * 0.01
    bu, bi = torch.zeros(num_users), torch.zeros(num_items)
    lr, reg, bias_reg, mean = 0.003, 0.05, 0.01, 3.5
    n = batch * (steps + 3)
    users = torch.randint(0, num_users, (n,), generator=gen)
    items = torch.randint(0, num_items, (n,), generator=gen)
    ratings = torch.randint(1, 6, (n,), generator=gen).float()

    def step(u, i, r):
        pu, qi = p.index_select(0, u), q.index_select(0, i)
        bu_u, bi_i = bu.index_select(0, u), bi.index_select(0, i)
        err = mean + bu_u + bi_i + (pu * qi).sum(1) - r  # (B,)
        e = err.unsqueeze(1)
        grad_p = 2 * (e * qi + reg * pu)
        grad_q = 2 * (e * pu + reg * qi)
        uu = u.unsqueeze(1).expand(-1, dim)
        ii = i.unsqueeze(1).expand(-1, dim)
        p.scatter_add_(0, uu, grad_p.mul_(-lr))
        q.scatter_add_(0, ii, grad_q.mul_(-lr))
        bu.scatter_add_(0, u, (2 * (err + bias_reg * bu_u)).mul_(-lr))
        bi.scatter_add_(0, i, (2 * (err + bias_reg * bi_i)).mul_(-lr))

    for s in range(3):  # warm-up
        sl = slice(s * batch, (s + 1) * batch)
        step(users[sl], items[sl], ratings[sl])
    started = time.perf_counter()
    for s in range(3, steps + 3):
        sl = slice(s * batch, (s + 1) * batch)
        step(users[sl], items[sl], ratings[sl])
    seconds = time.perf_counter() - started
    return {"ratings_per_s": batch * steps / seconds, "step_ms": 1000 * seconds / steps}


def trainer_worker(shards_dir: str, dim: int, rank_batch: int, steps: int,
                   gradients: str) -> dict | None:
    """One rank of a trainer measurement (run under torchrun for 2 ranks)."""
    import torch

    from trainer.config import ModelConfig, OptimConfig, TrainConfig
    from trainer.data import TrainBatches, steps_per_epoch, train_loader
    from trainer.distributed import all_reduce, init_distributed, teardown, wrap_model
    from trainer.model import BiasedMF
    from trainer.shards import open_shards, pieces_for_rank
    from trainer.train import _train_epoch, _TrainState, build_optimizer

    torch.set_num_threads(1)
    env = init_distributed("cpu", "gloo", 300)
    try:
        shards = open_shards(shards_dir, "none")
        pieces = pieces_for_rank(shards.pieces("train"), env.rank, env.world_size)
        warm = 3
        needed = 3 * steps + 2 * warm
        if steps_per_epoch(pieces, rank_batch) < needed:
            raise SystemExit(f"rank {env.rank}: too few ratings for {needed} steps")
        torch.manual_seed(0)
        model_config = ModelConfig(dim=dim)
        train_config = TrainConfig(batch_size=rank_batch * env.world_size, seed=0,
                                   gradients=gradients, threads=1)
        model = BiasedMF(shards.num_users, shards.num_items, shards.train_mean,
                         model_config, sparse=gradients == "sparse")
        ddp = wrap_model(model, env)
        optimizer = build_optimizer(model, OptimConfig(optimizer="sgd", lr=0.001))
        scale = float(env.world_size)

        # 1. The real loop, over the first `steps` batches of epoch 0.
        started = time.perf_counter()
        _train_epoch(ddp, optimizer, pieces, rank_batch, steps, 0, train_config, env,
                     _TrainState(), lambda *a: None)
        loop_s = all_reduce([time.perf_counter() - started], env, "max")[0]

        # 2./3. Timed phases, with and without gradient synchronisation (epoch 1's data).
        def timed(sync: bool, epoch: int) -> dict:
            data = TrainBatches(pieces, rank_batch, steps + warm, 0, epoch, env.rank)
            loader = iter(train_loader(data, 0, False))
            totals = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
            for s in range(steps + warm):
                t0 = time.perf_counter()
                users, items, ratings = next(loader)
                t1 = time.perf_counter()
                prediction, penalty = ddp(users, items)
                loss = ((prediction - ratings).square() + penalty).sum()
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                (loss * scale).backward()
                t3 = time.perf_counter()
                optimizer.step()
                t4 = time.perf_counter()
                if s >= warm:
                    for key, value in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        totals[key] += value
            return {k: 1000 * v / steps for k, v in totals.items()}

        if env.backend is not None:
            with ddp.no_sync():
                unsynced = timed(False, 2)
            all_reduce([0.0], env)  # line the ranks up again after the unsynced steps
        synced = timed(True, 1)
        if env.backend is None:
            unsynced = synced
        ms = all_reduce([*synced.values(), unsynced["backward"]], env, "max")
        result = dict(zip(synced, ms[:4]))
        result["backward_no_sync"] = ms[4]
        result["communication"] = max(ms[2] - ms[4], 0.0)
        result["step"] = sum(ms[:4])
        result["timed_ratings_per_s"] = rank_batch * env.world_size / (result["step"] / 1000)
        result["loop_ratings_per_s"] = steps * rank_batch * env.world_size / loop_s
        return result if env.is_main else None
    finally:
        teardown()


def run_config(args, ranks: int, gradients: str) -> dict:
    out = Path(args.work) / f"result-{ranks}-{gradients}.json"
    out.unlink(missing_ok=True)
    worker = [str(Path(__file__).resolve()), args.shards, "--worker", "--gradients", gradients,
              "--dim", str(args.dim), "--rank-batch", str(args.rank_batch),
              "--steps", str(args.steps), "--result", str(out)]
    if ranks == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", *worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=600)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_kernel(args, num_users: int, num_items: int) -> dict:
    call = f"kernel({num_users}, {num_items}, {args.dim}, {args.rank_batch}, {args.steps * 2})"
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from bench.train_throughput import kernel; print(json.dumps({call}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], check=True, env=env,
                          capture_output=True, text=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rank-batch", type=int, default=8192, help="ratings per rank per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/bench_tp/work")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gradients", default="sparse", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = trainer_worker(args.shards, args.dim, args.rank_batch, args.steps,
                                args.gradients)
        if result is not None:
            Path(args.result).write_text(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    from trainer.shards import open_shards

    shards = open_shards(args.shards, "none")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    configs = [("kernel", 1, "-"), ("trainer", 1, "sparse"), ("trainer", 2, "sparse"),
               ("trainer", 1, "dense"), ("trainer", 2, "dense")]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            kind, ranks, gradients = config
            result = (run_kernel(args, shards.num_users, shards.num_items) if kind == "kernel"
                      else run_config(args, ranks, gradients))
            runs[config].append(result)
            print(f"repeat {repeat + 1}: {kind} {ranks} rank(s) {gradients}: "
                  f"{json.dumps({k: round(v, 2) for k, v in result.items()})}", flush=True)
    summary = []
    for config, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        summary.append({"kind": config[0], "ranks": config[1], "gradients": config[2],
                        "median": median, "runs": results})
    facts = {"num_users": shards.num_users, "num_items": shards.num_items,
             "train_ratings": shards.rows("train"), "dim": args.dim,
             "rank_batch": args.rank_batch, "steps": args.steps, "repeats": args.repeats}
    out = Path(args.work) / "summary.json"
    out.write_text(json.dumps({"facts": facts, "results": summary}, indent=2))
    print(json.dumps({"facts": facts, "medians": [
        {**{k: v for k, v in s.items() if k != "runs"}} for s in summary]}, indent=1))


if __name__ == "__main__":
    main()
