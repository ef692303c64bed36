"""Damaged, cut, swapped and wrong-kind files of a run folder and a shard set (issue 24).

Every command that reads a file must end in exit 0 with the output of the undamaged file
(the damage is in a byte it does not use) or in exit 2 with one line naming the file:
never a traceback, a C++ abort or a silently different answer. Commands run in this
process through the CLI's ``main`` (fast, and faithful: it is what ``shardmf`` runs),
except where an abort must be observable: those run in a child process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import pytest
import torch
from helpers import ENV, SHARDMF

from launch.cli import main

SEED = 24
TRAIN = ["--epochs", "2", "--clusters", "0", "--threads", "1", "--ranking-users", "0"]


def shardmf(capsys, *args: object) -> tuple[int, str, str]:
    """``shardmf ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny shards (2 train shards) and two runs on them, A (dim 8) and B (dim 4)."""
    from data_shards import PrepareConfig, prepare
    from data_shards.synth import SynthConfig, synthesize

    root = tmp_path_factory.mktemp("damage")
    with dask.config.set(scheduler="synchronous"):
        synthesize(root / "raw", SynthConfig(num_users=80, num_items=40, num_ratings=1500,
                                             num_genres=2, seed=SEED))
        prepare([str(root / "raw")], root / "shards", PrepareConfig(num_shards=2))
    for name, dim in (("A", "8"), ("B", "4")):
        assert main(["train", str(root / "shards"), "--out", str(root / name), *TRAIN,
                     "--dim", dim]) == 0
    return root


READERS = {  # file -> the commands that read it
    "model.npz": [["recommend", "{run}", "--user", "1"], ["similar", "{run}", "--item", "3"],
                  ["export", "{run}", "--out", "{out}"]],
    "users.parquet": [["recommend", "{run}", "--user", "1"]],
    "items.parquet": [["similar", "{run}", "--item", "3"]],
    "model.pt": [["evaluate", "{run}", "--users", "0"]],
    "metrics.json": [["evaluate", "{run}", "--users", "0"]],
    "config.json": [["cluster", "{run}", "--clusters", "2"]],
}


def _run_command(capsys, command: list[str], run: Path, out: Path) -> tuple[int, str, str]:
    return shardmf(capsys, *(part.format(run=run, out=out) for part in command))


def _reference(capsys, run: Path, command: list[str], tmp_path: Path) -> str:
    """What ``command`` prints for the undamaged ``run`` (at the path it will be damaged)."""
    code, out, _ = _run_command(capsys, command, run, tmp_path / "export")
    assert code == 0
    return out


def _assert_clean(result: tuple[int, str, str], name: str, expected_out: str,
                  what: str) -> None:
    code, out, err = result
    assert "Traceback" not in err, (what, err)
    if code == 0:
        assert out == expected_out, f"{what}: exit 0 with another answer"
        return
    errors = [line for line in err.splitlines() if line.startswith("shardmf: error:")]
    assert code == 2 and len(errors) == 1 and name in errors[0], (what, code, err)


def _damaged_versions(tiny: Path, name: str, rng: random.Random) -> list[tuple[str, bytes]]:
    """(label, content): flipped bytes at seeded positions, cuts, the other run's file and a
    valid file of another kind."""
    data = (tiny / "A" / name).read_bytes()
    versions = []
    for position in sorted(rng.sample(range(len(data)), min(6, len(data)))) + [len(data) - 1]:
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        versions.append((f"flip {position}", bytes(flipped)))
    for length in (0, len(data) // 2, len(data) - 1):
        versions.append((f"cut to {length}", data[:length]))
    versions.append(("run B's", (tiny / "B" / name).read_bytes()))
    other = {".npz": "users.parquet", ".parquet": "model.npz", ".pt": "model.npz",
             ".json": "metrics.json" if name == "config.json" else "config.json"}
    versions.append(("another kind", (tiny / "A" / other[Path(name).suffix]).read_bytes()))
    return versions


@pytest.mark.parametrize("name", list(READERS))
def test_every_damaged_run_file_is_one_line_or_a_correct_answer(tiny: Path, tmp_path: Path,
                                                                capsys, name: str) -> None:
    rng = random.Random(f"{SEED}-{name}")
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    references = [_reference(capsys, run, command, tmp_path) for command in READERS[name]]
    original = (run / name).read_bytes()
    for label, content in _damaged_versions(tiny, name, rng):
        (run / name).write_bytes(content)
        for command, reference in zip(READERS[name], references):
            result = _run_command(capsys, command, run, tmp_path / "export")
            _assert_clean(result, name, reference, f"{name} {label}: {command[0]}")
    (run / name).write_bytes(original)


@pytest.mark.parametrize("name", ["model.npz", "model.pt", "users.parquet", "config.json"])
def test_a_run_without_checksums_still_names_a_cut_or_foreign_file(tiny: Path, tmp_path: Path,
                                                                   capsys, name: str) -> None:
    """A run from before checksums.json: the readers themselves turn any parse failure or
    misfit into one line."""
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    (run / "checksums.json").unlink(missing_ok=True)
    references = [_reference(capsys, run, command, tmp_path) for command in READERS[name]]
    data = (run / name).read_bytes()
    other = {"model.npz": "users.parquet", "model.pt": "model.npz",
             "users.parquet": "model.npz", "config.json": "metrics.json"}[name]
    for label, content in [("empty", b""), ("half", data[:len(data) // 2]),
                           ("another kind", (run / other).read_bytes())]:
        (run / name).write_bytes(content)
        for command, reference in zip(READERS[name], references):
            result = _run_command(capsys, command, run, tmp_path / "export")
            _assert_clean(result, name, reference, f"{name} {label}: {command[0]}")


# --- the cases of issue 24's table, each on its own ----------------------------------------


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "older-run"])
def test_an_emptied_model_pt_is_one_line(tiny: Path, tmp_path: Path, capsys,
                                         checksums: bool) -> None:
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    if not checksums:
        (run / "checksums.json").unlink(missing_ok=True)
    (run / "model.pt").write_bytes(b"")
    code, _, err = shardmf(capsys, "evaluate", run)
    assert code == 2 and "model.pt" in err and "Traceback" not in err and "EOFError" not in err


@pytest.mark.parametrize("command", [["recommend", "--user", "1"], ["similar", "--item", "3"]])
def test_a_model_npz_cut_in_half_is_one_line(tiny: Path, tmp_path: Path, capsys,
                                             command: list[str]) -> None:
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    (run / "checksums.json").unlink(missing_ok=True)  # the reader's own check, as for an older run
    data = (run / "model.npz").read_bytes()
    (run / "model.npz").write_bytes(data[:len(data) // 2])
    code, _, err = shardmf(capsys, command[0], run, *command[1:])
    assert code == 2 and "model.npz" in err and "BadZipFile: File is not" not in err, err


def test_a_model_pt_holding_a_function_is_one_line_and_runs_nothing(tiny: Path, tmp_path: Path,
                                                                     capsys) -> None:
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    (run / "checksums.json").unlink(missing_ok=True)
    torch.save({"state_dict": {}, "hook": os.system}, run / "model.pt")
    code, _, err = shardmf(capsys, "evaluate", run)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "model.pt" in lines[0], err
    assert "weights_only" not in err


def test_resume_with_another_dim_names_the_setting(tiny: Path, tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    (run / "metrics.json").unlink()  # not finished: resumable
    code, _, err = shardmf(capsys, "train", tiny / "shards", "--out", run, *TRAIN,
                           "--dim", "32", "--epochs", "3", "--resume")
    assert code == 2, err
    assert f"shardmf: error: {run} was trained with dim 8; --dim 32 cannot resume it (omit " \
           "--dim, or start a new run)" in err.splitlines()
    # omitting --dim takes the run's
    code, _, err = shardmf(capsys, "train", tiny / "shards", "--out", run, *TRAIN,
                           "--epochs", "3", "--resume")
    assert code == 0, err
    assert json.loads((run / "metrics.json").read_text())["dim"] == 8


def test_resume_of_a_finished_run_says_it_is_finished(tiny: Path, tmp_path: Path,
                                                      capsys) -> None:
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    before = (run / "metrics.json").read_bytes()
    code, _, err = shardmf(capsys, "train", tiny / "shards", "--out", run, *TRAIN, "--resume")
    assert code == 2 and "is a finished run" in err, err
    assert (run / "metrics.json").read_bytes() == before


def test_a_config_json_without_train_is_one_line(tiny: Path, tmp_path: Path, capsys) -> None:
    run = Path(shutil.copytree(tiny / "A", tmp_path / "run"))
    (run / "checksums.json").unlink(missing_ok=True)
    (run / "config.json").write_text(json.dumps({"model": {}}))
    code, _, err = shardmf(capsys, "cluster", run, "--clusters", "2")
    assert code == 2 and "config.json" in err and "--seed" in err and "Traceback" not in err


# --- shard files: every footer byte, in a child process (an abort must be seen) ----------

SHARD_FUZZ = textwrap.dedent("""
    import contextlib, io, json, random, sys
    from pathlib import Path
    from launch.cli import main
    from shardmf.errors import InputError
    from shardmf.manifest import Manifest
    shards, run, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    shard = shards / "train" / "part-00000.parquet"
    data = shard.read_bytes()
    entry = Manifest.load(shards).files["train"][0]
    start = len(data) - int.from_bytes(data[-8:-4], "little") - 8  # metadata, length, magic
    train = ["train", str(shards), "--out", str(out), "--epochs", "1", "--dim", "4",
             "--clusters", "0", "--ranking-users", "0", "--overwrite"]
    commands = {"verify": ["verify", str(shards), "--full"], "train": train,
                "evaluate": ["evaluate", str(run), "--users", "0"],
                "export-split": ["export-split", str(shards), "--out", str(out) + "-tsv",
                                 "--overwrite"],
                "recommend": ["recommend", str(run), "--user", "1"]}

    def cli(args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)
        return code, [l for l in err.getvalue().splitlines() if "shardmf: error" in l]

    assert cli(train)[0] == 0
    reference = json.loads((out / "metrics.json").read_text())["test_rmse"]
    rng = random.Random(24)
    sampled = set(rng.sample(range(start, len(data)), 4))
    for position in range(start, len(data)):  # every footer byte, as train/verify check it
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        shard.write_bytes(bytes(damaged))
        try:
            Manifest.load(shards).check_file(entry, sha256=False)
            found = None
        except InputError as e:
            found = str(e)
        print(json.dumps(["check_file", position, 2 if found else 0, [found] if found else []]))
        for name, args in commands.items() if position in sampled else ():
            print(json.dumps([name, position, *cli(args)]), flush=True)
    for position in rng.sample(range(4, start), 6):  # pages: checksums, or unread columns
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        shard.write_bytes(bytes(damaged))
        for name in ("verify", "train"):
            code, errors = cli(commands[name])
            if code == 0 and name == "train":
                rmse = json.loads((out / "metrics.json").read_text())["test_rmse"]
                assert rmse == reference, (position, rmse, reference)
            print(json.dumps([name, position, code, errors]), flush=True)
    shard.write_bytes(data)
