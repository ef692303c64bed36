"""The ``shardmf`` command line: a thin layer that parses flags and calls the packages' APIs.

    shardmf prepare INPUT... --out SHARDS_DIR     ratings -> Parquet shards (Dask)
    shardmf train SHARDS_DIR --out RUN_DIR --nproc N   torchrun N ranks, then clusters
    shardmf cluster RUN_DIR                       re-run the rank-0 post-step alone
    shardmf run INPUT... --out RUN_DIR            prepare, train and cluster in one go
    shardmf verify SHARDS_DIR [--full]            check the shard files against the manifest
    shardmf export-split SHARDS_DIR --out DIR     the splits as TSV, for other tools
    shardmf evaluate RUN_DIR [--k 10 20]          ranking figures vs most-popular
    shardmf recommend | similar | export RUN_DIR  use a trained run
    shardmf synth --out RAW_DIR                   a rating set with planted genres
    shardmf demo                                  synth -> run on 2 processes, with figures

User errors print one line and exit 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from data_shards.config import PrepareConfig, SourceOptions, SynthConfig
from data_shards.movielens import RELEASES, fetch_movielens, movielens_path
from launch.dask_cluster import dask_client
from launch.torchrun import (
    TorchrunOptions,
    add_launch_arguments,
    launch_evaluation,
    launch_training,
)
from shardmf.errors import Terminated, raise_terminated
from shardmf.flags import add_config_arguments, apply_config_file, as_flags, positive_int
from shardmf.outputs import no_interrupts, shardmf_version
from trainer.config import (
    EXPORT_FORMATS,
    MIN_ITEM_RATINGS,
    RUN_CONFIGS,
    RankingConfig,
    RunConfig,
    config_from_values,
    post_step_config,
)
from trainer.flags import (
    add_cluster_arguments,
    add_train_arguments,
    add_training_config_arguments,
)
from trainer.run_files import (
    CLUSTERS,
    CONFIG,
    FINAL_METRICS,
    REPORT_HTML,
    REPORT_MD,
    SHARDS_DIR,
    read_json,
    run_seed,
)

log = logging.getLogger("shardmf")
EXIT_USAGE = 2
# Commands that draw progress bars: their log lines are routed above the bars.
PROGRESS_BAR_COMMANDS = ("prepare", "train", "cluster", "run", "synth", "demo", "evaluate")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), "")
    debug = "--debug" in argv
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)  # unwind and clean up, as Ctrl-C
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        values = vars(build_parser().parse_args(argv))
        handler = values.pop("handler")
        if not values.pop("progress_bars"):
            return handler(values)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines above the progress bar, never on it
            return handler(values)
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        resumable = (" (a run keeps its last checkpoint: --resume continues it)"
                     if command in ("train", "run") else "")
        with no_interrupts():  # a repeated signal must not turn this line into a traceback
            print_error(f"shardmf: {stopped}; nothing half-written was kept{resumable}")
        return 143 if isinstance(e, Terminated) else 130
    except ValueError as e:  # InputError of either package, or a config's ValueError
        if debug:
            raise
        print_error(f"shardmf: error: {as_flags(str(e), flag_names())}")
        return EXIT_USAGE
    except RuntimeError as e:  # a rank failed; its own error is already on stderr
        if debug:
            raise
        print_error(f"shardmf: error: {e}")
        return 1


def flag_names() -> set[str]:
    """Every config field that is a flag of some command (the library names fields)."""
    configs = (*RUN_CONFIGS, PrepareConfig, SourceOptions, SynthConfig, TorchrunOptions)
    return {f.name for cls in configs for f in dataclasses.fields(cls)} | {
        "out", "val_input", "test_input", "movielens", "movielens_path", "title", "shards"}


def print_error(text: str) -> None:
    """``text`` on stderr on a line of its own: a live progress bar is cleared first."""
    tqdm = sys.modules.get("tqdm")  # no progress bar can exist before tqdm is imported
    if tqdm is None:
        print(text, file=sys.stderr)
    else:
        tqdm.tqdm.write(text, file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """Every command with its flags; only light modules are imported to build them.

    The flags come from the configs' field metadata (``trainer.config``,
    ``data_shards.config``), which import nothing heavy: ``--help`` and the small commands
    never load Dask, torch, scikit-learn or matplotlib (tests/test_cli.py checks it).
    """
    parser = argparse.ArgumentParser(
        prog="shardmf", description="Matrix factorisation on rating sets too large for one "
        "process: Dask shards, torch.distributed training, item clusters.")
    parser.add_argument("--version", action="version", version=f"shardmf {shardmf_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler, progress_bars=name in PROGRESS_BAR_COMMANDS)
        return sub

    prepare = command("prepare", _prepare, "Read ratings with Dask, validate them, encode "
                      "ids, split train/val/test and write Parquet shards plus a manifest.")
    prepare.add_argument("inputs", nargs="*", metavar="INPUT",
                         help="ratings files, folders, globs or fsspec URLs (or --movielens)")
    prepare.add_argument("--out", required=True, metavar="SHARDS_DIR",
                         help="folder for the shards and manifest.json (must not exist, or "
                         "be empty, unless --overwrite)")
    _add_prepare_arguments(prepare)

    verify = command("verify", _verify, "Check the manifest against itself and every "
                     "shard file against the manifest: sizes, rows, row groups, id ranges "
                     "and SHA-256 of every byte (with --full also page checksums and every "
                     "value).")
    verify.add_argument("shards_dir", metavar="SHARDS_DIR", help="output of `shardmf prepare`")
    verify.add_argument("--full", action="store_true",
                        help="also decode every page (checksums verified) and check values")
    verify.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    export_split = command("export-split", _export_split, "Write the train/val/test splits "
                           "of SHARDS_DIR back as TSV with original ids, for other tools.")
    export_split.add_argument("shards_dir", metavar="SHARDS_DIR",
                              help="output of `shardmf prepare`")
    export_split.add_argument("--out", required=True, metavar="DIR",
                              help="folder for train.tsv, val.tsv and test.tsv")
    export_split.add_argument("--overwrite", action="store_true",
                              help="replace DIR if it is an earlier export-split")
    export_split.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    train = command("train", _train, "Train on shards with torchrun (N local processes, or "
                    "several nodes), then cluster the item embeddings on rank 0.")
    add_train_arguments(train)
    add_cluster_arguments(train)
    add_launch_arguments(train)

    cluster = command("cluster", _cluster, "Re-run the rank-0 post-step on a finished run: "
                      "K-Means on item embeddings, scores against genres, report.")
    cluster.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    cluster.add_argument("--seed", type=int, default=argparse.SUPPRESS, metavar="N",
                         help="K-Means and baseline seed (default: the run's)")
    add_cluster_arguments(cluster, skippable=False)
    cluster.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    run = command("run", _run, "Prepare, train and cluster in one go: INPUT -> "
                  "RUN_DIR/shards -> RUN_DIR.")
    run.add_argument("inputs", nargs="*", metavar="INPUT",
                     help="ratings files, folders, globs or fsspec URLs (or --movielens)")
    run.add_argument("--out", required=True, metavar="RUN_DIR",
                     help="run folder: shards (RUN_DIR/shards), config, metrics, checkpoint, "
                     "model, clusters, reports")
    run.add_argument("--config", metavar="FILE.toml", help="TOML file whose keys are this "
                     "command's flags (snake or kebab case; nproc and the other launch flags "
                     "included, but not --config, --out or the inputs); flags given here win")
    run.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    _add_prepare_arguments(run)
    add_training_config_arguments(run)
    add_cluster_arguments(run)
    add_launch_arguments(run)

    synth = command("synth", _synth, "Generate a MovieLens-shaped rating set with planted "
                    "genres (Parquet ratings, items.csv), deterministic for a seed.")
    synth.add_argument("--out", required=True, metavar="RAW_DIR",
                       help="folder for the ratings (Parquet), items.csv and synth.json")
    synth.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    add_config_arguments(synth, SynthConfig, title="synthetic data")
    _add_dask_arguments(synth)

    evaluate = command("evaluate", _evaluate, "Ranking figures of a finished run on its test "
                       "split (precision, recall, NDCG, MAP, hit rate, coverage at k) beside "
                       f"a most-popular baseline; merged into RUN_DIR/{FINAL_METRICS}. Needs "
                       "the run's shards.")
    add_evaluate_arguments(evaluate)
    evaluate.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                          help="local processes (ranks) that share the users, as in training "
                          "(default: 1, this process)")
    evaluate.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    recommend = command("recommend", _recommend, "A user's top items: by the ranking "
                        "tables when the run trained them, else by predicted rating "
                        "(original ids; seen items excluded).")
    recommend.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    recommend.add_argument("--user", required=True, metavar="ID", help="original user id")
    recommend.add_argument("-n", type=positive_int, default=10, metavar="N",
                           help="how many items (default: 10)")
    recommend.add_argument("--include-seen", action="store_true",
                           help="keep items the user rated in training (the shards are not "
                           "needed then)")
    _add_shards_argument(recommend)
    recommend.add_argument("--min-item-ratings", type=int, default=MIN_ITEM_RATINGS,
                           metavar="N", help="leave out items with fewer training ratings "
                           f"(default: {MIN_ITEM_RATINGS})")
    recommend.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    similar = command("similar", _similar, "Items whose embeddings point the same way as "
                      "one item's (cosine similarity).")
    similar.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    which = similar.add_mutually_exclusive_group(required=True)
    which.add_argument("--item", metavar="ID", help="original item id")
    which.add_argument("--title", metavar="WORDS",
                       help="title text (exact, else the most-rated containing it)")
    similar.add_argument("-n", type=positive_int, default=10, metavar="N",
                         help="how many items (default: 10)")
    similar.add_argument("--min-item-ratings", type=int, default=MIN_ITEM_RATINGS,
                         metavar="N", help="leave out items with fewer training ratings "
                         f"(default: {MIN_ITEM_RATINGS})")
    similar.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    export = command("export", _export, "Write a run's user and item embeddings with their "
                     "original ids, for other tools.")
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="parquet",
                        help="parquet: one table per side; npy: arrays plus id tables")
    export.add_argument("--out", metavar="DIR", help="folder for the files (default: "
                        "RUN_DIR/export for parquet, RUN_DIR/export-npy for npy)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it holds an earlier export")
    export.add_argument("--debug", action="store_true", help="show tracebacks of errors")

    demo = command("demo", _demo, "The whole pipeline on a synthetic set with planted genres, "
                   "on 2 processes; prints test RMSE against a bias-only baseline and NMI.")
    demo.add_argument("--out", default="demo-run", metavar="DIR",
                      help="folder for the raw data, shards and run (default: demo-run)")
    demo.add_argument("--nproc", type=positive_int, default=2, metavar="N",
                      help="training processes (default: 2)")
    demo.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `shardmf evaluate` (its ranks get an EvaluateJob, not flags)."""
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
    _add_shards_argument(parser)


