"""One typed config per component; each field is a CLI flag and a TOML key of the same name.

A field's ``metadata`` carries its flag's ``help`` (what it means, and in words what a
None or 0 default means) and, for a fixed set of values, its ``choices``: the flags, the
TOML keys and the validation below all read them from here.
A field whose default is None is chosen from the data when training starts
(trainer/defaults.py): a value given as a flag or in TOML always wins.
"""

from __future__ import annotations

import dataclasses
import numbers
import typing
from dataclasses import dataclass, field
from types import UnionType
from typing import Union

OPTIMIZERS = ("sgd", "adagrad", "adam")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
GRADIENTS = ("auto", "sparse", "dense")
SYNCS = ("auto", "ddp", "packed")
STEPS = ("auto", "fused", "autograd")
USER_EMBEDDINGS = ("auto", "owned", "replicated")
VERIFY_MODES = ("quick", "full", "none")
CLUSTER_ALGORITHMS = ("kmeans", "minibatch", "auto")
EXPORT_FORMATS = ("parquet", "npy")  # of `trainer.export_run`
# Ratings per step: each rank keeps a few (batch, dim) float32 buffers, 1 GiB apiece at
# this size and dim 16; a larger batch is a typo, not a setting.
MAX_BATCH_SIZE = 2**24
# Items rated less in training have factors that are mostly the prior: clustering,
# recommendations and similar items leave them out by default.
MIN_ITEM_RATINGS = 20
# The data-scaled recipes (trainer/defaults.py applies them; the help below quotes them):
# SMALL_SET up to SMALL_SET_RATINGS training ratings, LARGE_SET from LARGE_SET_RATINGS,
# and in between each value moves with the logarithm of the size (geometrically for the
# dimension, step size and the epochs the step takes to decay), so no size is a cliff.
# lr and reg act on ratings in units of their standard deviation (trainer/model.py).
SMALL_SET_RATINGS = 100_000
LARGE_SET_RATINGS = 2_000_000
SMALL_SET = {"dim": 256, "reg": 0.045, "lr": 0.0035, "lr_decay": 0.99, "patience": 5,
             "min_delta": 0.0}
LARGE_SET = {"dim": 64, "reg": 0.035, "lr": 0.035, "lr_decay": 0.85, "patience": 2,
             "min_delta": 0.001}
EXCHANGE_EVERY_RATINGS = 524_288  # ratings a rank trains between row exchanges
PREFETCH = 4  # batches a loader thread cuts ahead, where a core is spare
CACHE_SHARE_OF_MEMORY = 8  # decoded ratings kept: 1/8 of the machine's memory at most
REG_PATH_START = 0.02  # the ranking regularisation path's first weight (trainer/sweeps.py)
REG_PATH_FACTOR = 0.8  # ... multiplied by this after every sweep


def _by_size(name: str) -> str:
    """A recipe field's default in words, from the recipes themselves."""
    return (f"(default: {SMALL_SET[name]:g} up to {SMALL_SET_RATINGS / 1e3:g}k training "
            f"ratings, {LARGE_SET[name]:g} from {LARGE_SET_RATINGS / 1e6:g}M, moving with "
            "the log of the size in between)")


