"""The training loop: every rank streams its own shards into one shared model.

Per step, each rank scores its share of the global batch, back-propagates the summed
squared error plus the per-example L2 penalty, and the model's replicas are kept equal
(trainer/sync.py): with sparse gradients on gloo (``--sync packed``, the default there)
every touched row goes into one all-gather per step, so communication grows with the
batch, not the tables, and ``--sync-every N`` lets ranks step alone between exchanges of
the rows they changed; dense gradients go through DDP's all-reduce. On shards partitioned
by user, each rank owns its users' rows (trainer/ownership.py) and only item rows are
exchanged. After each epoch all ranks evaluate their share of the validation rows and
reduce sums and counts.

Checkpoints come after every epoch and, with ``--checkpoint-every N``, every N steps
within one (rank 0 writes them; with owned users every rank writes its slice); a
checkpoint holds the exact data position, so ``--resume`` (or a restart by ``torchrun
--max-restarts``) continues mid-epoch without repeating or skipping a batch, and finishes
with the same figures as a run that was never interrupted.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.baseline import bias_baseline_rmse
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.data import TrainBatches, eval_batches, steps_per_epoch, train_loader
from trainer.distributed import DistEnv, all_reduce, on_main_then_broadcast, unwrap, wrap_model
from trainer.errors import InputError
from trainer.model import BiasedMF
from trainer.optim import build_optimizer
from trainer.ownership import UserOwnership, resolve_user_embeddings
from trainer.shards import Piece, ShardSet, open_shards, pieces_for_rank
from trainer.sync import PackedSparseSync, PeriodicRowSync, resolve_sync

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
DENSE_ROWS_PER_BATCH_ROW = 4  # auto: dense gradients while tables have <= 4 rows per batch row
LOSS_CHECK_EVERY = 64  # steps between finite-loss checks (each check syncs a GPU)


def train(shards_dir: str | Path, run_dir: str | Path, model_config: ModelConfig,
          optim_config: OptimConfig, train_config: TrainConfig, env: DistEnv,
          extra_config: dict | None = None) -> dict:
    """Train on SHARDS_DIR, write RUN_DIR; returns the final metrics (on every rank)."""
    run = Path(run_dir)
    shards = open_shards(shards_dir, train_config.verify)
    if train_config.batch_size < env.world_size:
        raise InputError(f"--batch-size {train_config.batch_size} is smaller than the "
                         f"{env.world_size} ranks; each rank needs at least one rating per step")
    ownership = resolve_user_embeddings(train_config.user_embeddings, shards, env,
                                        train_config.gradients)
    if ownership is None:
        total_pieces = len(shards.pieces("train"))
        if total_pieces < env.world_size:
            raise InputError(f"{shards.root}: {total_pieces} training row groups for "
                             f"{env.world_size} ranks; prepare with more --num-shards or a "
                             "smaller --row-group-size, or use fewer processes")
    split_pieces = {split: (ownership.pieces(shards, split) if ownership else
                            pieces_for_rank(shards.pieces(split), env.rank, env.world_size))
                    for split in ("train", "val", "test")}
    owned = ownership is not None
    local_rows = ownership.local_rows if ownership else None
    train_pieces = split_pieces["train"]
    rank_batch = train_config.batch_size // env.world_size
    global_batch = rank_batch * env.world_size
    steps = int(all_reduce([steps_per_epoch(train_pieces, rank_batch)], env, "max")[0])

    torch.manual_seed(train_config.seed)
    sparse = owned or use_sparse_gradients(
        train_config.gradients, shards, global_batch, env, train_config.sync_every)
    num_users = len(ownership.users) if ownership else shards.num_users
    model = BiasedMF(num_users, shards.num_items, shards.train_mean, model_config,
                     sparse=sparse)
    sync = resolve_sync(train_config.sync, sparse, env, owned, train_config.sync_every)
    model.to(env.device)
    optimizer = build_optimizer(model, optim_config)
    state = _TrainState()
    shape = {"world_size": env.world_size, "rank_batch_size": rank_batch, "steps": steps,
             "loader_workers": train_config.loader_workers}
    if _should_resume(run, train_config, env):
        state = _load_checkpoint(run, model, optimizer, shape, env, owned)
        if env.is_main:
            log.info("resuming from %s: %d epoch(s) done, then %d of %d steps", run / CHECKPOINT,
                     state.epoch, state.step, steps)
    elif env.is_main and (run / CHECKPOINT).is_file():
        # A fresh run: a checkpoint left by an earlier run in this folder must not be taken
        # for this run's own if torchrun restarts the job before its first checkpoint.
        (run / CHECKPOINT).unlink()
    # After a resume: the periodic sync snapshots the weights it starts from.
    train_model, grad_sync = _replica_sync(sync, model, owned, train_config.sync_every,
                                           rank_batch, env)
    if env.is_main:
        run.mkdir(parents=True, exist_ok=True)
        # On resume, epochs after the checkpoint are dropped: they will be run again.
        (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in state.history))
    if env.is_main:
        config = {"shards_dir": str(Path(shards_dir).resolve()), "world_size": env.world_size,
                  "backend": env.backend, "device": str(env.device),
                  "rank_batch_size": rank_batch, "steps_per_epoch": steps,
                  "gradients": "sparse" if sparse else "dense", "sync": sync,
                  "user_embeddings": "owned" if owned else "replicated",
                  "model": asdict(model_config), "optim": asdict(optim_config),
                  "train": asdict(train_config), **(extra_config or {})}
        _write_json(run / "config.json", config)
        log.info("training on %d ratings: %d users x %d items, dim %d, %d rank(s), "
                 "%d steps of %d ratings per epoch", shards.rows("train"), shards.num_users,
                 shards.num_items, model_config.dim, env.world_size, steps, global_batch)

    train_seconds = sum(h["seconds"] for h in state.history)

    def checkpoint_mid_epoch(step: int, loss_sums: list[float], seconds: float) -> None:
        """Every rank calls this at the same step (it holds a collective); rank 0 writes."""
        sums = _gather_floats(loss_sums, env)
        state.step, state.loss_sums, state.epoch_seconds = step, sums, seconds
        _save_checkpoint(run, model, optimizer, state, shape, env, owned)

    for epoch in range(state.epoch, train_config.epochs):
        lr = optim_config.lr * optim_config.lr_decay ** epoch
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_mean, seconds = _train_epoch(train_model, optimizer, train_pieces, rank_batch,
                                          steps, epoch, train_config, env, state,
                                          checkpoint_mid_epoch, grad_sync, local_rows)
        sync_bytes = state.sync_bytes
        state.step, state.loss_sums, state.epoch_seconds, state.sync_bytes = 0, None, 0.0, 0
        train_seconds += seconds
        val_rmse, val_mae = evaluate(model, split_pieces["val"], shards.scale, train_config,
                                     env, local_rows)
        record = {"epoch": epoch + 1, "train_loss": loss_mean, "val_rmse": val_rmse,
                  "val_mae": val_mae, "seconds": round(seconds, 4),
                  "ratings_per_s": round(steps * global_batch / seconds, 1), "lr": lr}
        if grad_sync is not None:
            record["sync_bytes_per_step"] = round(sync_bytes / steps, 1)
        state.history.append(record)
        improved = val_rmse is None or val_rmse < state.best_val - 1e-6
        if improved:
            state.best_val = val_rmse if val_rmse is not None else math.inf
            state.best_epoch = epoch + 1
            state.best_model = copy.deepcopy(model.state_dict())
            state.bad_epochs = 0
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        if env.is_main:
            log.info("epoch %d: train loss %.4f, val RMSE %s, %.0f ratings/s%s", epoch + 1,
                     loss_mean, _fmt(val_rmse), record["ratings_per_s"],
                     "" if improved else f" (best {_fmt(state.best_val)} at {state.best_epoch})")
            with (run / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        _save_checkpoint(run, model, optimizer, state, shape, env, owned)
        if train_config.patience and state.bad_epochs >= train_config.patience:
            if env.is_main:
                log.info("stopping: no better validation RMSE for %d epochs",
                         train_config.patience)
            break

    model.load_state_dict(state.best_model)
    test_rmse, test_mae = evaluate(model, split_pieces["test"], shards.scale, train_config,
                                   env, local_rows)
    baseline = bias_baseline_rmse(shards, env)
    trained = sum(h["ratings_per_s"] * h["seconds"] for h in state.history)
    metrics = {
        "test_rmse": test_rmse, "test_mae": test_mae,
        "val_rmse": None if math.isinf(state.best_val) else state.best_val,
        "best_epoch": state.best_epoch, "epochs": state.epoch,
        "world_size": env.world_size, "train_seconds": round(train_seconds, 3),
        "train_ratings_per_s": round(trained / train_seconds, 1) if train_seconds else None,
        "baseline_test_rmse": baseline,
        "train_ratings": shards.rows("train"), "num_users": shards.num_users,
        "num_items": shards.num_items, "dim": model_config.dim,
        "user_embeddings": "owned" if owned else "replicated",
        "ranks": _rank_memory(model, env),
    }
    if ownership is not None:
        _save_owned_model(run, model, ownership, shards, env)
    elif env.is_main:
        save_model(run / MODEL, model, shards)
    if env.is_main:
        _copy_id_maps(shards.root, run)
        _write_json(run / "metrics.json", metrics)
        log.info("test RMSE %s (bias-only baseline %s), MAE %s", _fmt(test_rmse),
                 _fmt(baseline), _fmt(test_mae))
    return metrics


def _replica_sync(sync: str, model: BiasedMF, owned: bool, every: int, rank_batch: int,
                  env: DistEnv) -> tuple[torch.nn.Module,
                                         PackedSparseSync | PeriodicRowSync | None]:
    """The module to step and what keeps replicas equal: DDP's wrapper, or a row sync."""
    if sync != "packed":
        return wrap_model(model, env), None
    if env.backend is None:
        return model, None
    groups = item_tables(model) if owned else sparse_tables(model)
    if every > 1:
        return model, PeriodicRowSync(groups, env, every, rank_batch)
    return model, PackedSparseSync(groups, env)


