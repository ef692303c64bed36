"""Checkpoints and the final model: what they hold, how they are saved, found and resumed.

A checkpoint (``checkpoint.pt``) holds the model, the optimizer, RNG states, the best
weights so far and a `TrainState` with the exact data position, so a resumed run takes
the same steps in the same order as one never interrupted. With owned users every rank
writes its own slice and ``checkpoint.pt`` names the slices. `Checkpointer` is what the
loop sees: ``start`` (resume or begin afresh) and ``save``. At the end, ``model.pt``
holds the best-epoch weights with every user, and the run copies the shards' id maps.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from shardmf.errors import InputError
from shardmf.manifest import file_sha256
from shardmf.outputs import copy_atomic, write_atomic
from trainer.config import ModelConfig, TrainConfig
from trainer.distributed import DistEnv, all_gather_objects, barrier, on_main_then_broadcast
from trainer.model import BiasedMF, RankingMF
from trainer.optim import Optimizer
from trainer.ownership import UserOwnership
from trainer.run_files import (
    CHECKPOINT,
    FINAL_METRICS,
    ITEMS,
    MODEL,
    MODEL_ARRAYS,
    RANKING_PREFIX,
    RESTORE_CHECKPOINT,
    RETRAIN,
    USERS,
    checkpoint_slice,
    checkpoint_slice_pattern,
    model_part,
    save_torch_atomic,
    vouched,
    write_vouched,
)
from trainer.shards import ShardSet

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TrainState:
    """What a checkpoint must restore to continue exactly where it was written."""

    epoch: int = 0  # epochs completed; the one in progress is this (0-based)
    steps_done: int = 0  # steps completed in the epoch in progress (0: at an epoch boundary)
    loss_sums: list[float] | None = None  # each rank's loss sum over those steps
    epoch_seconds: float = 0.0  # training seconds spent on those steps
    sync_bytes: int = 0  # bytes the packed sync moved in those steps (same on all ranks)
    best_val: float = math.inf
    best_epoch: int = 0
    progress_val: float = math.inf  # val RMSE at the last epoch that gained >= min_delta
    bad_epochs: int = 0  # epochs since then
    best_model: dict | None = None
    history: list[dict] = field(default_factory=list)
    lr_scale: float = 1.0  # the step size's multiplier: lowered once by a non-finite loss

    def end_epoch(self, record: dict, val_rmse: float | None, model: torch.nn.Module,
                  min_delta: float = 0.0) -> bool:
        """Record a finished epoch; keeps the model when it is the best so far (returned).

        Any better validation RMSE keeps the model; only a gain of at least ``min_delta``
        since the last such gain resets the early-stopping count, so a decaying learning
        rate stops once its gains become negligible.
        """
        self.steps_done, self.loss_sums, self.epoch_seconds, self.sync_bytes = 0, None, 0.0, 0
        self.history.append(record)
        improved = val_rmse is None or val_rmse < self.best_val - 1e-6
        if improved:
            self.best_val = val_rmse if val_rmse is not None else math.inf
            self.best_epoch = record["epoch"]
            self.best_model = copy.deepcopy(model.state_dict())
        if val_rmse is None or val_rmse < self.progress_val - max(min_delta, 1e-6):
            self.progress_val = val_rmse if val_rmse is not None else math.inf
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        self.epoch = record["epoch"]
        return improved


# TrainState field -> its key in checkpoint.pt. The data position keeps the key "step"
# it was first written under, so checkpoints from before the rename still resume.
STATE_KEYS = {f.name: "step" if f.name == "steps_done" else f.name for f in fields(TrainState)}


class Checkpointer:
    """Saves and restores one run's training state; every rank holds one and calls it."""

    def __init__(self, run: Path, model: BiasedMF, optimizer: Optimizer,
                 shape: dict, env: DistEnv, owned: bool, identity: dict | None = None,
                 every: int = 0) -> None:
        self.run, self.model, self.optimizer = run, model, optimizer
        self.shape, self.env, self.owned = shape, env, owned
        # Steps between mid-epoch checkpoints, counted over the run (0: at epoch ends only);
        # the loop cuts its runs of batches there.
        self.every = every
        # What a resumed run must share with this one: {"shards": ShardSet.identity,
        # "optimizer": its name}; recorded in the checkpoint, compared on --resume.
        self.identity = identity or {}

    def start(self, config: TrainConfig) -> TrainState:
        """The state to continue from: a checkpoint's (resume, restart) or a fresh one."""
        run, env = self.run, self.env
        if should_resume(run, config, env):
            state = load_checkpoint(run, self.model, self.optimizer, self.shape, env,
                                    self.owned, self.identity)
            stopped = bool(config.patience) and state.bad_epochs >= config.patience
            if config.resume and (run / FINAL_METRICS).is_file() and (
                    stopped or state.epoch >= config.epochs):
                raise InputError(f"`resume`: {run} is a finished run ({state.epoch} epoch(s), "
                                 f"{'stopped early' if stopped else f'epochs={config.epochs}'}"
                                 f", {FINAL_METRICS} written): nothing is left to resume; "
                                 "raise `epochs` to train it further, pass `overwrite` to "
                                 "train it again, or choose another `out`")
            if env.is_main:
                log.info("resuming from %s: %d epoch(s) done, then %d of %d steps",
                         run / CHECKPOINT, state.epoch, state.steps_done, self.shape["steps"])
            return state
        if env.is_main and (run / CHECKPOINT).is_file():
            # A fresh run: a checkpoint left by an earlier run in this folder must not be
            # taken for this run's own if torchrun restarts the job before its first one.
            (run / CHECKPOINT).unlink()
        return TrainState()

    def save(self, state: TrainState) -> None:
        """Every rank calls this at the same point (it holds collectives)."""
        save_checkpoint(self.run, self.model, self.optimizer, state, self.shape, self.env,
                        self.owned, self.identity)


