"""The run folder (RUN_DIR) contract: every file name, the one atomic writer, the readers.

Training writes ``config.json`` first, then ``metrics.jsonl`` (one record per epoch),
``checkpoint.pt`` (with owned users, plus one slice per rank), and at the end
``model.pt``, the id maps and ``metrics.json``; the rank-0 post-step adds the cluster
files and the two reports, reports last. Every file goes through `write_atomic`
(``shardmf/outputs.py``): a crash leaves the previous complete file or none, never a
half-written one that looks complete. No other module spells these names.

A run folder is owned like every folder shardmf writes, by the convention of
``shardmf/outputs.py`` (the same marker, lock and atomic writes as a shard folder)::

    RUN/.shardmf-output.json   {"tool": "shardmf", "kind": "run", "version": ...}
    PARENT/.RUN.lock           flock()ed by the one process writing RUN, removed after

Unlike a shard folder, a run is written in place, not built aside and swapped in: its
checkpoint must survive a crash where ``--resume`` finds it. `claim_run_folder` is the
one way in: it takes the lock, refuses an existing run unless resumed or overwritten
(``--overwrite`` removes the old run's files by name and only in a marked run folder, so
shards or anything else inside it stay), and on failure before any checkpoint removes
what it created. Write faults (disk full, permission denied) become one `InputError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardmf.errors import InputError
from shardmf.outputs import (
    MARKER_NAME,
    create_folders,
    folder_lock,
    read_marker,
    refuse_files_on_the_way,
    remove_dead_temporaries,
    remove_empty,
    replace_atomically,
    write_marker,
)

log = logging.getLogger(__name__)

# Training.
CONFIG = "config.json"  # the resolved, nested configuration of the run
EPOCH_METRICS = "metrics.jsonl"  # one JSON object per epoch
SWEEP_METRICS = "sweeps.jsonl"  # one JSON object per ranking sweep (ranking objective)
FINAL_METRICS = "metrics.json"  # the final figures (test_rmse, epochs, ndcg@10, ...)
CHECKPOINT = "checkpoint.pt"  # what --resume continues from
MODEL = "model.pt"  # the kept (best-epoch) weights, every user included
MODEL_ARRAYS = "model.npz"  # the same weights as numpy arrays: read without importing torch
# The id maps, copied from SHARDS_DIR (where they have the same names).
USERS = "users.parquet"
ITEMS = "items.parquet"

# The rank-0 post-step.
ITEM_CLUSTERS = "item_clusters.parquet"  # one row per clustered item
CLUSTERS = "clusters.json"  # k, scores, per-cluster summaries
PCA_FIGURE = "clusters_pca.png"
CURVES_FIGURE = "training_curves.png"  # only when the run has per-epoch metrics
K_SELECTION_FIGURE = "silhouette_by_k.png"  # only with --clusters auto
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
# Written last, removed first: their presence vouches for the cluster files beside them.
REPORTS = (REPORT_MD, REPORT_HTML)
OPTIONAL_FIGURES = (CURVES_FIGURE, K_SELECTION_FIGURE)

# model.npz / model.pt keys: the rating model's tables keep their module names
# (user_factors.weight, ..., global_mean); the ranking tables' get this prefix
# (ranking_user_factors.weight, ranking_item_factors.weight); an export's ranking files too.
RANKING_PREFIX = "ranking_"
# The two pairs of tables a run may hold (model.npz "objective" says which it trained).
TABLES = ("rating", "ranking")

# Default folders of `export_run`, one per format: an export never replaces another's files.
EXPORT_DIRS = {"parquet": "export", "npy": "export-npy"}
EXPORT_SUMMARY = "model.json"  # in an export: global mean and rating scale
ESTIMATOR_PARAMS = "estimator.json"  # a saved MatrixFactorization's constructor parameters
SHARDS_DIR = "shards"  # where `shardmf run` prepares its shards inside RUN_DIR

# Ownership (the convention of shardmf/outputs.py).
RUN_KIND = "run"
EXPORT_KIND = "export"
# What one run writes, removed by --overwrite (with the checkpoint slices and model parts).
RUN_OUTPUTS = (*REPORTS, CONFIG, EPOCH_METRICS, SWEEP_METRICS, FINAL_METRICS, CHECKPOINT, MODEL,
               USERS, ITEMS, ITEM_CLUSTERS, CLUSTERS, PCA_FIGURE, *OPTIONAL_FIGURES)
# Files whose presence makes a folder a run (an older run has them but no marker).
RUN_EVIDENCE = (CONFIG, CHECKPOINT, MODEL, FINAL_METRICS)


def is_ranking_key(key: str) -> bool:
    """A metrics.json key of the ranking evaluation: ``ndcg@10``, ``popular_map@20``,
    ``ranking_threshold``, ... (`shardmf evaluate` replaces all of them at once)."""
    return "@" in key or key.startswith("ranking_")


def checkpoint_slice(tag: str, rank: int) -> str:
    """One rank's slice of a checkpoint with owned users; ``tag`` is ``<epoch>-<step>``."""
    return f"checkpoint.{tag}.rank{rank}.pt"


