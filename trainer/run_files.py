"""The run folder (RUN_DIR) contract: every file name, the one atomic writer, the readers.

Training writes ``config.json`` first, then ``metrics.jsonl`` (one record per epoch),
``checkpoint.pt`` (with owned users, plus one slice per rank), and at the end
``model.pt``, the id maps and ``metrics.json``; the rank-0 post-step adds the cluster
files and the two reports, reports last. Every file goes through `write_atomic`: a
crash leaves the previous complete file or none, never a half-written one that looks
complete. No other module spells these names.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

# Training.
CONFIG = "config.json"  # the resolved, nested configuration of the run
EPOCH_METRICS = "metrics.jsonl"  # one JSON object per epoch
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

EXPORT_DIR = "export"  # default folder of `export_run`
EXPORT_SUMMARY = "model.json"  # in an export: global mean and rating scale
ESTIMATOR_PARAMS = "estimator.json"  # a saved MatrixFactorization's constructor parameters
SHARDS_DIR = "shards"  # where `shardmf run` prepares its shards inside RUN_DIR


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


def export_names(side: str) -> dict[str, str]:
    """File names `export_run` writes for ``side`` ("users" or "items") per format."""
    return {"embeddings": f"{side}_embeddings.parquet", "factors": f"{side}_factors.npy",
            "ids": f"{side}_ids.parquet"}


# --- writing ------------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see `replace_atomically`)."""
    replace_atomically(path, lambda handle: handle.write(data))


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a file under a unique temporary name beside ``path``, fsync, rename.

    The one atomic-write idiom of the run folder. The temporary name is unique per process
    and call, so two writers never share one; it is removed on any failure. ``write``
    streams (torch.save, a file copy) without holding the whole file in memory.
    ``open(..., "xb")`` honours the umask, where ``tempfile.mkstemp``'s 0600 mode would
    make reports unreadable to others.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    """Strict, indented JSON (NaN refused: readers of the run folder expect standard JSON)."""
    write_atomic(path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace ``path`` with one JSON object per line."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def save_torch_atomic(payload: Any, path: Path) -> None:
    """``torch.save`` of ``payload`` to ``path``, atomically."""
    import torch  # here: the command line reads this module's names without torch
    replace_atomically(path, lambda handle: torch.save(payload, handle))


def copy_atomic(source: Path, path: Path) -> None:
    """A copy of ``source`` at ``path``, atomically, streamed."""
    with open(source, "rb") as reading:
        replace_atomically(path, lambda handle: shutil.copyfileobj(reading, handle))


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