def _check(condition: bool, field: str, value: object, expected: str) -> None:
    """A field's value checked; the error names the field (``dim=-1: expected ...``), which
    the command line words as its flag."""
    if not condition:
        raise ValueError(f"{field}={value!r}: expected {expected}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The biased matrix factorisation: r(u, i) = mean + b_u + b_i + <p_u, q_i>."""

    dim: int | None = field(default=None, metadata={
        "help": "embedding dimension of user and item factors " + _by_size("dim")})
    init_std: float = field(default=0.01, metadata={
        "help": "std of the normal initialisation of factors (biases start at 0)"})
    reg: float | None = field(default=None, metadata={
        "help": "L2 weight on ||p_u||^2 + ||q_i||^2, per example, on the rows a batch "
        "touches " + _by_size("reg")})
    bias_reg: float = field(
        default=0.01, metadata={"help": "L2 weight on b_u^2 + b_i^2, per example"})

    def __post_init__(self) -> None:
        _check(self.dim is None or self.dim >= 1, "dim", self.dim, "at least 1")
        _check(self.init_std > 0, "init_std", self.init_std, "> 0")
        _check(self.reg is None or self.reg >= 0, "reg", self.reg, ">= 0")
        _check(self.bias_reg >= 0, "bias_reg", self.bias_reg, ">= 0")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """How parameters move; the learning rate is per rating (the loss is a sum over the batch)."""

    optimizer: str = field(default="sgd", metadata={
        "help": "update rule (adagrad and adam are lazy: they move only the rows a batch "
        "touched)", "choices": OPTIMIZERS})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate, per rating for sgd " + _by_size("lr")[:-1]
        + "; times the ranks on small sets with a periodic exchange, fading to once on "
        "large ones)"})
    lr_decay: float | None = field(default=None, metadata={
        "help": "learning rate multiplied by this after every epoch " + _by_size("lr_decay")})

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer,
               " | ".join(OPTIMIZERS))
        _check(self.lr is None or 0 < self.lr < float("inf"), "lr", self.lr,
               "a finite number > 0")
        _check(self.lr_decay is None or 0 < self.lr_decay <= 1, "lr_decay", self.lr_decay,
               "0 < x <= 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: epochs, batches, stopping, devices, checkpoints and threads."""

    epochs: int = field(default=150, metadata={"help": "most epochs to run"})
    patience: int | None = field(default=None, metadata={
        "help": "stop after this many epochs gaining less than min-delta validation RMSE "
        "(0: never) " + _by_size("patience")})
    min_delta: float | None = field(default=None, metadata={
        "help": "smallest validation RMSE gain that resets the patience count; the best "
        "epoch is kept regardless " + _by_size("min_delta")})
    batch_size: int = field(default=1024, metadata={
        "help": "ratings per step across all ranks (each rank takes its share)"})
    eval_batch_size: int = field(default=65_536, metadata={"help": "ratings per evaluation batch"})
    seed: int = field(default=0, metadata={
        "help": "model init and data order; same seed, data and world size, same result"})
    device: str = field(default="auto", metadata={
        "help": "where ranks compute (auto: cuda when available)", "choices": DEVICES})
    backend: str = field(default="auto", metadata={
        "help": "torch.distributed backend (auto: nccl on cuda, gloo on cpu)",
        "choices": BACKENDS})
    gradients: str = field(default="auto", metadata={
        "help": "embedding gradients (auto: dense for small tables and on nccl, else sparse)",
        "choices": GRADIENTS})
    sync: str = field(default="auto", metadata={
        "help": "how replicas stay equal: ddp all-reduce, or packed (one all-gather of the "
        "touched rows per step; auto: packed with sparse gradients)", "choices": SYNCS})
    sync_every: int | None = field(default=None, metadata={
        "help": "exchange changed rows every N steps (N > 1: ranks step alone, then average "
        f"their changes) (default: 1 for one rank, else every {EXCHANGE_EVERY_RATINGS:,} "
        "ratings a rank)"})
    user_embeddings: str = field(default="auto", metadata={
        "help": "owned: each user's row lives on the rank that reads the user's shards "
        "(shards partitioned by user); auto: owned when the shards allow it",
        "choices": USER_EMBEDDINGS})
    step: str = field(default="auto", metadata={
        "help": "fused: a compiled CPU SGD step (numba); auto: fused when numba loads and "
        "the run allows it, else autograd", "choices": STEPS})
    threads: int = field(default=1, metadata={
        "help": "torch threads per rank (0: cores / local ranks); small MF ops like 1"})
    loader_workers: int = field(
        default=0, metadata={"help": "DataLoader worker processes per rank (0: load in the rank)"})
    prefetch: int | None = field(default=None, metadata={
        "help": "batches a thread cuts ahead of the steps (0: cut in the loop itself) "
        f"(default: {PREFETCH} when a core is spare for the thread, else 0)"})
    cache_mb: int | None = field(default=None, metadata={
        "help": "MiB of decoded ratings a rank keeps in memory between epochs; row groups "
        "beyond it are read again each epoch (0: read every epoch) (default: "
        f"1/{CACHE_SHARE_OF_MEMORY} of the "
        "machine's memory, shared by its ranks)"})
    verify: str = field(default="quick", metadata={
        "help": "check shards against the manifest: quick (sizes, rows), full (also "
        "SHA-256), none", "choices": VERIFY_MODES})
    resume: bool = field(default=False, metadata={
        "help": "continue from the checkpoint in RUN_DIR"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the run in RUN_DIR (only a folder shardmf marked as a run)"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "also checkpoint every N steps mid-epoch (0: at epoch ends only)"})
    timeout_s: int = field(
        default=600, metadata={"help": "collective timeout: a rank stuck this long fails the job"})

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _check(self.patience is None or self.patience >= 0, "patience", self.patience, ">= 0")
        _check(self.min_delta is None or self.min_delta >= 0, "min_delta", self.min_delta,
               ">= 0")
        _check(1 <= self.batch_size <= MAX_BATCH_SIZE, "batch_size", self.batch_size,
               f"1..{MAX_BATCH_SIZE:,}")
        _check(1 <= self.eval_batch_size <= MAX_BATCH_SIZE, "eval_batch_size",
               self.eval_batch_size, f"1..{MAX_BATCH_SIZE:,}")
        _check(self.device in DEVICES, "device", self.device, " | ".join(DEVICES))
        _check(self.backend in BACKENDS, "backend", self.backend, " | ".join(BACKENDS))
        _check(self.gradients in GRADIENTS, "gradients", self.gradients,
               " | ".join(GRADIENTS))
        _check(self.sync in SYNCS, "sync", self.sync, " | ".join(SYNCS))
        _check(self.sync_every is None or self.sync_every >= 1, "sync_every", self.sync_every,
               "at least 1")
        _check(self.user_embeddings in USER_EMBEDDINGS, "user_embeddings",
               self.user_embeddings, " | ".join(USER_EMBEDDINGS))
        _check(self.step in STEPS, "step", self.step, " | ".join(STEPS))
        _check(self.threads >= 0, "threads", self.threads, ">= 0")
        _check(self.loader_workers >= 0, "loader_workers", self.loader_workers, ">= 0")
        _check(self.prefetch is None or self.prefetch >= 0, "prefetch", self.prefetch,
               ">= 0")
        _check(self.cache_mb is None or self.cache_mb >= 0, "cache_mb", self.cache_mb,
               ">= 0")
        _check(self.verify in VERIFY_MODES, "verify", self.verify, " | ".join(VERIFY_MODES))
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")
        _check(self.timeout_s >= 10, "timeout_s", self.timeout_s, "at least 10")
        if self.resume and self.overwrite:
            raise ValueError("`resume` continues the run in the run folder and `overwrite` "
                             "replaces it; pass one of them")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """How item embeddings are clustered and scored; validated on construction."""

    clusters: int | str = field(default="auto", metadata={
        "help": "k (2 or more), or auto: best silhouette over k-min..k-max"})
    k_min: int = field(default=4, metadata={"help": "smallest k tried by --clusters auto"})
    k_max: int = field(default=30, metadata={
        "help": "largest k tried by --clusters auto (capped at clustered items - 1)"})
    algorithm: str = field(default="auto", metadata={
        "help": "K-Means or MiniBatchKMeans (auto: minibatch above 100,000 items)",
        "choices": CLUSTER_ALGORITHMS})
    normalize: bool = field(default=False, metadata={
        "help": "L2-normalise embeddings before clustering (cosine geometry)"})
    min_item_ratings: int = field(default=MIN_ITEM_RATINGS, metadata={
        "help": "items with fewer training ratings are left out"})
    top_items: int = field(
        default=10, metadata={"help": "items listed per cluster, most training ratings first"})
    seed: int = field(default=0, metadata={
        "help": "random_state for K-Means, PCA, silhouette sampling and the shuffles"})
    baseline_shuffles: int = field(
        default=20, metadata={"help": "genre-label shuffles for the chance baseline"})

    def __post_init__(self) -> None:
        clusters = self.clusters
        if clusters != "auto":
            if isinstance(clusters, bool) or not isinstance(clusters, int):
                raise ValueError(
                    f"clusters={clusters!r}: expected an integer of at least 2, or 'auto'")
            if clusters < 2:
                raise ValueError(
                    f"clusters={clusters!r}: expected at least 2, or 'auto' (0, which skips "
                    "clustering, means no ClusterConfig: see post_step_config)")
        minimums = {
            "k_min": 2,
            "k_max": 2,
            "min_item_ratings": 0,
            "top_items": 1,
            "seed": 0,
            "baseline_shuffles": 1,
        }
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r}: expected an integer")
            if value < minimum:
                raise ValueError(f"{name}={value!r}: expected at least {minimum}")
        if self.k_max < self.k_min:
            raise ValueError(f"k_max={self.k_max!r}: expected at least `k_min` ({self.k_min})")
        if self.algorithm not in CLUSTER_ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}: expected "
                             f"{' | '.join(CLUSTER_ALGORITHMS)}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize={self.normalize!r}: expected true or false")
        if self.seed >= 2**32:
            # scikit-learn's random_state accepts 0..2**32-1 only.
            raise ValueError(f"seed={self.seed!r}: expected less than 2**32")


