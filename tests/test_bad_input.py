"""Bad values are bad rows, flags mean what they say, and every bad input is one line.

Issue #12 cases 6, 7, 8 (the data side), 12 and 14, each with real files.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from data_shards import InputError, PrepareConfig, SourceOptions, prepare
from launch.cli import main

GOOD_TSV = "".join(f"{u}\t{i}\t{(u + i) % 5 + 1}\t{10**9 + 100 * u + i}\n"
                   for u in range(1, 9) for i in range(1, 9))


def error_line(capsys: pytest.CaptureFixture) -> str:
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if line.strip()]
    assert not any("Traceback" in line for line in lines), lines
    assert lines and lines[-1].startswith("shardmf: error: "), lines
    return lines[-1]


# ------------------------------------------------------------------- (6) bad timestamps


def test_a_bad_timestamp_is_a_bad_row_not_minus_one_everywhere(tmp_path: Path,
                                                               shard_reader) -> None:
    source = tmp_path / "u.data"
    source.write_text(GOOD_TSV + "9\t1\t3\tlast-tuesday\n")
    with pytest.raises(InputError, match=r"u\.data, line 65: timestamp 'last-tuesday' is "
                                         r"not a time"):
        prepare([str(source)], tmp_path / "out", PrepareConfig(split="leave-last"))
    manifest = prepare([str(source)], tmp_path / "out",
                       PrepareConfig(split="leave-last", on_bad_rows="skip", num_shards=2))
    assert manifest["bad_rows"]["bad_timestamp"] == 1
    _, ratings = shard_reader(tmp_path / "out")
    assert len(ratings) == 64 and (ratings["timestamp"] >= 10**9).all()
    # leave-last used the times: each user's latest rating (item 8) is in test.
    assert set(ratings.loc[ratings["split"] == "test", "item"]) == {8}


def test_a_bad_timestamp_in_parquet_is_counted(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user": [1, 1, 2], "item": [1, 2, 1], "rating": [3.0, 4.0, 5.0],
                          "timestamp": ["2020-01-01", "not a date", "2020-01-03"]})
    frame.to_parquet(tmp_path / "r.parquet")
    with pytest.raises(InputError, match=r"1 missing or unreadable timestamps"):
        prepare([str(tmp_path / "r.parquet")], tmp_path / "out", PrepareConfig())


# ---------------------------------------------------------------- (7) boolean flag pairs


def test_header_flags_are_a_real_pair(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "ratings.tsv"
    source.write_text(GOOD_TSV)
    assert main(["prepare", str(source), "--out", str(tmp_path / "a"), "--no-header"]) == 0
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert sum(manifest["counts"]["ratings"].values()) == 64  # the first rating kept
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # "false" is no longer a value of --header
        main(["prepare", str(source), "--out", str(tmp_path / "b"), "--header", "false"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "b").exists()
    assert main(["prepare", str(source), "--out", str(tmp_path / "c"), "--header"]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert sum(manifest["counts"]["ratings"].values()) == 63  # the first line is a header


# ------------------------------------------------- (8) verify checks the manifest itself


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["counts"]["ratings"].update(train=m["counts"]["ratings"]["train"] + 1),
     r"counts\.ratings\.train is .* but its files hold"),
    (lambda m: m["counts"].update(users=m["counts"]["users"] - 10),
     r"counts\.users is .* but users\.parquet has"),
    (lambda m: m["files"]["val"][0].update(rows=m["files"]["val"][0]["rows"] + 5),
     r"rows but row groups of"),
])
def test_verify_finds_an_edited_manifest(trainer_shards_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture, edit,
                                         message: str) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(trainer_shards_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    edit(manifest)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(shards)]) == 2
    assert re.search(message, error_line(capsys))


def test_a_flipped_byte_in_a_data_page_is_found(trainer_shards_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(trainer_shards_dir, shards)
    target = shards / "train" / "part-00000.parquet"
    chunk = pq.ParquetFile(target).metadata.row_group(0).column(0)  # user_id
    data = bytearray(target.read_bytes())
    data[chunk.data_page_offset + 100] ^= 0x01
    target.write_bytes(bytes(data))
    assert main(["verify", str(shards)]) == 2  # the default, quick check
    assert "train/part-00000.parquet: checksum" in error_line(capsys)
    # Page checksums are written, so a reader that verifies them fails on that page.
    with pytest.raises(OSError, match="CRC"):
        pq.ParquetFile(target, page_checksum_verification=True).read()


# ------------------------------------------------------------ (12) one line, no traceback


def test_a_megabyte_line_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "big.csv"
    source.write_text("x" * 1_000_000 + "\n")
    assert main(["prepare", str(source), "--out", str(tmp_path / "out")]) == 2
    assert "field larger than field limit" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.csv"]


def test_a_truncated_gzip_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    whole = gzip.compress((GOOD_TSV * 200).encode())
    source = tmp_path / "u.tsv.gz"
    source.write_bytes(whole[: len(whole) // 2])
    assert main(["prepare", str(source), "--out", str(tmp_path / "out")]) == 2
    line = error_line(capsys)
    assert str(source) in line and "truncated or damaged" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.tsv.gz"]


# --------------------------------------------------------------------- (14) smaller cases


def test_a_utf8_bom_is_dropped(tmp_path: Path) -> None:
    named = tmp_path / "named.csv"
    named.write_text("\ufeffuser,item,rating\n1,1,4\n2,1,3\n", encoding="utf-8")
    manifest = prepare([str(named)], tmp_path / "a", PrepareConfig(num_shards=1),
                       SourceOptions(user_col="user"))
    assert manifest["columns"]["user"] == "user"
    bare = tmp_path / "bare.tsv"
    bare.write_text("\ufeff1\t1\t4\n2\t1\t3\n", encoding="utf-8")
    manifest = prepare([str(bare)], tmp_path / "b", PrepareConfig(num_shards=1))
    assert manifest["id_types"]["user"] == "int64"  # not the string "\ufeff1"


@pytest.mark.parametrize(("column", "values", "expected"), [
    ("item", [[0], [1], [2]], r"column 'item' \(item\) holds list<element: int64>; "
                              r"expected numbers or strings"),
    ("rating", [True, False, True], r"column 'rating' \(rating\) holds bool; expected "
                                    r"numbers"),
])
def test_parquet_columns_of_the_wrong_type_are_refused(tmp_path: Path, column: str,
                                                       values: list, expected: str) -> None:
    frame = pd.DataFrame({"user": ["a", "b", "c"], "item": [1, 2, 3], "rating": [1.0, 2, 3]})
    frame[column] = values
    frame.to_parquet(tmp_path / "r.parquet")
    with pytest.raises(InputError, match=expected):
        prepare([str(tmp_path / "r.parquet")], tmp_path / "out", PrepareConfig())
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
def test_num_shards_is_bounded_by_the_data(tmp_path: Path) -> None:
    source = tmp_path / "u.data"
    source.write_text(GOOD_TSV)
    with pytest.raises(InputError, match=r"num_shards=100000: more shards than 64 ratings "
                                         r"can fill; use at most 64"):
        prepare([str(source)], tmp_path / "out", PrepareConfig(num_shards=100_000))
    assert not (tmp_path / "out").exists()


def test_errors_print_plain_numbers(tmp_path: Path) -> None:
    source = tmp_path / "u.data"
    source.write_text(GOOD_TSV)
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\nx1,A\nx2,B\n")
    with pytest.raises(InputError) as error:
        prepare([str(source)], tmp_path / "out", PrepareConfig(items=str(items)))
    assert "vs 1)" in str(error.value) and "np." not in str(error.value)
    assert np.int64(1).__repr__() not in str(error.value)
