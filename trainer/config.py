"""One typed config per component; each field is a CLI flag and a TOML key of the same name."""

from __future__ import annotations

from dataclasses import dataclass

OPTIMIZERS = ("sgd", "adagrad", "adam")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
GRADIENTS = ("auto", "sparse", "dense")
SYNCS = ("auto", "ddp", "packed")
USER_EMBEDDINGS = ("auto", "owned", "replicated")


def _check(condition: bool, field: str, value: object, expected: str) -> None:
    if not condition:
        raise ValueError(f"--{field.replace('_', '-')} {value!r}: expected {expected}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The biased matrix factorisation: r(u, i) = mean + b_u + b_i + <p_u, q_i>."""

    dim: int = 256  # embedding dimension of user and item factors
    init_std: float = 0.01  # std of the normal initialisation of factors (biases start at 0)
    reg: float = 0.05  # L2 weight on ||p_u||^2 + ||q_i||^2, per example (rows a batch touches)
    bias_reg: float = 0.01  # L2 weight on b_u^2 + b_i^2, per example

    def __post_init__(self) -> None:
        _check(self.dim >= 1, "dim", self.dim, "at least 1")
        _check(self.init_std > 0, "init_std", self.init_std, "> 0")
        _check(self.reg >= 0, "reg", self.reg, ">= 0")
        _check(self.bias_reg >= 0, "bias_reg", self.bias_reg, ">= 0")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """How parameters move; the learning rate is per rating (the loss is a sum over the batch)."""

    optimizer: str = "sgd"  # sgd | adagrad | adam (lazy: moves only the rows a batch touched)
    lr: float = 0.003  # learning rate (per rating for sgd)
    lr_decay: float = 0.99  # learning rate multiplied by this after every epoch

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer,
               " | ".join(OPTIMIZERS))
        _check(0 < self.lr < float("inf"), "lr", self.lr, "a finite number > 0")
        _check(0 < self.lr_decay <= 1, "lr_decay", self.lr_decay, "0 < x <= 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The loop: epochs, batches, stopping, devices, checkpoints and threads."""

    epochs: int = 150  # most epochs to run
    patience: int = 5  # stop after this many epochs without a better validation RMSE (0: never)
    batch_size: int = 1024  # ratings per step across all ranks (each rank takes its share)
    eval_batch_size: int = 65_536  # ratings per evaluation batch
    seed: int = 0  # model init and data order; same seed, data and world size, same result
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when available)
    backend: str = "auto"  # auto | gloo | nccl (auto: nccl on cuda, gloo on cpu)
    gradients: str = "auto"  # sparse | dense | auto (dense for small tables and on nccl)
    sync: str = "auto"  # ddp | packed | auto (packed: one all-gather of sparse rows per step)
    sync_every: int = 1  # packed sync every N steps (N > 1: ranks step alone, then sum changes)
    user_embeddings: str = "auto"  # owned | replicated | auto (owned: user rows on their rank)
    threads: int = 1  # torch threads per rank (0: cores / local ranks); small MF ops like 1
    loader_workers: int = 0  # DataLoader worker processes per rank (0: load in the rank)
    prefetch: int = 4  # batches a thread cuts ahead of the steps (0: cut in the loop itself)
    verify: str = "quick"  # check shards against the manifest: quick | full | none
    resume: bool = False  # continue from RUN_DIR/checkpoint.pt
    checkpoint_every: int = 0  # also checkpoint every N steps mid-epoch (0: at epoch ends only)
    timeout_s: int = 600  # collective timeout: a rank stuck this long fails the job

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs", self.epochs, "at least 1")
        _check(self.patience >= 0, "patience", self.patience, ">= 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "at least 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", self.eval_batch_size,
               "at least 1")
        _check(self.device in DEVICES, "device", self.device, " | ".join(DEVICES))
        _check(self.backend in BACKENDS, "backend", self.backend, " | ".join(BACKENDS))
        _check(self.gradients in GRADIENTS, "gradients", self.gradients,
               " | ".join(GRADIENTS))
        _check(self.sync in SYNCS, "sync", self.sync, " | ".join(SYNCS))
        _check(self.sync_every >= 1, "sync_every", self.sync_every, "at least 1")
        _check(self.user_embeddings in USER_EMBEDDINGS, "user_embeddings",
               self.user_embeddings, " | ".join(USER_EMBEDDINGS))
        _check(self.threads >= 0, "threads", self.threads, ">= 0")
        _check(self.loader_workers >= 0, "loader_workers", self.loader_workers, ">= 0")
        _check(self.prefetch >= 0, "prefetch", self.prefetch, ">= 0")
        _check(self.verify in ("quick", "full", "none"), "verify", self.verify,
               "quick | full | none")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, ">= 0")
        _check(self.timeout_s >= 10, "timeout_s", self.timeout_s, "at least 10")