def use_sparse_gradients(choice: str, shards: ShardSet, global_batch: int,
                         env: DistEnv, sync_every: int = 1) -> bool:
    """Sparse rows when the tables dwarf a step's rows; whole tables when they are small.

    A sparse step moves the touched rows of every rank (~2 x global batch rows); a dense
    step moves and updates whole tables but in one cheap collective. nccl has no sparse
    all-reduce, so GPUs always go dense. ``--sync-every N`` > 1 exchanges rows itself, not
    gradients: each rank's update then touches only its rows, so sparse.
    """
    if choice != "auto":
        if choice == "sparse" and env.backend == "nccl":
            raise InputError("--gradients sparse needs gloo: nccl cannot all-reduce sparse "
                             "tensors; use --gradients dense on GPUs")
        return choice == "sparse"
    if env.backend == "nccl":
        return False
    if env.backend is None or sync_every > 1:
        return True  # nothing to communicate per step, so only touched rows move
    rows = shards.num_users + shards.num_items
    return rows > DENSE_ROWS_PER_BATCH_ROW * global_batch


def sparse_tables(model: BiasedMF) -> list[list[torch.nn.Parameter]]:
    """The embedding weights a packed sync exchanges, grouped by the ids that index them."""
    return [[model.user_factors.weight, model.user_bias.weight], *item_tables(model)]


