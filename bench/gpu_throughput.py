"""Throughput of the trainer's own update step on a GPU, on ML-25M-shaped tables.

    python bench/gpu_throughput.py                          # cuda, batches 2^16..2^22
    python bench/gpu_throughput.py --device cpu --quick     # smoke test: a few seconds

What is timed is `trainer.steps.AutogradStep`, the step `shardmf train` runs: BiasedMF's
forward (its one-node loss), backward (row gradients of the embeddings), and the optimizer
from `trainer.optim.build_optimizer`. No data loading and no communication between GPUs:
this is the kernel's figure, to set beside a whole `shardmf train` run's
train_ratings_per_s (bench/gpu_check.sh prints both). Two modes:

* ``sparse``: one rank, sparse row gradients and RowSGD, which is what
  `shardmf train --nproc 1 --device cuda` runs (a single rank has no process group).
* ``dense-ddp``: dense gradients under DDP over a one-rank process group (nccl on cuda,
  gloo on cpu), which is what each rank of `--nproc N` runs on GPUs (nccl cannot reduce
  sparse tensors). One rank measures the whole-table update and DDP's bucketing with an
  all-reduce over itself, not traffic between GPUs.

Ids are drawn on the device before timing: users uniform, items Zipf-like (rank r drawn
with weight 1 / (r + 1)^s, ranks scattered over the ids by a fixed permutation, so hot
rows are not neighbours). Each batch size is warmed up, then timed in chunks of steps with
a device synchronisation at each chunk's ends; the median chunk is reported.

Prints a table of M ratings/s per mode and batch size, then one JSON line (also written to
``--json-out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a source tree
    sys.path.insert(0, str(ROOT))

from trainer.config import ModelConfig, OptimConfig  # noqa: E402
from trainer.distributed import DistEnv  # noqa: E402
from trainer.model import BiasedMF  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.steps import AutogradStep  # noqa: E402
from trainer.steps import build_step as build_trainer_step  # noqa: E402

ML25M_TABLES = (162_541, 59_047)  # users, items of MovieLens 25M
TARGET_RATINGS_PER_S = 100e6  # issue #11 item 4, one H200 at dim 64 (cuMF_SGD: ~640 M/s)
# The loss is a sum over the batch and the learning rate is per rating, so a hot item's
# update grows with the batch. lr x batch held at this constant keeps the arithmetic
# finite at every batch size; the speed of the step does not depend on the learning rate.
LR_TIMES_BATCH = 3.0
MODES = ("sparse", "dense-ddp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda | cpu (default: cuda)")
    parser.add_argument("--quick", action="store_true",
                        help="small batches and short timing, for a smoke test")
    parser.add_argument("--dim", type=int, default=64, help="embedding dimension (default 64)")
    parser.add_argument("--tables", type=int, nargs=2, default=ML25M_TABLES,
                        metavar=("USERS", "ITEMS"), help="table rows (default: ML-25M's)")
    parser.add_argument("--log2-batches", type=int, nargs="+", default=None, metavar="K",
                        help="batch sizes as powers of two (default 16..22; quick: 12 14)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--zipf", type=float, default=1.0,
                        help="item popularity exponent s (default 1.0)")
    parser.add_argument("--chunk-seconds", type=float, default=None,
                        help="shortest timed chunk (default 0.25 s; quick: 0.03 s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks per size (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.log2_batches is None:
        args.log2_batches = [12, 14] if args.quick else list(range(16, 23))
    if args.chunk_seconds is None:
        args.chunk_seconds = 0.03 if args.quick else 0.25
    return args


class IdSampler:
    """Batches of (users, items, ratings) drawn on the device: users uniform, items Zipf."""

    def __init__(self, num_users: int, num_items: int, exponent: float,
                 device: torch.device, seed: int) -> None:
        self.num_users, self.num_items, self.device = num_users, num_items, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        weights = torch.arange(1, num_items + 1, dtype=torch.float64,
                               device=device).pow_(-exponent)
        self.cdf = (weights.cumsum(0) / weights.sum()).float()
        self.item_of_rank = torch.randperm(num_items, generator=self.generator, device=device)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) int64 users, (B,) int64 items, (B,) float32 ratings in 1..5."""
        users = torch.randint(self.num_users, (size,), generator=self.generator,
                              device=self.device)
        draws = torch.rand(size, generator=self.generator, device=self.device)
        ranks = torch.searchsorted(self.cdf, draws).clamp_(max=self.num_items - 1)
        ratings = torch.randint(1, 6, (size,), generator=self.generator,
                                device=self.device).float()
        return users, self.item_of_rank[ranks], ratings


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(mode: str, num_users: int, num_items: int, dim: int, batch: int,
               env: DistEnv) -> AutogradStep:
    """The trainer's model, optimizer and step, as `trainer.train` builds them per mode."""
    model = BiasedMF(num_users, num_items, 3.5, ModelConfig(reg=0.05, dim=dim),
                     sparse=mode == "sparse")
    model.to(env.device)
    optimizer = build_optimizer(model, OptimConfig(lr=LR_TIMES_BATCH / batch))
    if mode == "sparse":
        return AutogradStep(model, optimizer, None, 1.0, batch)
    return build_trainer_step("autograd", model, optimizer, "sgd", "ddp", False, 1, batch,
                              env)


