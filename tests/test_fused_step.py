"""The fused CPU step (trainer/fused_step.py) against the reference autograd + RowSGD step:
the same update for one rating and for rows repeated in a batch, the same loss curve, the
fallback when numba cannot load, and a real 2-rank gloo run with the periodic row sync.
"""

from __future__ import annotations

import builtins
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_config, spawn_ranks

from shardmf.errors import InputError
from trainer.config import ModelConfig, ObjectiveConfig, OptimConfig, TrainConfig
from trainer.distributed import DistEnv, all_reduce
from trainer.fused_step import FusedSGDStep, load_fused_kernel
from trainer.model import BiasedMF
from trainer.optim import RowSGD
from trainer.steps import sparse_tables
from trainer.sync import PeriodicRowSync
from trainer.train import train

CPU = torch.device("cpu")
NUM_USERS, NUM_ITEMS = 30, 20


def _twins(seed: int = 0, dim: int = 8, unit: float = 1.0) -> tuple[BiasedMF, BiasedMF]:
    """Two identical models with non-zero biases (so every term of the update counts)."""
    torch.manual_seed(seed)
    config = ModelConfig(reg=0.05, dim=dim, init_std=0.3)
    reference = BiasedMF(NUM_USERS, NUM_ITEMS, 3.5, config, rating_unit=unit)
    with torch.no_grad():
        reference.user_bias.weight.normal_(std=0.5)
        reference.item_bias.weight.normal_(std=0.5)
    fused = BiasedMF(NUM_USERS, NUM_ITEMS, 3.5, config, rating_unit=unit)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _reference_step(model: BiasedMF, optimizer: RowSGD, users, items, ratings) -> float:
    loss = model(users, items, ratings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _assert_same_weights(a: BiasedMF, b: BiasedMF, atol: float = 1e-6) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("unit", [1.0, 2.5], ids=["unit-1", "unit-2.5"])
@pytest.mark.parametrize("batch", [
    ([3], [7], [4.5]),  # one rating
    ([1, 1, 3, 5, 1, 3], [2, 4, 2, 2, 2, 9], [4.0, 3.0, 5.0, 1.0, 2.0, 3.5]),  # repeats
], ids=["one-rating", "repeated-rows"])
def test_one_step_is_the_reference_update(batch, unit: float) -> None:
    kernel = load_fused_kernel()
    assert kernel is not None, "numba is a dependency: the kernel must load here"
    reference, fused = _twins(unit=unit)
    users, items = torch.tensor(batch[0]), torch.tensor(batch[1])
    ratings = torch.tensor(batch[2])
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    expected = _reference_step(reference, RowSGD(reference.parameters(), lr=0.05),
                               users, items, ratings)
    loss = FusedSGDStep(fused, RowSGD(fused.parameters(), lr=0.05), kernel, len(ratings))(
        users, items, ratings, 0.0)
    assert isinstance(loss, float) and loss == pytest.approx(expected, rel=1e-6)
    _assert_same_weights(reference, fused)
    moved = fused.user_factors.weight[users[0]] - before["user_factors.weight"][users[0]]
    assert moved.abs().max() > 1e-3  # the step did move the rows (not a vacuous match)


def test_loss_curve_matches_the_reference_over_many_steps() -> None:
    reference, fused = _twins(seed=1, dim=16)
    reference_sgd = RowSGD(reference.parameters(), lr=0.01)
    fused_sgd = RowSGD(fused.parameters(), lr=0.01)
    step = FusedSGDStep(fused, fused_sgd, load_fused_kernel(), 64)
    generator = torch.Generator().manual_seed(2)
    truth = torch.randn(NUM_USERS, 4, generator=generator) @ torch.randn(4, NUM_ITEMS,
                                                                          generator=generator)
    curves: tuple[list[float], list[float]] = ([], [])
    for number in range(60):
        size = 16 if number % 2 else 64  # a call's batch may be shorter than batch_size
        users = torch.randint(NUM_USERS, (size,), generator=generator)
        items = torch.randint(NUM_ITEMS, (size,), generator=generator)
        ratings = (3.5 + truth[users, items]).float()
        for group in (*reference_sgd.param_groups, *fused_sgd.param_groups):
            group["lr"] = 0.01 * 0.98 ** number  # the loop's schedule reaches the fused step
        curves[0].append(_reference_step(reference, reference_sgd, users, items, ratings))
        curves[1].append(float(step(users, items, ratings, 0.0)))
    assert curves[0][-1] < 0.5 * curves[0][0]  # it learned: the curve is not flat
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)
    _assert_same_weights(reference, fused, atol=1e-5)


def test_a_run_of_batches_in_one_call_is_each_batch_in_turn() -> None:
    generator = torch.Generator().manual_seed(3)
    batch, batches = 16, 7
    users = torch.randint(NUM_USERS, (batch * batches - 5,), generator=generator)  # short last
    items = torch.randint(NUM_ITEMS, (len(users),), generator=generator)
    ratings = torch.rand(len(users), generator=generator) * 4 + 1
    one_by_one, at_once = _twins(seed=4)
    step = FusedSGDStep(one_by_one, RowSGD(one_by_one.parameters(), lr=0.05),
                        load_fused_kernel(), batch)
    total = 0.25
    for start in range(0, len(users), batch):
        cut = slice(start, start + batch)
        total = step(users[cut], items[cut], ratings[cut], total)
    run = FusedSGDStep(at_once, RowSGD(at_once.parameters(), lr=0.05), load_fused_kernel(),
                       batch)(users, items, ratings, 0.25)
    assert run == total  # the same sums in the same order: equal to the last bit
    for x, y in zip(one_by_one.parameters(), at_once.parameters()):
        assert torch.equal(x, y)
    # and not one summed batch: rows repeat across batches, so that would differ
    whole, _ = _twins(seed=4)
    FusedSGDStep(whole, RowSGD(whole.parameters(), lr=0.05), load_fused_kernel(),
                 len(users))(users, items, ratings, 0.0)
    assert not torch.equal(whole.user_factors.weight, at_once.user_factors.weight)


