"""--on-bad-rows skip: good rows kept, bad ones counted by reason and shown in rejects.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import data_shards.sources as sources
from data_shards import InputError, PrepareConfig, SourceOptions, prepare

GOOD = [f"{u}\t{i}\t{(u + i) % 5 + 1}\t{10**9 + u * 100 + i}" for u in range(1, 11)
        for i in range(1, 11)]
BAD = {  # line text -> reason (u.data: a 1..5 scale, four fields)
    "3\t50\t4\t881250949\textra": "ragged_line",
    "3\t51\tfour\t881250949": "non_numeric_rating",
    "3\t52\t\t881250949": "non_numeric_rating",
    "3\t53\t9\t881250949": "rating_out_of_range",
    "\t54\t3\t881250949": "missing_id",
    "3\t55\t4\tyesterday": "bad_timestamp",
    "3\t56\t4\t": "bad_timestamp",
}


def write_u_data(folder: Path) -> tuple[Path, dict[int, str]]:
    """u.data with the bad lines spread through good ones; returns line number -> reason."""
    lines, where = list(GOOD), {}
    for k, text in enumerate(BAD):
        position = 7 + k * 19
        lines.insert(position, text)
    for number, text in enumerate(lines, 1):
        if text in BAD:
            where[number] = BAD[text]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    return folder / "u.data", where


@pytest.mark.parametrize("blocksize", [None, 300])
def test_skip_keeps_good_rows_and_reports_bad_ones(tmp_path: Path, shard_reader,
                                                   monkeypatch, blocksize) -> None:
    if blocksize:  # many blocks: line numbers must count the lines of earlier blocks
        monkeypatch.setattr(sources, "TEXT_BLOCKSIZE", blocksize)
    path, where = write_u_data(tmp_path / "raw")
    out = tmp_path / "out"
    manifest = prepare([str(path)], out, PrepareConfig(on_bad_rows="skip", num_shards=2))
    _, ratings = shard_reader(out)
    assert len(ratings) == len(GOOD)
    assert manifest["bad_rows"] == {"ragged_line": 1, "non_numeric_rating": 2,
                                    "rating_out_of_range": 1, "missing_id": 1,
                                    "bad_timestamp": 2}
    assert manifest["rejects_file"] == "rejects.csv"
    rejects = pd.read_csv(out / "rejects.csv", keep_default_na=False)
    assert list(rejects.columns) == ["file", "line", "reason", "raw"]
    assert set(rejects["file"]) == {str(path)}
    assert dict(zip(rejects["line"], rejects["reason"])) == where
    assert set(rejects["raw"]) == set(BAD)


def test_error_is_still_the_default(tmp_path: Path) -> None:
    path, where = write_u_data(tmp_path / "raw")
    first = min(where)
    with pytest.raises(InputError, match=f"line {first}: "):
        prepare([str(path)], tmp_path / "out", PrepareConfig())
    assert not (tmp_path / "out").exists()


def test_skip_on_clean_input_matches_error_mode(tmp_path: Path) -> None:
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "u.data").write_text("\n".join(GOOD) + "\n")
    a = prepare([str(folder)], tmp_path / "a", PrepareConfig(num_shards=2))
    b = prepare([str(folder)], tmp_path / "b", PrepareConfig(num_shards=2, on_bad_rows="skip"))
    assert [e["sha256"] for e in a["files"]["train"]] == [e["sha256"] for e in
                                                         b["files"]["train"]]
    assert b["bad_rows"] == dict.fromkeys(sources.BAD_ROW_REASONS, 0)
    assert pd.read_csv(tmp_path / "b" / "rejects.csv").empty


def test_skip_with_parquet_input(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user": [1, 2, 3, None], "item": [1, 2, 3, 4],
                          "rating": [3.0, np.nan, np.inf, 2.0]})
    frame.to_parquet(tmp_path / "r.parquet")
    manifest = prepare([str(tmp_path / "r.parquet")], tmp_path / "out",
                       PrepareConfig(on_bad_rows="skip", num_shards=1, val_fraction=0.0,
                                     test_fraction=0.0))
    assert manifest["counts"]["ratings"]["train"] == 1
    assert manifest["bad_rows"]["non_numeric_rating"] == 2
    assert manifest["bad_rows"]["missing_id"] == 1


def test_everything_rejected_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t2\tx\t3\n1\t3\t9\t4\n")
    with pytest.raises(InputError, match="all 2 rows were rejected"):
        prepare([str(tmp_path / "u.data")], tmp_path / "out",
                PrepareConfig(on_bad_rows="skip"), SourceOptions(header=False))
