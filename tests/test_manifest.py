"""The shared manifest (shardmf/manifest.py): read once, typed, and every problem named at
the file, for data_shards and trainer alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_shards.verify import verify_shards
from shardmf.errors import InputError
from shardmf.manifest import MANIFEST_NAME, SPLITS, Manifest
from trainer.shards import open_shards


def test_load_types_what_prepare_wrote(trainer_user_shards_dir: Path) -> None:
    data = json.loads((trainer_user_shards_dir / MANIFEST_NAME).read_text())
    manifest = Manifest.load(trainer_user_shards_dir)
    assert manifest.data == data
    assert (manifest.num_users, manifest.num_items) == (data["counts"]["users"],
                                                        data["counts"]["items"])
    assert manifest.scale == tuple(data["rating"]["scale"])
    assert manifest.partition_scheme == "user" and manifest.users_file_column == "shard"
    for split in SPLITS:
        assert [entry.path for entry in manifest.files[split]] == [
            entry["path"] for entry in data["files"][split]]
        assert manifest.rows(split) == sum(entry.rows for entry in manifest.files[split])
    assert len(manifest.identity) == 16


@pytest.mark.parametrize(("content", "message"), [
    (b"[1, 2]", "a JSON list, not the object `shardmf prepare` writes"),
    (b"\xff\xfe{", "not valid JSON"),
    (b'{"format_version": 2}', r"format version 2, this shardmf reads \(1,\)"),
    (b'{"format_version": 1, "counts": {}}', "a required entry is missing or malformed"),
])
def test_a_bad_manifest_is_named_the_same_by_both_packages(tmp_path: Path, content: bytes,
                                                           message: str) -> None:
    (tmp_path / MANIFEST_NAME).write_bytes(content)
    for read in (Manifest.load, verify_shards, open_shards):
        with pytest.raises(InputError, match=rf"{MANIFEST_NAME}: {message}"):
            read(tmp_path)


def test_a_malformed_file_entry_is_named_even_unverified(trainer_shards_dir: Path,
                                                         tmp_path: Path) -> None:
    shards = Path(shutil.copytree(trainer_shards_dir, tmp_path / "shards"))
    data = json.loads((shards / MANIFEST_NAME).read_text())
    del data["files"]["val"][0]["row_groups"]
    (shards / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match="'row_groups'.*re-create the shards"):
        open_shards(shards, "none")