def should_resume(run: Path, config: TrainConfig, env: DistEnv) -> bool:
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


# The settings that shape the rating tables: a resumed run takes the checkpoint's where it
# gives none, and cannot give others.
SHAPE_SETTINGS = ("dim",)


def resumed_model_config(run: Path, config: ModelConfig) -> ModelConfig:
    """``config`` for resuming ``run``: each shape setting it leaves to the data is the
    checkpoint's; one it sets otherwise is one InputError naming it, before any tensor is
    loaded. Every rank calls this (the run folder is on storage all ranks share)."""
    path = run / CHECKPOINT
    if not path.is_file():
        return config  # `load_checkpoint` names the missing file
    # The settings only: the tables (the whole model, twice with the best epoch's) are
    # read once, by `load_checkpoint`.
    saved = load_trusted(path, RESTORE_CHECKPOINT, mmap=True).get("model_config")
    if not isinstance(saved, dict):
        return config  # an older checkpoint: its tables' shapes are checked as they load
    inherited = {}
    for name in SHAPE_SETTINGS:
        given, trained = getattr(config, name), saved.get(name)
        if given is None:
            inherited[name] = trained
        elif trained is not None and given != trained:
            raise InputError(f"{run} was trained with {name} {trained}; {name}={given} cannot "
                             f"resume it (omit `{name}`, or start a new run)")
    return dataclasses.replace(config, **inherited)


def save_checkpoint(run: Path, model: BiasedMF, optimizer: Optimizer,
                    state: TrainState, shape: dict, env: DistEnv, owned: bool,
                    identity: dict | None = None) -> None:
    """Every rank calls this at the same point; files are written then renamed into place.

    Replicated: rank 0 writes RUN/checkpoint.pt alone (every rank holds the same model).
    Owned users: each rank writes its own slice (its users, the items, its optimizer,
    RNG and best weights) as checkpoint.<epoch>-<step>.rank<r>.pt; once all are on disk,
    rank 0 writes checkpoint.pt naming them, and only then are older slices removed. A
    crash at any moment leaves a checkpoint.pt whose slices all exist. A write that fails
    (disk full) fails every rank with the same one line, not the writer alone.
    """
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    # Right after an epoch that improved (most epochs of a run still gaining), the best
    # weights are the current ones: written once, not twice (a checkpoint of a large model
    # costs a good part of an epoch: bench/train_throughput.md).
    best_is_model = state.steps_done == 0 and state.best_epoch == state.epoch > 0
    local = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng,
             "best_model": None if best_is_model else state.best_model,
             "best_is_model": best_is_model}
    shared = {"shape": shape, "identity": identity or {},
              "model_config": asdict(model.config),
              **{key: getattr(state, name) for name, key in STATE_KEYS.items()
                 if name != "best_model"}}
    if not owned:
        _agreed(lambda: write_vouched(run / CHECKPOINT, lambda: save_torch_atomic(
            {**shared, **local}, run / CHECKPOINT)) if env.is_main else None, env)
        return
    tag = f"{state.epoch}-{state.steps_done}"
    mine = run / checkpoint_slice(tag, env.rank)
    _agreed(lambda: save_torch_atomic(local, mine), env)  # every slice is on disk before
    # checkpoint.pt names them, with their digests: a slice is checked before it is loaded.
    digests = all_gather_objects(file_sha256(mine), env)
    _agreed(lambda: write_vouched(run / CHECKPOINT, lambda: save_torch_atomic(
        {**shared, "slices": tag, "world_size": env.world_size, "slice_sha256": digests},
        run / CHECKPOINT)) if env.is_main else None, env)
    for old in run.glob(checkpoint_slice_pattern(env.rank)):
        if old != mine:
            old.unlink()


