"""The trainer's flags: ``python -m trainer`` (the ranks' entry) and ``shardmf train`` and
``run`` build theirs here, from the configs' field metadata."""

from __future__ import annotations

import argparse

from shardmf.flags import add_config_arguments
from trainer.config import TRAIN_CONFIGS, ClusterConfig


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a training run, shared by ``python -m trainer`` and ``shardmf train``."""
    parser.add_argument("shards_dir", metavar="SHARDS_DIR", help="output of `shardmf prepare`")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="run folder: config, metrics, checkpoint, model, clusters")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file whose keys are the "
                        "config flags (snake or kebab case; `shardmf train` also takes nproc "
                        "and the other launch flags); flags given here win")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    add_training_config_arguments(parser)


def add_training_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag group per config that training reads (TRAIN_CONFIGS)."""
    for cls, title in zip(TRAIN_CONFIGS, ("model", "optimizer", "training",
                                          "objective (ratings, rankings, or both)",
                                          "ranking evaluation (test split, after training)")):
        add_config_arguments(parser, cls, title=title)


CLUSTER_SKIP = ("seed",)  # the post-step uses the run's --seed


def add_cluster_arguments(parser: argparse.ArgumentParser, skippable: bool = True) -> None:
    """The clustering flags of ``train``, ``run`` and ``cluster`` (no --seed of their own);
    ``skippable``: training, where ``--clusters 0`` leaves the post-step out."""
    add_config_arguments(parser, ClusterConfig, skip=CLUSTER_SKIP,
                         title="item clusters (--clusters 0 skips them)" if skippable
                         else "item clusters")
