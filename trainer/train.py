"""The training loop: every rank streams its own shards into one shared model.

    train(): plan the ranks' rows and steps, build the model and its step, resume or start
             for epoch: TrainEpoch, evaluate, checkpoint, stop?
             test the best epoch (RMSE, ranking against most-popular), save model.pt
             and metrics.json

By default on CPUs each rank trains with the fused SGD step (trainer/fused_step.py); on
shards partitioned by user each rank owns its users' rows (trainer/ownership.py), and
every ``--sync-every`` steps the ranks exchange the rows they changed over gloo
(trainer/sync.py), so a rank's memory and its traffic shrink with the world size. The
autograd step (trainer/steps.py) is the reference, and the path for GPUs (DDP over nccl)
and other optimizers. `TrainEpoch` hands the step runs of consecutive batches, cut where
a loss check or a checkpoint is due (trainer/cadence.py); after each epoch all ranks
evaluate their share of the validation rows and reduce sums and counts.

A checkpoint (trainer/checkpoint.py) follows every epoch and every ``--checkpoint-every
N`` steps; it holds the exact data position, so ``--resume`` (or a restart by ``torchrun
--max-restarts``) continues mid-epoch and finishes with the same figures as a run never
interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shardmf.errors import InputError
from shardmf.outputs import write_json, write_jsonl
from shardmf.progress import bars_wanted
from trainer.baseline import bias_baseline_rmse
from trainer.cadence import Cadence
from trainer.checkpoint import (
    Checkpointer,
    Tables,
    TrainState,
    copy_id_maps,
    resumed_model_config,
    save_model,
    save_owned_model,
)
from trainer.config import ModelConfig, RunConfig, TrainConfig
from trainer.data import (
    RowGroupReader,
    TrainBatches,
    eval_batches,
    steps_per_epoch,
    train_loader,
)
from trainer.defaults import Resolved, ranks_cannot_pay, resolve_defaults
from trainer.distributed import DistEnv, all_reduce, gather_floats, unwrap
from trainer.fused_step import FusedSGDStep, load_fused_kernel
from trainer.model import BiasedMF
from trainer.optim import build_optimizer
from trainer.ownership import UserOwnership, user_ownership
from trainer.ranking import ranking_metrics, relevance_threshold
from trainer.run_files import (
    CONFIG,
    EPOCH_METRICS,
    FINAL_METRICS,
    MODEL,
    SWEEP_METRICS,
    write_vouched,
)
from trainer.shards import Piece, ShardSet, open_shards, pieces_for_rank
from trainer.steps import AutogradStep, build_step
from trainer.strategy import Facts, Strategy, resolve_strategy
from trainer.sweeps import RankingResult, train_ranking

log = logging.getLogger(__name__)
# A non-finite loss once: the epoch restarts from the best weights at this times the step.
DIVERGED_LR_SCALE = 0.25


def train(config: RunConfig, env: DistEnv, shards_verified: bool = False) -> dict:
    """Train on ``config.shards_dir``, write ``config.run_dir``; returns the final metrics
    (on every rank). Every rank calls it with the same config; ``shards_verified``: the
    launcher has just checked the shards (``config.train.verify``), so ranks trust them."""
    run = Path(config.run_dir)
    if config.train.resume:
        config = dataclasses.replace(config, model=resumed_model_config(run, config.model))
    plan = _plan(config, env, shards_verified)
    objectives = resolve_objectives(config.objective.objective, plan.shards.kind,
                                    env.device.type)
    auto = resolve_defaults(config.model, config.optim, config.train,
                            train_ratings=plan.shards.rows("train"),
                            world_size=env.world_size,
                            periodic_exchange=env.world_size > 1 and plan.strategy.sync_every > 1,
                            spare_core=len(os.sched_getaffinity(0)) > env.local_world_size,
                            memory_per_rank=_machine_memory() // env.local_world_size)
    # The config as it runs: every auto field filled, the strategy's choices included.
    train_config = dataclasses.replace(auto.train, **dataclasses.asdict(plan.strategy))
    config = dataclasses.replace(config, model=auto.model, optim=auto.optim, train=train_config)
    reader = RowGroupReader(plan.local_rows, train_config.cache_mb * 2**20)
    # A threshold outside the data's scale fails now, not after the last epoch.
    relevance_threshold(plan.shards.scale, config.ranking.ranking_threshold,
                        plan.shards.kind == "interactions")
    rating = ranking = None
    if "rating" in objectives:
        rating = _train_rating(run, config, plan, auto, env, reader)
    elif env.is_main:
        _start_run_folder(run, _config_record(config, plan, auto, env), TrainState())
    if "ranking" in objectives:
        ranking = train_ranking(plan.shards, plan.pieces["train"], plan.ownership, reader,
                                config.objective, config.ranking, train_config.seed, env)
    return _finish(run, rating, ranking, plan, config, env, reader)


def resolve_objectives(choice: str, kind: str, device_type: str = "cpu") -> tuple[str, ...]:
    """What the run learns: ("rating",), ("ranking",) or ("rating", "ranking").

    auto: rankings on interaction data, which has no ratings to predict; both on rating
    data, each from its own pair of tables: one pair cannot serve both (fitting ranking into
    the rating tables cost 0.018 test RMSE on ML-100K, bench/ranking_objective.md), and
    rating predictions make weak lists (they rank what a user would rate highly among what
    they chose, not what they would choose).

    The ranking tables' solver (trainer/ials.py) runs on CPU tables: on GPUs auto trains
    the rating tables alone, and asking for rankings there is an error.
    """
    gpu = device_type != "cpu"
    if choice == "auto" and kind == "ratings":
        return ("rating",) if gpu else ("rating", "ranking")
    if gpu and choice != "rating":
        raise InputError(f"objective={choice!r}: the ranking tables train on CPU ranks for "
                         f"now (device={device_type!r}); use device='cpu' for them, or "
                         "objective='rating'")
    if kind == "interactions" and choice not in ("auto", "ranking"):
        raise InputError(f"objective={choice!r} predicts ratings, but the shards hold "
                         "interactions (no ratings); use objective='ranking' (the default "
                         "for them)")
    return {"rating": ("rating",), "ranking": ("ranking",), "auto": ("ranking",),
            "both": ("rating", "ranking")}[choice]


@dataclass
class _RatingResult:
    """The rating model at its best epoch, with the epochs that led there."""

    model: BiasedMF
    state: TrainState


def _train_rating(run: Path, config: RunConfig, plan: _Plan, auto: Resolved, env: DistEnv,
                  reader: RowGroupReader) -> _RatingResult:
    """The rating objective: epochs of SGD on the biased MF, kept at the best validation
    RMSE, checkpointed so ``resume`` continues mid-epoch."""
    strategy, train_config, optim_config = plan.strategy, config.train, config.optim
    torch.manual_seed(train_config.seed)
    num_users = len(plan.ownership.users) if plan.owned else plan.shards.num_users
    # Shards of an older prepare do not record the spread (and a spread of 0 has no
    # scale): their ratings train as given.
    model = BiasedMF(num_users, plan.shards.num_items, plan.shards.train_mean, config.model,
                     sparse=strategy.sparse, rating_unit=plan.shards.train_std or 1.0)
    model.to(env.device)
    optimizer = build_optimizer(model, optim_config)
    shape = {"world_size": env.world_size, "rank_batch_size": plan.rank_batch,
             "steps": plan.steps, "loader_workers": train_config.loader_workers}
    checkpointer = Checkpointer(run, model, optimizer, shape, env, plan.owned,
                                identity={"shards": plan.shards.identity,
                                          "optimizer": optim_config.optimizer},
                                every=train_config.checkpoint_every)
    state = checkpointer.start(train_config)
    if env.is_main:
        _start_run_folder(run, _config_record(config, plan, auto, env), state)
        _log_start(plan, strategy, auto, config.model, env)

    def epoch_runner() -> TrainEpoch:
        """The step and epoch loop over the model as it is now (the periodic sync
        snapshots the weights it starts from)."""
        train_step = build_step(strategy, model, checkpointer.optimizer, plan.rank_batch, env)
        return TrainEpoch(train_step, plan.pieces["train"], plan.rank_batch, plan.steps,
                          train_config, env, reader, checkpointer)

    train_epoch = epoch_runner()
    # A run that resumes after early stopping had stopped (a later phase was cut short) has
    # no epoch left: another would change what it keeps.
    stopped = bool(train_config.patience) and state.bad_epochs >= train_config.patience
    epoch, last = state.epoch, state.epoch if stopped else train_config.epochs
    while epoch < last:
        lr = optim_config.lr * optim_config.lr_decay ** epoch * state.lr_scale
        for group in checkpointer.optimizer.param_groups:
            group["lr"] = lr
        try:
            loss_mean, seconds, sync_bytes = train_epoch(epoch, state)
        except Diverged as diverged:
            if state.lr_scale != 1.0:  # lowered once already
                raise InputError(f"{diverged}; lower `lr` (now {lr:g}), or use a smaller "
                                 "`batch_size` or `init_std`") from None
            if env.is_main:
                origin = (f"epoch {state.best_epoch}'s weights" if state.best_model
                          else "the initial weights")
                log.warning("%s at lr %g: going on from %s with the step size divided by %g",
                            diverged, lr, origin, 1 / DIVERGED_LR_SCALE)
            _restart_epoch(model, state, config, num_users, plan, checkpointer)
            state.lr_scale = DIVERGED_LR_SCALE
            train_epoch = epoch_runner()
            continue
        val_rmse, val_mae = evaluate(model, plan.pieces["val"], plan.shards.scale,
                                     train_config, env, reader)
        record = {"epoch": epoch + 1, "train_loss": loss_mean, "val_rmse": val_rmse,
                  "val_mae": val_mae, "seconds": round(seconds, 4),
                  "ratings_per_s": round(plan.steps * plan.global_batch / seconds, 1), "lr": lr}
        if train_epoch.train_step.grad_sync is not None:
            record["sync_bytes_per_step"] = round(sync_bytes / plan.steps, 1)
        improved = state.end_epoch(record, val_rmse, model, train_config.min_delta)
        if env.is_main:
            _log_epoch(run, record, state, improved, train_config.epochs)
        checkpointer.save(state)
        epoch += 1
        if train_config.patience and state.bad_epochs >= train_config.patience:
            if env.is_main:
                log.info("stopping: validation RMSE gained less than %g in %d epochs",
                         max(train_config.min_delta, 1e-6), train_config.patience)
            break
    model.load_state_dict(state.best_model)
    return _RatingResult(model, state)


class Diverged(Exception):
    """The training loss became non-finite (agreed by every rank)."""


def _restart_epoch(model: BiasedMF, state: TrainState, config: RunConfig, num_users: int,
                   plan: _Plan, checkpointer: Checkpointer) -> None:
    """Back to the start of the epoch in progress, with the best epoch's weights (the
    initial ones before any epoch ended) and a fresh optimizer."""
    if state.best_model is not None:
        model.load_state_dict(state.best_model)
    else:
        torch.manual_seed(config.train.seed)  # the same draws as the run's first tables
        model.load_state_dict(BiasedMF(num_users, plan.shards.num_items,
                                       plan.shards.train_mean, config.model,
                                       rating_unit=model.rating_unit).state_dict())
    checkpointer.optimizer = build_optimizer(model, config.optim)
    state.steps_done, state.loss_sums, state.epoch_seconds, state.sync_bytes = 0, None, 0.0, 0


def _config_record(config: RunConfig, plan: _Plan, auto: Resolved, env: DistEnv) -> dict:
    """config.json: the config as it runs, with the facts and choices behind it."""
    return {"shards_dir": str(Path(config.shards_dir).resolve()),
            "world_size": env.world_size, "backend": env.backend,
            "device": str(env.device), "rank_batch_size": plan.rank_batch,
            "steps_per_epoch": plan.steps, **dataclasses.asdict(plan.strategy),
            "chosen_from_data": {**auto.chosen, "reason": auto.reason},
            **config.to_dict()}


@dataclass(frozen=True)
class _Plan:
    """Which rows this rank reads, how the run executes and how many steps every rank
    takes per epoch."""

    shards: ShardSet
    strategy: Strategy
    ownership: UserOwnership | None  # set when each rank owns its users' rows
    pieces: dict[str, list[Piece]]  # this rank's row groups per split
    rank_batch: int  # ratings per step on this rank
    global_batch: int  # ratings per step over all ranks
    steps: int  # steps per epoch, the same on every rank

    @property
    def owned(self) -> bool:
        return self.ownership is not None

    @property
    def local_rows(self) -> np.ndarray | None:
        """Global user id -> owned row, with owned users."""
        return self.ownership.local_rows if self.ownership else None


def _plan(config: RunConfig, env: DistEnv, shards_verified: bool) -> _Plan:
    train_config = config.train
    shards = open_shards(config.shards_dir, "none" if shards_verified else train_config.verify)
    if train_config.batch_size < env.world_size:
        raise InputError(f"batch_size={train_config.batch_size} is smaller than the "
                         f"{env.world_size} ranks; each rank needs at least one rating per step")
    rank_batch = train_config.batch_size // env.world_size
    facts = Facts(world_size=env.world_size, backend=env.backend,
                  device_type=env.device.type, optimizer=config.optim.optimizer,
                  partitioned_by_user=shards.partition_scheme == "user",
                  table_rows=shards.num_users + shards.num_items, rank_batch=rank_batch)
    strategy = resolve_strategy(train_config, facts,
                                fused_kernel_loads=lambda: load_fused_kernel() is not None)
    ownership = user_ownership(shards, env) if strategy.owned else None
    if ownership is None:
        total_pieces = len(shards.pieces("train"))
        if total_pieces < env.world_size:
            raise InputError(f"{shards.root}: {total_pieces} training row groups for "
                             f"{env.world_size} ranks; prepare with more `num_shards` or a "
                             "smaller `row_group_size`, or use fewer processes")
    pieces = {split: (ownership.pieces(shards, split) if ownership else
                      pieces_for_rank(shards.pieces(split), env.rank, env.world_size))
              for split in ("train", "val", "test")}
    steps = int(all_reduce([steps_per_epoch(pieces["train"], rank_batch)], env, "max")[0])
    return _Plan(shards, strategy, ownership, pieces, rank_batch, rank_batch * env.world_size,
                 steps)


def _start_run_folder(run: Path, config: dict, state: TrainState) -> None:
    """Rank 0: the run's config, and the epochs done so far (on resume, epochs after the
    checkpoint are dropped: they will be run again)."""
    run.mkdir(parents=True, exist_ok=True)
    write_jsonl(run / EPOCH_METRICS, state.history)
    write_vouched(run / CONFIG, lambda: write_json(run / CONFIG, config))


def _log_start(plan: _Plan, strategy: Strategy, auto: Resolved, model_config: ModelConfig,
               env: DistEnv) -> None:
    """Rank 0: what was chosen from the data, and what the run will do."""
    shards, train_ratings = plan.shards, plan.shards.rows("train")
    if auto.chosen:
        log.info("defaults from the data (%s): %s", auto.reason,
                 ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in auto.chosen.items()))
    if strategy.sync == "ddp" and strategy.sparse and env.backend == "gloo":
        log.warning("sync ddp with sparse gradients: DDP's sparse all-reduce over gloo "
                    "aborted with heap corruption after a few epochs in our runs (torch "
                    "2.13); the packed sync (the default) does the same update safely")
    if ranks_cannot_pay(train_ratings, env.world_size):
        log.warning("%d ranks on %s training ratings: each rank has too little work for "
                    "more ranks to be faster here; one process would finish sooner",
                    env.world_size, f"{train_ratings:,}")
    log.info("training on %d ratings: %d users x %d items, dim %d, %d rank(s), "
             "%d steps of %d ratings per epoch", train_ratings, shards.num_users,
             shards.num_items, model_config.dim, env.world_size, plan.steps, plan.global_batch)


def _log_epoch(run: Path, record: dict, state: TrainState, improved: bool,
               epochs: int) -> None:
    """One line per epoch: the progress a log file keeps (bars are for terminals), with
    the time left if every remaining epoch runs (early stopping may end sooner)."""
    left = (epochs - record["epoch"]) * sum(h["seconds"] for h in state.history) / max(
        len(state.history), 1)
    log.info("epoch %d/%d: train loss %.4f, val RMSE %s, %.0f ratings/s%s%s", record["epoch"],
             epochs, record["train_loss"], _fmt(record["val_rmse"]), record["ratings_per_s"],
             "" if improved else f" (best {_fmt(state.best_val)} at {state.best_epoch})",
             f"; at most {_duration(left)} left" if record["epoch"] < epochs else "")
    write_jsonl(run / EPOCH_METRICS, state.history)


def _finish(run: Path, rating: _RatingResult | None, ranking: RankingResult | None,
            plan: _Plan, config: RunConfig, env: DistEnv, reader: RowGroupReader) -> dict:
    """Test the kept tables, save them and the final metrics. The lists are the ranking
    tables' when there are any (they rank better: bench/ranking_objective.md)."""
    shards, ranks = plan.shards, config.ranking
    metrics: dict = {"world_size": env.world_size, "train_ratings": shards.rows("train"),
                     "num_users": shards.num_users, "num_items": shards.num_items,
                     "user_embeddings": "owned" if plan.owned else "replicated",
                     "objective": "both" if rating and ranking else
                     "rating" if rating else "ranking", "kind": shards.kind}
    if rating is not None:
        metrics.update(_rating_figures(rating, plan, config.train, env, reader))
    if ranking is not None:
        metrics.update({"ranking_dim": ranking.model.item_factors.embedding_dim,
                         "ranking_best_sweep": ranking.best_sweep,
                         "ranking_sweeps": len(ranking.history),
                         "ranking_reg": ranking.best_reg,
                         "ranking_seconds": round(ranking.seconds, 3)})
    metrics["ranks"] = _rank_memory([r.model for r in (rating, ranking) if r], env)
    lists = ranking.model if ranking is not None else rating.model
    metrics.update(ranking_metrics(lists, shards, env, ownership=plan.ownership,
                                   ks=ranks.ranking_ks, threshold=ranks.ranking_threshold,
                                   max_users=ranks.ranking_users))
    tables = Tables(rating.model if rating else None, ranking.model if ranking else None,
                    kind=shards.kind)
    if plan.owned:
        save_owned_model(run, tables, plan.ownership, shards, env)
    elif env.is_main:
        save_model(run / MODEL, tables, shards)
    if env.is_main:
        copy_id_maps(shards.root, run)
        if ranking is not None:
            write_jsonl(run / SWEEP_METRICS, ranking.history)
        write_vouched(run / FINAL_METRICS, lambda: write_json(run / FINAL_METRICS, metrics))
        if rating is not None:
            log.info("test RMSE %s ± %s (bias-only baseline %s), MAE %s",
                     _fmt(metrics["test_rmse"]), _fmt(metrics["test_rmse_se"]),
                     _fmt(metrics["baseline_test_rmse"]), _fmt(metrics["test_mae"]))
            if None not in (metrics["test_rmse"], metrics["baseline_test_rmse"]) and (
                    metrics["test_rmse"] > metrics["baseline_test_rmse"]):
                log.warning("the factors made predictions worse: test RMSE %s is above the "
                            "bias-only baseline's %s (more epochs if validation RMSE was "
                            "still falling, else a larger reg or a smaller lr)",
                            _fmt(metrics["test_rmse"]),
                            _fmt(metrics["baseline_test_rmse"]))
        k = ranks.ranking_ks[0]
        log.info("test NDCG@%d %s ± %s (most-popular %s), recall@%d %s ± %s (most-popular "
                 "%s)%s", k, _fmt(metrics[f"ndcg@{k}"]), _fmt(metrics[f"ndcg@{k}_se"]),
                 _fmt(metrics[f"popular_ndcg@{k}"]), k, _fmt(metrics[f"recall@{k}"]),
                 _fmt(metrics[f"recall@{k}_se"]), _fmt(metrics[f"popular_recall@{k}"]),
                 "" if ranking is not None else " (lists of the rating model)")
    return metrics


