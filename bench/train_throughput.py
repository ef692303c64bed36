"""Training throughput: the trainer's step (1 and 2 ranks, sparse and dense gradients, DDP or
the packed sync) against a best-case hand-written PyTorch kernel on the same table sizes,
with a per-step breakdown and the bytes communicated per step.

    shardmf synth --out /tmp/bench_tp/raw --num-users 162541 --num-items 59047 \\
        --num-ratings 5000000
    shardmf prepare /tmp/bench_tp/raw --out /tmp/bench_tp/shards --num-shards 4
    python bench/train_throughput.py /tmp/bench_tp/shards --repeats 3
    python bench/train_throughput.py - --tables 10000000 1000000 --dim 16 \\
        --configs 1-sparse,2-sparse-ddp,2-sparse-packed   # random ids, no shards

Every configuration runs in its own process (2 ranks through torchrun, gloo), one torch
thread per process, and the configurations are interleaved ``--repeats`` times so that
noise from other users of the machine hits all of them alike; medians are reported.

What one trainer measurement does (rank batch B, the trainer's own components:
TrainBatches, BiasedMF, wrap_model/DDP, build_optimizer, the same loss):

* ``loop``: ``trainer.train.TrainEpoch`` itself over ``--steps`` steps (the real loop,
  with its progress bar and loss checks), ratings/s over all ranks.
* a timed loop of the same steps, synchronous timers around each phase: data (next batch
  from the DataLoader), forward (+loss), backward (under DDP this includes the gradient
  all-reduce), optimizer (zero_grad + step).
* the same timed loop inside ``model.no_sync()``: backward without the all-reduce.
  communication = backward - backward(no_sync). With ``--sync packed`` (no DDP) the sync
  call is its own timed phase, and its returned bytes are recorded; for DDP the bytes are
  estimated from each rank's unique touched rows (int64 ids + float32 values).

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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]


def kernel(num_users: int, num_items: int, dim: int, batch: int, steps: int,
           seed: int = 0) -> dict:
    """Best-case plain-PyTorch biased-MF SGD: ratings/s of the update alone."""
    import torch

    from trainer.distributed import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # the trainer's own setting: a best case must not pay page faults
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


def random_batches(num_users: int, num_items: int, rank_batch: int, seed: int):
    """Endless uniform (users, items, ratings) batches: tables too big to prepare shards for."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.randint(0, num_users, (rank_batch,), generator=gen),
               torch.randint(0, num_items, (rank_batch,), generator=gen),
               torch.randint(1, 6, (rank_batch,), generator=gen).float())