def time_steps(step: AutogradStep, batches: list, steps: int, device: torch.device
               ) -> tuple[float, torch.Tensor]:
    """Seconds for ``steps`` steps cycling over ``batches``, and the last loss."""
    synchronize(device)
    started = time.perf_counter()
    loss = torch.zeros(())
    for index in range(steps):
        loss = step(*batches[index % len(batches)], 0.0)
    synchronize(device)
    return time.perf_counter() - started, loss


def measure(mode: str, batch: int, args: argparse.Namespace, sampler: IdSampler,
            env: DistEnv) -> dict:
    """Median ratings/s of the step at one batch size, after warm-up."""
    step = build_step(mode, *args.tables, args.dim, batch, env)
    # A few distinct batches, cycled: the step sees fresh ids without timing their drawing.
    batches = [sampler.batch(batch) for _ in range(4)]
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    # Warm-up: the allocator, kernel selection, DDP's buckets.
    time_steps(step, batches, 1 if args.quick else 5, env.device)
    steps = 2
    seconds, loss = time_steps(step, batches, steps, env.device)
    while seconds < args.chunk_seconds:  # grow the chunk until the timer is negligible
        steps *= 2
        seconds, loss = time_steps(step, batches, steps, env.device)
    chunks = [seconds] + [time_steps(step, batches, steps, env.device)[0]
                          for _ in range(args.repeats - 1)]
    median = statistics.median(chunks)
    result = {"mode": mode, "batch_size": batch, "steps_per_chunk": steps,
              "chunk_seconds": [round(s, 5) for s in chunks],
              "step_time_s": round(median / steps, 7),
              "ratings_per_s": round(batch * steps / median, 1),
              "loss_finite": bool(math.isfinite(float(loss)))}
    if env.device.type == "cuda":
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(env.device)
    return result


def one_rank_group(device: torch.device) -> DistEnv:
    """A process group of this process alone, for DDP (nccl on cuda, gloo on cpu)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    return DistEnv(0, 0, 1, 1, device, backend)


def environment(device: torch.device) -> dict:
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return facts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: error: --device cuda, but torch sees no CUDA device "
              f"(torch {torch.__version__}); use --device cpu for a smoke test",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sampler = IdSampler(*args.tables, args.zipf, device, args.seed)
    plain = DistEnv(0, 0, 1, 1, device, None)
    results = []
    print(f"{'mode':<10} {'batch':>9} {'M ratings/s':>12} {'ms/step':>9}", flush=True)
    for mode in args.modes:
        env = one_rank_group(device) if mode == "dense-ddp" else plain
        try:
            for log2 in args.log2_batches:
                result = measure(mode, 2 ** log2, args, sampler, env)
                results.append(result)
                print(f"{mode:<10} {2 ** log2:>9,} {result['ratings_per_s'] / 1e6:>12.2f} "
                      f"{result['step_time_s'] * 1e3:>9.3f}", flush=True)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    best = max(results, key=lambda r: r["ratings_per_s"])
    summary = {
        "bench": "gpu_throughput", **environment(device), "quick": args.quick,
        "num_users": args.tables[0], "num_items": args.tables[1], "dim": args.dim,
        "item_zipf_exponent": args.zipf, "lr_times_batch": LR_TIMES_BATCH,
        "results": results, "best": {k: best[k] for k in ("mode", "batch_size",
                                                          "ratings_per_s")},
        "target_ratings_per_s": TARGET_RATINGS_PER_S,
        # The target is stated for a GPU at full size; a CPU or --quick run only smoke-tests.
        "target_met": (best["ratings_per_s"] >= TARGET_RATINGS_PER_S
                       if device.type == "cuda" and not args.quick else None),
    }
    line = json.dumps(summary)
    print(line)
    if args.json_out is not None:
        args.json_out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
