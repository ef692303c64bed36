"""The one entry of a rank: training or evaluation, in one process or under torchrun.

    python -m trainer SHARDS_DIR --out RUN_DIR [flags]                 # one process
    torchrun --nproc-per-node=2 -m trainer SHARDS_DIR --out RUN_DIR    # two ranks
    torchrun --nproc-per-node=2 -m trainer --job JOB.json              # what `shardmf` starts

`run_job` is what every path runs: ``shardmf train`` and the estimator call it in their
own process for one rank, and torchrun's ranks reach it through `main`, which adds what a
process of its own needs: flags or a job file, logging, signals, one line per error.
A job (`TrainJob`, `EvaluateJob`) carries its whole, already checked config: the
launcher builds and checks it once and hands it to the ranks as a JSON file.

Rank 0 holds the run folder (trainer.run_files.claim_run_folder) from before training to
after clustering. Under torchrun a rank ends with its launcher (PR_SET_PDEATHSIG), and
SIGTERM or Ctrl-C unwind it (temporary files removed) before it dies of that signal.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from shardmf.errors import InputError, Terminated, raise_terminated
from shardmf.flags import apply_config_file, as_flags
from trainer.config import RUN_CONFIGS, RankingConfig, RunConfig, TrainConfig
from trainer.distributed import (
    DistEnv,
    init_distributed,
    keep_freed_memory,
    on_main_then_broadcast,
    teardown,
)
from trainer.flags import add_cluster_arguments, add_train_arguments
from trainer.run_files import claim_run_folder

log = logging.getLogger("trainer")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LOST_PEER_GRACE_S = 5.0  # far above torchrun's 0.1 s monitor interval
QUIET_ENV = "SHARDMF_QUIET"  # "1": rank 0 prints no progress either (warnings and errors only)


@dataclass(frozen=True)
class TrainJob:
    """Train, then (rank 0) cluster the item embeddings when ``config.cluster`` is set."""

    config: RunConfig
    shards_verified: bool = False  # the launcher checked the shards just now: ranks trust them


@dataclass(frozen=True)
class EvaluateJob:
    """Ranking figures of a finished run (`trainer.run.evaluate_run`)."""

    run_dir: str
    ks: tuple[int, ...] = RankingConfig.ranking_ks
    threshold: float | None = None  # None: from the run's rating scale
    min_item_ratings: int = 0
    max_users: int = RankingConfig.ranking_users
    shards: str | None = None  # where the run's shards are now (None: where it knows)


Job = TrainJob | EvaluateJob


def run_job(job: Job) -> dict:
    """Join the ranks, do the job, leave; returns the job's figures (on every rank).

    Torch's thread count is set for the job and restored after, so a process that calls
    this (the estimator's) keeps its own.
    """
    threads = torch.get_num_threads()
    train_config = job.config.train if isinstance(job, TrainJob) else TrainConfig()
    env = init_distributed(train_config.device, train_config.backend, train_config.timeout_s)
    try:
        torch.set_num_threads(train_config.threads or max(
            1, (os.cpu_count() or 1) // env.local_world_size))
        if isinstance(job, EvaluateJob):
            from trainer.run import evaluate_run

            return evaluate_run(job.run_dir, job.ks, job.threshold, job.min_item_ratings,
                                job.max_users, env=env, shards=job.shards)
        return _train(job, env)
    finally:
        teardown()  # (idempotent: training leaves the group before rank 0 clusters)
        torch.set_num_threads(threads)


def _train(job: TrainJob, env: DistEnv) -> dict:
    from trainer.train import train

    config = job.config
    with contextlib.ExitStack() as claim:
        try:
            claim.enter_context(claimed_run(Path(config.run_dir), config.train, env))
            keep_freed_memory()
            metrics = train(config, env, shards_verified=job.shards_verified)
        finally:
            teardown()
        if env.is_main and config.cluster is not None:
            # Imported here: scikit-learn and matplotlib take ~2 s to import, which only
            # rank 0 needs, and only once training is over.
            from trainer.analysis import cluster_run

            cluster_run(config.run_dir, config.cluster)
    return metrics


@contextlib.contextmanager
def claimed_run(run: Path, config: TrainConfig, env: DistEnv) -> Iterator[None]:
    """Rank 0 claims RUN_DIR for the block; every rank learns whether it could, so a
    refused run ends every rank with the same one-line error."""
    with contextlib.ExitStack() as held:
        refusal = None
        if env.is_main:
            try:
                held.enter_context(claim_run_folder(run, config.resume, config.overwrite,
                                                    restarted=env.restart_count > 0))
            except InputError as e:
                refusal = str(e)
        refusal = on_main_then_broadcast(lambda: refusal, env)
        if refusal is not None:
            raise InputError(refusal)
        yield


# ---------------------------------------------------------------- job files


def write_job(job: Job, path: Path) -> None:
    """The job as JSON, for ranks started by torchrun (`read_job`)."""
    if isinstance(job, TrainJob):
        payload = {"kind": "train", "config": job.config.to_dict(),
                   "shards_verified": job.shards_verified}
    else:
        payload = {"kind": "evaluate", **asdict(job)}
    path.write_text(json.dumps(payload))


def read_job(path: str | Path) -> Job:
    try:
        payload = json.loads(Path(path).read_text())
        if payload["kind"] == "train":
            return TrainJob(RunConfig.from_dict(payload["config"]), payload["shards_verified"])
        fields = {k: v for k, v in payload.items() if k != "kind"}
        return EvaluateJob(**{**fields, "ks": tuple(fields["ks"])})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"job file {path}: not a job shardmf wrote ({e}); start ranks with "
                         "`shardmf train` or `python -m trainer SHARDS_DIR --out RUN_DIR`") from e


# ---------------------------------------------------------------- a process of its own


def build_parser(prog: str = "python -m trainer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a biased matrix factorisation on SHARDS_DIR with "
        "torch.distributed (run under torchrun for several ranks), then cluster the items.")
    add_train_arguments(parser)
    add_cluster_arguments(parser)
    return parser


def parse_job(argv: list[str]) -> tuple[Job, bool]:
    """(the job, --debug) from ``--job FILE`` or from training flags."""
    if argv[:1] == ["--job"] and len(argv) == 2:
        return read_job(argv[1]), False
    values = apply_config_file(vars(build_parser().parse_args(argv)), RUN_CONFIGS)
    debug = values.pop("debug", False)
    try:
        config = RunConfig.from_values(values["shards_dir"], values["out"], values)
    except ValueError as e:  # a bad flag: the same on every rank
        raise InputError(str(e)) from e
    return TrainJob(config), debug


@record
def main(argv: list[str] | None = None) -> int:
    """A rank as a process of its own (torchrun's, or ``python -m trainer``)."""
    argv = sys.argv[1:] if argv is None else argv
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if under_torchrun:
        _end_with_parent()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)
    rank = int(os.environ.get("RANK", 0))
    debug = "--debug" in argv
    try:
        job, debug = parse_job(argv)
    except InputError as e:
        return fail(e, rank)
    configure_logging(rank)
    try:
        try:
            with logging_redirect_tqdm():  # log lines above rank 0's progress bar, never on it
                run_job(job)
                return 0
        except RuntimeError as e:
            if under_torchrun and _timed_out(e):
                # A peer that is stopped or hung: this rank's collective waited `timeout_s`.
                print(f"shardmf: error: rank {rank}: no answer from another rank within the "
                      "collective timeout (--timeout-s); a rank was stopped, hung or "
                      "overloaded, so the job stops (--resume continues from its last "
                      "checkpoint)", file=sys.stderr)
                return 1
            if not (under_torchrun and _lost_peer(e)):
                raise
            # torchrun stops the other ranks within its monitor interval (0.1 s) once one
            # fails: a rank that merely lost that one dies quietly of the SIGTERM while it
            # waits here. Only one left running says what happened to it.
            time.sleep(LOST_PEER_GRACE_S)
            print(f"shardmf: error: rank {rank}: lost contact with another rank, which "
                  f"failed or was stopped ({str(e).splitlines()[0][:200]})", file=sys.stderr)
            return 1
    except ValueError as e:  # InputError, or a config's ValueError
        if debug:
            raise
        return fail(e, rank)
    except KeyboardInterrupt as e:
        if not under_torchrun:
            raise
        # Cleaned up; now die of the signal, so torchrun counts this rank as stopped by it
        # rather than failed, and no traceback is printed.
        number = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        raise


def _lost_peer(error: RuntimeError) -> bool:
    """gloo's error when another rank's connection closes (that rank is the cause)."""
    text = str(error)
    return any(sign in text for sign in ("Connection closed by peer",
                                         "Connection reset by peer", "Broken pipe"))


def _timed_out(error: RuntimeError) -> bool:
    """gloo's error when a collective waited longer than the process group's timeout."""
    return "Timed out waiting" in str(error)


def _end_with_parent() -> None:
    """Ask Linux to SIGTERM this rank when its launcher dies, even of SIGKILL.

    Without it the ranks of a killed `shardmf train` live on, reparented, still writing
    the run folder. The signal comes when the parent's thread that started this process
    exits; torchrun starts ranks from its main thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this rank would outlive "
                    "its launcher", ctypes.get_errno())
    elif os.getppid() == 1:  # the launcher died before the request took effect
        raise Terminated()


def configure_logging(rank: int) -> None:
    """Rank 0 at INFO, the others at WARNING; every rank at WARNING under QUIET_ENV (set by
    the estimator's ``verbose=False`` for the ranks it starts)."""
    quiet = rank != 0 or os.environ.get(QUIET_ENV) == "1"
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(message)s", stream=sys.stderr, force=True)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def fail(error: Exception, rank: int) -> int:
    """An InputError is the same on every rank (flags, manifest, checkpoint): rank 0 prints
    the one line. Another ValueError may hit one rank alone (pyarrow on a damaged row group),
    so whichever rank meets it says so: a silent rank would leave nothing to read."""
    if rank == 0 or not isinstance(error, InputError):
        where = f"rank {rank}: " if rank else ""
        names = {"out", *(f.name for cls in RUN_CONFIGS for f in dataclasses.fields(cls))}
        text = as_flags(str(error), names)  # a rank's process is started with flags
        tqdm.write(f"shardmf: error: {where}{text}", file=sys.stderr)  # a line of its own
    return 2
