"""trainer/shards.py: the manifest check (every damage named) and which row groups each
rank reads. Rank and world size are arguments, so no process group is needed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from helpers import copy_shards, edit_manifest

from shardmf.errors import InputError
from trainer.data import read_piece
from trainer.shards import Piece, open_shards, pieces_for_rank


def test_open_shards_reads_global_facts(trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir, "full")
    assert shards.num_users == 300 and shards.num_items == 150
    assert shards.scale == (1.0, 5.0)
    assert 1.0 < shards.train_mean < 5.0
    assert sum(p.rows for p in shards.pieces("train")) == shards.rows("train")
    assert len(shards.pieces("train")) > 4  # several row groups per shard


def test_missing_manifest_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    with pytest.raises(InputError, match=r"manifest\.json: not found.*unfinished"):
        open_shards(tmp_path / "shards")
    with pytest.raises(InputError, match=r"nowhere[/\\]manifest\.json: not found"):
        open_shards(tmp_path / "nowhere")


def test_bad_manifest_version(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m.update(format_version=99))
    with pytest.raises(InputError, match=r"manifest\.json: format version 99"):
        open_shards(shards)


def test_manifest_not_json(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    (shards / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"manifest\.json: not valid JSON"):
        open_shards(shards)


def test_missing_shard_file(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    (shards / "train" / "part-00002.parquet").unlink()
    with pytest.raises(InputError, match=r"shard train/part-00002\.parquet: missing"):
        open_shards(shards)


def test_changed_byte_size(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    with (shards / "val" / "part-00001.parquet").open("ab") as handle:
        handle.write(b"extra")
    with pytest.raises(InputError, match=r"shard val/part-00001\.parquet: [\d,]+ bytes, "
                                         r"manifest says [\d,]+"):
        open_shards(shards)


def test_row_count_mismatch(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m["files"]["train"][1].update(
        rows=m["files"]["train"][1]["rows"] + 1))
    # The manifest no longer agrees with itself (rows against its row groups): named first.
    with pytest.raises(InputError, match=r"manifest\.json: train/part-00001\.parquet has "
                                         r"[\d,]+ rows but row groups of [\d,]+"):
        open_shards(shards)


def test_row_group_mismatch(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)

    def regroup(manifest: dict) -> None:
        groups = manifest["files"]["train"][0]["row_groups"]
        manifest["files"]["train"][0]["row_groups"] = [groups[0] + groups[1], *groups[2:]]

    edit_manifest(shards, regroup)
    with pytest.raises(InputError, match=r"shard train/part-00000\.parquet: row groups"):
        open_shards(shards)


def test_checksum_only_checked_in_full_mode(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    path = shards / "test" / "part-00003.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the data pages: same size, same footer
    path.write_bytes(bytes(data))
    open_shards(shards, "quick")
    open_shards(shards, "none")
    with pytest.raises(InputError, match=r"shard test/part-00003\.parquet: checksum"):
        open_shards(shards, "full")


def test_unknown_verify_mode(trainer_shards_dir: Path) -> None:
    with pytest.raises(InputError, match="verify='fast'"):
        open_shards(trainer_shards_dir, "fast")


def test_row_group_size_is_checked_when_reading(trainer_shards_dir: Path,
                                                tmp_path: Path) -> None:
    """With --verify none a wrong manifest is caught where a row group is read."""
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m["files"]["train"][0].update(
        row_groups=[1999, *m["files"]["train"][0]["row_groups"][1:]]))
    piece = open_shards(shards, "none").pieces("train")[0]
    with pytest.raises(ValueError, match=r"train/part-00000\.parquet: row group 0 has 2,000 "
                                         r"rows, manifest says 1,999"):
        read_piece(piece)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 12])
def test_pieces_for_rank_cover_every_row_group_once(trainer_shards_dir: Path,
                                                    world_size: int) -> None:
    pieces = open_shards(trainer_shards_dir).pieces("train")
    shares = [pieces_for_rank(pieces, rank, world_size) for rank in range(world_size)]
    taken = Counter((p.path, p.row_group) for share in shares for p in share)
    assert sorted(taken) == sorted((p.path, p.row_group) for p in pieces)
    assert set(taken.values()) == {1}
    rows = [sum(p.rows for p in share) for share in shares]
    assert max(rows) - min(rows) <= max(p.rows for p in pieces)
    assert shares == [pieces_for_rank(pieces, rank, world_size) for rank in range(world_size)]


def test_pieces_skip_empty_row_groups(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m["files"]["val"][0].update(row_groups=[0]))
    assert len(open_shards(shards, "none").pieces("val")) == 3


def test_pieces_for_rank_balance_rows_not_counts() -> None:
    pieces = [Piece(Path(f"part-{i}"), 0, rows) for i, rows in enumerate([4000, 1000, 1000,
                                                                          1000, 1000])]
    shares = [pieces_for_rank(pieces, rank, 2) for rank in range(2)]
    assert [sum(p.rows for p in share) for share in shares] == [4000, 4000]