def item_tables(model: BiasedMF) -> list[list[torch.nn.Parameter]]:
    """The only weights exchanged when each rank owns its users' rows."""
    return [[model.item_factors.weight, model.item_bias.weight]]


def _train_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 pieces: list[Piece], rank_batch: int, steps: int, epoch: int,
                 config: TrainConfig, env: DistEnv, state: _TrainState,
                 checkpoint: Callable[[int, float, float], None],
                 grad_sync: PackedSparseSync | PeriodicRowSync | None = None,
                 local_rows: np.ndarray | None = None) -> tuple[float, float]:
    """One epoch, or its rest from ``state.step``; returns (mean loss, epoch seconds).

    ``grad_sync`` (packed sync) runs after each backward and after each optimizer step, and
    is flushed before checkpoints and at the epoch's end, so replicas are equal whenever
    anything looks at them; without it the model is DDP-wrapped (or alone). Its bytes add
    up in state.sync_bytes. ``local_rows`` maps global user ids to owned rows.
    """
    started = time.perf_counter()
    model.train()
    first = state.step  # > 0 only in the epoch a mid-epoch checkpoint resumes
    dataset = TrainBatches(pieces, rank_batch, steps, config.seed, epoch, env.rank,
                           start_step=first, local_rows=local_rows)
    loader = train_loader(dataset, config.loader_workers, env.device.type == "cuda",
                          config.prefetch)
    # DDP averages gradients over ranks; scaling each rank's sum by W makes the update the
    # gradient of the sum over the global batch, so the learning rate is per rating. The
    # packed sync sums over ranks already: the same update, unscaled.
    scale = 1.0 if grad_sync is not None else float(env.world_size)
    # Each rank's own running sum, restored exactly (float64) from the checkpoint, so a
    # resumed epoch adds the same numbers in the same order as an uninterrupted one.
    start_total = state.loss_sums[env.rank] if state.loss_sums else 0.0
    total = torch.tensor(start_total, dtype=torch.float64, device=env.device)
    progress = tqdm(total=steps * rank_batch * env.world_size, unit="rating", unit_scale=True,
                    desc=f"epoch {epoch + 1}", mininterval=1.0, disable=not env.is_main,
                    leave=False, dynamic_ncols=True, initial=first * rank_batch * env.world_size)
    every = config.checkpoint_every
    fault = env.test_fault
    step = first
    for step, (users, items, ratings) in enumerate(loader, first + 1):
        if fault is not None:
            fault.maybe_fire(env.rank, epoch * steps + step)
        users = users.to(env.device, non_blocking=True)
        items = items.to(env.device, non_blocking=True)
        ratings = ratings.to(env.device, non_blocking=True)
        loss = model(users, items, ratings)
        optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        if grad_sync is not None:
            state.sync_bytes += grad_sync.after_backward()
        optimizer.step()
        if grad_sync is not None:
            state.sync_bytes += grad_sync.after_step()
        total += loss.detach()
        if step % LOSS_CHECK_EVERY == 0 or step == steps:
            # Agreed by all ranks, so every rank stops here with the same message instead of
            # the healthy ones failing later on a closed connection.
            diverged = all_reduce([float(not torch.isfinite(total))], env, "max")[0]
            if diverged:
                lr = optimizer.param_groups[0]["lr"]
                raise InputError(f"the training loss became non-finite by step {step} of "
                                 f"epoch {epoch + 1}; lower --lr (now {lr:g}), or use a "
                                 "smaller --batch-size or --init-std")
            progress.update(min(step, steps) * rank_batch * env.world_size - progress.n)
        if every and (epoch * steps + step) % every == 0 and step < steps:
            # (the end of an epoch is checkpointed after validation, by the caller)
            if grad_sync is not None:
                state.sync_bytes += grad_sync.flush()
            checkpoint(step, total.item(), state.epoch_seconds + time.perf_counter() - started)
    progress.close()
    if grad_sync is not None:
        state.sync_bytes += grad_sync.flush()
    if step != steps:  # the other ranks would wait in a collective for the missing steps
        raise RuntimeError(f"rank {env.rank}: {step} batches in epoch {epoch + 1}, expected "
                           f"{steps} like every rank")
    mean = all_reduce([total.item(), steps * rank_batch], env)
    return mean[0] / mean[1], state.epoch_seconds + time.perf_counter() - started


