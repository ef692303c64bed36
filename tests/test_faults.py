"""Faults in real multi-process jobs: a rank crashing mid-epoch, resumed by hand or restarted
by torchrun; two "nodes" on one machine; a rank raising must end the job quickly.

Crashes are injected with the test-only SHARDMF_TEST_FAULT=KIND:RANK:STEP (see
trainer/distributed.py): rank RANK fails just before global step STEP, on the job's first
attempt only. Every job runs in its own session under a hard timeout (see run_job).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
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

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

EPOCHS = ["--epochs", "2"]
FAST = ["--batch-size", "512"]  # after SETTINGS, so it wins: 36 steps per epoch
# measured, so never equal between runs ("ranks" holds each rank's peak memory)
TIMING = {"train_seconds", "train_ratings_per_s", "seconds", "ratings_per_s", "ranks",
          "ranking_seconds"}


def start_job(args: list, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SHARDMF_TEST_FAULT", None)
    if fault:
        env["SHARDMF_TEST_FAULT"] = fault
    return subprocess.Popen([str(a) for a in args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def train_job(shards: Path, run: Path, *extra: str, fault: str | None = None,
              expect: int | None = 0) -> subprocess.CompletedProcess:
    """`shardmf train --nproc 2`, 2 epochs of 512-rating steps, no clusters, optionally
    with an injected fault."""
    return finish_job(start_job([SHARDMF, "train", shards, "--out", run, "--nproc", "2",
                                 *SETTINGS, *FAST, *EPOCHS, *NO_CLUSTERS, *extra], fault),
                      expect)


def without_timing(records):
    if isinstance(records, dict):
        return {k: v for k, v in records.items() if k not in TIMING}
    return [without_timing(r) for r in records]


@pytest.fixture(scope="module")
def reference_run(trainer_shards_dir: Path, tmp_path_factory) -> Path:
    """2 ranks, 2 epochs, never interrupted: what every faulty run must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train_job(trainer_shards_dir, run)
    return run


def steps_per_epoch(run: Path) -> int:
    return json.loads((run / "config.json").read_text())["steps_per_epoch"]


def test_crash_mid_epoch_then_resume_is_bit_identical(reference_run: Path,
                                                      trainer_shards_dir: Path,
                                                      tmp_path: Path) -> None:
    """Rank 1 dies 7 steps into epoch 2 (checkpoints every 5 steps); --resume continues
    from the mid-epoch checkpoint: the same metrics, to the last bit, as never stopping."""
    steps = steps_per_epoch(reference_run)
    run = tmp_path / "run"
    crash = train_job(trainer_shards_dir, run, "--checkpoint-every", "5",
                      fault=f"raise:1:{steps + 7}", expect=1)
    assert "injected failure on rank 1" in crash.stderr
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and 1 <= saved["step"] <= 6, (saved["epoch"], saved["step"])
    assert len(saved["loss_sums"]) == 2 and not (run / "metrics.json").exists()

    train_job(trainer_shards_dir, run, "--checkpoint-every", "5", "--resume")
    assert without_timing(final(run)) == without_timing(final(reference_run))
    assert without_timing(history(run)) == without_timing(history(reference_run))


def test_sigkill_with_max_restarts_resumes_automatically(reference_run: Path,
                                                         trainer_shards_dir: Path,
                                                         tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed mid-epoch 2; torchrun restarts both ranks, which find the
    checkpoint (TORCHELASTIC_RESTART_COUNT 1) and finish like an uninterrupted run."""
    steps = steps_per_epoch(reference_run)
    run = tmp_path / "run"
    job = train_job(trainer_shards_dir, run, "--checkpoint-every", "5", "--max-restarts", "1",
                    fault=f"kill:1:{steps + 7}")
    assert "restart 1 of this job: resuming from its checkpoint" in job.stderr, job.stderr
    assert re.search(r"resuming from .*checkpoint\.pt: 1 epoch\(s\) done, then [1-6] of",
                     job.stderr), job.stderr
    assert [h["epoch"] for h in history(run)] == [1, 2]
    assert final(run)["world_size"] == 2 and final(run)["epochs"] == 2
    assert abs(final(run)["test_rmse"] - final(reference_run)["test_rmse"]) < 0.005


def free_port() -> int:
    """A port free right now (the c10d rendezvous needs a concrete HOST:PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_on_one_machine_match_one_node(reference_run: Path,
                                                 trainer_shards_dir: Path,
                                                 tmp_path: Path) -> None:
    """Two torchrun "nodes" of one rank each meet through a c10d rendezvous. Same seed,
    data and world size as the single-node reference: identical metrics (determinism)."""
    run = tmp_path / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [start_job([TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                        "--rdzv-id", "faults-test", "-m", "trainer", trainer_shards_dir,
                        "--out", run, *SETTINGS, *FAST, *EPOCHS, *NO_CLUSTERS])
             for _ in range(2)]
    jobs = [finish_job(node) for node in nodes]
    assert final(run)["world_size"] == 2
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert sum(job.stderr.count("training on ") for job in jobs) == 1  # rank 0 logs
    assert without_timing(final(run)) == without_timing(final(reference_run))
    assert without_timing(history(run)) == without_timing(history(reference_run))


def test_a_raising_rank_ends_the_job_quickly(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """Rank 1 raises at step 5: the job ends (no hang) within 30 s of the failure, exit 1,
    the error appears once, and the launcher's one line names rank 1. (Measured from the
    failure, not the start: starting 2 ranks on 2 busy cores alone can take 20 s.)"""
    proc = start_job([SHARDMF, "train", trainer_shards_dir, "--out", tmp_path / "run",
                      "--nproc", "2", *SETTINGS, *FAST, *EPOCHS, *NO_CLUSTERS],
                     fault="raise:1:5")
    failed_at: list[float] = []
    lines: list[str] = []

    def read_stderr() -> None:
        for line in proc.stderr:
            if not failed_at and "injected failure" in line:
                failed_at.append(time.monotonic())
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(10)
        pytest.fail(f"no exit within {RUN_TIMEOUT_S} s (hang?)\n" + "".join(lines))
    ended = time.monotonic()
    reader.join(10)
    stderr = "".join(lines)
    assert proc.returncode == 1, stderr
    assert failed_at, stderr
    assert ended - failed_at[0] < 30, f"{ended - failed_at[0]:.1f} s after the failure"
    assert stderr.count("RuntimeError: SHARDMF_TEST_FAULT: injected failure on rank 1 "
                        "before step 5") == 1, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert re.match(r"shardmf: error: training failed on ranks? ([0-9, ]*\b)?1\b", errors[0])
