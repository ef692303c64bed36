"""Nothing lost, ever: what prepare, export-split and synth may replace, remove or leave behind.

Real files and real processes: a writer is started as a subprocess and paused (SIGSTOP),
interrupted (SIGINT) or killed (SIGKILL) at a known point, found by the folders it makes.
A full disk is a real 1 MiB tmpfs (needs root to mount); permission denied is a real
read-only folder, with root's permission override dropped by ``setpriv``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ENV, ROOT, read_only_folder

from data_shards import InputError, PrepareConfig, prepare
from launch.cli import main
from shardmf.outputs import MARKER_NAME, read_marker

PREPARE = ("import sys; from data_shards import PrepareConfig, prepare; "
           "prepare([sys.argv[1]], sys.argv[2], PrepareConfig(num_shards=4))")


def write_tsv(path: Path, rows: int, duplicate: bool = False, seed: int = 0) -> Path:
    """``rows`` distinct (user, item) pairs as u.data-like TSV; one pair twice if asked."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(4000 * 1000, size=rows, replace=False)
    users, items = pairs // 1000 + 1, pairs % 1000 + 1
    stars = rng.integers(1, 6, rows)
    lines = [f"{u}\t{i}\t{r}\t{10**9 + k}" for k, (u, i, r) in
             enumerate(zip(users.tolist(), items.tolist(), stars.tolist()))]
    if duplicate:
        lines.append(lines[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def start(args: list, cli: bool = False) -> subprocess.Popen:
    command = ([sys.executable, "-m", "launch.cli", *map(str, args)] if cli else
               [sys.executable, "-c", PREPARE, *map(str, args)])
    return subprocess.Popen(command, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def wait_for(folder: Path, pattern: str, process: subprocess.Popen, timeout: float = 60.0
             ) -> Path:
    """The first path matching ``pattern`` under ``folder``, while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"the writer ended (exit {process.returncode}) before {pattern} "
                        f"appeared:\n{process.stderr.read()}")
        time.sleep(0.01)
    process.kill()
    pytest.fail(f"{pattern} never appeared under {folder}")


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines), stderr
    assert lines and lines[-1].startswith("shardmf: error: "), stderr
    return lines[-1]


# ------------------------------------------------------------ (1) --overwrite owns nothing else


def test_overwrite_never_deletes_the_input_folder(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """`prepare d/ratings.tsv --out d --overwrite` used to delete d/ratings.tsv."""
    folder = tmp_path / "d"
    source = write_tsv(folder / "ratings.tsv", 50)
    before = source.read_bytes()
    assert main(["prepare", str(source), "--out", str(folder), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "shardmf did not write this folder" in line
    assert source.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert [p.name for p in folder.iterdir()] == ["ratings.tsv"]


def test_overwrite_replaces_only_marked_shards_that_hold_no_input(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = write_tsv(tmp_path / "r.tsv", 60)
    shards = tmp_path / "shards"
    assert main(["prepare", str(source), "--out", str(shards), "--num-shards", "2"]) == 0
    assert read_marker(shards)["kind"] == "shards"
    # An input inside the marked folder (through a symlink, too): never replaced.
    (tmp_path / "link").symlink_to(shards)
    inside = tmp_path / "link" / "train" / "part-00000.parquet"
    capsys.readouterr()
    assert main(["prepare", str(inside), "--out", str(shards), "--overwrite"]) == 2
    assert "is inside it" in one_error_line(capsys.readouterr().err)
    assert inside.is_file()
    # A marked folder of another kind is not replaced by prepare.
    other = tmp_path / "export"
    assert main(["export-split", str(shards), "--out", str(other)]) == 0
    assert main(["prepare", str(source), "--out", str(other), "--overwrite"]) == 2
    assert "holds shardmf export-split output" in one_error_line(capsys.readouterr().err)
    assert (other / "train.tsv").is_file()
    # The same kind, holding no input: replaced whole.
    assert main(["prepare", str(source), "--out", str(shards), "--overwrite",
                 "--num-shards", "3"]) == 0
    assert len(list((shards / "train").iterdir())) == 3
    assert hidden(tmp_path) == []


def test_export_split_into_an_existing_folder(tmp_path: Path, capsys) -> None:
    source = write_tsv(tmp_path / "r.tsv", 60)
    shards = tmp_path / "shards"
    assert main(["prepare", str(source), "--out", str(shards), "--num-shards", "2"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    capsys.readouterr()
    for extra in ([], ["--overwrite"]):
        assert main(["export-split", str(shards), "--out", str(mine), *extra]) == 2
        one_error_line(capsys.readouterr().err)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    split = tmp_path / "split"
    assert main(["export-split", str(shards), "--out", str(split)]) == 0
    assert main(["export-split", str(shards), "--out", str(split), "--overwrite"]) == 0
    assert sorted(p.name for p in split.iterdir()) == [MARKER_NAME, "test.tsv", "train.tsv",
                                                        "val.tsv"]


# ------------------------------------------------ (2) cleanup removes only what it created


def test_failing_prepare_keeps_a_parent_another_run_wrote_into(tmp_path: Path) -> None:
    """A fails (a repeated pair) after B, started later, finished into the same new parent."""
    failing = start([write_tsv(tmp_path / "dup.tsv", 300, duplicate=True),
                     tmp_path / "new" / "a"])
    wait_for(tmp_path / "new", ".a.tmp-*", failing)
    os.kill(failing.pid, signal.SIGSTOP)  # A has made new/ and holds its temporary folder
    try:
        prepare([str(write_tsv(tmp_path / "base.tsv", 200))], tmp_path / "new" / "b",
                PrepareConfig(num_shards=2))
    finally:
        os.kill(failing.pid, signal.SIGCONT)
    _, stderr = failing.communicate(timeout=120)
    assert failing.returncode == 1 and "rated more than once" in stderr
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["b"]
    assert (tmp_path / "new" / "b" / "manifest.json").is_file()


def test_failed_prepare_removes_the_empty_parents_it_made(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\t3\n1\t3\toops\n")
    with pytest.raises(InputError, match="line 2"):
        prepare([str(bad)], tmp_path / "x" / "y" / "shards", PrepareConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv"]


# ------------------------------------------------------------- (3) one writer per target


def test_a_second_writer_fails_at_once(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    first = start([write_tsv(tmp_path / "a.tsv", 300), out])
    wait_for(tmp_path, ".shards.tmp-*", first)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(InputError, match=rf"--out {out}: another shardmf process "
                                             rf"\(pid {first.pid}\) is writing it"):
            prepare([str(write_tsv(tmp_path / "b.tsv", 100, seed=1))], out,
                    PrepareConfig(num_shards=2, overwrite=True))
        assert time.monotonic() - started < 5
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first.communicate(timeout=120)
    assert first.returncode == 0
    assert read_marker(out)["kind"] == "shards"
    assert hidden(tmp_path) == []  # the lock file goes with its writer


# ------------------------------------------------------ (10) interrupted and killed writers


@pytest.mark.timeout(120)
def test_ctrl_c_leaves_no_temporary_folder(tmp_path: Path) -> None:
    """SIGINT while Dask threads write staging files: exit 130, one line, nothing left.

    Dask returns at once on Ctrl-C while its threads keep writing; they used to re-create
    the temporary folder after it was removed (seen in about half the runs)."""
    source = write_tsv(tmp_path / "in" / "r.tsv", 300_000)
    writer = start(["prepare", source, "--out", tmp_path / "out" / "shards",
                    "--num-shards", "16"], cli=True)
    wait_for(tmp_path / "out", ".shards.tmp-*/_staging/shard=*", writer, timeout=120)
    writer.send_signal(signal.SIGINT)
    _, stderr = writer.communicate(timeout=60)
    assert writer.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == ("shardmf: interrupted; nothing half-written "
                                               "was kept")
    time.sleep(1.0)  # a straggling thread would write now
    assert not (tmp_path / "out").exists()  # not even the parent it made


def test_leftovers_of_a_killed_writer_are_removed_at_the_next_start(tmp_path: Path) -> None:
    out = tmp_path / "shards"
    source = write_tsv(tmp_path / "r.tsv", 300)
    killed = start([source, out])
    wait_for(tmp_path, ".shards.tmp-*", killed)
    killed.kill()
    killed.wait(timeout=30)
    assert any(name.startswith(".shards.tmp-") for name in hidden(tmp_path))
    # Left alone: a live process's temporary folder, and names that are not shardmf's.
    alive = tmp_path / f".shards.tmp-{os.getpid()}-0abc"
    foreign = tmp_path / ".shards.tmp-mine"
    alive.mkdir()
    foreign.mkdir()
    prepare([str(source)], out, PrepareConfig(num_shards=2))
    assert hidden(tmp_path) == sorted([alive.name, foreign.name])
    assert (out / "manifest.json").is_file()


def test_a_swap_cut_short_puts_the_old_output_back(tmp_path: Path) -> None:
    """Killed between the two renames: OUT is missing and .OUT.old-PID-* holds it."""
    source = write_tsv(tmp_path / "r.tsv", 100)
    out = tmp_path / "shards"
    prepare([str(source)], out, PrepareConfig(num_shards=2))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    os.replace(out, tmp_path / f".shards.old-{dead}-00ff")
    with pytest.raises(InputError, match="already exists and is not empty"):
        prepare([str(source)], out, PrepareConfig(num_shards=2))
    assert (out / "manifest.json").is_file() and hidden(tmp_path) == []


# ------------------------------------------------------------ (11) full disk, no permission


@contextlib.contextmanager
def tiny_filesystem(size: str = "1m"):
    folder = Path(tempfile.mkdtemp(prefix="shardmf-full-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}; needs root)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
        folder.rmdir()


def cli(*args) -> subprocess.CompletedProcess:
    # A process per command: after ENOSPC inside Dask threads, CPython 3.11.7's ast.parse
    # fails in that process (SystemError: AST constructor recursion depth mismatch).
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)


def test_disk_full_is_named_as_such_and_leaves_nothing(tmp_path: Path) -> None:
    source = write_tsv(tmp_path / "r.tsv", 120_000)
    shards = tmp_path / "shards"
    prepare([str(source)], shards, PrepareConfig(num_shards=2))
    with tiny_filesystem() as full:
        for args in (["prepare", source, "--out", full / "shards"],
                     ["export-split", shards, "--out", full / "split"]):
            done = cli(*args)
            assert done.returncode == 2, done.stderr
            line = one_error_line(done.stderr)
            assert "No space left on device" in line and str(args[-1]) in line, line
            assert "could not be parsed" not in line
            assert list(full.iterdir()) == []


def test_permission_denied_is_one_line(tmp_path: Path) -> None:
    source = write_tsv(tmp_path / "r.tsv", 50)
    locked = tmp_path / "locked"
    with read_only_folder(locked) as drop:
        for out in (locked / "shards", locked / "deeper" / "shards"):
            done = subprocess.run([*drop, sys.executable, "-m", "launch.cli", "prepare",
                                   str(source), "--out", str(out)], cwd=ROOT, env=ENV,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, done.stderr
            line = one_error_line(done.stderr)
            assert "Permission denied" in line and str(locked) in line, line
        assert list(locked.iterdir()) == []


# --------------------------------------------------------- (12) --out that is a regular file


@pytest.mark.parametrize("command", ["prepare", "export-split"])
def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture,
                            command: str) -> None:
    source = write_tsv(tmp_path / "r.tsv", 60)
    shards = tmp_path / "shards"
    prepare([str(source)], shards, PrepareConfig(num_shards=2))
    taken = tmp_path / "taken"
    taken.write_text("a file\n")
    first = str(source) if command == "prepare" else str(shards)
    for out, expected in ((taken, f"--out {taken} is a file, not a folder"),
                          (taken / "sub", f"--out {taken / 'sub'}: {taken} is a file")):
        assert main([command, first, "--out", str(out)]) == 2
        assert expected in one_error_line(capsys.readouterr().err)
    assert taken.read_text() == "a file\n"
    assert hidden(tmp_path) == []


class InterruptedAfter:
    """A file handle that takes a Ctrl-C (KeyboardInterrupt) once ``limit`` bytes went
    through it, as a signal arriving mid-write does."""

    def __init__(self, handle, limit: int) -> None:
        self.handle, self.limit, self.written = handle, limit, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if self.written > self.limit:
            raise KeyboardInterrupt
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def test_ctrl_c_during_a_checkpoint_write_stays_an_interruption(tmp_path: Path) -> None:
    """torch.save's zip writer turns an interrupted write into a RuntimeError ("unexpected
    pos") on its way out; the run must still see a Ctrl-C, and keep no temporary file."""
    import torch

    from shardmf.outputs import replace_atomically
    payload = {"table": torch.zeros(1000, 8)}
    with pytest.raises(KeyboardInterrupt):
        replace_atomically(tmp_path / "checkpoint.pt",
                           lambda handle: torch.save(payload, InterruptedAfter(handle, 4096)))
    assert list(tmp_path.iterdir()) == []