def _rating_figures(rating: _RatingResult, plan: _Plan, config: TrainConfig, env: DistEnv,
                    reader: RowGroupReader) -> dict:
    """Test RMSE of the best epoch, the bias-only baseline, and the epochs' speed."""
    state, shards = rating.state, plan.shards
    test = rating_errors(rating.model, plan.pieces["test"], shards.scale, config, env, reader)
    train_seconds = sum(h["seconds"] for h in state.history)
    trained = sum(h["ratings_per_s"] * h["seconds"] for h in state.history)
    return {"test_rmse": test["rmse"], "test_rmse_se": test["rmse_se"], "test_mae": test["mae"],
            "val_rmse": None if math.isinf(state.best_val) else state.best_val,
            "best_epoch": state.best_epoch, "epochs": state.epoch,
            "train_seconds": round(train_seconds, 3),
            "train_ratings_per_s": round(trained / train_seconds, 1) if train_seconds else None,
            "baseline_test_rmse": bias_baseline_rmse(shards, env),
            "dim": rating.model.config.dim}


class TrainEpoch:
    """One epoch of batches over this rank's row groups, or its rest after a mid-epoch resume.

    Hands ``train_step`` runs of consecutive batches, cut where the `Cadence` says
    something is due: a finite-loss check (agreed by all ranks, on a row exchange's
    batch), a mid-epoch checkpoint at the checkpointer's interval, the epoch's end. The
    step is flushed before each checkpoint and at the end, so replicas are equal whenever
    anything looks at them. Without a checkpointer it saves nothing.
    """

    def __init__(self, train_step: AutogradStep | FusedSGDStep, pieces: list[Piece],
                 rank_batch: int, steps: int, config: TrainConfig, env: DistEnv,
                 reader: RowGroupReader | None = None,
                 checkpointer: Checkpointer | None = None) -> None:
        self.train_step, self.pieces, self.rank_batch = train_step, pieces, rank_batch
        self.config, self.env, self.reader = config, env, reader
        self.checkpointer = checkpointer
        fault = env.test_fault
        self.cadence = Cadence(steps, rank_batch, train_step.exchange_every,
                               checkpointer.every if checkpointer else 0,
                               fault.step if fault else 0)

    def __call__(self, epoch: int, state: TrainState) -> tuple[float, float, int]:
        """Run epoch ``epoch`` from ``state.steps_done``; returns (mean loss over all ranks,
        epoch seconds, bytes the step's sync moved in this epoch)."""
        env, cadence, fault = self.env, self.cadence, self.env.test_fault
        started = time.perf_counter()
        self.train_step.model.train()
        self.train_step.sync_bytes = state.sync_bytes  # > 0 only when resuming mid-epoch
        steps_done = state.steps_done  # > 0 only in the epoch a mid-epoch checkpoint resumes
        # Each rank's own running sum, restored exactly (float64) from the checkpoint, so a
        # resumed epoch adds the same numbers in the same order as an uninterrupted one.
        # A float, or a 0-dim tensor on the device once an autograd step's loss is added
        # (summing there keeps a GPU from waiting for each step's loss).
        loss_sum = state.loss_sums[env.rank] if state.loss_sums else 0.0
        global_batch = self.rank_batch * env.world_size
        progress = tqdm(total=cadence.steps * global_batch, unit="rating", unit_scale=True,
                        desc=f"epoch {epoch + 1}/{self.config.epochs}", mininterval=1.0,
                        disable=not (env.is_main and bars_wanted(log)),
                        leave=False, dynamic_ncols=True, initial=steps_done * global_batch)
        # Both closed however the epoch ends: the bar's line cleared (a Ctrl-C's line then
        # starts on a line of its own), the loader's prefetch thread joined.
        with progress, contextlib.closing(self._loader(epoch, steps_done)) as loader:
            for users, items, ratings in loader:
                for cut, batches in cadence.runs(epoch, steps_done, len(ratings)):
                    if fault is not None:  # tests only: fail before a chosen batch
                        fault.maybe_fire(env.rank, cadence.batches_done(epoch, steps_done) + 1)
                    loss_sum = self.train_step(users[cut], items[cut], ratings[cut], loss_sum)
                    steps_done += batches
                    if cadence.check_due(steps_done):
                        self._check_finite(loss_sum, steps_done, epoch)
                        progress.update(min(steps_done, cadence.steps) * global_batch
                                        - progress.n)
                    if self.checkpointer is not None and cadence.checkpoint_due(epoch,
                                                                                steps_done):
                        started = self._save_mid_epoch(state, steps_done, loss_sum, started)
        self.train_step.flush()
        if steps_done != cadence.steps:  # the other ranks would wait for the missing batches
            raise RuntimeError(f"rank {env.rank}: {steps_done} batches in epoch {epoch + 1}, "
                               f"expected {cadence.steps} like every rank")
        mean = all_reduce([float(loss_sum), cadence.steps * self.rank_batch], env)
        seconds = state.epoch_seconds + time.perf_counter() - started
        return mean[0] / mean[1], seconds, self.train_step.sync_bytes

    def _loader(self, epoch: int, steps_done: int
                ) -> Generator[tuple[torch.Tensor, ...], None, None]:
        """The epoch's batches from ``steps_done`` on, as runs of consecutive batches."""
        config, env = self.config, self.env
        dataset = TrainBatches(self.pieces, self.rank_batch, self.cadence.steps, config.seed,
                               epoch, env.rank, start_step=steps_done, reader=self.reader)
        return train_loader(dataset, config.loader_workers, env.device.type == "cuda",
                            config.prefetch)

    def _save_mid_epoch(self, state: TrainState, steps_done: int,
                        loss_sum: torch.Tensor | float, started: float) -> float:
        """A checkpoint ``steps_done`` batches into the epoch (collectives); returns the
        time the epoch's clock restarts from (writing the file is not training time)."""
        self.train_step.flush()
        state.steps_done, state.sync_bytes = steps_done, self.train_step.sync_bytes
        state.loss_sums = gather_floats(float(loss_sum), self.env)
        state.epoch_seconds += time.perf_counter() - started
        started = time.perf_counter()
        self.checkpointer.save(state)
        return started

    def _check_finite(self, loss_sum: torch.Tensor | float, steps_done: int,
                      epoch: int) -> None:
        # Agreed by all ranks, so every rank stops here with the same message instead of
        # the healthy ones failing later on a closed connection.
        diverged = all_reduce([float(not math.isfinite(loss_sum))], self.env, "max")[0]
        if diverged:
            raise Diverged(f"the training loss became non-finite by step {steps_done} of "
                           f"epoch {epoch + 1}")


