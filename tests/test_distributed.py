"""Real multi-process runs: 2 gloo ranks on real shards, through `shardmf train --nproc 2`
and through `torchrun -m trainer` directly. Never mocks torch.distributed.

Each run is a subprocess in its own session with a hard timeout; on a timeout the whole
process group (torchrun and its ranks) is killed and the test fails with both streams.
Runs shared by several tests are module fixtures, so the file starts few jobs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import (
    NO_CLUSTERS,
    ROOT,
    RUN_TIMEOUT_S,
    SETTINGS,
    SHARDMF,
    TORCHRUN,
    error_lines,
    final,
    finish_job,
    history,
)

from trainer.shards import open_shards, pieces_for_rank

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

CLUSTERS = ["--clusters", "4", "--min-item-ratings", "5", "--baseline-shuffles", "2"]

EPOCH_KEYS = {"epoch", "train_loss", "val_rmse", "val_mae", "seconds", "ratings_per_s"}
FINAL_KEYS = {"test_rmse", "test_mae", "val_rmse", "epochs", "world_size", "train_seconds",
              "train_ratings_per_s"}


def run_job(args: list[str], expect: int | None = 0,
            timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a command to completion or kill its whole process group; fail with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(a) for a in args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    return finish_job(proc, expect, timeout)


def shardmf_train(shards: Path, run: Path, nproc: int, *extra: str,
                  expect: int | None = 0) -> subprocess.CompletedProcess:
    return run_job([SHARDMF, "train", shards, "--out", run, "--nproc", str(nproc),
                    *SETTINGS, *extra], expect=expect)


def torchrun_train(shards: Path, run: Path, *extra: str,
                   expect: int | None = 0) -> subprocess.CompletedProcess:
    return run_job([TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "trainer", shards,
                    "--out", run, *SETTINGS, *extra], expect=expect)


@pytest.fixture(scope="module")
def two_rank_run(trainer_shards_dir: Path, tmp_path_factory) -> Path:
    """`shardmf train --nproc 2`, 4 epochs, with the clustering post-step."""
    run = tmp_path_factory.mktemp("two_rank") / "run"
    job = shardmf_train(trainer_shards_dir, run, 2, "--epochs", "4", *CLUSTERS)
    (run / "stderr.txt").write_text(job.stderr)
    return run


@pytest.fixture(scope="module")
def torchrun_run(trainer_shards_dir: Path, tmp_path_factory) -> Path:
    """`torchrun -m trainer` directly, 2 ranks, 2 epochs (the first half of the resume test)."""
    run = tmp_path_factory.mktemp("torchrun") / "run"
    torchrun_train(trainer_shards_dir, run, "--epochs", "2", *NO_CLUSTERS)
    return run


def test_shardmf_train_two_ranks_end_to_end(two_rank_run: Path) -> None:
    run = two_rank_run
    for name in ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.pt", "model.pt",
                 "clusters.json", "item_clusters.parquet", "report.md", "users.parquet",
                 "items.parquet"):
        assert (run / name).is_file(), name
    assert not list(run.glob("*.tmp")), "temporary files left behind"
    pngs = list(run.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)

    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["backend"] == "gloo"
    assert config["rank_batch_size"] == 128 and config["steps_per_epoch"] >= 1
    assert config["train"]["epochs"] == 4 and config["train"]["seed"] == 0

    epochs = history(run)
    assert [h["epoch"] for h in epochs] == [1, 2, 3, 4]
    for record in epochs:
        assert set(record) >= EPOCH_KEYS
        assert math.isfinite(record["train_loss"]) and record["ratings_per_s"] > 0
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]

    metrics = final(run)
    assert set(metrics) >= FINAL_KEYS
    assert metrics["world_size"] == 2 and metrics["epochs"] == 4
    assert metrics["test_rmse"] < 0.8 * metrics["baseline_test_rmse"]  # learned beyond biases

    clusters = json.loads((run / "clusters.json").read_text())
    assert clusters["k"] == 4 and len(clusters["clusters"]) == 4
    assert sum(c["size"] for c in clusters["clusters"]) == clusters["items_clustered"] == 150
    assert "silhouette" in clusters["scores"] and clusters["genres_known"]
    items = pd.read_parquet(run / "item_clusters.parquet")
    assert {"original_item_id", "cluster", "distance"} <= set(items.columns)
    assert len(items) == 150 and set(items["cluster"]) == {0, 1, 2, 3}
    assert "test_rmse" in (run / "report.md").read_text()

    stderr = (run / "stderr.txt").read_text()
    assert stderr.count("training on ") == 1  # one process logs
    assert "Traceback" not in stderr


def test_torchrun_module_directly(torchrun_run: Path) -> None:
    metrics = final(torchrun_run)
    assert set(metrics) >= FINAL_KEYS
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    assert [h["epoch"] for h in history(torchrun_run)] == [1, 2]
    assert (torchrun_run / "checkpoint.pt").is_file() and (torchrun_run / "model.pt").is_file()
    assert not (torchrun_run / "clusters.json").exists()  # --clusters 0


def test_resume_continues_and_matches_an_uninterrupted_run(torchrun_run: Path,
                                                          two_rank_run: Path,
                                                          trainer_shards_dir: Path,
                                                          tmp_path: Path) -> None:
    """2 epochs (torchrun), then --resume to 4 (shardmf): the same as 4 epochs in one go."""
    run = Path(shutil.copytree(torchrun_run, tmp_path / "run"))
    before = history(run)
    shardmf_train(trainer_shards_dir, run, 2, "--epochs", "4", "--resume", *NO_CLUSTERS)
    after = history(run)
    assert [h["epoch"] for h in after] == [1, 2, 3, 4]
    assert after[:2] == before
    uninterrupted = history(two_rank_run)
    for key in ("train_loss", "val_rmse", "val_mae"):
        assert [h[key] for h in after] == [h[key] for h in uninterrupted], key
    for key in ("test_rmse", "test_mae", "val_rmse", "best_epoch", "epochs"):
        assert final(run)[key] == final(two_rank_run)[key], key


def test_two_ranks_match_one_rank(two_rank_run: Path, trainer_shards_dir: Path,
                                  tmp_path: Path) -> None:
    """Same data, seed and global batch: 2 ranks learn as well as 1 (RMSE within 0.02).

    Seeds alone move test RMSE by about 0.02 at this size, so this catches gross errors
    (gradient scale off by the world size, ranks drifting apart), not subtle ones. The one
    rank runs as `python -m trainer`, the entry point's world-size-1 form."""
    one = tmp_path / "one"
    run_job([sys.executable, "-m", "trainer", trainer_shards_dir, "--out", one, *SETTINGS,
             "--epochs", "4", *NO_CLUSTERS])
    assert final(one)["world_size"] == 1
    assert abs(final(one)["test_rmse"] - final(two_rank_run)["test_rmse"]) < 0.02
    assert final(one)["test_rmse"] < 0.8 * final(one)["baseline_test_rmse"]
    assert (json.loads((one / "config.json").read_text())["steps_per_epoch"]
            == json.loads((two_rank_run / "config.json").read_text())["steps_per_epoch"])


