"""The trainer's flags: ``python -m trainer`` (the ranks' entry) and ``shardmf train``,
``run`` and ``evaluate`` build theirs here, from the configs' field metadata."""

from __future__ import annotations

import argparse

from shardmf.flags import add_config_arguments, positive_int
from trainer.config import TRAIN_CONFIGS, ClusterConfig, RankingConfig


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
                                          "ranking evaluation (test split, after training)")):
        add_config_arguments(parser, cls, title=title)


CLUSTER_SKIP = ("seed",)  # the post-step uses the run's --seed


def add_cluster_arguments(parser: argparse.ArgumentParser, skippable: bool = True) -> None:
    """The clustering flags of ``train``, ``run`` and ``cluster`` (no --seed of their own);
    ``skippable``: training, where ``--clusters 0`` leaves the post-step out."""
    add_config_arguments(parser, ClusterConfig, skip=CLUSTER_SKIP,
                         title="item clusters (--clusters 0 skips them)" if skippable
                         else "item clusters")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `shardmf evaluate`, which its ranks parse too (launch/train_entry.py)."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    default_ks = RankingConfig.ranking_ks
    parser.add_argument("--k", type=positive_int, nargs="+", default=list(default_ks),
                        metavar="K", help="list lengths (default: "
                        f"{' '.join(map(str, default_ks))})")
    parser.add_argument("--threshold", type=float, metavar="RATING",
                        help="a test rating at or above this is relevant (default: 75 %% "
                        "up the run's rating scale: 4 on 1-5, 3.875 on 0.5-5)")
    parser.add_argument("--min-item-ratings", type=int, default=0, metavar="N",
                        help="recommend only items with at least N training ratings, as "
                        "`recommend` does with 20 (default: 0, every item)")
    default_users = RankingConfig.ranking_users
    parser.add_argument("--users", type=int, default=default_users, metavar="N",
                        help="a seeded sample of about N test users, the same as training's "
                        f"(default: {default_users:,}; 0: every user)")
