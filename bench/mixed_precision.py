"""Mixed precision for the training step: does computing in bfloat16 make it faster?

    python bench/mixed_precision.py --out bench/mixed_precision.json

The trainer's step (BiasedMF, its fused loss node, RowSGD; fp32 tables and updates) against
the same step with the gathered factor rows cast to bfloat16 for the dot products, the
penalty and the row gradients, as a mixed-precision step would be (the tables and their
updates stay fp32, so small SGD updates are not rounded away). ``torch.autocast`` alone
changes nothing here: on CPU it lowers matmul-like ops, and this step has none.

Also timed: gathering 8,192 random rows of an fp32 and of a bfloat16 table, what storing
the tables in bfloat16 would save on the gathers. ML-25M-shaped tables, dim 64, 8,192
ratings a step, random ids, one thread; variants interleaved ``--repeats`` times, medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import ModelConfig  # noqa: E402
from trainer.distributed import keep_freed_memory  # noqa: E402
from trainer.model import BiasedMF, SquaredErrorWithL2  # noqa: E402
from trainer.optim import RowSGD  # noqa: E402


class Bfloat16SquaredError(SquaredErrorWithL2):
    """The trainer's loss node computing on bfloat16 copies of the gathered factor rows.

    The inherited backward then forms the row gradients from the bfloat16 rows; autograd
    casts them back to the fp32 tables' dtype before the embeddings' sparse gradients.
    """

    @staticmethod
    def forward(ctx, p, q, *rest):  # noqa: ANN001, ANN205 (autograd's signature)
        return SquaredErrorWithL2.forward(ctx, p.to(torch.bfloat16), q.to(torch.bfloat16),
                                          *rest)


def step_rate(model: BiasedMF, loss_node: type[torch.autograd.Function],
              optimizer: RowSGD, batches: list) -> float:
    """Ratings/s of loss, backward and step over ``batches`` after 5 warm-up steps."""
    def step(users, items, ratings) -> None:  # noqa: ANN001
        loss = loss_node.apply(model.user_factors(users), model.item_factors(items),
                               model.user_bias(users)[:, 0], model.item_bias(items)[:, 0],
                               ratings, model.global_mean, model.config.reg,
                               model.config.bias_reg)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for batch in batches[:5]:
        step(*batch)
    started = time.perf_counter()
    for batch in batches[5:]:
        step(*batch)
    return sum(len(b[0]) for b in batches[5:]) / (time.perf_counter() - started)


def gather_ms(table: torch.Tensor, rows: torch.Tensor, times: int = 50) -> float:
    started = time.perf_counter()
    for _ in range(times):
        table.index_select(0, rows)
    return 1000 * (time.perf_counter() - started) / times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", type=int, nargs=2, default=(162_541, 59_047),
                        metavar=("USERS", "ITEMS"))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()

    torch.set_num_threads(1)
    keep_freed_memory()
    torch.manual_seed(0)
    num_users, num_items = args.tables
    model = BiasedMF(num_users, num_items, 3.5, ModelConfig(reg=0.05, dim=args.dim, init_std=0.1))
    optimizer = RowSGD(model.parameters(), lr=0.003)
    gen = torch.Generator().manual_seed(0)

    def batches() -> list:
        return [(torch.randint(0, num_users, (args.batch,), generator=gen),
                 torch.randint(0, num_items, (args.batch,), generator=gen),
                 torch.randint(1, 6, (args.batch,), generator=gen).float())
                for _ in range(args.steps + 5)]

    variants = {"fp32 (the trainer)": SquaredErrorWithL2,
                "bfloat16 compute, fp32 tables": Bfloat16SquaredError}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    gathers: dict[str, list[float]] = {"fp32 rows": [], "bfloat16 rows": []}
    table32 = model.user_factors.weight.detach()
    table16 = table32.to(torch.bfloat16)
    for _ in range(args.repeats):
        for name, node in variants.items():
            rates[name].append(step_rate(model, node, optimizer, batches()))
        rows = torch.randint(0, num_users, (args.batch,), generator=gen)
        gathers["fp32 rows"].append(gather_ms(table32, rows))
        gathers["bfloat16 rows"].append(gather_ms(table16, rows))

    base = statistics.median(rates["fp32 (the trainer)"])
    print(f"{'step':32s} {'M ratings/s':>12s} {'vs fp32':>8s}  runs")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:32s} {median / 1e6:12.2f} {median / base:8.2f}  "
              f"{[round(v / 1e6, 2) for v in values]}")
    for name, values in gathers.items():
        print(f"gather {args.batch:,} {name}: {statistics.median(values):.3f} ms")
    if args.out:
        args.out.write_text(json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "torch": torch.__version__, "threads": 1},
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "ratings_per_s": rates, "gather_ms": gathers}, indent=1) + "\n")


if __name__ == "__main__":
    main()
