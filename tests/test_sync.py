"""The packed gradient sync and the periodic row sync (trainer/sync.py) against DDP, and
user rows owned by rank (trainer/ownership.py), on 2 real gloo ranks.

Ranks are spawned processes meeting through a file:// rendezvous under tmp_path; every join
has a timeout, and a failing rank's traceback is reported. Never mocks torch.distributed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import run_config, spawn_ranks

from shardmf.errors import InputError
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.distributed import DistEnv, TestFault, wrap_model
from trainer.model import BiasedMF
from trainer.optim import build_optimizer
from trainer.steps import sparse_tables
from trainer.sync import PackedSparseSync, PeriodicRowSync
from trainer.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

# measured, so never equal between runs ("ranks" holds each rank's peak memory)
TIMING = {"train_seconds", "train_ratings_per_s", "seconds", "ratings_per_s", "ranks",
          "ranking_seconds"}


# ---------------------------------------------------------------- the sync on its own

NUM_USERS, NUM_ITEMS, STEPS = 50, 40, 12
# periodic row sync: (every, rank batch) -> rows exchanged sparsely (3 x 1 < 4 x 40 rows) or
# densely (5 x 64 >= 4 x 50 rows)
PERIODIC = {"every-1": (1, 1), "every-3-sparse": (3, 1), "every-5-dense": (5, 64)}


def _grad_job(env: DistEnv, out: str) -> None:
    """Both syncs from the same init, on batches that differ per rank in size and content
    (duplicate rows within a rank and across ranks): every rank saves its parameters."""
    for optimizer_name in ("sgd", "adagrad"):
        for mode in ("ddp", "packed", *PERIODIC):
            torch.manual_seed(0)
            model = BiasedMF(NUM_USERS, NUM_ITEMS, 3.5, ModelConfig(reg=0.05, dim=8), sparse=True)
            optimizer = build_optimizer(model, OptimConfig(optimizer=optimizer_name, lr=0.01))
            if mode == "ddp":
                step_model, scale, sync = wrap_model(model, env), 2.0, None
            elif mode == "packed":
                step_model, scale = model, 1.0
                sync = PackedSparseSync(sparse_tables(model), env)
            else:
                step_model, scale = model, 1.0
                sync = PeriodicRowSync(sparse_tables(model), env, *PERIODIC[mode])
            gen = torch.Generator().manual_seed(100 + env.rank)
            size = 64 if env.rank == 0 else 37  # unequal buffers: the padding path runs
            moved = []
            for _ in range(STEPS):
                users = torch.randint(0, NUM_USERS, (size,), generator=gen)
                items = torch.randint(0, NUM_ITEMS, (size,), generator=gen)
                ratings = torch.randint(1, 6, (size,), generator=gen).float()
                loss = step_model(users, items, ratings)
                optimizer.zero_grad(set_to_none=True)
                (loss * scale).backward()
                if sync is not None:
                    moved.append(sync.after_backward())
                optimizer.step()
                if sync is not None:
                    moved[-1] += sync.after_step()
            if sync is not None:
                moved.append(sync.flush())
            torch.save({"state": model.state_dict(), "bytes": moved},
                       Path(out) / f"{optimizer_name}-{mode}-{env.rank}.pt")


def test_packed_sync_equals_ddp_and_keeps_replicas_identical(tmp_path: Path) -> None:
    spawn_ranks(_grad_job, str(tmp_path), folder=tmp_path)
    for optimizer_name in ("sgd", "adagrad"):
        saved = {(mode, rank): torch.load(tmp_path / f"{optimizer_name}-{mode}-{rank}.pt",
                                          weights_only=True)
                 for mode in ("ddp", "packed") for rank in (0, 1)}
        packed0, packed1 = saved["packed", 0]["state"], saved["packed", 1]["state"]
        ddp0 = saved["ddp", 0]["state"]
        for name in packed0:
            # Replicas: bit-identical, not merely close.
            assert torch.equal(packed0[name], packed1[name]), name
            assert torch.equal(ddp0[name], saved["ddp", 1]["state"][name]), name
            # Equal to DDP up to float summation order: a rank's duplicate rows are summed
            # by index_add_ here and by Tensor.coalesce() in gloo (observed: differences in
            # the last bits; with Tensor.coalesce() here too they were bit-identical).
            torch.testing.assert_close(packed0[name], ddp0[name], rtol=1e-5, atol=1e-7)
        moved = saved["packed", 0]["bytes"]
        assert moved[-1] == 0  # nothing left for the final flush
        moved = moved[:-1]
        assert moved == saved["packed", 1]["bytes"][:-1] and len(moved) == STEPS
        # Per rank buffer <= 2 counts + 64 rows x (1 id + d + 1 bias) x 2 groups, float32
        assert all(0 < b <= 2 * 4 * (2 + 2 * 64 * 10) for b in moved), moved
        for mode, (every, _) in PERIODIC.items():
            rank0, rank1 = (torch.load(tmp_path / f"{optimizer_name}-{mode}-{r}.pt",
                                       weights_only=True) for r in (0, 1))
            for name in rank0["state"]:
                assert torch.equal(rank0["state"][name], rank1["state"][name]), (mode, name)
            exchanges = sum(1 for b in rank0["bytes"] if b > 0)
            assert exchanges == -(-STEPS // every), (mode, rank0["bytes"])


def _mean_job(env: DistEnv, out: str) -> None:
    """Rank 0 moves rows 0 and 1 of a 4-row table, rank 1 rows 1 and 2, by known amounts."""
    results = {}
    for path, rank_batch in (("sparse", 1), ("dense", 8)):
        table = torch.nn.Parameter(torch.zeros(4, 2))
        bias = torch.nn.Parameter(torch.zeros(4, 1))
        sync = PeriodicRowSync([[table, bias]], env, every=2, rank_batch=rank_batch)
        assert sync.dense == [path == "dense"]
        rows = torch.tensor([0, 1]) if env.rank == 0 else torch.tensor([1, 2])
        change = 1.0 if env.rank == 0 else 3.0
        for _ in range(2):
            table.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.ones(2, 2), (4, 2))
            bias.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.ones(2, 1), (4, 1))
            sync.after_backward()
            with torch.no_grad():  # what an optimizer step would do
                table[rows] += change
                bias[rows] -= change
            sync.after_step()
        results[path] = (table.detach().clone(), bias.detach().clone())
    torch.save(results, Path(out) / f"mean-{env.rank}.pt")


def test_periodic_sync_moves_each_row_by_its_changes_over_root_ranks(tmp_path: Path) -> None:
    spawn_ranks(_mean_job, str(tmp_path), folder=tmp_path)
    # Row 0: rank 0's change alone; row 1: both summed over sqrt(2); row 2: rank 1's; row 3:
    # none.
    both = torch.tensor(2.0 + 6.0) / torch.tensor(2.0).sqrt()
    expected = torch.tensor([2.0, float(both), 6.0, 0.0])
    for rank in (0, 1):
        for table, bias in torch.load(tmp_path / f"mean-{rank}.pt", weights_only=True).values():
            assert torch.equal(table, expected.unsqueeze(1).expand(4, 2))
            assert torch.equal(bias, -expected.unsqueeze(1))


def test_single_process_packed_sync_is_a_no_op() -> None:
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"), None)
    model = BiasedMF(5, 4, 3.0, ModelConfig(reg=0.05, dim=2), sparse=True)
    model(torch.tensor([0, 0, 3]), torch.tensor([1, 2, 1]), torch.tensor([4.0, 2.0, 1.0])
          ).backward()
    tables = [p for group in sparse_tables(model) for p in group]
    before = [p.grad.to_dense().clone() for p in tables]
    assert PackedSparseSync(sparse_tables(model), env).after_backward() == 0
    assert all(torch.equal(b, p.grad.to_dense()) for b, p in zip(before, tables))


# ---------------------------------------------------------------- the trainer with it

# Exact per-step synchronisation unless a test asks for the periodic one (several ranks
# default to a periodic exchange: trainer/defaults.py).
SETTINGS = {"batch_size": 512, "seed": 0, "threads": 1, "gradients": "sparse",
            "timeout_s": 60, "epochs": 2, "patience": 0, "sync_every": 1}


def _configs(lr_decay: float = 0.99, **train) -> tuple[ModelConfig, OptimConfig, TrainConfig]:
    return (ModelConfig(dim=16, reg=0.02),
            OptimConfig(optimizer="sgd", lr=0.045, lr_decay=lr_decay),
            TrainConfig(**{**SETTINGS, **train}))


def _train_job(env: DistEnv, shards: str, out: str) -> None:
    """ddp and packed from the same seed; then packed crashed mid-epoch 2 on both ranks
    (checkpoints every 5 steps) and resumed."""
    for sync in ("ddp", "packed"):
        train(run_config(shards, Path(out) / sync, *_configs(sync=sync)), env)
    steps = json.loads((Path(out) / "packed" / "config.json").read_text())["steps_per_epoch"]
    crashing = dataclasses.replace(env, test_fault=TestFault("raise", env.rank, steps + 7))
    with pytest.raises(RuntimeError, match="injected failure"):
        train(run_config(shards, Path(out) / "resumed",
                         *_configs(sync="packed", checkpoint_every=5)), crashing)
    train(run_config(shards, Path(out) / "resumed",
                     *_configs(sync="packed", checkpoint_every=5, resume=True)), env)


def _without_timing(records):
    if isinstance(records, dict):
        return {k: v for k, v in records.items() if k not in TIMING}
    return [_without_timing(r) for r in records]


def _read(run: Path) -> tuple[dict, list[dict]]:
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run / "metrics.json").read_text()), history


def test_trainer_packed_matches_ddp_and_resumes_bit_identically(trainer_shards_dir: Path,
                                                               tmp_path: Path) -> None:
    spawn_ranks(_train_job, str(trainer_shards_dir), str(tmp_path), folder=tmp_path)
    ddp, ddp_history = _read(tmp_path / "ddp")
    packed, packed_history = _read(tmp_path / "packed")
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["sync"] == "packed"
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["sync"] == "ddp"
    # The same update up to float summation order (see above): figures agree to ~1e-6.
    for key in ("test_rmse", "test_mae", "val_rmse"):
        assert abs(packed[key] - ddp[key]) < 1e-5, (key, packed[key], ddp[key])
    assert packed["best_epoch"] == ddp["best_epoch"] and packed["epochs"] == ddp["epochs"]
    for mine, theirs in zip(packed_history, ddp_history, strict=True):
        assert abs(mine["train_loss"] - theirs["train_loss"]) < 1e-5 * theirs["train_loss"]
        assert abs(mine["val_rmse"] - theirs["val_rmse"]) < 1e-5
        assert mine["sync_bytes_per_step"] > 0 and "sync_bytes_per_step" not in theirs
    print("packed - ddp:", {k: packed[k] - ddp[k] for k in ("test_rmse", "val_rmse")})

    resumed, resumed_history = _read(tmp_path / "resumed")
    assert _without_timing(resumed) == _without_timing(packed)
    assert _without_timing(resumed_history) == _without_timing(packed_history)


# ---------------------------------------------------------------- users owned by rank

def _owned_job(env: DistEnv, shards: str, out: str) -> None:
    """Replicated and owned user rows on the same user-partitioned shards; the periodic
    sync; and the periodic sync crashed mid-epoch 2 on both ranks, then resumed."""
    more = {"epochs": 12, "lr_decay": 0.8}  # settles, so the comparison is not noise
    train(run_config(shards, Path(out) / "replicated",
                     *_configs(user_embeddings="replicated", **more)), env)
    train(run_config(shards, Path(out) / "owned", *_configs(**more)), env)  # auto: owned
    # Rows both ranks change move by their changes over sqrt(2): this run gets more epochs
    # to settle.
    periodic = {"sync_every": 3, "checkpoint_every": 5, "epochs": 20, "lr_decay": 0.9}
    train(run_config(shards, Path(out) / "periodic", *_configs(**periodic)), env)
    steps = json.loads((Path(out) / "owned" / "config.json").read_text())["steps_per_epoch"]
    crashing = dataclasses.replace(env, test_fault=TestFault("raise", env.rank, steps + 7))
    with pytest.raises(RuntimeError, match="injected failure"):
        train(run_config(shards, Path(out) / "resumed", *_configs(**periodic)), crashing)
    train(run_config(shards, Path(out) / "resumed", *_configs(resume=True, **periodic)), env)


def test_owned_user_rows_match_replicated_and_resume_bit_identically(
        trainer_user_shards_dir: Path, tmp_path: Path) -> None:
    from trainer.checkpoint import load_model
    from trainer.shards import open_shards
    from trainer.train import evaluate

    spawn_ranks(_owned_job, str(trainer_user_shards_dir), str(tmp_path), folder=tmp_path)
    shards = open_shards(trainer_user_shards_dir)
    replicated, _ = _read(tmp_path / "replicated")
    owned, owned_history = _read(tmp_path / "owned")
    periodic, periodic_history = _read(tmp_path / "periodic")
    config = json.loads((tmp_path / "owned" / "config.json").read_text())
    assert config["user_embeddings"] == "owned" and replicated["user_embeddings"] == "replicated"
    # Each rank holds only its users: together all of them, each once; the items in full.
    rows = [rank["user_rows"] for rank in owned["ranks"]]
    assert sum(rows) == shards.num_users and max(rows) < shards.num_users
    assert all(r["user_rows"] == shards.num_users for r in replicated["ranks"])
    assert sum(r["user_table_bytes"] for r in owned["ranks"]) == \
        replicated["ranks"][0]["user_table_bytes"]
    # Only item rows travel: fewer bytes than with user rows too.
    replicated_history = _read(tmp_path / "replicated")[1]
    assert 0 < owned_history[0]["sync_bytes_per_step"] < \
        replicated_history[0]["sync_bytes_per_step"]
    # Same model, same data, another owner of each user row and another data order.
    print({k: (replicated[k], owned[k], periodic[k]) for k in ("test_rmse", "val_rmse")})
    for run in (owned, periodic):
        assert abs(run["test_rmse"] - replicated["test_rmse"]) < 0.005
        assert abs(run["val_rmse"] - replicated["val_rmse"]) < 0.005
    # model.pt holds every user's row at its global id: evaluated in one process, it gives
    # the test RMSE the ranks computed on their own users.
    model = load_model(tmp_path / "owned" / "model.pt")[0].rating
    single = DistEnv(0, 0, 1, 1, torch.device("cpu"), None)
    rmse, _ = evaluate(model, shards.pieces("test"), shards.scale, TrainConfig(), single)
    assert rmse == pytest.approx(owned["test_rmse"], abs=1e-6)
    assert not list((tmp_path / "owned").glob("model.users.*"))
    slices = sorted(p.name for p in (tmp_path / "owned").glob("checkpoint.*.rank*.pt"))
    assert slices == ["checkpoint.12-0.rank0.pt", "checkpoint.12-0.rank1.pt"], slices

    resumed, resumed_history = _read(tmp_path / "resumed")
    assert _without_timing(resumed) == _without_timing(periodic)
    assert _without_timing(resumed_history) == _without_timing(periodic_history)

    # A checkpoint of owned rows continues only as it was written.
    one = _configs(resume=True, epochs=13)
    with pytest.raises(InputError, match="user_embeddings='owned'"):
        train(run_config(trainer_user_shards_dir, tmp_path / "owned", *one), single)
    owned_one = _configs(resume=True, epochs=13, user_embeddings="owned")
    with pytest.raises(InputError, match="resume with 2 processes"):
        train(run_config(trainer_user_shards_dir, tmp_path / "owned", *owned_one), single)