@torch.no_grad()
def evaluate(model: BiasedMF, pieces: list[Piece], scale: tuple[float, float],
             config: TrainConfig, env: DistEnv,
             local_rows: np.ndarray | None = None) -> tuple[float | None, float | None]:
    """RMSE and MAE over every rank's share, from all-reduced sums and counts."""
    module = unwrap(model)
    module.eval()
    sse = sae = 0.0
    count = 0
    for users, items, ratings in eval_batches(pieces, config.eval_batch_size, local_rows):
        predicted = module.predict(users.to(env.device), items.to(env.device), scale)
        error = predicted.double() - ratings.to(env.device).double()
        sse += float(error.square().sum())
        sae += float(error.abs().sum())
        count += len(ratings)
    sse, sae, count = all_reduce([sse, sae, float(count)], env)
    if count == 0:
        return None, None
    return math.sqrt(sse / count), sae / count


def save_model(path: Path, model: BiasedMF, shards: ShardSet) -> None:
    """The kept (best-epoch) weights plus what is needed to use them without the shards."""
    payload = {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "model_config": asdict(model.config), "scale": list(shards.scale),
               "shards_dir": str(shards.root.resolve())}
    _atomic_save(payload, path)


def _copy_id_maps(shards_dir: Path, run_dir: Path) -> None:
    """The run keeps its own id maps, so it stays usable if the shards move or go."""
    for name in ("users.parquet", "items.parquet"):
        tmp = run_dir / f"{name}.tmp"
        shutil.copyfile(shards_dir / name, tmp)
        os.replace(tmp, run_dir / name)


