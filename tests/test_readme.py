"""The README's commands, as a reader copies them: every flag exists, and the short ones run.

Every ``shardmf COMMAND ...`` the README shows (shell blocks, ``$`` lines, inline code) and
every ``-m trainer`` line is parsed, and each ``--flag`` must be one of that command's; the
MovieLens-100K pipeline of the "From a ratings file" section and the commands that use its
run (similar, recommend, evaluate, export) then run on a small set in the same layout.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from launch.cli import build_parser
from trainer.entry import build_parser as build_trainer_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
# Commands that run here in seconds once the README's first paths are substituted; `run`
# and the python/torchrun lines repeat the same steps and are only checked for their flags.
RUNNABLE = ("prepare", "train", "cluster", "similar", "recommend", "evaluate", "export",
            "verify")
SUBSTITUTED = ("u.data", "shards/ml100k", "runs/ml100k")


def _shell_lines(text: str) -> list[str]:
    """Command lines of the fenced blocks (sh, or ``$ `` lines of any block), in order,
    with continuation lines joined and comments dropped."""
    lines = []
    for language, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        body = body.replace("\\\n", " ")
        for line in body.splitlines():
            if language != "sh":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            line = line.split("  #")[0].strip()
            if line:
                lines.append(line)
    return lines


def _inline_commands(text: str) -> list[str]:
    """``shardmf ...`` in inline code spans of the prose (a span may wrap a line)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return [span.replace("\n", " ") for span in re.findall(r"`(shardmf [^`]+)`", prose)]


def _readme_calls() -> list[tuple[str, list[str]]]:
    """(where, argv after the program) of every shardmf and ``-m trainer`` call shown."""
    calls = []
    for line in _shell_lines(README) + _inline_commands(README):
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " | "))
        for start, word in enumerate(words):
            if word.endswith("shardmf") or (word == "trainer" and words[start - 1] == "-m"):
                end = words.index("|", start) if "|" in words[start:] else len(words)
                program = "trainer" if word == "trainer" else "shardmf"
                calls.append((program, words[start + 1:end]))
                break
    return calls


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def test_the_readme_shows_only_flags_that_exist() -> None:
    calls = _readme_calls()
    assert len(calls) > 20, "the README parser lost the commands"
    parser = build_parser()
    commands = next(a for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    trainer_options = _options(build_trainer_parser())
    checked = 0
    for program, argv in calls:
        if program == "trainer":
            known, where = trainer_options, "python -m trainer"
        elif argv and argv[0] in commands:
            known, where = _options(commands[argv[0]]) | _options(parser), argv[0]
        else:  # `shardmf --version`, or a placeholder such as `shardmf COMMAND --help`
            assert not argv or argv[0].isupper() or argv[0] in _options(parser), argv
            continue
        for word in argv:
            flag = word.split("=")[0]
            if flag.startswith("--"):
                assert flag in known, f"README: `{where} ... {flag}`: no such flag"
                checked += 1
    assert checked > 20


def _write_ml100k_folder(folder: Path) -> None:
    """u.data and u.item in MovieLens-100K's layouts: 80 users, 60 films, two tastes."""
    rng = np.random.default_rng(0)
    users, items = np.meshgrid(np.arange(1, 81), np.arange(1, 61), indexing="ij")
    keep = rng.random(users.shape) < 0.6
    users, items = users[keep], items[keep]
    likes = (users <= 40) == (items <= 30)
    ratings = np.where(likes, 5 - rng.integers(0, 2, len(users)), 1 + rng.integers(0, 2,
                                                                                   len(users)))
    times = 880_000_000 + rng.integers(0, 10**7, len(users))
    pd.DataFrame({"u": users, "i": items, "r": ratings, "t": times}).to_csv(
        folder / "u.data", sep="\t", header=False, index=False)
    titles = ["Star Wars (1977)" if i == 50 else f"Film {i} (1995)" for i in range(1, 61)]
    with open(folder / "u.item", "w", encoding="latin-1") as handle:
        for i, title in enumerate(titles, 1):
            flags = ["0"] * 19
            flags[8 if i <= 30 else 11] = "1"  # Drama, Horror
            handle.write("|".join([str(i), title, "01-Jan-1995", "", "http://x", *flags]) + "\n")


@pytest.mark.distributed
def test_the_readme_pipeline_runs(tmp_path: Path) -> None:
    _write_ml100k_folder(tmp_path)
    program = [sys.executable, "-m", "launch.cli"]
    runs = [["--version"], ["--help"]]
    for name, argv in _readme_calls():  # the first call of each command, as shown
        if (name == "shardmf" and argv and argv[0] in RUNNABLE and len(argv) > 1
                and argv[1] in SUBSTITUTED and argv[0] not in {a[0] for a in runs}):
            runs.append(argv)
    assert [argv[0] for argv in runs[2:5]] == ["prepare", "train", "cluster"], runs
    assert {"similar", "recommend", "evaluate", "export"} <= {argv[0] for argv in runs}
    for argv in runs:
        if argv[0] == "train":  # its post-step is the README's next line, `cluster`: once
            argv = [*argv, "--clusters", "0"]
        done = subprocess.run([*program, *argv], cwd=tmp_path, env=ENV, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (argv, done.stderr[-2000:])
        if argv[0] == "similar":
            assert "Star Wars (1977) (id 50)" in done.stdout