""")


def test_every_footer_byte_of_a_shard_is_one_line_never_an_abort(tiny: Path,
                                                                  tmp_path: Path) -> None:
    """Every byte of a shard's footer, and a sample of its pages, flipped: one line in every
    command that reads shards (or, for a page of a column training never reads, the same
    run). In a child process, so that an abort in pyarrow's C++ fails the test."""
    shards = Path(shutil.copytree(tiny / "shards", tmp_path / "shards"))
    run = _run_reading(tiny / "A", shards, tmp_path / "run")
    job = subprocess.run([sys.executable, "-c", SHARD_FUZZ, str(shards), str(run),
                          str(tmp_path / "out")], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert job.returncode == 0, job.stderr[-2000:]  # no abort, no traceback
    results = [json.loads(line) for line in job.stdout.splitlines()]
    assert len({position for name, position, _, _ in results if name == "check_file"}) > 500
    for name, position, code, errors in results:
        if code == 0 and name in ("verify", "train"):
            continue  # a page of a column not read (train), or read and correct (checked)
        assert code == 2 and len(errors) == 1 and "part-00000.parquet" in errors[0], (
            name, position, code, errors)


def _run_reading(run: Path, shards: Path, copy: Path) -> Path:
    """A copy of ``run`` whose model points at ``shards`` (as if trained on them)."""
    import numpy as np

    copy = Path(shutil.copytree(run, copy))
    (copy / "checksums.json").unlink(missing_ok=True)  # the model files are rewritten below
    state = torch.load(copy / "model.pt", weights_only=True)
    state["shards_dir"] = str(shards.resolve())
    torch.save(state, copy / "model.pt")
    with np.load(copy / "model.npz") as arrays:
        kept = {k: arrays[k] for k in arrays.files}
    kept["shards_dir"] = np.array(str(shards.resolve()))
    np.savez(copy / "model.npz", **kept)
    return copy


# --- Ctrl-C at random moments ---------------------------------------------------------------


@pytest.mark.parametrize("job", ["train", "train on 2 ranks", "prepare"])
def test_ctrl_c_at_random_moments_ends_in_one_line_and_130(tiny: Path, tmp_path: Path,
                                                           job: str) -> None:
    """From the first moment (imports) to the last: the loader's prefetch thread, the ranks
    under torchrun, Dask's threads; every try must end in the one line and status 130."""
    rng = random.Random(f"{SEED}-{job}")
    longest = {"train": 3.0, "train on 2 ranks": 5.0, "prepare": 1.5}[job]
    for attempt in range(6):
        out = tmp_path / f"out{attempt}"
        if job == "prepare":
            args = ["prepare", str(tiny / "raw"), "--out", str(out)]
        else:
            args = ["train", str(tiny / "shards"), "--out", str(out), *TRAIN, "--epochs",
                    "400", "--patience", "0", "--prefetch", "2",
                    "--nproc", "2" if job.endswith("ranks") else "1"]
        proc = subprocess.Popen([SHARDMF, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
        time.sleep(rng.uniform(0.0, longest))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:
            continue  # finished before the signal
        assert proc.returncode == 130, (attempt, proc.returncode, err[-2000:])
        assert "Fatal Python error" not in err and "Traceback" not in err, err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("shardmf: ")]
        assert len(lines) == 1 and lines[0].startswith("shardmf: interrupted"), err[-2000:]


def test_a_damaged_checkpoint_slice_is_one_line(tiny: Path, tmp_path: Path) -> None:
    """With owned users each rank resumes from its own slice, which checkpoint.pt vouches
    for by digest (torch would load a flipped tensor byte without a word)."""
    from data_shards import PrepareConfig, prepare

    shards = tmp_path / "shards"
    with dask.config.set(scheduler="synchronous"):
        prepare([str(tiny / "raw")], shards, PrepareConfig(num_shards=2, partition_by="user"))
    run = tmp_path / "run"
    args = [SHARDMF, "train", str(shards), "--out", str(run), *TRAIN, "--epochs", "1",
            "--nproc", "2", "--user-embeddings", "owned"]
    assert subprocess.run(args, capture_output=True, env=ENV, timeout=150).returncode == 0
    (run / "metrics.json").unlink()  # not finished: resumable
    slice_path = next(run.glob("checkpoint.*.rank1.pt"))
    data = bytearray(slice_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    slice_path.write_bytes(bytes(data))
    job = subprocess.run([*args, "--epochs", "2", "--resume"], capture_output=True, text=True,
                         env=ENV, timeout=150)
    errors = [line for line in job.stderr.splitlines() if "shardmf: error" in line]
    assert job.returncode == 2 and len(errors) == 1, job.stderr[-2000:]
    assert slice_path.name in errors[0] and "damaged or replaced" in errors[0], errors