OBJECTIVES = ("auto", "rating", "ranking", "both")


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """What the run learns: ratings (the biased MF above, by SGD), top-N lists (a second
    pair of tables without biases, by iALS: trainer/ials.py), or both from the same shards."""

    objective: str = field(default="auto", metadata={
        "help": "rating: predict ratings (RMSE); ranking: recommend (iALS: every observed "
        "pair pulled to 1, every unobserved pair a weak 0); both: one pair of tables for "
        "each, from the same shards (auto: both on ratings, ranking on interactions)",
        "choices": OBJECTIVES})
    ranking_dim: int = field(default=64, metadata={
        "help": "embedding dimension of the ranking tables"})
    unobserved_weight: float = field(default=1.0, metadata={
        "help": "weight of every unobserved (user, item) pair pulled towards 0 (iALS's "
        "alpha0), through the tables' Gramians: no negatives are sampled"})
    liked_weight: float = field(default=1.0, metadata={
        "help": "extra confidence of a rating at or above the relevance threshold (a pair's "
        "weight is 1 + this when liked, 1 otherwise)"})
    ranking_reg: float | None = field(default=None, metadata={
        "help": "L2 weight of the ranking tables, scaled per row by its pairs plus "
        "unobserved_weight x the other side's rows (default: a path from "
        f"{REG_PATH_START:g} shrinking x{REG_PATH_FACTOR:g} a sweep, keeping the sweep with "
        "the best validation NDCG@10)"})
    cg_steps: int = field(default=3, metadata={
        "help": "conjugate-gradient steps per row update, warm-started at the current row"})
    sweeps: int = field(default=30, metadata={
        "help": "most ranking sweeps (each updates every user row, then every item row)"})
    sweep_patience: int = field(default=4, metadata={
        "help": "stop after this many sweeps without a better validation NDCG@10"})

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, "objective", self.objective, " | ".join(OBJECTIVES))
        _check(isinstance(self.ranking_dim, int) and self.ranking_dim >= 1, "ranking_dim",
               self.ranking_dim, "at least 1")
        _check(0 <= self.unobserved_weight < float("inf"), "unobserved_weight",
               self.unobserved_weight, "a finite number >= 0")
        _check(0 <= self.liked_weight < float("inf"), "liked_weight", self.liked_weight,
               "a finite number >= 0")
        _check(self.ranking_reg is None or 0 <= self.ranking_reg < float("inf"),
               "ranking_reg", self.ranking_reg, "a finite number >= 0")
        _check(isinstance(self.cg_steps, int) and self.cg_steps >= 1, "cg_steps",
               self.cg_steps, "at least 1")
        _check(isinstance(self.sweeps, int) and self.sweeps >= 1, "sweeps", self.sweeps,
               "at least 1")
        _check(isinstance(self.sweep_patience, int) and self.sweep_patience >= 0,
               "sweep_patience", self.sweep_patience, ">= 0")


