"""Issue #12, the training side: run folders owned and never collateral, a killed launcher
takes its ranks along, damage found where it is read, --resume only of the same training,
and every fault one line (exit 2, 130 for Ctrl-C) with nothing half-written left.

Real files, real `shardmf` processes and real signals; the ENOSPC/EROFS cases mount small
tmpfs folders (root only, skipped otherwise).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    ROOT,
    SHARDMF,
    SINGLE,
    SMALL,
    error_lines,
    finish_job,
    run_config,
    run_train,
)

from launch.cli import main as cli_main
from shardmf.errors import InputError
from shardmf.manifest import Footer
from trainer.config import ModelConfig, OptimConfig, TrainConfig
from trainer.shards import open_shards
from trainer.train import train

pytestmark = pytest.mark.timeout(120)

QUICK = ["--threads", "1", "--dim", "8", "--batch-size", "512", "--optimizer", "sgd",
         "--lr", "0.03", "--seed", "0", "--timeout-s", "60", "--clusters", "0"]


def start(args: list) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SHARDMF_TEST_FAULT", None)
    return subprocess.Popen([str(a) for a in args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def shardmf(*args, expect: int | None = 0) -> subprocess.CompletedProcess:
    return finish_job(start([SHARDMF, *args]), expect, timeout=90)


def in_process(*args) -> int:
    """`shardmf ARGS` (one process) in this one, its SIGTERM handler put back after."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return cli_main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)