def _add_shards_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", metavar="SHARDS_DIR",
                        help="the run's shards, when moved or restored elsewhere (checked "
                        "against the run; default: RUN_DIR/shards, else where training read "
                        "them)")


def _add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--val-input", nargs="+", default=[], metavar="FILE",
                        help="already-split validation ratings, used as given (same layout "
                        "and options as INPUT); INPUT then goes to train")
    inputs.add_argument("--test-input", nargs="+", default=[], metavar="FILE",
                        help="already-split test ratings, used as given")
    which = inputs.add_mutually_exclusive_group()
    which.add_argument("--movielens", choices=RELEASES, metavar="NAME",
                       help="a MovieLens release by name, downloaded once into $SHARDMF_CACHE "
                       f"(default ~/.cache/shardmf) and checked: {', '.join(RELEASES)}")
    which.add_argument("--movielens-path", metavar="ZIP|DIR",
                       help="a MovieLens release zip or extracted folder on disk")
    add_config_arguments(parser, SourceOptions, skip=("storage_options",),
                         title="input columns and parsing")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for URLs, repeatable (e.g. anon=true)")
    add_config_arguments(parser, PrepareConfig, title="shards")
    _add_dask_arguments(parser)
    if not any(a.dest == "debug" for a in parser._actions):
        parser.add_argument("--config", metavar="FILE.toml", help="TOML file with the same "
                            "keys as the flags (flags given here win)")
        parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")