def trainer_worker(shards_dir: str, dim: int, rank_batch: int, steps: int,
                   gradients: str, sync: str, tables: tuple[int, int] | None,
                   users: str = "replicated", every: int = 1,
                   prefetch: int = 4) -> dict | None:
    """One rank of a trainer measurement (run under torchrun for 2 ranks).

    ``tables``: (users, items) of a random-batch run without shards (no "loop" figure).
    ``users``: "owned" keeps each rank's users only (shards partitioned by user) and
    exchanges item rows alone; ``every`` > 1 is the periodic row sync.
    """
    import torch

    from trainer.checkpoint import TrainState
    from trainer.config import ModelConfig, OptimConfig, TrainConfig
    from trainer.data import RowGroupReader, TrainBatches, steps_per_epoch, train_loader
    from trainer.distributed import all_reduce, init_distributed, keep_freed_memory, teardown
    from trainer.model import BiasedMF
    from trainer.optim import build_optimizer
    from trainer.ownership import user_ownership
    from trainer.shards import open_shards, pieces_for_rank
    from trainer.steps import build_step, sparse_tables
    from trainer.train import TrainEpoch

    torch.set_num_threads(1)
    keep_freed_memory()
    env = init_distributed("cpu", "gloo", 300)
    try:
        warm = 3
        reader = RowGroupReader()
        if tables is None:
            shards = open_shards(shards_dir, "none")
            num_users, num_items, mean = shards.num_users, shards.num_items, shards.train_mean
            pieces = pieces_for_rank(shards.pieces("train"), env.rank, env.world_size)
            if users == "owned":
                ownership = user_ownership(shards, env)
                pieces = ownership.pieces(shards, "train")
                reader = RowGroupReader(ownership.local_rows)
                num_users = len(ownership.users)
            # The loop and the two timed passes each cut one epoch's plan (epochs 0, 1, 2):
            # each needs its steps without wrapping around the rank's ratings.
            needed = steps + warm
            if steps_per_epoch(pieces, rank_batch) < needed:
                raise SystemExit(f"rank {env.rank}: too few ratings for {needed} steps")
        else:
            (num_users, num_items), mean = tables, 3.5
        torch.manual_seed(0)
        model_config = ModelConfig(reg=0.05, dim=dim)
        train_config = TrainConfig(batch_size=rank_batch * env.world_size, seed=0,
                                   gradients=gradients, threads=1, prefetch=prefetch)
        model = BiasedMF(num_users, num_items, mean, model_config,
                         sparse=gradients == "sparse")
        packed = sync == "packed" and env.backend is not None
        optimizer = build_optimizer(model, OptimConfig(optimizer="sgd", lr=0.001))
        step = build_step("autograd", model, optimizer, "sgd", sync, users == "owned",
                          every, rank_batch, env)
        step_model, grad_sync, scale = step.model, step.grad_sync, step.scale

        loop_s = None
        if tables is None:  # 1. The real loop, over the first `steps` batches of epoch 0.
            started = time.perf_counter()
            TrainEpoch(step, pieces, rank_batch, steps, train_config, env, reader)(
                0, TrainState())
            loop_s = all_reduce([time.perf_counter() - started], env, "max")[0]

        # 2./3. Timed phases, with and without gradient synchronisation (epoch 1's data).
        # Packed: the sync is its own phase. DDP: it hides in backward; no_sync() tells.
        def timed(sync_now: bool, epoch: int) -> dict:
            if tables is None:
                data = TrainBatches(pieces, rank_batch, steps + warm, 0, epoch, env.rank,
                                    reader=reader)
                loader = (batch for run in train_loader(data, 0, False, prefetch)
                          for batch in zip(*(c.split(rank_batch) for c in run)))
            else:
                loader = random_batches(num_users, num_items, rank_batch,
                                        1000 * epoch + env.rank)
            phases = ("data", "forward", "backward", "sync", "optimizer")
            totals = dict.fromkeys(phases, 0.0)
            moved = rows = 0
            for s in range(steps + warm):
                t0 = time.perf_counter()
                users, items, ratings = next(loader)
                t1 = time.perf_counter()
                loss = step_model(users, items, ratings)
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                (loss * scale).backward()
                t3 = time.perf_counter()
                step_bytes = 0
                if grad_sync is not None and sync_now:
                    step_bytes += grad_sync.after_backward()
                elif not sync_now and s >= warm and gradients == "sparse":
                    # rows DDP's 4 sparse all-reduces send (coalesced: unique rows)
                    rows += sum(p.grad.coalesce().indices().shape[1]
                                for p, _ in sparse_tables(model))
                t4 = time.perf_counter()
                optimizer.step()
                t5 = time.perf_counter()
                if grad_sync is not None and sync_now:  # the periodic sync's exchange
                    step_bytes += grad_sync.after_step()
                t6 = time.perf_counter()
                if s >= warm:
                    moved += step_bytes
                    for key, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2,
                                                   t4 - t3 + t6 - t5, t5 - t4)):
                        totals[key] += value
            result = {k: 1000 * v / steps for k, v in totals.items()}
            result["bytes"] = moved / steps
            result["rows"] = rows / steps
            return result

        if env.backend is not None and not packed:
            with step_model.no_sync():
                unsynced = timed(False, 2)
            all_reduce([0.0], env)  # line the ranks up again after the unsynced steps
        synced = timed(True, 1)
        if env.backend is None or packed:
            unsynced = synced
        keys = ("data", "forward", "backward", "sync", "optimizer")
        ms = all_reduce([*(synced[k] for k in keys), unsynced["backward"]], env, "max")
        result = dict(zip(keys, ms[:5]))
        result["backward_no_sync"] = ms[5]
        if packed:
            result["communication"] = ms[3]
            result["bytes_per_step"] = synced["bytes"]
        elif env.backend is not None and gradients == "sparse":
            result["communication"] = max(ms[2] - ms[5], 0.0)
            # gloo's sparse all-reduce all-gathers int64 indices and float32 values of each
            # rank's unique rows (the factor rows; the bias tables add 12 B per row)
            rows = all_reduce([unsynced["rows"]], env)[0]
            result["bytes_per_step"] = rows * (8 + 4 * dim + 12)
        else:
            result["communication"] = max(ms[2] - ms[5], 0.0)
            result["bytes_per_step"] = 0.0 if env.backend is None else (
                4.0 * sum(p.numel() for p in model.parameters()) * env.world_size)
        result["step"] = sum(ms[:5])
        result["timed_ratings_per_s"] = rank_batch * env.world_size / (result["step"] / 1000)
        if loop_s is not None:
            result["loop_ratings_per_s"] = steps * rank_batch * env.world_size / loop_s
        return result if env.is_main else None
    finally:
        teardown()


