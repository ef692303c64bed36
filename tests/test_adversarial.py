"""What a hostile-but-realistic user tried (issue 25): each case loses nothing, damages
nothing silently and ends in one clear line.

Grouped by theme: folders that hold someone else's output, id maps and manifest facts,
readers of odd inputs, listeners and planted symlinks, signals and leftovers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import dask
import psutil
import pyarrow.parquet as pq
import pytest
from helpers import (
    ENV,
    NO_CLUSTERS,
    SHARDMF,
    edit_manifest,
    error_lines,
    finish_job,
    read_only_folder,
    run_train,
)

from data_shards import PrepareConfig, movielens_path, prepare
from data_shards.verify import verify_shards
from launch.cli import main
from launch.dask_cluster import dask_client
from shardmf.errors import InputError, raise_terminated
from shardmf.outputs import MARKER_NAME, folder_lock, no_interrupts, write_marker
from trainer.run_files import check_run_target, claim_run_folder
from trainer.shards import open_shards

# --- security: planted symlinks, listeners ------------------------------------------------


def test_a_symlink_at_the_lock_name_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    (tmp_path / ".out.lock").symlink_to(target)
    with pytest.raises(InputError, match="symbolic link"), folder_lock(tmp_path / "out"):
        pass
    assert target.read_text() == "keep me\n"
    assert (tmp_path / ".out.lock").is_symlink()


def test_a_local_dask_cluster_listens_on_loopback_only() -> None:
    with dask_client(None, 1):
        listening = {conn.laddr.ip for conn in psutil.Process().net_connections("tcp")
                     if conn.status == psutil.CONN_LISTEN}
    assert listening and listening <= {"127.0.0.1"}, listening


# --- folders holding someone else's output --------------------------------------------------

OLD_RUN = {"config.json": "{}", "metrics.json": '{"test_rmse": 0.9}', "model.pt": "weights",
           "model.npz": "arrays", "report.md": "# old"}


def finished_run(run: Path) -> Path:
    run.mkdir(parents=True)
    write_marker(run, "run")
    for name, text in OLD_RUN.items():
        (run / name).write_text(text)
    return run


def run_files(run: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in run.iterdir() if p.name != MARKER_NAME}


def test_ctrl_c_in_an_overwriting_job_before_its_checkpoint_puts_the_old_run_back(
        tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt), claim_run_folder(run, False, True):
        assert not (run / "model.pt").exists()  # the new job starts in an empty run
        (run / "config.json").write_text('{"new": true}')
        raise KeyboardInterrupt
    assert run_files(run) == OLD_RUN
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_an_overwriting_job_that_checkpointed_replaces_the_old_run(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt), claim_run_folder(run, False, True):
        (run / "checkpoint.pt").write_text("new")
        raise KeyboardInterrupt
    assert run_files(run) == {"checkpoint.pt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_a_run_set_aside_by_a_killed_job_comes_back(tmp_path: Path) -> None:
    run = finished_run(tmp_path / "run")
    dead = subprocess.Popen(["true"])
    dead.wait()
    aside = tmp_path / f".run.old-{dead.pid}-0123abcd"
    aside.mkdir()
    for name in OLD_RUN:
        (run / name).rename(aside / name)
    (run / "config.json").write_text('{"new": true}')  # the killed job's, no checkpoint
    with pytest.raises(InputError, match="already holds a finished run"), \
            claim_run_folder(run, False, False):
        pass
    assert run_files(run) == OLD_RUN and not aside.exists()


@pytest.fixture()
def shard_folder(tmp_path: Path, make_ratings, ratings_writer) -> tuple[Path, Path]:
    """(ratings file, shard folder prepared from it)."""
    ratings = ratings_writer(make_ratings(), tmp_path / "raw", "csv")
    out = tmp_path / "shards"
    with dask.config.set(scheduler="synchronous"):
        prepare([str(ratings)], out, PrepareConfig(num_shards=2))
    return ratings, out


def test_a_run_is_never_trained_into_a_shard_folder(shard_folder) -> None:
    _, shards = shard_folder
    with pytest.raises(InputError, match="lies inside .*shards output"):
        check_run_target(shards / "nest" / "myrun", resume=False, overwrite=False)


@pytest.mark.parametrize("planted", ["myrun", "notes.txt"])
def test_prepare_overwrite_keeps_what_it_did_not_write(shard_folder, planted: str) -> None:
    ratings, shards = shard_folder
    if planted == "myrun":
        finished_run(shards / planted)
    else:
        (shards / planted).write_text("mine\n")
    with dask.config.set(scheduler="synchronous"), \
            pytest.raises(InputError, match=f"holds {planted}.*not replaced"):
        prepare([str(ratings)], shards, PrepareConfig(num_shards=2, overwrite=True))
    assert (shards / planted).exists()


def test_a_run_inside_an_owned_subfolder_also_stops_prepare_overwrite(shard_folder) -> None:
    ratings, shards = shard_folder
    finished_run(shards / "train" / "myrun")
    with dask.config.set(scheduler="synchronous"), \
            pytest.raises(InputError, match="holds shardmf run output"):
        prepare([str(ratings)], shards, PrepareConfig(num_shards=2, overwrite=True))
    assert run_files(shards / "train" / "myrun") == OLD_RUN


def test_demo_never_writes_over_a_run_in_a_folder_it_did_not_make(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    finished_run(tmp_path / "D" / "run")
    assert main(["demo", "--out", str(tmp_path / "D")]) == 2
    assert "is not a folder `shardmf demo` made" in capsys.readouterr().err
    assert run_files(tmp_path / "D" / "run") == OLD_RUN


# --- id maps and manifest facts, checked against the files --------------------------------


def test_a_flipped_bit_in_an_id_table_is_found_by_verify_and_training(shard_folder) -> None:
    _, shards = shard_folder
    path = shards / "users.parquet"
    data = bytearray(path.read_bytes())
    data[64] ^= 0x10  # in the first data page, not the footer
    path.write_bytes(bytes(data))
    for check in (verify_shards, lambda root: open_shards(root, "quick")):
        with pytest.raises(InputError, match="users.parquet: differs from the id table"):
            check(shards)


def test_another_sets_id_table_with_as_many_rows_is_found(shard_folder, tmp_path: Path,
                                                          make_ratings, ratings_writer) -> None:
    _, shards = shard_folder
    other = ratings_writer(make_ratings(seed=1), tmp_path / "raw-other", "csv")
    with dask.config.set(scheduler="synchronous"):
        prepare([str(other)], tmp_path / "other", PrepareConfig(num_shards=2))
    assert (pq.read_metadata(tmp_path / "other" / "items.parquet").num_rows ==
            pq.read_metadata(shards / "items.parquet").num_rows)
    (tmp_path / "other" / "items.parquet").replace(shards / "items.parquet")
    with pytest.raises(InputError, match="items.parquet: differs from the id table"):
        verify_shards(shards)


def test_an_edited_training_mean_is_found_by_verify_full(shard_folder) -> None:
    _, shards = shard_folder
    edit_manifest(shards, lambda m: m["rating"].update(train_mean=m["rating"]["min"] + 0.01))
    verify_shards(shards)  # quick: the facts are still in order
    with pytest.raises(InputError, match="train_mean is .* but the train files' mean"):
        verify_shards(shards, full=True)


def test_facts_out_of_order_are_found_by_the_quick_check(shard_folder) -> None:
    _, shards = shard_folder
    edit_manifest(shards, lambda m: m["rating"].update(scale=[1.0, 2.0]))
    with pytest.raises(InputError, match="rating facts out of order"):
        open_shards(shards, "quick")


def drop_train_files(manifest: dict, keep: int) -> None:
    train = manifest["files"]["train"]
    manifest["files"]["train"] = train[:keep]
    manifest["counts"]["ratings"]["train"] = sum(e["rows"] for e in train[:keep])


@pytest.mark.parametrize("keep", [0, 1])
def test_removed_train_files_with_their_counts_lowered_are_found(shard_folder,
                                                                 keep: int) -> None:
    _, shards = shard_folder
    edit_manifest(shards, lambda m: drop_train_files(m, keep))
    for entry in sorted((shards / "train").iterdir())[keep:]:
        entry.unlink()
    with pytest.raises(InputError, match="no training ratings" if keep == 0 else
                       r"train files list shards \[0\] \(missing \[1\]\)"):
        verify_shards(shards)


# --- readers of odd inputs ------------------------------------------------------------------


def rating_lines(frame) -> str:
    return "".join(f"{r.user},{r.item},{r.rating:g},{r.timestamp}\n"
                   for r in frame.itertuples(index=False))


def prepare_quietly(inputs: list[str], out: Path) -> dict:
    with dask.config.set(scheduler="synchronous"):
        return prepare(inputs, out, PrepareConfig(num_shards=1))


def test_a_zip_of_several_files_is_refused_naming_them_and_a_member_can_be_named(
        tmp_path: Path, make_ratings) -> None:
    archive = tmp_path / "ratings.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        for seed in range(3):
            handle.writestr(f"part{seed}.csv", rating_lines(make_ratings(seed=seed)))
    with pytest.raises(InputError, match=r"3 files \(part0.csv, part1.csv, part2.csv\).*"
                       r"zip://MEMBER::"):
        prepare_quietly([str(archive)], tmp_path / "out")
    manifest = prepare_quietly([f"zip://part1.csv::{archive}"], tmp_path / "out")
    assert sum(manifest["counts"]["ratings"].values()) == 300


def test_a_truncated_zip_is_one_line(tmp_path: Path, make_ratings) -> None:
    archive = tmp_path / "ratings.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("ratings.csv", rating_lines(make_ratings()))
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(InputError, match="not a readable zip archive.*truncated"):
        prepare_quietly([str(archive)], tmp_path / "out")


def test_a_bad_first_line_of_a_headerless_file_is_not_taken_for_a_header(
        tmp_path: Path, make_ratings) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("1,2,abc,1000000000\n" + rating_lines(make_ratings()))
    with pytest.raises(InputError, match="ratings.csv, line 1: rating 'abc' is not a number"):
        prepare_quietly([str(path)], tmp_path / "out")


@pytest.mark.parametrize("layout", ["csv", "parquet"])
def test_a_rating_beyond_float32_is_refused(tmp_path: Path, make_ratings, layout: str) -> None:
    frame = make_ratings()
    frame.loc[5, "rating"] = 1e39
    if layout == "csv":
        path = tmp_path / "ratings.csv"
        path.write_text(rating_lines(frame))
        expected = "line 6: rating '1e\\+39' is beyond the largest 32-bit float"
    else:
        path = tmp_path / "ratings.parquet"
        frame.to_parquet(path)
        expected = "1 rows with a missing, non-finite"
    with pytest.raises(InputError, match=expected):
        prepare_quietly([str(path)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_movielens_zip_that_expands_beyond_any_release_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "ml-bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("ml-bomb/ratings.csv", b"1,1,1,1\n" + b"0" * (20 * 2**20))
    with pytest.raises(InputError, match="would expand from .* to 20,971,528 bytes"):
        movielens_path(archive, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# --- one clear line instead of a traceback --------------------------------------------------


def shardmf(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, SHARDMF, *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=120)


def one_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(trainer_shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run of the rating model on the session's shards (titles included)."""
    run = tmp_path_factory.mktemp("adversarial") / "run"
    with claim_run_folder(run, resume=False, overwrite=False):
        run_train(trainer_shards_dir, run, epochs=1)
    return run