def _add_dask_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("dask")
    group.add_argument("--dask-scheduler", metavar="ADDRESS", help="use a running Dask "
                       "cluster (tcp://host:8786); default: the local threaded scheduler")
    group.add_argument("--workers", type=int, metavar="N", help="start a local Dask "
                       "cluster of N worker processes instead of threads")


# ------------------------------------------------------------------ handlers


def _prepare(values: dict) -> int:
    values = apply_config_file(values, (PrepareConfig, SourceOptions))
    _prepare_from_values(values["inputs"], Path(values["out"]), values)
    return 0


def _prepare_from_values(inputs: list[str], out: Path, values: dict) -> dict:
    from data_shards.prepare import prepare

    storage = dict(_key_value(kv) for kv in values.get("storage_option", []))
    source = config_from_values(SourceOptions, {**values, "storage_options": storage})
    config = config_from_values(PrepareConfig, values)
    inputs = list(inputs)
    if values.get("movielens"):
        inputs.append(str(fetch_movielens(values["movielens"])))
    elif values.get("movielens_path"):
        inputs.append(str(movielens_path(values["movielens_path"])))
    if not inputs:
        raise ValueError("no input given: name ratings files or folders, or pass "
                         "--movielens NAME / --movielens-path ZIP")
    with dask_client(values.get("dask_scheduler"), values.get("workers")):
        manifest = prepare(inputs, out, config, source,
                           val_inputs=values.get("val_input") or None,
                           test_inputs=values.get("test_input") or None)
    counts = manifest["counts"]
    log.info("prepared %s: %d users, %d items, %s train %d / val %d / test %d, "
             "%d train shards, in %.1f s", out, counts["users"], counts["items"],
             manifest["kind"], counts["ratings"]["train"], counts["ratings"]["val"],
             counts["ratings"]["test"], manifest["partition"]["num_shards"],
             manifest["seconds"])
    return manifest