@dataclass(frozen=True, kw_only=True)
class RankingConfig:
    """The ranking evaluation of the best epoch on the test split (trainer/ranking.py)."""

    ranking_ks: tuple[int, ...] = field(default=(10, 20), metadata={
        "help": "list lengths k of precision@k, recall@k, NDCG@k, MAP@k, hit rate, coverage"})
    ranking_threshold: float | None = field(default=None, metadata={
        "help": "a test rating at or above this is relevant (default: 75% up the data's "
        "rating scale: 4 on 1-5, 3.875 on 0.5-5)"})
    ranking_users: int = field(default=10_000, metadata={
        "help": "evaluate a random sample of about this many test users (0: every one); "
        "scoring every user against every item costs as much as training on large sets"})

    def __post_init__(self) -> None:
        _check(isinstance(self.ranking_users, int) and self.ranking_users >= 0,
               "ranking_users", self.ranking_users, "0 (every user) or more")
        ks = self.ranking_ks
        _check(isinstance(ks, tuple) and len(ks) > 0 and all(
            isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks),
            "ranking_ks", ks, "one or more whole numbers >= 1, e.g. 10 20")


# Every config of a training run, in the order of config.json's sections and of --help.
# what training reads
TRAIN_CONFIGS = (ModelConfig, OptimConfig, TrainConfig, ObjectiveConfig, RankingConfig)
RUN_CONFIGS = (*TRAIN_CONFIGS, ClusterConfig)
SKIP_CLUSTERS = 0  # clusters=0: train without the clustering post-step


