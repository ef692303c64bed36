"""The run folder (RUN_DIR) contract: every file name, the one atomic writer, the readers.

Training writes ``config.json`` first, then ``metrics.jsonl`` (one record per epoch),
``checkpoint.pt`` (with owned users, plus one slice per rank), and at the end
``model.pt``, the id maps and ``metrics.json``; the rank-0 post-step adds the cluster
files and the two reports, reports last. Every file goes through `write_atomic`
(``shardmf/outputs.py``): a crash leaves the previous complete file or none, never a
half-written one that looks complete. No other module spells these names.

The files a command reads back (config.json, metrics.json, checkpoint.pt, model.pt,
model.npz, the id maps, and the cluster files for other tools) are written through
`write_vouched`, which records each one's size and SHA-256 in ``checksums.json``;
`vouched` checks a file against its record before anything parses it, so a damaged, cut
or swapped file is one line naming it and what to do, never a parser's traceback or a
silently different model (torch does not check its zip members' CRCs). A run from before
checksums, or a file whose record a crash dropped (the record goes before the file is
replaced, and comes back after), is read unchecked, and its readers still turn any parse
failure into one line.

A run folder is owned like every folder shardmf writes, by the convention of
``shardmf/outputs.py`` (the same marker, lock and atomic writes as a shard folder)::

    RUN/.shardmf-output.json   {"tool": "shardmf", "kind": "run", "version": ...}
    PARENT/.RUN.lock           flock()ed by the one process writing RUN, removed after

Unlike a shard folder, a run is written in place, not built aside and swapped in: its
checkpoint must survive a crash where ``--resume`` finds it. `claim_run_folder` is the
one way in: it takes the lock, refuses an existing run unless resumed or overwritten
(``--overwrite`` takes the old run's files by name and only in a marked run folder, so
shards or anything else inside it stay; they wait in PARENT/.RUN.old-PID-HEX until the
new job has a checkpoint or ends, and come back if it fails before), and on failure
before any checkpoint removes what it created. Write faults (disk full, permission
denied) become one `InputError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardmf.errors import InputError
from shardmf.outputs import (
    MARKER_NAME,
    REPLACED_WHOLE,
    create_folders,
    folder_lock,
    no_interrupts,
    pid_alive,
    read_marker,
    refuse_files_on_the_way,
    remove_dead_temporaries,
    remove_empty,
    replace_atomically,
    write_json,
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
CHECKSUMS = "checksums.json"  # size and SHA-256 of the files read back, as the run wrote them
ESTIMATOR_PARAMS = "estimator.json"  # a saved MatrixFactorization's constructor parameters
SHARDS_DIR = "shards"  # where `shardmf run` prepares its shards inside RUN_DIR

# Ownership (the convention of shardmf/outputs.py).
RUN_KIND = "run"
EXPORT_KIND = "export"
# What one run writes, removed by --overwrite (with the checkpoint slices and model parts).
RUN_OUTPUTS = (*REPORTS, CONFIG, EPOCH_METRICS, SWEEP_METRICS, FINAL_METRICS, CHECKPOINT, MODEL,
               MODEL_ARRAYS, USERS, ITEMS, ITEM_CLUSTERS, CLUSTERS, PCA_FIGURE,
               *OPTIONAL_FIGURES, CHECKSUMS)
# What to do about a damaged or missing file of a run.
RETRAIN = ("train the run again (`shardmf train SHARDS_DIR --out RUN_DIR --overwrite`), or "
           "restore the file")
RESTORE_CHECKPOINT = "restore it, or start without `resume`"
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


def write_vouched(path: Path, write: Callable[[], object]) -> None:
    """Run ``write`` (which replaces ``path`` atomically), then record the new file in the
    run's checksums.json. The old record goes first: a crash in between leaves the file
    unrecorded (read unchecked), never a record that no longer matches it."""
    path = Path(path)
    records = _writable_checksums(path.parent)
    if records.pop(path.name, None) is not None:
        _write_checksums(path.parent, records)
    write()
    from shardmf.manifest import file_sha256  # here: pyarrow, which the CLI's help avoids

    records = _writable_checksums(path.parent)
    records[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    _write_checksums(path.parent, records)


def _writable_checksums(run: Path) -> dict[str, dict]:
    """The records to update; a damaged checksums.json is started afresh (it vouches for
    nothing, and a write must not fail on it)."""
    try:
        return _read_checksums(run)
    except InputError:
        return {}


def _write_checksums(run: Path, records: dict[str, dict]) -> None:
    write_json(run / CHECKSUMS, {"format_version": 1, "files": records})


# --- reading ------------------------------------------------------------------


def vouched(path: Path, remedy: str) -> Path:
    """``path`` when it exists and, where the run's checksums.json records it, has the
    size and SHA-256 written there; else one InputError naming it and ``remedy``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: not found; {remedy}")
    record = _read_checksums(path.parent).get(path.name)
    if record is None:
        return path
    from shardmf.manifest import file_sha256  # here: pyarrow, which the CLI's help avoids

    size = path.stat().st_size
    if size != record["bytes"] or file_sha256(path) != record["sha256"]:
        change = (f"{size:,} bytes, written as {record['bytes']:,}" if size != record["bytes"]
                  else "same size, other bytes")
        raise InputError(f"{path}: damaged or replaced since the run wrote it ({change}; "
                         f"{CHECKSUMS} records it); {remedy}")
    return path


