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


# Blocks the test does not run, and why.
NOT_RUN = {
    "make ": "the test runs inside the environment `make` builds (`make test` would run "
             "the suite inside itself)",
    "--nnodes": "needs several machines",
}
NUMBER = re.compile(r"\d[\d,]*(\.\d+)?(e-?\d+)?")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return re.findall(r"```(\w*)\n(.*?)```", text, re.S)


def _steps(text: str) -> list[tuple[str, str, str | None]]:
    """What a reader runs, in order: ("sh", command, None) for each shell line and each
    ``$`` line of an output block, ("python", code, None) for each Python block; an output
    block right after a shell block becomes that block's last step's expected output."""
    steps: list[tuple[str, str, str | None]] = []
    for language, body in _blocks(text):
        if language == "python":
            steps.append(("python", body, None))
        elif language == "sh":
            for line in body.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line and not any(mark in line for mark in NOT_RUN):
                    steps.append(("sh", line, None))
        elif language == "text":
            if body.startswith("$ "):
                steps += [("sh", line[2:], None) for line in body.splitlines()
                          if line.startswith("$ ")]
            elif steps and steps[-1][0] == "sh" and steps[-1][2] is None:
                steps[-1] = ("sh", steps[-1][1], body)
    return steps


def _shape(line: str) -> str:
    """A printed line with its figures masked: what any data set prints the same way."""
    return NUMBER.sub("#", line.strip())


def _fresh_clone(folder: Path) -> dict[str, str]:
    """``folder`` as the root of a fresh clone after `make install`: its .venv (this one),
    and MovieLens-100K already in the download cache, in GroupLens' layout but the test's
    own small set (the README's blocks run as written; only the data differs)."""
    (folder / ".venv").symlink_to(ROOT / ".venv")
    release = folder / "cache" / "ml-100k"
    (release / "ml-100k").mkdir(parents=True)
    _write_ml100k_folder(release / "ml-100k")
    (release / ".shardmf-complete").write_text("ml-100k.zip\n")
    return {**ENV, "SHARDMF_CACHE": str(folder / "cache"),
            "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_readme_runs_top_to_bottom(tmp_path: Path) -> None:
    """Every block in order, as written, in one fresh folder: each command succeeds, and
    each output the README shows under a command is printed by it, line for line up to
    the figures (the README's are MovieLens-100K's, this set is smaller)."""
    env = _fresh_clone(tmp_path)
    steps = _steps(README)
    commands = [step for kind, step, _ in steps if kind == "sh"]
    assert commands[0].startswith(".venv/bin/shardmf run --movielens ml-100k"), commands
    assert len({c.split("--out ")[1].split()[0] for c in commands if "--out " in c}) == len(
        [c for c in commands if "--out " in c]), "two blocks write the same --out"
    for kind, step, shown in steps:
        argv = [sys.executable, "-c", step] if kind == "python" else ["bash", "-c", step]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (step, done.stderr[-3000:])
        if shown is not None:
            printed = {_shape(line) for line in (done.stdout + done.stderr).splitlines()}
            for line in shown.splitlines():
                assert _shape(line) in printed, (step, line, done.stdout + done.stderr)