def run_config(args, ranks: int, gradients: str, sync: str = "ddp",
               tables: tuple[int, int] | None = None, users: str = "replicated",
               every: int = 1, prefetch: int = 4) -> dict:
    out = (Path(args.work)
           / f"result-{ranks}-{gradients}-{sync}-{users}-{every}-{prefetch}.json")
    out.unlink(missing_ok=True)
    shards = args.user_shards if users == "owned" else args.shards
    worker = [str(Path(__file__).resolve()), shards, "--worker", "--gradients", gradients,
              "--sync", sync, "--dim", str(args.dim), "--rank-batch", str(args.rank_batch),
              "--steps", str(args.steps), "--result", str(out), "--users", users,
              "--every", str(every), "--prefetch", str(prefetch)]
    if tables is not None:
        worker += ["--tables", str(tables[0]), str(tables[1])]
    if ranks == 1:
        command = [sys.executable, *worker]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={ranks}", *worker]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=900)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_kernel(args, num_users: int, num_items: int, copies: int = 1) -> dict:
    """The kernel in ``copies`` processes at once: with 2, the most that 2 processes with no
    communication at all get out of the machine's 2 cores (ratings/s summed)."""
    call = f"kernel({num_users}, {num_items}, {args.dim}, {args.rank_batch}, {args.steps * 2})"
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from bench.train_throughput import kernel; print(json.dumps({call}))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(copies)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        if proc.returncode:
            raise SystemExit(f"kernel failed:\n{err[-4000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return {"ratings_per_s": sum(r["ratings_per_s"] for r in results),
            "step_ms": statistics.median(r["step_ms"] for r in results)}


class Config(NamedTuple):
    """One measured configuration; the summary records these fields beside its medians."""

    kind: str  # kernel | trainer
    ranks: int
    gradients: str = "sparse"
    sync: str = "-"  # ddp | packed ("-": one rank)
    users: str = "replicated"  # replicated | owned
    every: int = 1  # sync every N steps
    prefetch: int = 4  # batches cut ahead in a thread (0: in the loop, one thread per rank)