@torch.no_grad()
def evaluate(model: BiasedMF, pieces: list[Piece], scale: tuple[float, float],
             config: TrainConfig, env: DistEnv,
             reader: RowGroupReader | None = None) -> tuple[float | None, float | None]:
    """RMSE and MAE over every rank's share (`rating_errors`)."""
    errors = rating_errors(model, pieces, scale, config, env, reader)
    return errors["rmse"], errors["mae"]


def rating_errors(model: BiasedMF, pieces: list[Piece], scale: tuple[float, float],
                  config: TrainConfig, env: DistEnv,
                  reader: RowGroupReader | None = None) -> dict[str, float | None]:
    """RMSE, MAE and the RMSE's standard error over every rank's share, from all-reduced
    sums (None without ratings). The standard error is the squared errors' mean's, carried
    to its square root by the delta method: se(MSE) / (2 RMSE)."""
    module = unwrap(model)
    module.eval()
    sse = sae = s4 = 0.0
    count = 0
    for users, items, ratings in eval_batches(pieces, config.eval_batch_size, reader):
        predicted = module.predict(users.to(env.device), items.to(env.device), scale)
        error = predicted.double() - ratings.to(env.device).double()
        sse += float(error.square().sum())
        sae += float(error.abs().sum())
        s4 += float(error.pow(4).sum())
        count += len(ratings)
    sse, sae, s4, count = all_reduce([sse, sae, s4, float(count)], env)
    if count == 0:
        return {"rmse": None, "mae": None, "rmse_se": None}
    mse = sse / count
    rmse = math.sqrt(mse)
    mse_se = (math.sqrt(max(s4 / count - mse ** 2, 0.0) / (count - 1)) if count > 1
              else float("nan"))
    return {"rmse": rmse, "mae": sae / count, "rmse_se": mse_se / (2 * rmse) if rmse else 0.0}


def _machine_memory() -> int:
    """Bytes of physical memory (0 where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _rank_memory(models: list[torch.nn.Module], env: DistEnv) -> list[dict]:
    """Per rank: rows and bytes of its user tables and of every table, and its peak
    resident memory."""
    user_rows = models[0].user_factors.weight.shape[0]
    tables = [t for m in models for t in m.modules() if isinstance(t, torch.nn.Embedding)]
    table_bytes = sum(t.weight.numel() * t.weight.element_size() for t in tables)
    user_bytes = sum(t.weight.numel() * t.weight.element_size() for m in models
                     for name, t in m.named_children() if name.startswith("user_"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    columns = [gather_floats(float(v), env) for v in (user_rows, user_bytes, table_bytes, peak)]
    return [{"user_rows": int(rows), "user_table_bytes": int(users),
             "parameter_bytes": int(params), "peak_rss_bytes": int(rss)}
            for rows, users, params, rss in zip(*columns)]


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h10m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isinf(value) else f"{value:.4f}"
