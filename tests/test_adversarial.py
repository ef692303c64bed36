"""What a hostile-but-realistic user tried (issue 25): each case loses nothing, damages
nothing silently and ends in one clear line.

Grouped by theme: folders that hold someone else's output, id maps and manifest facts,
readers of odd inputs, listeners and planted symlinks, signals and leftovers.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import psutil
import pytest

from helpers import ENV, SHARDMF, error_lines
from launch.dask_cluster import dask_client
from shardmf.errors import InputError
from shardmf.outputs import folder_lock

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
