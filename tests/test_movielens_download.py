"""--movielens NAME: download from a real local HTTP server, MD5 check, cache, extraction."""

from __future__ import annotations

import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_shards import InputError, fetch_movielens, movielens_path
from launch.cli import main

U_DATA = "".join(f"{u}\t{i}\t{(u * i) % 5 + 1}\t{880000000 + u * 50 + i}\n"
                 for u in range(1, 21) for i in range(1, 16) if (u + i) % 3)
U_ITEM = "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x|0|{i % 2}|{1 - i % 2}"
                 + "|0" * 16 + "\n" for i in range(1, 16))


def make_archive(folder: Path, name: str, top: str) -> Path:
    path = folder / f"{name}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{top}/u.data" if name == "ml-100k" else f"{top}/ratings.dat",
                         U_DATA if name == "ml-100k" else U_DATA.replace("\t", "::"))
        if name == "ml-100k":
            archive.writestr(f"{top}/u.item", U_ITEM)
    return path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A real http.server on 127.0.0.1 (port 0) serving tmp_path/site; logs request paths."""
    site = tmp_path / "site"
    site.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def log_message(self, *args) -> None:
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", site, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def publish(site: Path, name: str, top: str, md5: str | None = None) -> None:
    archive = make_archive(site, name, top)
    digest = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    (site / f"{name}.zip.md5").write_text(f"MD5 ({name}.zip) = {digest}\n")


def test_download_check_extract_then_cached_without_requests(tmp_path: Path, server,
                                                             monkeypatch) -> None:
    url, site, requests = server
    publish(site, "ml-100k", "ml-100k")
    monkeypatch.setenv("SHARDMF_MOVIELENS_URL", url)
    monkeypatch.setenv("SHARDMF_CACHE", str(tmp_path / "cache"))
    folder = fetch_movielens("ml-100k")
    assert folder == tmp_path / "cache" / "ml-100k" / "ml-100k"
    assert (folder / "u.data").read_text() == U_DATA
    assert sorted(requests) == ["/ml-100k.zip", "/ml-100k.zip.md5"]
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]

    requests.clear()
    out = tmp_path / "shards"
    assert main(["prepare", "--movielens", "ml-100k", "--out", str(out),
                 "--num-shards", "2"]) == 0
    assert requests == []  # the cached release is used as it is
    manifest = (out / "manifest.json").read_text()
    assert '"titles": true' in manifest


def test_wrong_checksum_is_an_error_and_nothing_is_cached(tmp_path: Path, server) -> None:
    url, site, requests = server
    publish(site, "ml-1m", "ml-1m", md5="0" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match=r"ml-1m.zip: MD5 [0-9a-f]{32} differs from the "
                                         r"published 0{32}"):
        fetch_movielens("ml-1m", cache=cache, base_url=url)
    assert list(cache.iterdir()) == []
    publish(site, "ml-1m", "ml-1m")  # fixed upstream: the next run downloads again
    assert (fetch_movielens("ml-1m", cache=cache, base_url=url) / "ratings.dat").is_file()


def test_release_folder_names_differ(tmp_path: Path, server) -> None:
    url, site, _ = server
    publish(site, "ml-10m", "ml-10M100K")
    folder = fetch_movielens("ml-10m", cache=tmp_path / "cache", base_url=url)
    assert folder.name == "ml-10M100K" and (folder / "ratings.dat").is_file()


def test_local_zip_or_folder(tmp_path: Path) -> None:
    archive = make_archive(tmp_path, "ml-100k", "ml-100k")
    folder = movielens_path(archive, cache=tmp_path / "cache")
    assert (folder / "u.data").is_file()
    assert movielens_path(folder) == folder
    with pytest.raises(InputError, match="no such file"):
        movielens_path(tmp_path / "missing.zip")
    with pytest.raises(InputError, match="expected one of"):
        fetch_movielens("ml-5m", cache=tmp_path / "cache")


def test_unreachable_release_names_the_offline_flag(tmp_path: Path, server, monkeypatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    """No network (here: a server without the release) ends in one line that says how to
    go on offline: the command line's --movielens-path."""
    url, _, _ = server
    monkeypatch.setenv("SHARDMF_MOVIELENS_URL", url)
    monkeypatch.setenv("SHARDMF_CACHE", str(tmp_path / "cache"))
    assert main(["prepare", "--movielens", "ml-100k", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("shardmf: error: ") and "--movielens-path" in error
    assert "`movielens_path`" not in error