def _verify(values: dict) -> int:
    from data_shards.verify import verify_shards

    manifest = verify_shards(values["shards_dir"], full=values["full"])
    files = len(manifest.all_files())
    counts = manifest.split_rows
    checked = "sizes, rows, row groups, id ranges, sha256 of shards and id tables" + (
        ", page checksums, every value and the manifest's facts" if values["full"] else "")
    print(f"OK {values['shards_dir']}: the manifest adds up and {files} files match it "
          f"({checked}); {manifest.kind} train {counts['train']:,} / val {counts['val']:,} / "
          f"test {counts['test']:,}")
    return 0


def _export_split(values: dict) -> int:
    from data_shards.export import export_split

    written = export_split(values["shards_dir"], values["out"], values["overwrite"])
    log.info("wrote %s to %s", ", ".join(f"{s} {n}" for s, n in written.items()), values["out"])
    return 0


def _train(values: dict) -> int:
    values = apply_config_file(values, (*RUN_CONFIGS, TorchrunOptions))
    options = TorchrunOptions.from_values(values)
    return launch_training(RunConfig.from_values(values["shards_dir"], values["out"], values),
                           options)


def _cluster(values: dict) -> int:
    from trainer import cluster_run

    run_dir = Path(values["run_dir"])
    if "seed" not in values and (seed := run_seed(run_dir)) is not None:
        values["seed"] = seed
    config = post_step_config(values)
    if config is None:
        raise ValueError("--clusters 0 skips clustering; give --clusters K (2 or more) or "
                         "auto to cluster a finished run")
    cluster_run(run_dir, config)
    return 0