def checkpoint_slice_pattern(rank: int) -> str:
    """A glob matching every checkpoint slice of ``rank``, current or stale."""
    return checkpoint_slice("*", rank)


def model_part(rank: int) -> str:
    """The user rows one rank contributes to ``model.pt`` with owned users (removed after)."""
    return f"model.users.rank{rank}.pt"


def export_names(side: str, tables: str = "rating") -> dict[str, str]:
    """File names `export_run` writes for ``side`` ("users" or "items") of ``tables``
    ("rating" or "ranking") per format; the ranking tables' names start with RANKING_PREFIX."""
    stem = side if tables == "rating" else RANKING_PREFIX + side
    return {"embeddings": f"{stem}_embeddings.parquet", "factors": f"{stem}_factors.npy",
            "ids": f"{stem}_ids.parquet"}


# --- writing ------------------------------------------------------------------


def save_torch_atomic(payload: Any, path: Path) -> None:
    """``torch.save`` of ``payload`` to ``path``, atomically."""
    import torch  # here: the command line reads this module's names without torch
    replace_atomically(path, lambda handle: torch.save(payload, handle))


# --- reading ------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None (with a warning) when missing, unreadable or not an object.

    For side files of a run whose loss must cost only a section of a report.
    """
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: not readable JSON (%s); left out of the report", path, e)
        return None
    if not isinstance(value, dict):
        log.warning("%s: expected a JSON object; left out of the report", path)
        return None
    return value


def read_epochs(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl records in epoch order; for an epoch logged twice (a resumed run), the last."""
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        log.warning("%s: not readable (%s); no training curves", path, e)
        return []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s line %d: not JSON; skipped", path, number)
            continue
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            log.warning("%s line %d: no integer 'epoch'; skipped", path, number)
            continue
        by_epoch[epoch] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


@dataclass(frozen=True)
class RunFiles:
    """What the run folder says about training; each part absent when its file is."""

    name: str  # the run folder's name
    metrics: dict[str, Any] | None  # metrics.json: final figures
    config: dict[str, Any] | None  # config.json: the resolved, nested configuration
    epochs: list[dict[str, Any]]  # metrics.jsonl: one record per epoch, in epoch order


def read_run_files(run_dir: Path, metrics: dict[str, Any] | None = None) -> RunFiles:
    """metrics.json (unless given), config.json and metrics.jsonl; unreadable ones are skipped.

    The report is the last step of a long run: a damaged side file costs its
    section of the report, with a warning, never the clustering.
    """
    run_dir = Path(run_dir)
    if metrics is None:
        metrics = read_json(run_dir / FINAL_METRICS)
    return RunFiles(name=run_dir.resolve().name, metrics=metrics,
                    config=read_json(run_dir / CONFIG),
                    epochs=read_epochs(run_dir / EPOCH_METRICS))


# --- ownership: marker, lock, claim -----------------------------------------------


