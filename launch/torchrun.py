"""Start training or evaluation: in this process for one rank, or with torchrun for several.

``torchrun --nproc-per-node=N -m trainer`` (``-m launch.evaluate_entry`` for `shardmf
evaluate`) is what runs underneath, so anything this module does can be done by hand; it
adds checks before training starts (so a bad flag or a missing shard is one message, not
one per rank) and a short report when a rank fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from launch.options import add_config_arguments
from shardmf.errors import InputError
from trainer.config import TRAIN_CONFIGS, TrainConfig, config_from_values
from trainer.run_files import precheck_run_target

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TorchrunOptions:
    """Where the ranks run: N processes on this node, on one or several nodes."""

    nproc: int = field(default=1, metadata={"help": "training processes on this node (ranks)"})
    nnodes: int = field(
        default=1, metadata={"help": "nodes taking part; each runs this same command"})
    rdzv_endpoint: str | None = field(default=None, metadata={"metavar": "HOST:PORT",
        "help": "HOST:PORT every node can reach (c10d rendezvous) (default: none: a "
        "standalone job on this node; needed with --nnodes above 1)"})
    rdzv_id: str = field(
        default="shardmf", metadata={
            "metavar": "ID", "help": "job id shared by the nodes of one run"})
    max_restarts: int = field(default=0, metadata={
        "help": "restarts of all ranks after a failure; they resume from the checkpoint"})

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"--nproc {self.nproc}: expected at least 1")
        if self.nnodes < 1:
            raise ValueError(f"--nnodes {self.nnodes}: expected at least 1")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, "
                             "reachable from every node")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts {self.max_restarts}: expected >= 0")

    @classmethod
    def from_values(cls, values: dict) -> TorchrunOptions:
        return config_from_values(cls, values)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TorchrunOptions, title="launch (torchrun)")


def launch_training(shards_dir: str, run_dir: str, values: dict,
                    options: TorchrunOptions) -> int:
    """Check, then train on all ranks; returns the exit status (2 for a user error)."""
    from trainer.config import RUN_CONFIGS, post_step_config
    from trainer.shards import open_shards

    for cls in TRAIN_CONFIGS:  # a bad flag fails here, once, not on every rank
        config_from_values(cls, values)
    post_step_config(values)  # a bad clustering flag fails here, not after training
    train_config = config_from_values(TrainConfig, values)
    shards = open_shards(shards_dir, train_config.verify)
    if options.nnodes == 1 and len(shards.pieces("train")) < options.nproc:
        raise InputError(f"{shards_dir}: {len(shards.pieces('train'))} training row groups "
                         f"for --nproc {options.nproc}; prepare with more --num-shards or "
                         "use fewer processes")
    precheck_run_target(Path(run_dir), train_config.resume, train_config.overwrite)
    names = {f.name for cls in RUN_CONFIGS for f in dataclasses.fields(cls)}
    trainer_args = [shards_dir, "--out", run_dir, *_as_flags(values, names)]
    if options.nproc == 1 and options.nnodes == 1:
        from launch.train_entry import main as train_main

        return train_main(trainer_args)
    return _torchrun("trainer", trainer_args, options, "training")


def launch_evaluation(values: dict, options: TorchrunOptions) -> int:
    """`shardmf evaluate`: ranking figures of a finished run, computed by ``options.nproc``
    local ranks (each scores its share of the users, as at the end of training) and merged
    into RUN_DIR/metrics.json by rank 0; returns the exit status (2 for a user error)."""
    args = [values["run_dir"], "--k", *map(str, values["k"]),
            "--min-item-ratings", str(values["min_item_ratings"]), "--users", str(values["users"])]
    if values["threshold"] is not None:
        args += ["--threshold", str(values["threshold"])]
    if options.nproc == 1 and options.nnodes == 1:
        from launch.train_entry import evaluate_main

        return evaluate_main(args)
    return _torchrun("launch.evaluate_entry", args, options, "evaluation")


def _torchrun(module: str, module_args: list[str], options: TorchrunOptions,
              what: str) -> int:
    """Run ``python -m module module_args`` on every rank; ``what`` names it in errors."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from launch.train_entry import Terminated

    if options.nnodes == 1 and not options.rdzv_endpoint:
        where = ["--standalone"]
    else:
        where = ["--rdzv-backend=c10d", f"--rdzv-endpoint={options.rdzv_endpoint}",
                 f"--rdzv-id={options.rdzv_id}"]
    args = [f"--nnodes={options.nnodes}", f"--nproc-per-node={options.nproc}", *where,
            f"--max-restarts={options.max_restarts}", "--module", module, *module_args]
    # Threads are set per rank by the trainer; this only silences torchrun's warning.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A failure is reported below in one line (its rank printed the details): torchrun's own
    # "failed (exitcode: ...)" log line would only repeat it.
    # torchelastic's module loggers carry their own levels, so each is set, not only the
    # parent (its "Received 2 death signal" would add a line to Ctrl-C's one).
    for name in ["torch.distributed", *logging.root.manager.loggerDict]:
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(args))
    except SignalException as e:
        # torchrun has already passed the signal on to every rank and waited for them.
        raise (KeyboardInterrupt() if e.sigval == signal.SIGINT else Terminated()) from None
    except ChildFailedError as e:
        # Ranks that torchrun stopped after the first failure died of its signal (a negative
        # exit code): they are not the cause, and rank 0 among them is the usual one. Failure
        # times have one-second resolution, so a rank that failed on its own because it lost
        # its peer cannot be told from the first one: name every rank that failed on its own.
        failures = sorted((rank, f.exitcode) for rank, f in e.failures.items())
        failed = [(rank, code) for rank, code in failures if code > 0] or failures
        if any(code == 2 for _, code in failed):
            return 2  # a user error, already printed (by rank 0, or by the rank that met it)
        ranks = ", ".join(str(rank) for rank, _ in failed)
        codes = ", ".join(str(code) for _, code in failed)
        if len(failed) == 1:
            raise RuntimeError(f"{what} failed on rank {ranks} (exit code {codes}); its "
                               "error is printed above") from None
        raise RuntimeError(f"{what} failed on ranks {ranks} (exit codes {codes}); their errors "
                           "are printed above, and the first is the cause (a rank that loses "
                           "its peer fails too)") from None
    return 0


def _as_flags(values: dict, names: set[str]) -> list[str]:
    """Parsed values back into trainer flags, so torchrun's ranks parse the same settings."""
    flags = []
    for name, value in values.items():
        if name not in names or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, tuple):  # a list of numbers, e.g. --ranking-ks 10 20
            flags.extend([flag, *(str(v) for v in value)])
        else:
            flags.extend([flag, str(value)])
    return flags
