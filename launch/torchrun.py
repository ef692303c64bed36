"""Start training or evaluation: in this process for one rank, or with torchrun for several.

Every rank runs `trainer.entry.run_job` on one job whose config was built and checked
here, once: this process calls it for one rank, and torchrun's ranks read it from a job
file (``torchrun --nproc-per-node=N -m trainer --job FILE``; ``-m trainer SHARDS_DIR
--out RUN_DIR`` with flags does the same by hand). The shards are checked here, once,
before any rank starts, so a bad shard is one message, not one per rank; a failed rank
gets a short report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shardmf.errors import InputError, Terminated
from shardmf.flags import add_config_arguments
from trainer.config import RunConfig, config_from_values
from trainer.defaults import RATINGS_PER_RANK_TO_PAY, ranks_that_pay
from trainer.run_files import precheck_run_target

if TYPE_CHECKING:
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

    from trainer.entry import EvaluateJob, TrainJob

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"
LOOPBACK_RENDEZVOUS = "shardmf-loopback"  # a single-node job's rendezvous backend


@dataclass(frozen=True, kw_only=True)
class TorchrunOptions:
    """Where the ranks run: N processes on this node, on one or several nodes."""

    nproc: int | str = field(default="auto", metadata={
        "help": "training processes on this node (ranks); auto: one per core (per GPU on "
        "cuda) where each trains at least "
        f"{RATINGS_PER_RANK_TO_PAY:,} ratings, else one process"})
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
        if self.nproc != "auto" and (isinstance(self.nproc, bool) or not isinstance(
                self.nproc, int) or self.nproc < 1):
            raise ValueError(f"--nproc {self.nproc}: expected a whole number of at least 1, "
                             "or auto")
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


def launch_training(config: RunConfig, options: TorchrunOptions) -> int:
    """Check, then train on all ranks; returns the exit status (2 for a user error)."""
    from trainer.entry import TrainJob
    from trainer.shards import open_shards

    shards = open_shards(config.shards_dir, config.train.verify)
    if options.nproc == "auto":
        options = dataclasses.replace(options, nproc=_auto_ranks(shards.rows("train"),
                                                                 config.train.device))
    if options.nnodes == 1 and len(shards.pieces("train")) < options.nproc:
        raise InputError(f"{config.shards_dir}: {len(shards.pieces('train'))} training row "
                         f"groups for --nproc {options.nproc}; prepare with more "
                         "--num-shards or use fewer processes")
    precheck_run_target(Path(config.run_dir), config.train.resume, config.train.overwrite)
    return _start(TrainJob(config, shards_verified=True), options, "training")


def _auto_ranks(train_ratings: int, device: str) -> int:
    """--nproc auto on this node: `trainer.defaults.ranks_that_pay` over its cores, or its
    GPUs when the ranks run on cuda; said in one line."""
    import torch

    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    slots = gpus or len(os.sched_getaffinity(0))
    ranks = ranks_that_pay(train_ratings, slots)
    log.info("--nproc auto: %d rank(s) for %s training ratings on %d %s", ranks,
             f"{train_ratings:,}", slots, "GPU(s)" if gpus else "core(s)")
    return ranks


def launch_evaluation(job: EvaluateJob, options: TorchrunOptions) -> int:
    """`shardmf evaluate`: ranking figures of a finished run, computed by ``options.nproc``
    local ranks (each scores its share of the users, as at the end of training) and merged
    into RUN_DIR/metrics.json by rank 0; returns the exit status (2 for a user error)."""
    return _start(job, options, "evaluation")


def _start(job: TrainJob | EvaluateJob, options: TorchrunOptions, what: str) -> int:
    """The job in this process for one local rank, else on torchrun's ranks."""
    from trainer.entry import run_job, write_job

    if options.nproc == 1 and options.nnodes == 1:
        run_job(job)
        return 0
    with tempfile.TemporaryDirectory(prefix="shardmf-job-") as folder:
        path = Path(folder) / "job.json"
        write_job(job, path)
        # Ranks take seconds to start (each imports torch and joins the group): say so.
        log.info("starting %d processes per node for %s (torchrun)...", options.nproc,
                 what)
        return _torchrun(["--job", str(path)], options, what)


def loopback_rendezvous(params: RendezvousParameters) -> RendezvousHandler:
    """torchrun's c10d rendezvous for one node, with its stores listening on loopback only.

    torch's TCPStore binds every interface for the address it is given; it listens on a
    socket of ours (``master_listen_fd``) instead. The handler's store server for the
    ranks is made the same way (`DynamicRendezvousHandler._create_tcp_store_server`, the
    one place it is created).
    """
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import (
        C10dRendezvousBackend,
    )
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        DynamicRendezvousHandler,
    )

    class LoopbackHandler(DynamicRendezvousHandler):
        def get_backend(self) -> str:
            return LOOPBACK_RENDEZVOUS

        def _create_tcp_store_server(self, master_addr: str, master_port: int) -> TCPStore:
            return loopback_store()

    store = loopback_store()
    return LoopbackHandler.from_backend(params.run_id, store,
                                        C10dRendezvousBackend(store, params.run_id),
                                        params.min_nodes, params.max_nodes,
                                        local_addr=LOOPBACK)


def loopback_store() -> TCPStore:
    """A TCPStore server on a free loopback port, unreachable from other machines."""
    from torch.distributed import TCPStore

    listener = socket.create_server((LOOPBACK, 0), backlog=socket.SOMAXCONN)
    port = listener.getsockname()[1]
    return TCPStore(LOOPBACK, port, is_master=True, multi_tenant=True,
                    wait_for_workers=False, master_listen_fd=listener.detach())


def _torchrun(module_args: list[str], options: TorchrunOptions, what: str) -> int:
    """Run ``python -m trainer module_args`` on every rank; ``what`` names it in errors."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.run import parse_args, run

    if options.nnodes == 1 and not options.rdzv_endpoint:
        # A job of this node alone: its stores listen on loopback (torchrun's --standalone
        # listens on every interface). Given an endpoint, the nodes meet there instead.
        rendezvous_handler_registry.register(LOOPBACK_RENDEZVOUS, loopback_rendezvous)
        where = [f"--rdzv-backend={LOOPBACK_RENDEZVOUS}", f"--rdzv-endpoint={LOOPBACK}:0",
                 f"--rdzv-id={uuid.uuid4().hex}"]
    else:
        where = ["--rdzv-backend=c10d", f"--rdzv-endpoint={options.rdzv_endpoint}",
                 f"--rdzv-id={options.rdzv_id}"]
    args = [f"--nnodes={options.nnodes}", f"--nproc-per-node={options.nproc}", *where,
            f"--max-restarts={options.max_restarts}", "--module", "trainer", *module_args]
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
