"""`shardmf verify`, and prepare through a real distributed.LocalCluster."""

from __future__ import annotations

import shutil
from pathlib import Path

import dask
import pytest

from data_shards import PrepareConfig, prepare
from launch.cli import main


def test_verify_ok_then_names_a_changed_file(trainer_shards_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(trainer_shards_dir, shards)
    assert main(["verify", str(shards), "--full"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"OK {shards}: the manifest adds up and 12 "
                                               "files match it")
    target = shards / "val" / "part-00001.parquet"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF  # same size, rows and row groups: the quick check hashes every byte
    target.write_bytes(bytes(data))
    assert main(["verify", str(shards)]) == 2
    assert "val/part-00001.parquet: checksum" in capsys.readouterr().err
    target.write_bytes(bytes(data[:-10]))
    assert main(["verify", str(shards)]) == 2
    assert "bytes, manifest says" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_local_cluster_output_is_byte_identical(trainer_ratings_dir: Path,
                                                tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    config = PrepareConfig(num_shards=3, row_group_size=2000, split="leave-last")
    with dask.config.set(scheduler="threads"):
        local = prepare([str(trainer_ratings_dir)], tmp_path / "local", config)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster):
        remote = prepare([str(trainer_ratings_dir)], tmp_path / "cluster", config)
    for split in ("train", "val", "test"):
        assert [e["sha256"] for e in local["files"][split]] == [
            e["sha256"] for e in remote["files"][split]]
    assert local["counts"] == remote["counts"]
