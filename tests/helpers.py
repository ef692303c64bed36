"""What several test modules share, so that no test module imports another.

``tests/`` is on ``sys.path`` under pytest (a folder of test modules without
``__init__.py``), so ``from helpers import ...`` works from any of them, and from the ranks
that `spawn_ranks` starts (spawned processes inherit the parent's path).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trainer.config import (
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RankingConfig,
    RunConfig,
    TrainConfig,
)
from trainer.distributed import DistEnv, teardown
from trainer.model import BiasedMF
from trainer.train import train

torch.set_num_threads(1)

# --- commands and their environment ----------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARDMF = str(BIN / "shardmf")
TORCHRUN = str(BIN / "torchrun")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

# --- jobs as subprocesses (shardmf, torchrun) ------------------------------------------

RUN_TIMEOUT_S = 150  # one job; a healthy one takes 10-25 s on 2 busy cores

# One rank per core, small model; a collective stuck for 60 s fails the job instead of
# hanging it. --batch-size is global: each of 2 ranks takes 128 ratings per step.
# Exact per-step synchronisation (--sync-every 1), the optimisation one rank runs: these
# tests compare ranks with one rank and with uninterrupted runs bit for bit. The default
# periodic exchange of several ranks is tested in test_defaults.py and test_sync.py.
SETTINGS = ["--threads", "1", "--dim", "16", "--batch-size", "256", "--reg", "0.02",
            "--optimizer", "sgd", "--lr", "0.03", "--seed", "0", "--timeout-s", "60",
            "--sync-every", "1"]
NO_CLUSTERS = ["--clusters", "0"]


def finish_job(proc: subprocess.Popen, expect: int | None = 0,
               timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Wait for a job or kill its whole process group (torchrun and every rank it started)."""
    command = " ".join(map(str, proc.args))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout:.0f} s (hang?): {command}\n"
                    f"--- stdout\n{out}\n--- stderr\n{err}")
    if expect is not None and proc.returncode != expect:
        pytest.fail(f"exit code {proc.returncode}, expected {expect}: {command}\n"
                    f"--- stdout\n{out}\n--- stderr\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "shardmf: error:" in line]


# --- ranks as spawned processes, meeting through a file:// rendezvous ------------------

JOB_TIMEOUT_S = 120


def _rank_main(rank: int, world_size: int, folder: str, job, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        env = DistEnv(rank, rank, world_size, world_size, torch.device("cpu"), "gloo")
        job(env, *args)
    except BaseException:
        Path(folder, f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        teardown()


def spawn_ranks(job, *args, folder: Path, world_size: int = 2) -> None:
    """Run ``job(env, *args)`` on ``world_size`` gloo ranks; fail with each rank's traceback."""
    folder.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_rank_main, args=(rank, world_size, str(folder), job, args))
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(JOB_TIMEOUT_S)
    hung = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join(10)
    failed = {rank: proc.exitcode for rank, proc in enumerate(procs) if proc.exitcode != 0}
    if hung or failed:
        errors = "\n".join(f"--- rank {r}\n{p.read_text()}"
                           for r in range(world_size)
                           if (p := folder / f"error-{r}.txt").is_file())
        pytest.fail(f"ranks hung {hung}, exit codes {failed}\n{errors}")


# --- the trainer in one process --------------------------------------------------------

SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                 device=torch.device("cpu"), backend=None)


def copy_shards(shards_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's shards, safe to damage."""
    return Path(shutil.copytree(shards_dir, tmp_path / "shards"))


def edit_manifest(shards: Path, change) -> None:
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def rank_env(rank: int, world_size: int, backend: str | None = "gloo") -> DistEnv:
    """Rank ``rank`` of ``world_size`` without a process group (ownership needs none)."""
    return DistEnv(rank, rank, world_size, world_size, torch.device("cpu"), backend)


def small_model(sparse: bool = True, **config) -> BiasedMF:
    torch.manual_seed(0)
    return BiasedMF(6, 4, 3.5, ModelConfig(**{"reg": 0.05, "dim": 3, **config}), sparse=sparse)


SMALL = dict(batch_size=256, seed=0, threads=1, patience=0)


def run_config(shards: str | Path, run: str | Path, model: ModelConfig | None = None,
               optim: OptimConfig | None = None, train: TrainConfig | None = None,
               ranking: RankingConfig | None = None,
               objective: ObjectiveConfig | None = None) -> RunConfig:
    """A training run's config, every section defaulted unless given, no clustering."""
    return RunConfig(shards_dir=str(shards), run_dir=str(run), model=model or ModelConfig(),
                     optim=optim or OptimConfig(), train=train or TrainConfig(),
                     objective=objective or ObjectiveConfig(),
                     ranking=ranking or RankingConfig())


def run_train(shards: Path, run: Path, **options) -> dict:
    return train(run_config(shards, run, ModelConfig(dim=8, reg=0.02),
                            OptimConfig(optimizer="sgd", lr=0.03),
                            TrainConfig(**{**SMALL, **options})), SINGLE)


# --- folders ---------------------------------------------------------------------------


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[list[str]]:
    """A real read-only ``folder`` (created when missing) for the block; yields the command
    prefix that makes root obey it (setpriv drops root's permission override), empty for
    other users."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: permissions cannot be enforced")
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        yield (["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                "--bounding-set=-dac_override,-dac_read_search", "--"]
               if os.geteuid() == 0 else [])
    finally:
        folder.chmod(0o755)
