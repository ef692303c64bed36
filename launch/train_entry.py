"""The ranks' entry points (training, and evaluation), unchanged under one process or torchrun.

    python -m trainer SHARDS_DIR --out RUN_DIR                        # one process
    torchrun --nproc-per-node=2 -m trainer SHARDS_DIR --out RUN_DIR   # two ranks
    torchrun --nproc-per-node=2 -m launch.evaluate_entry RUN_DIR      # `evaluate --nproc 2`

Rank 0 logs and writes; the others stay quiet unless they fail. After training every
rank leaves the process group and rank 0 alone clusters the item embeddings. Rank 0 holds
the run folder (trainer.run_files.claim_run_folder) from before training to after
clustering. Under torchrun a rank ends with its launcher (PR_SET_PDEATHSIG), and SIGTERM
or Ctrl-C unwind it (temporary files removed) before it dies of that signal, quietly.
``trainer/__main__.py`` calls `main` here: the flags are built by ``launch.options``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from launch.options import (
    add_cluster_arguments,
    add_evaluate_arguments,
    add_train_arguments,
    apply_config_file,
)
from shardmf.errors import InputError
from trainer.config import (
    RUN_CONFIGS,
    ModelConfig,
    OptimConfig,
    RankingConfig,
    TrainConfig,
    config_from_values,
    post_step_config,
)
from trainer.distributed import (
    DistEnv,
    init_distributed,
    keep_freed_memory,
    on_main_then_broadcast,
    teardown,
)
from trainer.run import evaluate_run
from trainer.run_files import claim_run_folder
from trainer.train import train

log = logging.getLogger("trainer")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
LOST_PEER_GRACE_S = 5.0  # far above torchrun's 0.1 s monitor interval


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so cleanup runs as it does for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def build_parser(prog: str = "python -m trainer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a biased matrix factorisation on SHARDS_DIR with "
        "torch.distributed (run under torchrun for several ranks), then cluster the items.")
    add_train_arguments(parser)
    add_cluster_arguments(parser)
    return parser


@record
def main(argv: list[str] | None = None) -> int:
    return _as_rank(lambda: apply_config_file(vars(build_parser().parse_args(argv)),
                                              RUN_CONFIGS), _run)


def build_evaluate_parser(prog: str = "python -m launch.evaluate_entry"
                          ) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="One rank of `shardmf evaluate --nproc N`: ranking figures of "
        "a finished run, each rank scoring its share of the users (run under torchrun).")
    add_evaluate_arguments(parser)
    return parser


@record
def evaluate_main(argv: list[str] | None = None) -> int:
    """One rank of `shardmf evaluate` (in the launcher's process when there is one rank)."""
    return _as_rank(lambda: vars(build_evaluate_parser().parse_args(argv)), _evaluate)


def _as_rank(parse: Callable[[], dict], work: Callable[[dict, int], int]) -> int:
    """Parse, then ``work(values, rank)``, with what every rank needs around it: ending with
    the launcher, SIGTERM as Ctrl-C, one line per error, quiet deaths by signal."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if under_torchrun:
        _end_with_parent()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    rank = int(os.environ.get("RANK", 0))
    try:
        values = parse()
    except InputError as e:
        return _fail(e, rank)
    debug = values.pop("debug", False)
    configure_logging(rank)
    try:
        try:
            with logging_redirect_tqdm():  # log lines above rank 0's progress bar, never on it
                return work(values, rank)
        except RuntimeError as e:
            if not (under_torchrun and _lost_peer(e)):
                raise
            # torchrun stops the other ranks within its monitor interval (0.1 s) once one
            # fails: a rank that merely lost that one dies quietly of the SIGTERM while it
            # waits here. Only one left running says what happened to it.
            time.sleep(LOST_PEER_GRACE_S)
            print(f"shardmf: error: rank {rank}: lost contact with another rank, which "
                  f"failed or was stopped ({str(e).splitlines()[0][:200]})", file=sys.stderr)
            return 1
    except (InputError, ValueError) as e:
        if debug:
            raise
        return _fail(e, rank)
    except KeyboardInterrupt as e:
        if not under_torchrun:
            raise  # in the launcher's own process: it prints the one line
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


def _run(values: dict, rank: int) -> int:
    try:
        model_config = config_from_values(ModelConfig, values)
        optim_config = config_from_values(OptimConfig, values)
        train_config = config_from_values(TrainConfig, values)
        ranking_config = config_from_values(RankingConfig, values)
        post = post_step_config(values)
    except ValueError as e:  # a bad flag: the same on every rank
        raise InputError(str(e)) from e
    env = init_distributed(train_config.device, train_config.backend, train_config.timeout_s)
    with contextlib.ExitStack() as claim:
        try:
            claim.enter_context(claimed_run(Path(values["out"]), train_config, env))
            torch.set_num_threads(train_config.threads or max(
                1, (os.cpu_count() or 1) // env.local_world_size))
            keep_freed_memory()
            train(values["shards_dir"], values["out"], model_config, optim_config,
                  train_config, env, extra_config={"cluster": vars(post) if post else None},
                  ranking_config=ranking_config)
        finally:
            teardown()
        if env.is_main and post is not None:
            # Imported here: scikit-learn and matplotlib take ~2 s to import, which only
            # rank 0 needs, and only once training is over.
            from trainer.analysis import cluster_run

            cluster_run(values["out"], post)
    return 0


def _evaluate(values: dict, rank: int) -> int:
    env = init_distributed(timeout_s=TrainConfig.timeout_s)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
        evaluate_run(values["run_dir"], tuple(values["k"]), values["threshold"],
                     values["min_item_ratings"], values["users"], env=env)
    finally:
        teardown()
    return 0


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


def configure_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stderr, force=True)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")


def _fail(error: Exception, rank: int) -> int:
    """An InputError is the same on every rank (flags, manifest, checkpoint): rank 0 prints
    the one line. Another ValueError may hit one rank alone (pyarrow on a damaged row group),
    so whichever rank meets it says so: a silent rank would leave nothing to read."""
    if rank == 0 or not isinstance(error, InputError):
        where = f"rank {rank}: " if rank else ""
        tqdm.write(f"shardmf: error: {where}{error}", file=sys.stderr)  # a line of its own
    return 2