def test_uneven_shards_take_equal_steps(trainer_uneven_shards_dir: Path,
                                        tmp_path: Path) -> None:
    """The ranks hold different numbers of rows; both take the collective step count."""
    pieces = open_shards(trainer_uneven_shards_dir).pieces("train")
    rows = [sum(p.rows for p in pieces_for_rank(pieces, rank, 2)) for rank in (0, 1)]
    assert abs(rows[0] - rows[1]) >= 1000, rows  # the fixture really is uneven
    run = tmp_path / "run"
    shardmf_train(trainer_uneven_shards_dir, run, 2, "--epochs", "2", *NO_CLUSTERS)
    config = json.loads((run / "config.json").read_text())
    assert config["steps_per_epoch"] == -(-max(rows) // 128)
    # The trainer raises if a rank's loader gives other than steps_per_epoch batches, so
    # a clean exit means both ranks took exactly that many steps in every epoch.
    assert [h["epoch"] for h in history(run)] == [1, 2]
    assert final(run)["epochs"] == 2 and math.isfinite(final(run)["test_rmse"])


def test_user_error_on_the_ranks_is_one_line(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """A check made by every rank (not by the launcher): exit 2, one line, no traceback."""
    job = shardmf_train(trainer_shards_dir, tmp_path / "run", 2, "--epochs", "1",
                        *NO_CLUSTERS, "--batch-size", "1", expect=2)
    assert error_lines(job.stderr) == [
        "shardmf: error: --batch-size 1 is smaller than the 2 ranks; each rank needs at "
        "least one rating per step"], job.stderr
    assert "Traceback" not in job.stderr


@pytest.fixture
def corrupt_shards(trainer_shards_dir: Path, tmp_path: Path) -> Path:
    """A copy whose train/part-00001.parquet grew after prepare."""
    shards = Path(shutil.copytree(trainer_shards_dir, tmp_path / "shards"))
    with (shards / "train" / "part-00001.parquet").open("ab") as handle:
        handle.write(b"garbage")
    return shards


# The launcher refuses these before starting any rank, so they run in this process.


def test_corrupt_shard_refused_by_the_launcher(corrupt_shards: Path, tmp_path: Path,
                                               capsys) -> None:
    from launch.cli import main as shardmf_main

    code = shardmf_main(["train", str(corrupt_shards), "--out", str(tmp_path / "run"),
                         "--nproc", "2", *SETTINGS, *NO_CLUSTERS])
    err = capsys.readouterr().err
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "train/part-00001.parquet" in lines[0], err
    assert "manifest says" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written


def test_resume_without_checkpoint_refused_by_the_launcher(trainer_shards_dir: Path,
                                                           tmp_path: Path, capsys) -> None:
    from launch.cli import main as shardmf_main

    code = shardmf_main(["train", str(trainer_shards_dir), "--out", str(tmp_path / "run"),
                         "--nproc", "2", "--resume", *SETTINGS, *NO_CLUSTERS])
    err = capsys.readouterr().err
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "checkpoint.pt not found" in lines[0], err


def test_corrupt_shard_through_torchrun(corrupt_shards: Path, tmp_path: Path) -> None:
    """Every rank refuses the shards: torchrun fails (no hang), rank 0 prints one line."""
    job = torchrun_train(corrupt_shards, tmp_path / "run", *NO_CLUSTERS, expect=None)
    assert job.returncode != 0
    lines = error_lines(job.stderr)
    assert len(lines) == 1, job.stderr
    assert lines[0].startswith("shardmf: error: shard train/part-00001.parquet")


def test_a_damaged_row_group_on_one_rank_is_one_line(trainer_shards_dir: Path,
                                                     tmp_path: Path) -> None:
    """A row group only rank 1 reads is damaged (same size, intact footer, so --verify quick
    passes): rank 1 fails mid-epoch, rank 0 must not hang, and rank 1's one line names it."""
    shards = Path(shutil.copytree(trainer_shards_dir, tmp_path / "shards"))
    piece = pieces_for_rank(open_shards(shards).pieces("train"), 1, 2)[0]
    column = pq.ParquetFile(piece.path).metadata.row_group(piece.row_group).column(0)
    data = bytearray(piece.path.read_bytes())
    start = column.data_page_offset + 200  # inside the user_id page's compressed values
    data[start:start + 50] = bytes(b ^ 0xFF for b in data[start:start + 50])
    piece.path.write_bytes(bytes(data))
    with pytest.raises(OSError):  # the damage is real, or the test would prove nothing
        pq.ParquetFile(piece.path).read_row_group(piece.row_group)
    open_shards(shards, "quick")

    # A damaged shard is the user's to fix (issue #12): one line from the rank that read it,
    # exit 2; rank 0, which only lost its peer, is stopped by torchrun without a word.
    job = shardmf_train(shards, tmp_path / "run", 2, "--epochs", "1", *NO_CLUSTERS, expect=2)
    assert "Traceback" not in job.stderr, job.stderr
    lines = error_lines(job.stderr)
    assert len(lines) == 1, job.stderr
    assert (f"shardmf: error: rank 1: shard train/{piece.path.name}: row group "
            f"{piece.row_group} is damaged") in lines[0], lines