def config_from_values(cls: type, values: dict):
    """Build a config from the flat values that belong to it (others are ignored), each
    checked against its field's type first (`typed_value`)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: typed_value(k, v, hints[k]) for k, v in values.items() if k in names})


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False",
               dict: "a dict"}
_PLURAL_WORDS = {int: "integers", float: "numbers", str: "strings"}


def typed_value(name: str, value: object, hint: object) -> object:
    """``value`` as the plain Python type of a field annotated ``hint``, or ValueError
    naming the field (``dim='abc': expected an integer``).

    Values from Python (the estimator, a TOML file) may be of any type; a parameter grid
    often holds numpy numbers, which become ints and floats here (config.json is JSON).
    A whole float (``dim=32.0``) is not an integer: the value is refused, never rounded.
    """
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        converted = _as_type(value, option)
        if converted is not _NOT_THIS_TYPE:
            return converted
    words = [_type_words(option) for option in options if option is not type(None)]
    if type(None) in options:
        words.append("None")
    raise ValueError(f"{name}={value!r}: expected {' or '.join(words)}")


_NOT_THIS_TYPE = object()


def _as_type(value: object, hint: object) -> object:
    # numpy's bool_ is no bool subclass; True is an int to Python, never a count here.
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool_"
    if hint is bool:
        return bool(value) if is_bool else _NOT_THIS_TYPE
    if is_bool:
        return _NOT_THIS_TYPE
    if hint is int:
        return int(value) if isinstance(value, numbers.Integral) else _NOT_THIS_TYPE
    if hint is float:
        return float(value) if isinstance(value, numbers.Real) else _NOT_THIS_TYPE
    if hint in (str, dict):
        return value if isinstance(value, hint) else _NOT_THIS_TYPE
    if typing.get_origin(hint) is tuple and isinstance(value, (tuple, list)):
        args = typing.get_args(hint)
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) != len(value):
            return _NOT_THIS_TYPE
        items = tuple(_as_type(item, kind) for item, kind in zip(value, kinds))
        return _NOT_THIS_TYPE if _NOT_THIS_TYPE in items else items
    return _NOT_THIS_TYPE


def _type_words(hint: object) -> str:
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        count = "" if args[-1] is Ellipsis else f"{len(args)} "
        return f"a tuple of {count}{_PLURAL_WORDS[args[0]]}"
    return _TYPE_WORDS.get(hint, str(hint))


def post_step_config(values: dict) -> ClusterConfig | None:
    """The clustering post-step's config from flat values; None for clusters=0. Its
    ``seed`` is the run's (the one ``seed`` value drives training and clustering)."""
    if values.get("clusters", ClusterConfig.clusters) == SKIP_CLUSTERS:
        return None
    return config_from_values(ClusterConfig, values)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run reads, built and checked once (from flags, a TOML file or
    the estimator's parameters) and handed to every rank whole (trainer/entry.py)."""

    shards_dir: str  # the output of `shardmf prepare`
    run_dir: str  # where the run's files go
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ranking: RankingConfig = field(default_factory=RankingConfig)
    cluster: ClusterConfig | None = None  # None: no clustering post-step

    @classmethod
    def from_values(cls, shards_dir: str, run_dir: str, values: dict) -> RunConfig:
        """From flat values (flag or parameter names); every section checked here."""
        return cls(shards_dir=str(shards_dir), run_dir=str(run_dir),
                   model=config_from_values(ModelConfig, values),
                   optim=config_from_values(OptimConfig, values),
                   train=config_from_values(TrainConfig, values),
                   objective=config_from_values(ObjectiveConfig, values),
                   ranking=config_from_values(RankingConfig, values),
                   cluster=post_step_config(values))

    def to_dict(self) -> dict:
        """JSON-ready: nested sections, as config.json records them."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        sections = {name: _from_json(kind, data[name]) for name, kind in _SECTIONS.items()}
        cluster = data.get("cluster")
        return cls(shards_dir=data["shards_dir"], run_dir=data["run_dir"], **sections,
                   cluster=None if cluster is None else _from_json(ClusterConfig, cluster))


_SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "train": TrainConfig,
             "objective": ObjectiveConfig, "ranking": RankingConfig}


def _from_json(cls: type, values: dict):
    """A config from its JSON section (JSON lists back to the tuples the fields declare)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
