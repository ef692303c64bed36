"""How a run executes (trainer/strategy.py): every auto choice decided together, and the
combinations that cannot run refused with one message naming the fields."""

from __future__ import annotations

import dataclasses

import pytest

from shardmf.errors import InputError
from trainer.config import TrainConfig
from trainer.strategy import EXCHANGE_EVERY_RATINGS, Facts, Strategy, resolve_strategy

ONE = Facts(world_size=1, backend=None, device_type="cpu", optimizer="sgd",
            partitioned_by_user=False, table_rows=450, rank_batch=1024)
TWO_CPU = dataclasses.replace(ONE, world_size=2, backend="gloo", rank_batch=512)
TWO_GPU = dataclasses.replace(TWO_CPU, backend="nccl", device_type="cuda")
BY_USER = {"partitioned_by_user": True}
PERIODIC = EXCHANGE_EVERY_RATINGS // 512


def _resolve(facts: Facts, kernel: bool = True, **given) -> Strategy:
    return resolve_strategy(TrainConfig(**given), facts, fused_kernel_loads=lambda: kernel)


def test_one_process_runs_the_fused_step_and_exchanges_nothing() -> None:
    assert _resolve(ONE) == Strategy("replicated", "sparse", "packed", 1, "fused")
    assert _resolve(ONE, kernel=False).step == "autograd"
    assert _resolve(dataclasses.replace(ONE, optimizer="adam")).step == "autograd"


def test_cpu_ranks_exchange_rows_periodically_and_own_their_users() -> None:
    assert _resolve(TWO_CPU) == Strategy("replicated", "sparse", "packed", PERIODIC, "fused")
    owned = _resolve(dataclasses.replace(TWO_CPU, **BY_USER))
    assert owned == Strategy("owned", "sparse", "packed", PERIODIC, "fused")
    wide = dataclasses.replace(TWO_CPU, rank_batch=4096)
    assert _resolve(wide).sync_every == EXCHANGE_EVERY_RATINGS // 4096


def test_gpu_ranks_take_the_same_periodic_row_exchange_not_ddp() -> None:
    # The exchange travels in dense float buffers, which nccl carries: no whole-table
    # all-reduce every step.
    assert _resolve(TWO_GPU) == Strategy("replicated", "sparse", "packed", PERIODIC, "autograd")
    owned = _resolve(dataclasses.replace(TWO_GPU, **BY_USER))
    assert owned == Strategy("owned", "sparse", "packed", PERIODIC, "autograd")
    with pytest.raises(InputError, match="step='fused' cannot run with device='cuda'"):
        _resolve(TWO_GPU, step="fused")


def test_a_per_step_exchange_uses_ddp_for_small_tables_and_rows_for_large_ones() -> None:
    small = _resolve(TWO_CPU, sync_every=1)  # 450 table rows, 1,024 ratings a step
    assert (small.gradients, small.sync, small.step) == ("dense", "ddp", "autograd")
    large = _resolve(dataclasses.replace(TWO_CPU, table_rows=100_000), sync_every=1)
    assert (large.gradients, large.sync, large.step) == ("sparse", "packed", "autograd")
    assert _resolve(TWO_GPU, sync_every=1).gradients == "dense"  # nccl: DDP, dense
    assert _resolve(TWO_CPU, sync="ddp").sync_every == 1
    assert _resolve(TWO_CPU, gradients="dense").sync == "ddp"


def test_given_choices_win_and_impossible_ones_name_their_fields() -> None:
    assert _resolve(TWO_CPU, sync_every=4).sync_every == 4
    assert _resolve(dataclasses.replace(TWO_CPU, **BY_USER), user_embeddings="replicated"
                    ).user_embeddings == "replicated"
    refusals = [
        (TWO_CPU, {"user_embeddings": "owned"}, "needs shards partitioned by user"),
        (dataclasses.replace(TWO_CPU, **BY_USER), {"user_embeddings": "owned", "sync": "ddp"},
         "which DDP cannot do"),
        (TWO_CPU, {"sync": "ddp", "sync_every": 4}, "sync_every=4 works with the packed"),
        (TWO_CPU, {"sync": "packed", "gradients": "dense"}, "drop gradients='dense'"),
        (TWO_GPU, {"sync": "ddp", "gradients": "sparse"}, "nccl cannot all-reduce sparse"),
        (dataclasses.replace(ONE, optimizer="adam"), {"step": "fused"},
         "optimizer='adam'"),
        (TWO_CPU, {"sync_every": 1, "step": "fused"}, "a gradient exchange every step"),
        (ONE, {"step": "fused", "kernel": False}, "numba"),
    ]
    for facts, given, message in refusals:
        kernel = given.pop("kernel", True)
        with pytest.raises(InputError, match=message) as refused:
            _resolve(facts, kernel=kernel, **given)
        assert "--" not in str(refused.value)  # fields, not flags: the CLI words those