def check_run_target(run: Path, resume: bool, overwrite: bool, restarted: bool = False) -> str:
    """What training into ``run`` would do: "new", "resume" or "overwrite"; or InputError.

    ``restarted``: torchrun restarted this job, so a run in the folder is its own.
    """
    if run.exists() and not run.is_dir():
        raise InputError(f"out={run} is a file, not a folder; choose another `out`")
    entries = {entry.name for entry in run.iterdir()} if run.is_dir() else set()
    marker = read_marker(run)
    is_run = (marker is not None and marker.get("kind") == RUN_KIND) or any(
        name in entries for name in RUN_EVIDENCE)
    if resume:
        if CHECKPOINT not in entries:
            raise InputError(f"`resume`: {run / CHECKPOINT} not found; start without `resume`")
        return "resume"
    if restarted or not is_run and not entries - {SHARDS_DIR, MARKER_NAME}:
        return "new"  # empty, or holding only the shards of `shardmf run`
    if marker is not None and marker.get("kind") != RUN_KIND:
        raise InputError(f"out={run} holds shardmf {marker.get('kind')} output, not a run; "
                         "choose another `out`")
    if not is_run:
        raise InputError(f"out={run} is not empty and holds no shardmf run; choose another "
                         "`out` (training never writes into a foreign folder)")
    if not overwrite:
        state = "a finished run" if FINAL_METRICS in entries else "a run with a checkpoint"
        raise InputError(f"out={run} already holds {state}; pass `resume` to continue it, "
                         "`overwrite` to replace it, or choose another `out`")
    if marker is None:
        raise InputError(f"`overwrite`: {run} has no {MARKER_NAME} (written before runs were "
                         "marked, or not by shardmf), so it is never replaced; remove it "
                         "yourself or choose another `out`")
    return "overwrite"


def precheck_run_target(run: Path, resume: bool, overwrite: bool) -> None:
    """`check_run_target` before the ranks start, so a refusal is one line and no wait;
    the lock is tried too, so a run beside live ranks fails at once. Changes nothing."""
    if run.parent.is_dir() and not (run.exists() and not run.is_dir()):
        with folder_lock(run):
            check_run_target(run, resume, overwrite)
    else:
        check_run_target(run, resume, overwrite)


@contextlib.contextmanager
def claim_run_folder(run: str | Path, resume: bool, overwrite: bool,
                     restarted: bool = False) -> Iterator[Path]:
    """Hold ``run`` for one training job: locked, checked, marked; cleaned up on failure.

    Called by rank 0 alone. On an exception (Ctrl-C included) before this job wrote a
    checkpoint, the files it wrote go, and the folders it created if left empty; with a
    checkpoint the run stays, for ``--resume``.
    """
    run = Path(run)
    refuse_files_on_the_way(run)
    created = create_folders(run)
    try:
        with folder_lock(run):
            remove_dead_temporaries(run)
            action = check_run_target(run, resume, overwrite, restarted)
            if action == "overwrite":
                clear_run(run)
            had_checkpoint = (run / CHECKPOINT).exists()
            if read_marker(run) is None:
                write_marker(run, RUN_KIND)
            try:
                yield run
            except BaseException:
                if not had_checkpoint and not (run / CHECKPOINT).exists():
                    for name in (CONFIG, EPOCH_METRICS):
                        (run / name).unlink(missing_ok=True)
                    if run in created:
                        (run / MARKER_NAME).unlink(missing_ok=True)
                raise
    except BaseException:
        remove_empty(created)
        raise


def clear_run(run: Path) -> None:
    """Remove every file a run writes (its checkpoint slices and export too), nothing else."""
    for name in RUN_OUTPUTS:
        (run / name).unlink(missing_ok=True)
    for stale in (*run.glob(checkpoint_slice("*", "*")), *run.glob(model_part("*"))):
        stale.unlink()
    for name in EXPORT_DIRS.values():
        export = run / name
        marker = read_marker(export)
        if marker is not None and marker.get("kind") == EXPORT_KIND:
            shutil.rmtree(export)