def load_checkpoint(run: Path, model: BiasedMF, optimizer: Optimizer,
                    shape: dict, env: DistEnv, owned: bool,
                    identity: dict | None = None) -> TrainState:
    """Every rank reads checkpoint.pt (the run folder is on storage all ranks share)."""
    path = run / CHECKPOINT
    if not path.is_file():
        raise InputError(f"`resume`: {path} not found; start without `resume`")
    payload = load_trusted(path, RESTORE_CHECKPOINT)
    _check_identity(path, payload.get("identity") or {}, identity or {})
    if owned != ("slices" in payload):
        written = "owned" if "slices" in payload else "replicated"
        raise InputError(f"`resume`: {path} was written with user_embeddings={written!r}; "
                         f"resume with user_embeddings={written!r}")
    local = payload
    if owned:
        if payload["world_size"] != env.world_size:
            raise InputError(f"`resume`: {path} holds users split over "
                             f"{payload['world_size']} ranks (user_embeddings='owned'); "
                             f"resume with {payload['world_size']} processes")
        local = _agreed(lambda: _load_slice(run, payload, env), env)
    state = TrainState()
    for name, key in STATE_KEYS.items():
        setattr(state, name, payload.get(key, getattr(state, name)))  # older: epoch ends only
    state.best_model = local.get("best_model")
    saved = payload.get("shape")
    if state.steps_done and saved != shape:
        # The data position is a step of this rank's plan: another world size or batch
        # size has another plan. At an epoch boundary any shape can continue.
        raise InputError(f"`resume`: {path} was written mid-epoch by a run with "
                         f"{_describe(saved)}; this run has {_describe(shape)}. Resume with "
                         "the same number of ranks and `batch_size`")
    _check_tables(path, local.get("model"), model)
    model.load_state_dict(local["model"])
    if local.get("best_is_model"):
        state.best_model = copy.deepcopy(model.state_dict())
    optimizer.load_state_dict(local["optimizer"])
    if "rng" in local:
        torch.set_rng_state(local["rng"]["torch"])
        if "cuda" in local["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(local["rng"]["cuda"])
    return state


def _load_slice(run: Path, payload: dict, env: DistEnv) -> dict:
    """This rank's slice of an owned checkpoint, checked against the digest checkpoint.pt
    records for it (absent in checkpoints from before digests)."""
    slice_path = run / checkpoint_slice(payload["slices"], env.rank)
    if not slice_path.is_file():
        raise InputError(f"`resume`: {slice_path} not found; {CHECKPOINT} names it "
                         "(restore it, or start without `resume`)")
    digests = payload.get("slice_sha256")
    if digests is not None and file_sha256(slice_path) != digests[env.rank]:
        raise InputError(f"{slice_path}: damaged or replaced since the run wrote it (its "
                         f"SHA-256 differs from the one {CHECKPOINT} records); "
                         f"{RESTORE_CHECKPOINT}")
    return load_trusted(slice_path, RESTORE_CHECKPOINT)


def load_trusted(path: Path, remedy: str, mmap: bool = False) -> dict:
    """A torch file this trainer wrote, checked against the run's checksums.json and loaded
    without running code; any other is one InputError naming it and ``remedy``. ``mmap``:
    its tensors stay on disk until touched (a caller after the settings alone).

    Empty, truncated, random or crafted files all end here; torch's own message is not
    passed on (for a crafted pickle it suggests ``weights_only=False``, which would run it).
    """
    vouched(path, remedy)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 (a damaged file makes torch raise any of a dozen)
        raise InputError(f"{path}: not a file shardmf wrote (damaged, cut short, or holding "
                         f"objects it refuses to load); {remedy}") from e
    if not isinstance(payload, dict):
        raise InputError(f"{path}: holds a {type(payload).__name__}, not what shardmf writes "
                         f"there; {remedy}")
    return payload


def _check_tables(path: Path, saved: object, model: torch.nn.Module) -> None:
    """The checkpoint's tables have the model's names and shapes (before any is loaded)."""
    if not isinstance(saved, dict):
        raise InputError(f"{path}: holds no model tables; {RESTORE_CHECKPOINT}")
    for key, table in model.state_dict().items():
        found = saved.get(key)
        if not isinstance(found, torch.Tensor):
            raise InputError(f"{path}: holds no {key}; {RESTORE_CHECKPOINT}")
        if found.shape != table.shape:
            raise InputError(f"`resume`: {path} holds {key} of shape {tuple(found.shape)}, "
                             f"this run's is {tuple(table.shape)}; resume with the settings "
                             "and shards it was trained with, or start without `resume`")


def _check_identity(path: Path, saved: dict, current: dict) -> None:
    """--resume continues the same training: same shards, same optimizer."""
    if saved.get("shards") and current.get("shards") and saved["shards"] != current["shards"]:
        raise InputError(f"`resume`: {path} was trained on other shards (identity "
                         f"{saved['shards']}, SHARDS_DIR has {current['shards']}); resume with "
                         "the shards it was trained on, or start without `resume`")
    if saved.get("optimizer") and current.get("optimizer") and (
            saved["optimizer"] != current["optimizer"]):
        raise InputError(f"`resume`: {path} was trained with optimizer={saved['optimizer']!r}; "
                         f"this run has optimizer={current['optimizer']!r}. Resume with "
                         f"optimizer={saved['optimizer']!r}")


def _agreed(action: Callable[[], T], env: DistEnv) -> T:
    """Run a rank's part of a save or a load; an InputError on any rank is raised on every
    rank, else the rank's result is returned.

    One rank failing alone (disk full, a damaged slice) would leave the others waiting in
    the next collective, then failing with a lost-peer error instead of the cause (or
    print nothing: only rank 0 prints an InputError).
    """
    error = result = None
    try:
        result = action()
    except InputError as e:
        error = str(e)
    first = next((e for e in all_gather_objects(error, env) if e is not None), None)
    if first is not None:
        raise InputError(first)
    return result


@dataclass
class Tables:
    """What a finished run keeps: the rating model, the ranking tables, or both."""

    rating: BiasedMF | None
    ranking: RankingMF | None
    kind: str = "ratings"  # the shards': "ratings" | "interactions"

    @property
    def objective(self) -> str:
        return "both" if self.rating and self.ranking else "rating" if self.rating else "ranking"

    @property
    def lists(self) -> BiasedMF | RankingMF:
        """The model whose scores order recommendations: the ranking tables when trained."""
        return self.ranking if self.ranking is not None else self.rating

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every table on the CPU; the ranking tables' keys start with RANKING_PREFIX."""
        state = {}
        for prefix, model in (("", self.rating), (RANKING_PREFIX, self.ranking)):
            if model is not None:
                state.update({prefix + k: v.detach().cpu() for k, v in model.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """The inverse of `state_dict`: each model takes its own keys."""
        for prefix, model in (("", self.rating), (RANKING_PREFIX, self.ranking)):
            if model is not None:
                model.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()
                                       if k.startswith(RANKING_PREFIX) == bool(prefix)})


def save_model(path: Path, tables: Tables, shards: ShardSet) -> None:
    """The kept weights plus what is needed to use them without the shards, at ``path``
    (model.pt) and as arrays beside it (model.npz: `trainer.run` reads those, so
    recommending from a run does not wait seconds for torch to import)."""
    state = tables.state_dict()
    ranking = tables.ranking
    payload = {"state_dict": state,
               "model_config": asdict(tables.rating.config) if tables.rating else None,
               "ranking_dim": ranking.item_factors.embedding_dim if ranking else None,
               "scale": list(shards.scale), "shards_dir": str(shards.root.resolve()),
               # Which shards, wherever they are moved: recommend and evaluate check it.
               "shards_identity": shards.identity,
               "objective": tables.objective, "kind": tables.kind}
    write_vouched(path, lambda: save_torch_atomic(payload, path))
    buffer = io.BytesIO()
    np.savez(buffer, **{name: tensor.numpy() for name, tensor in state.items()},
             scale=np.array(shards.scale, dtype=np.float64),
             shards_dir=np.array(payload["shards_dir"]),
             shards_identity=np.array(payload["shards_identity"]),
             objective=np.array(tables.objective), kind=np.array(tables.kind))
    arrays = Path(path).with_name(MODEL_ARRAYS)
    write_vouched(arrays, lambda: write_atomic(arrays, buffer.getvalue()))


def load_model(path: Path) -> tuple[Tables, dict]:
    """The tables saved by `save_model` (on the CPU) and the payload (scale, shards_dir, ...).

    A run written before the ranking objective holds the rating model alone."""
    if not Path(path).is_file():
        raise InputError(f"{path}: not found; train a run first (`shardmf train SHARDS_DIR "
                         "--out RUN_DIR`)")
    payload = load_trusted(path, RETRAIN)
    try:
        state = payload["state_dict"]
        rating = ranking = None
        if payload.get("model_config") is not None:
            rating = BiasedMF(state["user_factors.weight"].shape[0],
                              state["item_factors.weight"].shape[0],
                              float(state["global_mean"]), ModelConfig(**payload["model_config"]))
        if payload.get("ranking_dim") is not None:
            users = state[RANKING_PREFIX + "user_factors.weight"]
            items = state[RANKING_PREFIX + "item_factors.weight"]
            ranking = RankingMF(users.shape[0], items.shape[0], payload["ranking_dim"])
        if rating is None and ranking is None:
            raise KeyError("neither the rating model nor the ranking tables")
        tables = Tables(rating, ranking, payload.get("kind", "ratings"))
        tables.load_state_dict(state)
        if not isinstance(payload.get("shards_dir"), str):
            raise KeyError("shards_dir")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise InputError(f"{path}: not a model shardmf wrote ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120] if str(e) else 'incomplete'}); "
                         f"{RETRAIN}") from e
    return tables, payload


def save_owned_model(run: Path, tables: Tables, ownership: UserOwnership,
                     shards: ShardSet, env: DistEnv) -> None:
    """model.pt with every user: each rank writes its users' rows, rank 0 assembles them.

    Rank 0 holds the whole user tables once, here, as anyone using the model will.
    """
    weights = tables.state_dict()
    part = run / model_part(env.rank)
    save_torch_atomic({"users": torch.from_numpy(ownership.users),
                       **{k: v for k, v in weights.items() if _is_user_table(k)}}, part)
    barrier(env)  # every part is on disk
    if not env.is_main:
        return
    rating = ranking = None
    if tables.rating is not None:
        rating = BiasedMF(shards.num_users, shards.num_items, shards.train_mean,
                          tables.rating.config)
    if tables.ranking is not None:
        ranking = RankingMF(shards.num_users, shards.num_items,
                            tables.ranking.item_factors.embedding_dim)
    full = Tables(rating, ranking, tables.kind)
    state = full.state_dict()
    state.update({k: v for k, v in weights.items() if not _is_user_table(k)})
    for rank in range(env.world_size):
        path = run / model_part(rank)
        rows = torch.load(path, map_location="cpu", weights_only=True)
        for key, values in rows.items():
            if key != "users":
                state[key][rows["users"]] = values
        path.unlink()
    full.load_state_dict(state)
    save_model(run / MODEL, full, shards)


def _is_user_table(key: str) -> bool:
    return key.removeprefix(RANKING_PREFIX).startswith("user_")


def copy_id_maps(shards_dir: Path, run_dir: Path) -> None:
    """The run keeps its own id maps, so it stays usable if the shards move or go."""
    for name in (USERS, ITEMS):
        write_vouched(run_dir / name, functools.partial(copy_atomic, shards_dir / name,
                                                        run_dir / name))


def _describe(shape: dict | None) -> str:
    if not shape:
        return "an unknown shape"
    return (f"{shape['world_size']} rank(s), {shape['rank_batch_size']} ratings per rank "
            f"per step, {shape['steps']} steps per epoch, {shape['loader_workers']} loader "
            "worker(s)")