def test_without_numba_one_warning_and_the_autograd_step(
        trainer_shards_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real_import = builtins.__import__

    def no_numba(name, *args, **kwargs):
        if name == "numba" or name.startswith("numba."):
            raise ImportError("No module named 'numba' (simulated)")
        return real_import(name, *args, **kwargs)

    load_fused_kernel.cache_clear()
    monkeypatch.delitem(sys.modules, "trainer.fused_kernel", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_numba)
    try:
        with caplog.at_level(logging.WARNING, logger="trainer.fused_step"):
            single = DistEnv(0, 0, 1, 1, CPU, None)
            settings = {"epochs": 2, "patience": 0, "batch_size": 256, "threads": 1}
            # The rating tables alone: the ranking objective needs numba whatever the step.
            rating = ObjectiveConfig(objective="rating")
            metrics = train(run_config(trainer_shards_dir, tmp_path / "run",
                                       ModelConfig(reg=0.05, dim=8),
                                       OptimConfig(lr=0.01),
                                       TrainConfig(**settings), objective=rating), single)
            with pytest.raises(InputError, match="numba, which could not load"):
                train(run_config(trainer_shards_dir, tmp_path / "fused",
                                 train=TrainConfig(**settings, step="fused"),
                                 objective=rating), single)
    finally:
        monkeypatch.undo()
        load_fused_kernel.cache_clear()
    warnings = [r for r in caplog.records if "fused CPU step is unavailable" in r.message]
    assert len(warnings) == 1, [r.message for r in caplog.records]
    assert "numba" in warnings[0].message
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["step"] == "autograd"
    losses = [json.loads(line)["train_loss"]
              for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses[1] < losses[0] and metrics["test_rmse"] is not None


# ---------------------------------------------------------------- 2 real gloo ranks

PERIODIC_EVERY = 3


def _replica_job(env: DistEnv, out: str) -> None:
    """Each rank steps its own batches with the fused step and with the reference, under
    the periodic row sync; after each exchange both paths hold the same weights, and all
    ranks the same replica (checked through an all-reduce of the differences)."""
    torch.manual_seed(0)  # the same initial replica on every rank
    reference, fused = _twins()
    reference_sgd = RowSGD(reference.parameters(), lr=0.02)
    fused_sgd = RowSGD(fused.parameters(), lr=0.02)
    reference_sync = PeriodicRowSync(sparse_tables(reference), env, PERIODIC_EVERY, 32)
    step = FusedSGDStep(fused, fused_sgd, load_fused_kernel(), 32,
                        PeriodicRowSync(sparse_tables(fused), env, PERIODIC_EVERY, 32))
    generator = torch.Generator().manual_seed(10 + env.rank)  # different data per rank
    pairs = []
    for number in range(4 * PERIODIC_EVERY):
        users = torch.randint(NUM_USERS, (32,), generator=generator)
        items = torch.randint(NUM_ITEMS, (32,), generator=generator)
        ratings = torch.rand(32, generator=generator) * 4 + 1
        loss = reference(users, items, ratings)
        reference_sgd.zero_grad(set_to_none=True)
        loss.backward()
        reference_sync.after_backward()
        reference_sgd.step()
        reference_sync.after_step()
        # The fused step takes two batches a call, as a loader run: it must cut the run
        # where an exchange falls (after every PERIODIC_EVERY = 3 batches).
        pairs.append((users, items, ratings))
        if len(pairs) == 2:
            step(*(torch.cat(column) for column in zip(*pairs)), 0.0)
            pairs = []
        if (number + 1) % (2 * PERIODIC_EVERY) == 0:
            _assert_same_weights(reference, fused, atol=1e-5)
    for param in fused.parameters():
        mine = param.detach().double()
        total = torch.tensor(all_reduce(mine.reshape(-1).tolist(), env))
        assert torch.equal(total, (mine * env.world_size).reshape(-1)), "replicas differ"
    Path(out, f"done-{env.rank}").write_text("ok")


def _train_job(env: DistEnv, shards: str, out: str) -> None:
    settings = {"epochs": 3, "patience": 0, "batch_size": 256, "threads": 1,
                "sync_every": PERIODIC_EVERY, "seed": 0, "timeout_s": 60}
    for kind in ("fused", "autograd"):
        train(run_config(shards, Path(out) / kind,
                         ModelConfig(dim=16, reg=0.02),
                         OptimConfig(lr=0.03, lr_decay=0.9),
                         TrainConfig(step=kind, **settings)), env)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_ranks_fused_matches_autograd_with_periodic_sync(trainer_shards_dir: Path,
                                                             tmp_path: Path) -> None:
    spawn_ranks(_replica_job, str(tmp_path), folder=tmp_path / "replicas")
    assert {p.name for p in tmp_path.glob("done-*")} == {"done-0", "done-1"}
    spawn_ranks(_train_job, str(trainer_shards_dir), str(tmp_path), folder=tmp_path / "train")
    runs = {kind: json.loads((tmp_path / kind / "metrics.json").read_text())
            for kind in ("fused", "autograd")}
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["step"] == "fused"
    assert json.loads((tmp_path / "autograd" / "config.json").read_text())["step"] == \
        "autograd"
    for key in ("test_rmse", "val_rmse", "test_mae"):
        assert runs["fused"][key] == pytest.approx(runs["autograd"][key], abs=1e-4), key
    assert runs["fused"]["test_rmse"] < runs["fused"]["baseline_test_rmse"]