KERNEL = {"gradients": "-", "users": "-", "prefetch": 0}
CONFIGS = {
    "kernel": Config("kernel", 1, **KERNEL),
    "2-kernels": Config("kernel", 2, **KERNEL),  # two at once, no communication
    "1-sparse": Config("trainer", 1),
    "2-sparse-ddp": Config("trainer", 2, sync="ddp"),
    "2-sparse-packed": Config("trainer", 2, sync="packed"),
    "2-owned-packed": Config("trainer", 2, sync="packed", users="owned"),
    "2-owned-every-8": Config("trainer", 2, sync="packed", users="owned", every=8),
    "2-owned-every-32": Config("trainer", 2, sync="packed", users="owned", every=32),
    "2-owned-every-48": Config("trainer", 2, sync="packed", users="owned", every=48),
    "1-dense": Config("trainer", 1, gradients="dense"),
    "2-dense-ddp": Config("trainer", 2, gradients="dense", sync="ddp"),
    # --prefetch 0: batches cut in the loop, one thread per rank (the "1 thread")
    "1-sparse-inline": Config("trainer", 1, prefetch=0),
    "2-owned-every-32-inline": Config("trainer", 2, sync="packed", users="owned", every=32,
                                      prefetch=0),
    "2-owned-every-48-inline": Config("trainer", 2, sync="packed", users="owned", every=48,
                                      prefetch=0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", help="SHARDS_DIR (ignored with --tables)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rank-batch", type=int, default=8192, help="ratings per rank per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--tables", type=int, nargs=2, metavar=("USERS", "ITEMS"),
                        help="random uniform batches on tables of this size instead of shards")
    parser.add_argument("--user-shards", default=None,
                        help="the same ratings prepared with --partition-by user, for the "
                             "owned configurations (default: SHARDS_DIR)")
    parser.add_argument("--work", default="/tmp/bench_tp/work")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gradients", default="sparse", help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--users", default="replicated", help=argparse.SUPPRESS)
    parser.add_argument("--every", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--prefetch", type=int, default=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.user_shards = args.user_shards or args.shards
    tables = tuple(args.tables) if args.tables else None
    if args.worker:
        result = trainer_worker(args.shards, args.dim, args.rank_batch, args.steps,
                                args.gradients, args.sync, tables, args.users, args.every,
                                args.prefetch)
        if result is not None:
            Path(args.result).write_text(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    from trainer.shards import open_shards

    if tables is None:
        shards = open_shards(args.shards, "none")
        facts = {"num_users": shards.num_users, "num_items": shards.num_items,
                 "train_ratings": shards.rows("train")}
    else:
        facts = {"num_users": tables[0], "num_items": tables[1], "train_ratings": None}
    facts.update(dim=args.dim, rank_batch=args.rank_batch, steps=args.steps,
                 repeats=args.repeats, data="random uniform" if tables else args.shards)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    configs = [CONFIGS[name] for name in args.configs.split(",")]
    runs: dict[Config, list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for config in configs:
            kind, ranks, gradients, sync, users, every, prefetch = config
            result = (run_kernel(args, facts["num_users"], facts["num_items"], ranks)
                      if kind == "kernel" else run_config(args, ranks, gradients, sync, tables,
                                                          users, every, prefetch))
            runs[config].append(result)
            print(f"repeat {repeat + 1}: {kind} {ranks} rank(s) {gradients} {sync} {users} "
                  f"every {every} prefetch {prefetch}: "
                  f"{json.dumps({k: round(v, 2) for k, v in result.items()})}", flush=True)
    summary = []
    for config, results in runs.items():
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        summary.append({**config._asdict(), "median": median, "runs": results})
    name = "summary.json" if tables is None else f"summary-{tables[0]}x{tables[1]}.json"
    out = Path(args.work) / name
    out.write_text(json.dumps({"facts": facts, "results": summary}, indent=2))
    print(json.dumps({"facts": facts, "medians": [
        {**{k: v for k, v in s.items() if k != "runs"}} for s in summary]}, indent=1))


if __name__ == "__main__":
    main()