def _read_checksums(run: Path) -> dict[str, dict]:
    """checksums.json's records by file name; {} when the run has none (written before
    checksums); InputError when it is damaged."""
    path = run / CHECKSUMS
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text(encoding="utf-8"))["files"]
        if not all(isinstance(r["bytes"], int) and isinstance(r["sha256"], str)
                   for r in records.values()):
            raise TypeError("a record without an integer size and a text digest")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: damaged (not the record of the run's files shardmf "
                         f"writes: {type(e).__name__}); restore it, or remove it to read the "
                         "run's files unchecked") from e
    return records




def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None (with a warning) when missing, unreadable or not an object.

    For side files of a run whose loss must cost only a section of a report.
    """
    if not path.is_file():
        return None
    try:
        vouched(path, "ignored")
    except InputError as e:
        log.warning("%s", e)
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


def read_vouched_json(path: Path, remedy: str) -> dict[str, Any] | None:
    """A JSON object a command relies on: None when missing; else checked against the run's
    checksums.json and parsed, and any damage is one InputError naming it and ``remedy``."""
    if not path.is_file():
        return None
    try:
        value = json.loads(vouched(path, remedy).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not readable JSON ({type(e).__name__}); {remedy}") from e
    if not isinstance(value, dict):
        raise InputError(f"{path}: a JSON {type(value).__name__}, not the object shardmf "
                         f"writes; {remedy}")
    return value


def run_seed(run: Path) -> int | None:
    """The seed a run trained with (config.json), for commands that redo its seeded steps;
    None for a folder without config.json."""
    path = run / CONFIG
    remedy = f"pass `seed`, or {RETRAIN}"
    config = read_vouched_json(path, remedy)
    if config is None:
        return None
    train = config.get("train")
    seed = train.get("seed") if isinstance(train, dict) else None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"{path}: no integer train.seed (not the config shardmf writes); "
                         f"{remedy}")
    return seed


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
    for parent in run.resolve().parents:
        outer = read_marker(parent)
        if outer is not None and outer.get("kind") in REPLACED_WHOLE:
            raise InputError(f"out={run} lies inside {parent}, shardmf {outer.get('kind')} "
                             "output that is replaced whole; choose an `out` outside it")
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
    checkpoint the run stays, for ``--resume``. ``overwrite`` sets the old run's files
    aside rather than removing them: they come back if the job fails before its first
    checkpoint, so the folder always holds a run (the old one, or the new one's checkpoint).
    """
    run = Path(run)
    refuse_files_on_the_way(run)
    created = create_folders(run)
    try:
        with folder_lock(run):
            remove_dead_temporaries(run)
            _recover_set_aside(run)
            action = check_run_target(run, resume, overwrite, restarted)
            aside = _set_aside(run) if action == "overwrite" else None
            had_checkpoint = (run / CHECKPOINT).exists()
            if read_marker(run) is None:
                write_marker(run, RUN_KIND)
            try:
                yield run
            except BaseException:
                if not had_checkpoint and not (run / CHECKPOINT).exists():
                    with no_interrupts():
                        for name in (CONFIG, EPOCH_METRICS, CHECKSUMS):
                            (run / name).unlink(missing_ok=True)
                        if aside is not None:
                            _put_back(aside, run)
                            aside = None
                        elif run in created:
                            (run / MARKER_NAME).unlink(missing_ok=True)
                raise
            finally:
                if aside is not None:
                    shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        remove_empty(created)
        raise


def clear_run(run: Path) -> None:
    """Remove every file a run writes (its checkpoint slices and export too), nothing else."""
    for path in _run_outputs(run):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _run_outputs(run: Path) -> list[Path]:
    """The files (and owned export folders) of the run in ``run``, that exist."""
    found = [run / name for name in RUN_OUTPUTS if (run / name).exists()]
    found += [*run.glob(checkpoint_slice("*", "*")), *run.glob(model_part("*"))]
    for name in EXPORT_DIRS.values():
        export = run / name
        marker = read_marker(export)
        if marker is not None and marker.get("kind") == EXPORT_KIND:
            found.append(export)
    return found


def _set_aside(run: Path) -> Path:
    """Move the run's files into PARENT/.RUN.old-PID-HEX (renames: nothing is copied)."""
    aside = run.parent / f".{run.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    with no_interrupts():  # half the files moved would be half a run in either place
        aside.mkdir()
        for path in _run_outputs(run):
            os.replace(path, aside / path.name)
    return aside


def _put_back(aside: Path, run: Path) -> None:
    """The set-aside run returns, replacing whatever the failed job wrote."""
    clear_run(run)
    for path in aside.iterdir():
        os.replace(path, run / path.name)
    aside.rmdir()


def _recover_set_aside(run: Path) -> None:
    """A run set aside by a job that was killed (its pid is dead): back into ``run`` when
    that job wrote no checkpoint, else removed (the new run replaced it). Lock held."""
    pattern = re.compile(rf"\.{re.escape(run.name)}\.old-(?P<pid>\d+)-[0-9a-f]+")
    for entry in run.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if not match or not entry.is_dir() or pid_alive(int(match["pid"])):
            continue
        if (run / CHECKPOINT).exists():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            _put_back(entry, run)