class _TrainState:
    """What a checkpoint must restore to continue exactly where it was written."""

    def __init__(self) -> None:
        self.epoch = 0  # epochs completed; the one in progress is this (0-based)
        self.step = 0  # steps completed in the epoch in progress (0: at an epoch boundary)
        self.loss_sums: list[float] | None = None  # each rank's loss sum over those steps
        self.epoch_seconds = 0.0  # training seconds spent on those steps
        self.sync_bytes = 0  # bytes the packed sync moved in those steps (same on all ranks)
        self.best_val = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.best_model: dict | None = None
        self.history: list[dict] = []


STATE_KEYS = ("epoch", "step", "loss_sums", "epoch_seconds", "sync_bytes", "best_val",
              "best_epoch", "bad_epochs", "best_model", "history")


def _should_resume(run: Path, config: TrainConfig, env: DistEnv) -> bool:
    """--resume, or a job restarted by torchrun (--max-restarts) that has a checkpoint.

    Rank 0 looks and tells the others, so all ranks take the same branch.
    """
    if config.resume:
        return True
    if env.restart_count == 0:
        return False
    found = on_main_then_broadcast(lambda: (run / CHECKPOINT).is_file(), env)
    if env.is_main:
        log.warning("restart %d of this job: %s", env.restart_count,
                    "resuming from its checkpoint" if found else
                    "no checkpoint yet, starting again")
    return found


def _gather_floats(value: float, env: DistEnv) -> list[float]:
    """Each rank's number, by rank, on every rank: a sum of one-hot vectors, so exact."""
    one_hot = [0.0] * env.world_size
    one_hot[env.rank] = value
    return all_reduce(one_hot, env)


def _save_checkpoint(run: Path, model: BiasedMF, optimizer: torch.optim.Optimizer,
                     state: _TrainState, shape: dict, env: DistEnv, owned: bool) -> None:
    """Every rank calls this at the same point; files are written then renamed into place.

    Replicated: rank 0 writes RUN/checkpoint.pt alone (every rank holds the same model).
    Owned users: each rank writes its own slice (its users, the items, its optimizer,
    RNG and best weights) as checkpoint.<epoch>-<step>.rank<r>.pt; once all are on disk,
    rank 0 writes checkpoint.pt naming them, and only then are older slices removed. A
    crash at any moment leaves a checkpoint.pt whose slices all exist.
    """
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    local = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
             "best_model": state.best_model}
    shared = {"shape": shape, **{key: getattr(state, key) for key in STATE_KEYS}}
    if not owned:
        if env.is_main:
            _atomic_save({**shared, **local}, run / CHECKPOINT)
        return
    tag = f"{state.epoch}-{state.step}"
    mine = run / f"checkpoint.{tag}.rank{env.rank}.pt"
    _atomic_save(local, mine)
    all_reduce([0.0], env)  # every slice is on disk before checkpoint.pt names them
    if env.is_main:
        _atomic_save({**shared, "slices": tag, "world_size": env.world_size},
                     run / CHECKPOINT)
    all_reduce([0.0], env)
    for old in run.glob(f"checkpoint.*.rank{env.rank}.pt"):
        if old != mine:
            old.unlink()


