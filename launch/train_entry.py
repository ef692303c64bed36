"""The training entry point, unchanged under one process or torchrun.

    python -m trainer SHARDS_DIR --out RUN_DIR                        # one process
    torchrun --nproc-per-node=2 -m trainer SHARDS_DIR --out RUN_DIR   # two ranks

Rank 0 logs and writes; the others stay quiet unless they fail. After training every
rank leaves the process group and rank 0 alone clusters the item embeddings.
``trainer/__main__.py`` calls `main` here: the flags are built by ``launch.options``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from launch.options import add_cluster_arguments, add_train_arguments, apply_config_file
from trainer.config import (
    RUN_CONFIGS,
    ModelConfig,
    OptimConfig,
    RankingConfig,
    TrainConfig,
    config_from_values,
    post_step_config,
)
from trainer.distributed import init_distributed, keep_freed_memory, teardown
from trainer.errors import InputError
from trainer.post_step import cluster_run
from trainer.train import train

log = logging.getLogger("trainer")


def build_parser(prog: str = "python -m trainer") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a biased matrix factorisation on SHARDS_DIR with "
        "torch.distributed (run under torchrun for several ranks), then cluster the items.")
    add_train_arguments(parser)
    add_cluster_arguments(parser)
    return parser


@record
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    rank = int(os.environ.get("RANK", 0))
    try:
        values = apply_config_file(vars(parser.parse_args(argv)), RUN_CONFIGS)
    except InputError as e:
        return _fail(e, rank)
    debug = values.pop("debug", False)
    configure_logging(rank)
    try:
        with logging_redirect_tqdm():  # log lines above rank 0's progress bar, never on it
            return _run(values, rank)
    except (InputError, ValueError) as e:
        if debug:
            raise
        return _fail(e, rank)


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
    try:
        torch.set_num_threads(train_config.threads or max(
            1, (os.cpu_count() or 1) // env.local_world_size))
        keep_freed_memory()
        train(values["shards_dir"], values["out"], model_config, optim_config, train_config,
              env, extra_config={"cluster": vars(post) if post else None},
              ranking_config=ranking_config)
    finally:
        teardown()
    if env.is_main and post is not None:
        cluster_run(values["out"], post)
    return 0


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
