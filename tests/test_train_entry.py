"""launch/train_entry.py, what each rank runs: a user error is one line, printed once."""

from __future__ import annotations

from pathlib import Path

from launch.train_entry import main as trainer_main
from shardmf.errors import InputError


def test_entry_point_reports_bad_config_in_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("epochz = 3\n")
    assert trainer_main(["S", "--out", str(tmp_path / "r"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardmf: error: --config")


def test_entry_point_error_lines_per_rank(capsys) -> None:
    """An InputError is the same on every rank: only rank 0 prints it. Another ValueError may
    be one rank's alone (a damaged row group), so that rank prints it, naming itself."""
    from launch.train_entry import _fail

    assert _fail(InputError("bad flag"), rank=1) == 2
    assert capsys.readouterr().err == ""
    assert _fail(InputError("bad flag"), rank=0) == 2
    assert capsys.readouterr().err == "shardmf: error: bad flag\n"
    assert _fail(ValueError("row group 3 unreadable"), rank=1) == 2
    assert capsys.readouterr().err == "shardmf: error: rank 1: row group 3 unreadable\n"