def _load_checkpoint(run: Path, model: BiasedMF, optimizer: torch.optim.Optimizer,
                     shape: dict, env: DistEnv, owned: bool) -> _TrainState:
    """Every rank reads checkpoint.pt (the run folder is on storage all ranks share)."""
    path = run / CHECKPOINT
    if not path.is_file():
        raise InputError(f"--resume: {path} not found; start without --resume")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if owned != ("slices" in payload):
        written = "owned" if "slices" in payload else "replicated"
        raise InputError(f"--resume: {path} was written with --user-embeddings {written}; "
                         f"resume with --user-embeddings {written}")
    local = payload
    if owned:
        if payload["world_size"] != env.world_size:
            raise InputError(f"--resume: {path} holds users split over "
                             f"{payload['world_size']} ranks (--user-embeddings owned); "
                             f"resume with {payload['world_size']} processes")
        slice_path = run / f"checkpoint.{payload['slices']}.rank{env.rank}.pt"
        if not slice_path.is_file():
            raise InputError(f"--resume: {slice_path} not found; checkpoint.pt names it "
                             "(restore it, or start without --resume)")
        local = torch.load(slice_path, map_location="cpu", weights_only=True)
    state = _TrainState()
    for key in STATE_KEYS:
        setattr(state, key, payload.get(key, getattr(state, key)))  # older: epoch ends only
    state.best_model = local.get("best_model")
    saved = payload.get("shape")
    if state.step and saved != shape:
        # The data position is a step of this rank's plan: another world size or batch
        # size has another plan. At an epoch boundary any shape can continue.
        raise InputError(f"--resume: {path} was written mid-epoch by a run with "
                         f"{_describe(saved)}; this run has {_describe(shape)}. Resume with "
                         "the same number of ranks and --batch-size")
    model.load_state_dict(local["model"])
    optimizer.load_state_dict(local["optimizer"])
    if "rng" in local:
        torch.set_rng_state(local["rng"]["torch"])
        if "cuda" in local["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(local["rng"]["cuda"])
    return state


def _save_owned_model(run: Path, model: BiasedMF, ownership: UserOwnership,
                      shards: ShardSet, env: DistEnv) -> None:
    """model.pt with every user: each rank writes its users' rows, rank 0 assembles them.

    Rank 0 holds the whole user table once, here, as anyone using the model will.
    """
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    part = run / f"model.users.rank{env.rank}.pt"
    _atomic_save({"users": torch.from_numpy(ownership.users),
                  "user_factors": weights["user_factors.weight"],
                  "user_bias": weights["user_bias.weight"]}, part)
    all_reduce([0.0], env)  # every part is on disk
    if not env.is_main:
        return
    full = BiasedMF(shards.num_users, shards.num_items, shards.train_mean, model.config)
    state = full.state_dict()
    state.update({k: v for k, v in weights.items() if not k.startswith("user_")})
    for rank in range(env.world_size):
        path = run / f"model.users.rank{rank}.pt"
        rows = torch.load(path, map_location="cpu", weights_only=True)
        state["user_factors.weight"][rows["users"]] = rows["user_factors"]
        state["user_bias.weight"][rows["users"]] = rows["user_bias"]
        path.unlink()
    full.load_state_dict(state)
    save_model(run / MODEL, full, shards)


def _rank_memory(model: BiasedMF, env: DistEnv) -> list[dict]:
    """Per rank: rows and bytes of its user and item tables, and its peak resident memory."""
    user_rows = model.user_factors.weight.shape[0]
    table_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    user_bytes = sum(t.weight.numel() * t.weight.element_size()
                     for t in (model.user_factors, model.user_bias))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    columns = [_gather_floats(float(v), env) for v in (user_rows, user_bytes, table_bytes, peak)]
    return [{"user_rows": int(rows), "user_table_bytes": int(users),
             "parameter_bytes": int(params), "peak_rss_bytes": int(rss)}
            for rows, users, params, rss in zip(*columns)]


def _describe(shape: dict | None) -> str:
    if not shape:
        return "an unknown shape"
    return (f"{shape['world_size']} rank(s), {shape['rank_batch_size']} ratings per rank "
            f"per step, {shape['steps']} steps per epoch, {shape['loader_workers']} loader "
            "worker(s)")


def _atomic_save(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isinf(value) else f"{value:.4f}"