def _run(values: dict) -> int:
    values = apply_config_file(values, (PrepareConfig, SourceOptions, *RUN_CONFIGS,
                                        TorchrunOptions))
    out = Path(values["out"])
    shards = out / SHARDS_DIR
    config = RunConfig.from_values(str(shards), str(out), values)  # bad flags fail here
    options = TorchrunOptions.from_values(values)
    if not values.get("resume"):
        _prepare_from_values(values["inputs"], shards, values)
    return launch_training(config, options)


def _synth(values: dict) -> int:
    from data_shards.synth import synthesize

    with dask_client(values.get("dask_scheduler"), values.get("workers")):
        summary = synthesize(values["out"], config_from_values(SynthConfig, values))
    log.info("wrote %d ratings by %d users on %d items to %s", summary.num_ratings,
             summary.num_users, summary.num_items, summary.out_dir)
    return 0


def _demo(values: dict) -> int:
    from data_shards.prepare import prepare
    from data_shards.synth import synthesize
    from trainer.defaults import LARGE_SET

    out = Path(values["out"])
    started = time.perf_counter()
    _claim_demo_folder(out)
    raw, shards, run = out / "raw", out / "shards", out / "run"
    if (run / CONFIG).is_file():
        log.info("replacing the earlier demo run in %s", run)
    if not (raw / "synth.json").is_file():
        synthesize(raw, SynthConfig())
    with dask_client(None, None):
        prepare([str(raw)], shards, PrepareConfig(overwrite=True))
    # The large-set recipe, though the demo's 600k ratings are below its threshold: it
    # learns the planted world in ~18 epochs (test RMSE 0.517), where the small-set
    # recipe takes ~130 (0.511) and the demo over a minute. A second `make demo` replaces
    # the run, as it does the shards.
    config = RunConfig.from_values(str(shards), str(run), {**LARGE_SET, "overwrite": True})
    code = launch_training(config, TorchrunOptions(nproc=values["nproc"]))
    if code:
        return code
    metrics = json.loads((run / FINAL_METRICS).read_text())
    clusters = json.loads((run / CLUSTERS).read_text())
    nmi = clusters["scores"].get("nmi") or {}
    print(f"\nshardmf demo ({time.perf_counter() - started:.0f} s, "
          f"{metrics['world_size']} processes): {run}")
    print(f"  test RMSE {_with_error(metrics, 'test_rmse')}   bias-only baseline "
          f"{metrics['baseline_test_rmse']:.4f}")
    print(f"  test NDCG@10 {_with_error(metrics, 'ndcg@10')}, recall@10 "
          f"{_with_error(metrics, 'recall@10')}   most-popular {metrics['popular_ndcg@10']:.4f}, "
          f"{metrics['popular_recall@10']:.4f}")
    print(f"  item clusters vs planted genres: NMI {nmi.get('score', float('nan')):.3f} "
          f"(shuffled labels {nmi.get('baseline_mean', float('nan')):.3f})")
    print(f"  report: {run / REPORT_HTML} (and {REPORT_MD})")
    return 0


def _claim_demo_folder(out: Path) -> None:
    """The demo replaces its own raw data, shards and run on a second go, so it writes only
    into a folder it marked as a demo's (or an empty one), never over someone's run."""
    from shardmf.outputs import read_marker, refuse_files_on_the_way, write_marker

    refuse_files_on_the_way(out)
    marker = read_marker(out)
    if marker is not None and marker.get("kind") == "demo":
        return
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"out={out} is not empty and is not a folder `shardmf demo` made, so "
                         "the demo does not write into it (it would replace a run at "
                         f"{out / 'run'}); choose another `out` or remove it")
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "demo")