@pytest.mark.parametrize("command", ["cluster", "evaluate"])
def test_a_read_only_run_folder_is_one_line(finished: Path, tmp_path: Path,
                                            command: str) -> None:
    run = Path(shutil.copytree(finished, tmp_path / "run"))
    (run / "report.md").write_text("# an earlier report\n")  # cluster removes it first
    with read_only_folder(run) as drop:
        args = ["--clusters", "3"] if command == "cluster" else ["--users", "50"]
        line = one_error(shardmf(command, run, *args, prefix=tuple(drop)))
    assert "Permission denied" in line and str(run) in line, line


def test_similar_to_an_empty_title_is_refused(finished: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    assert main(["similar", str(finished), "--title", " "]) == 2
    assert "an empty --title" in capsys.readouterr().err


def test_a_batch_size_beyond_any_memory_is_one_line(trainer_shards_dir: Path,
                                                    tmp_path: Path) -> None:
    line = one_error(shardmf("train", trainer_shards_dir, "--out", tmp_path / "run",
                             "--batch-size", 10**12))
    assert "--batch-size 1000000000000: expected 1..16,777,216" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("folder", ["shards", "run"])
def test_prepare_of_shardmf_output_says_what_it_is(finished: Path, trainer_shards_dir: Path,
                                                   tmp_path: Path, folder: str) -> None:
    given = trainer_shards_dir if folder == "shards" else finished
    with pytest.raises(InputError, match=f"a shardmf {folder} folder, not ratings"):
        prepare_quietly([str(given)], tmp_path / "out")


def test_a_manifest_with_a_malformed_section_is_one_line(shard_folder) -> None:
    _, shards = shard_folder
    edit_manifest(shards, lambda m: m.update(partition=[]))
    with pytest.raises(InputError, match="a required entry is missing or malformed"):
        verify_shards(shards)


def job_listeners(proc: subprocess.Popen) -> set[str]:
    """The addresses the launcher (its rendezvous stores) and both ranks listen on, once
    the ranks run."""
    launcher = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            processes = [launcher, *launcher.children(recursive=True)]
            sockets = {process.pid: [c.laddr.ip for c in process.net_connections("tcp")
                                     if c.status == psutil.CONN_LISTEN]
                       for process in processes}
            if len(processes) >= 3 and all(sockets.values()):
                return {ip for ips in sockets.values() for ip in ips}
        time.sleep(0.1)
    return set()


def test_a_hung_rank_ends_the_job_in_one_line_within_the_timeout(trainer_shards_dir: Path,
                                                                    tmp_path: Path) -> None:
    """Rank 1 hangs before step 3 (as a SIGSTOPped rank does): rank 0's collective times
    out after --timeout-s and says so in one line, not gloo's traceback; torchrun then
    stops the hung rank. Meanwhile every socket of the job listens on loopback only."""
    env = {**ENV, "SHARDMF_TEST_FAULT": "hang:1:3"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [SHARDMF, "train", trainer_shards_dir, "--out", tmp_path / "run", "--nproc", "2",
         "--threads", "1", "--dim", "8", "--batch-size", "256", "--epochs", "2",
         "--timeout-s", "10", *NO_CLUSTERS], env=env, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True)
    listening = job_listeners(proc)
    done = finish_job(proc, expect=1, timeout=90)
    assert listening and listening <= {"127.0.0.1"}, listening
    assert time.monotonic() - started < 60
    assert "Traceback" not in done.stderr, done.stderr
    assert "rank 0: no answer from another rank within the collective timeout" in done.stderr


# --- signals and leftovers ------------------------------------------------------------------


def test_cleanup_holds_off_sigterm_as_it_does_ctrl_c() -> None:
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with no_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)  # ignored, not raised mid-cleanup
        assert signal.getsignal(signal.SIGTERM) is raise_terminated
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_repeated_sigterm_during_prepare_leaves_one_line_and_nothing_behind(
        tmp_path: Path, make_ratings) -> None:
    """A supervisor repeats SIGTERM: the first unwinds, the rest must not cut the cleanup
    short (a temporary folder or the lock left behind, a traceback)."""
    raw = tmp_path / "ratings.csv"
    raw.write_text(rating_lines(make_ratings(num_users=3000, num_items=400,
                                             num_ratings=300_000)))
    proc = subprocess.Popen([SHARDMF, "prepare", raw, "--out", tmp_path / "out"], env=ENV,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None:
        assert time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.005)
    while proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    out, err = proc.communicate()
    # 143; or the signal itself, when one lands after the line as the interpreter exits
    assert proc.returncode in (143, -signal.SIGTERM), err
    assert "Traceback" not in err and err.count("shardmf: terminated") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.csv"]