def refused(capsys, *args) -> str:
    """`shardmf ARGS` in this process, for refusals made before any rank starts: the line."""
    assert in_process(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1, err
    return error_lines(err)[0]


def one_error(job: subprocess.CompletedProcess) -> str:
    """The one line a failed command prints, checked to be alone and traceback-free."""
    assert "Traceback" not in job.stderr, job.stderr
    lines = error_lines(job.stderr)
    assert len(lines) == 1, job.stderr
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders anywhere below ``folder``."""
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp")
                  or ".tmp-" in p.name or p.name.endswith(".lock"))


# --- (4) an existing run -------------------------------------------------------------


def test_train_refuses_an_existing_run_unless_resume_or_overwrite(trainer_shards_dir: Path,
                                                                  tmp_path: Path,
                                                                  capsys) -> None:
    run = tmp_path / "run"
    assert in_process("train", trainer_shards_dir, "--out", run, *QUICK, "--epochs", "1") == 0
    assert json.loads((run / ".shardmf-output.json").read_text())["kind"] == "run"
    for stale in ("clusters.json", "report.html", "clusters_pca.png"):
        (run / stale).write_text("an older run's")
    (run / "shards").mkdir()
    (run / "shards" / "kept.txt").write_text("the input of `shardmf run`")
    model = (run / "model.pt").read_bytes()

    line = refused(capsys, "train", trainer_shards_dir, "--out", run, *QUICK, "--epochs", "1")
    assert "already holds a finished run; pass --resume to continue it, --overwrite to " \
        "replace it" in line
    assert (run / "model.pt").read_bytes() == model and (run / "clusters.json").exists()

    assert in_process("train", trainer_shards_dir, "--out", run, *QUICK, "--epochs", "1",
                      "--seed", "1", "--overwrite") == 0
    assert (run / "model.pt").read_bytes() != model
    assert not any((run / stale).exists() for stale in
                   ("clusters.json", "report.html", "clusters_pca.png"))
    assert (run / "shards" / "kept.txt").read_text() == "the input of `shardmf run`"
    assert leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_shardmf_did_not_mark_as_a_run(
        trainer_shards_dir: Path, tmp_path: Path, capsys) -> None:
    unmarked = tmp_path / "older"
    unmarked.mkdir()
    (unmarked / "config.json").write_text("{}")  # a run from before runs were marked
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    shards_copy = tmp_path / "shards"
    shutil.copytree(trainer_shards_dir, shards_copy)
    (shards_copy / ".shardmf-output.json").write_text(
        json.dumps({"tool": "shardmf", "kind": "shards", "version": "0"}))
    for out, message in ((unmarked, "has no .shardmf-output.json"),
                         (foreign, "is not empty and holds no shardmf run"),
                         (shards_copy, "holds shardmf shards output, not a run")):
        assert message in refused(capsys, "train", trainer_shards_dir, "--out", out, *QUICK,
                                  "--overwrite")
    assert (foreign / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in unmarked.iterdir()) == ["config.json"]
    open_shards(shards_copy, "full")  # untouched


# --- (5) killing the launcher ----------------------------------------------------------


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie has finished: it writes nothing more
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["SIGINT-group", "SIGTERM-launcher", "SIGKILL-launcher"])
def test_killing_the_launcher_ends_every_rank(trainer_shards_dir: Path, tmp_path: Path,
                                              how: str, capsys) -> None:
    """Ctrl-C (SIGINT to the process group) is one line and exit 130; SIGTERM 143; even
    SIGKILL of the launcher alone ends both ranks (PR_SET_PDEATHSIG). A --resume started
    beside the live ranks fails at once on the run folder's lock; after the kill the last
    checkpoint resumes."""
    run = tmp_path / "run"
    job = start([SHARDMF, "train", trainer_shards_dir, "--out", run, "--nproc", "2", *QUICK,
                 "--batch-size", "64", "--epochs", "40", "--checkpoint-every", "50"])
    try:
        assert wait_for(lambda: (run / "checkpoint.pt").exists(), 60), "no checkpoint"
        ranks = [c for c in children(job.pid)]
        assert len(ranks) == 2, ranks

        started = time.monotonic()
        line = refused(capsys, "train", trainer_shards_dir, "--out", run, *QUICK, "--resume")
        assert "another shardmf process (pid " in line and time.monotonic() - started < 5

        name, target = how.split("-")
        number = getattr(signal, name)
        if target == "group":
            os.killpg(job.pid, number)
        else:
            os.kill(job.pid, number)
        assert wait_for(lambda: not any(alive(r) for r in ranks), 20), "orphaned ranks"
        out, err = job.communicate(timeout=40)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    if name == "SIGKILL":
        assert job.returncode == -signal.SIGKILL
    else:
        assert job.returncode == {"SIGINT": 130, "SIGTERM": 143}[name], err
        assert "Traceback" not in err and "[rank" not in err, err
        stopped = re.findall(r"shardmf: [^\n]*", err)  # (after a progress bar's \r)
        assert len(stopped) == 1 and "a run keeps its last checkpoint" in stopped[0], err
    assert leftovers(tmp_path) == [] or name == "SIGKILL"
    if name != "SIGKILL":
        return
    # The hardest case (nothing could clean up): the last checkpoint still resumes, and the
    # killed writers' temporary files, if any, are removed.
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    resumed = shardmf("train", trainer_shards_dir, "--out", run, "--nproc", "2", *QUICK,
                      "--batch-size", "64", "--epochs", str(saved["epoch"] + 1), "--resume")
    assert "resuming from" in resumed.stderr
    assert json.loads((run / "metrics.json").read_text())["epochs"] == saved["epoch"] + 1
    assert leftovers(tmp_path) == []


# --- (8) damaged shards ---------------------------------------------------------------


def with_page_checksums(shards: Path, split: str = "train") -> Path:
    """Rewrite a split's first file with page checksums (as `prepare` writes them now),
    uncompressed and without dictionaries, so a flipped byte changes a value silently."""
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["files"][split][0]
    path = shards / entry["path"]
    groups = [pq.ParquetFile(path).read_row_group(i) for i in range(len(entry["row_groups"]))]
    with pq.ParquetWriter(path, groups[0].schema, write_page_checksum=True,
                          compression="none", use_dictionary=False) as writer:
        for group in groups:
            writer.write_table(group)
    return path


def flip_last_rating_byte(shards: Path, path: Path) -> None:
    """XOR the lowest byte of the last rating of row group 0, keeping the manifest in step
    (sizes, SHA-256 and footer), as damage after `prepare` and a `verify` would look."""
    column = next(c for c in (pq.ParquetFile(path).metadata.row_group(0).column(i)
                              for i in range(4)) if c.path_in_schema == "rating")
    data = bytearray(path.read_bytes())
    data[column.data_page_offset + column.total_compressed_size - 4] ^= 1
    path.write_bytes(bytes(data))
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["files"]["train"]:
        if shards / entry["path"] == path:
            entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            entry["footer"] = dataclasses.asdict(Footer.of(bytes(data)))
    (shards / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.distributed
def test_a_flipped_byte_in_a_data_page_is_one_line_and_leaves_no_run(trainer_shards_dir: Path,
                                                                     tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(trainer_shards_dir, shards)
    damaged = with_page_checksums(shards)
    flip_last_rating_byte(shards, damaged)
    assert pq.ParquetFile(damaged).read_row_group(0)["rating"][-1].as_py() % 0.5 != 0  # silent
    run = tmp_path / "run"
    job = shardmf("train", shards, "--out", run, "--nproc", "2", *QUICK, "--epochs", "1",
                  expect=2)
    line = one_error(job)
    assert f"shard train/{damaged.name}: row group 0 is damaged" in line, line
    assert "CRC checksum verification failed" in line
    assert not run.exists() and leftovers(tmp_path) == []  # (14): no config.json left


def test_manifest_counts_are_checked_against_the_files(trainer_shards_dir: Path,
                                                       tmp_path: Path) -> None:
    """An edited count is named when the shards are opened, never an IndexError later."""
    for key, value, message in (
            (("counts", "users"), 100, "counts.users is 100 but users.parquet has 300 rows"),
            (("counts", "ratings", "train"), 1, "counts.ratings.train is 1 but its files hold")):
        shards = tmp_path / f"shards-{key[-1]}"
        shutil.copytree(trainer_shards_dir, shards)
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest[key[0]][key[1]] = value if len(key) == 2 else {
            **manifest[key[0]][key[1]], key[2]: value}
        (shards / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(InputError, match=message):
            open_shards(shards)


def test_id_ranges_are_checked_against_the_counts(trainer_shards_dir: Path,
                                                  tmp_path: Path) -> None:
    """Counts and id tables edited together still disagree with the footers' id ranges."""
    shards = tmp_path / "shards"
    shutil.copytree(trainer_shards_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["counts"]["items"] = 10
    manifest.pop("id_files")  # edited too (else the id table's checksum is named first)
    users = pq.read_table(shards / manifest["items_file"])
    pq.write_table(users.slice(0, 10), shards / manifest["items_file"])
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=r"item_id in 0\.\.\d+, the manifest counts 10"):
        open_shards(shards)


# --- (9), (12) resuming -----------------------------------------------------------------


def test_resume_refuses_other_shards_and_another_optimizer(trainer_shards_dir: Path,
                                                           trainer_user_shards_dir: Path,
                                                           tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_train(trainer_shards_dir, run, epochs=1)
    with pytest.raises(InputError, match=r"was trained on other shards \(identity [0-9a-f]{16}"
                                         r", SHARDS_DIR has [0-9a-f]{16}\)"):
        run_train(trainer_user_shards_dir, run, epochs=2, resume=True,
                  user_embeddings="replicated")
    with pytest.raises(InputError, match="trained with optimizer='sgd'; this run has "
                                         "optimizer='adam'. Resume with optimizer='sgd'"):
        train(run_config(trainer_shards_dir, run,
                         ModelConfig(dim=8, reg=0.02),
                         OptimConfig(optimizer="adam", lr=0.03),
                         TrainConfig(**SMALL, epochs=2, resume=True)), SINGLE)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this would have run",))


@pytest.mark.parametrize("content", [b"", os.urandom(4096), pickle.dumps(_RunsCode())],
                         ids=["empty", "random", "crafted"])
def test_a_bad_checkpoint_is_one_line(trainer_shards_dir: Path, tmp_path: Path,
                                      content: bytes, capsys) -> None:
    run = tmp_path / "run"
    run_train(trainer_shards_dir, run, epochs=1)
    (run / "checkpoint.pt").write_bytes(content)
    with pytest.raises(InputError) as caught:
        run_train(trainer_shards_dir, run, epochs=2, resume=True)
    message = str(caught.value)
    # checksums.json names the damage before torch parses anything
    assert message.startswith(f"{run / 'checkpoint.pt'}: damaged or replaced since the run "
                              "wrote it") and "\n" not in message
    assert "weights_only" not in message
    assert "this would have run" not in capsys.readouterr().out


# --- (11), (12) disks that refuse ---------------------------------------------------------


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_nothing_half_written(trainer_shards_dir: Path,
                                                          tmp_path: Path) -> None:
    """The checkpoint (about 1.8 MB at --dim 1024) does not fit a 1 MB tmpfs: one line
    naming it and the cause, exit 2, and the folder as it was (empty)."""
    with tmpfs(tmp_path / "small", "size=1m") as small:
        job = shardmf("train", trainer_shards_dir, "--out", small / "run", *QUICK,
                      "--dim", "1024", "--epochs", "1", expect=2)
        line = one_error(job)
        assert f"{small / 'run' / 'checkpoint.pt'}: No space left on device while writing " \
            "it; free some space or choose another --out" in line, line
        assert list(small.iterdir()) == []


def test_a_read_only_disk_is_one_line(trainer_shards_dir: Path, tmp_path: Path,
                                      capsys) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=1m") as read_only:
        line = refused(capsys, "train", trainer_shards_dir, "--out",
                       read_only / "runs" / "run", *QUICK, "--epochs", "1")
        assert "Read-only file system" in line and "choose a writable --out" in line, line


# --- (13) train_seconds --------------------------------------------------------------------


def test_train_seconds_counts_each_epoch_once_with_mid_epoch_checkpoints(
        trainer_shards_dir: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    metrics = run_train(trainer_shards_dir, tmp_path / "run", epochs=2, checkpoint_every=3)
    wall = time.perf_counter() - started
    epochs = [json.loads(line) for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["train_seconds"] == pytest.approx(sum(e["seconds"] for e in epochs),
                                                     abs=1e-3)
    assert 0 < metrics["train_seconds"] < wall