def _evaluate(values: dict) -> int:
    from trainer.entry import EvaluateJob
    from trainer.ranking import METRICS, POPULAR_PREFIX

    job = EvaluateJob(values["run_dir"], tuple(values["k"]), values["threshold"],
                      values["min_item_ratings"], values["users"], values["shards"])
    code = launch_evaluation(job, TorchrunOptions(nproc=values["nproc"]))
    if code:
        return code
    from trainer import load_run

    run = load_run(values["run_dir"])
    metrics = read_json(run.run_dir / FINAL_METRICS)
    threshold = metrics["ranking_threshold"]
    relevant = (f"a rating >= {threshold:g}" if run.kind == "ratings" else
                "a held-out interaction" if threshold <= run.scale[0] else
                f"a held-out interaction weighing >= {threshold:g}")
    print(f"ranking on the test split of {values['run_dir']} by the {run.tables} tables: "
          f"{metrics['ranking_users']:,} users with {relevant}")
    print(f"  {'metric':<14}{'model ± standard error':>24}{'most-popular':>24}")
    for k in sorted(set(values["k"])):
        for name in (*METRICS, "coverage"):  # coverage is of the catalogue: no mean, no error
            cells = [_with_error(metrics, f"{prefix}{name}@{k}")
                     for prefix in ("", POPULAR_PREFIX)]
            print(f"  {f'{name}@{k}':<14}{cells[0]:>24}{cells[1]:>24}")
    print(f"merged into {Path(values['run_dir']) / FINAL_METRICS}; `shardmf cluster "
          f"{values['run_dir']}` redraws the report with them")
    return 0


def _fixed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _with_error(metrics: dict, key: str) -> str:
    """``0.2513 ± 0.0103``: a mean over users with its standard error, when it has one."""
    from trainer.ranking import SE_SUFFIX

    error = metrics.get(key + SE_SUFFIX)
    return _fixed(metrics[key]) + (f" ± {error:.4f}" if error is not None else "")


def _recommend(values: dict) -> int:
    from trainer import load_run

    run = load_run(values["run_dir"], shards=values["shards"])
    top, scores = run.top_items(values["user"], values["n"],
                                exclude_seen=not values["include_seen"],
                                min_item_ratings=values["min_item_ratings"])
    if run.tables == "ranking":
        print(f"top {len(top)} for user {values['user']} (score of the ranking tables, "
              "higher is a likelier choice):")
        for item_id, score in zip(top, scores):
            print(f"  {f'score {score:.2f}':<14} {_label(run.item_fields(item_id))}")
        return 0
    low, high = run.scale
    clipped = bool((scores > high).any())
    note = (f"; ≥{high:.2f}: above the scale's top, with the unclipped score that orders "
            "them" if clipped else "")
    print(f"top {len(top)} for user {values['user']} (predicted rating{note}):")
    for item_id, score in zip(top, scores):
        rating = f"≥{high:.2f} ({score:.2f})" if score > high else f"{max(score, low):4.2f}"
        print(f"  {rating:<14} {_label(run.item_fields(item_id))}")
    return 0


def _similar(values: dict) -> int:
    from trainer import load_run

    run = load_run(values["run_dir"])
    item = values["item"] if values["item"] is not None else run.find_item(values["title"])
    print(f"items most similar to {_label(run.item_fields(run.item_id(item)))} "
          "(cosine similarity):")
    top, cosine = run.nearest_items(item, values["n"], values["min_item_ratings"])
    for item_id, similarity in zip(top, cosine):
        print(f"  {similarity:5.3f}  {_label(run.item_fields(item_id))}")
    return 0


def _label(item: dict) -> str:
    title, genres, original = item.get("title"), item.get("genres"), item["original_item_id"]
    genres = f"  [{genres.replace('|', ', ')}]" if isinstance(genres, str) else ""
    return f"{title} (id {original}){genres}" if title else f"item {original}{genres}"


def _export(values: dict) -> int:
    from trainer import export_run

    export_run(values["run_dir"], values["out"], values["format"], values["overwrite"])
    return 0


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--storage-option {text!r}: expected KEY=VALUE")
    lowered = value.lower()
    return key, {"true": True, "false": False}.get(lowered, value)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
