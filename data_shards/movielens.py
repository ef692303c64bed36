"""MovieLens releases by name: download once into a cache, check the published MD5, extract.

    fetch_movielens("ml-1m")  # -> ~/.cache/shardmf/ml-1m/ml-1m (the folder with ratings)

Archives come from ``$SHARDMF_MOVIELENS_URL`` (default GroupLens) as ``<name>.zip`` with the
checksum GroupLens publishes beside it (``<name>.zip.md5``). The cache (``$SHARDMF_CACHE``,
default ``~/.cache/shardmf``) holds an extracted release only after its checksum matched;
downloads and extraction go to temporary names renamed into place, so an interrupted or
corrupt download never looks complete. A cached release makes no network request.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

from shardmf.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_URL = "https://files.grouplens.org/datasets/movielens"
RELEASES = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-25m", "ml-32m", "ml-latest-small",
            "ml-latest")
RATING_FILES = ("u.data", "ratings.dat", "ratings.csv")
DONE_MARKER = ".shardmf-complete"
# What a release zip may expand to: ml-latest, the largest, is ~1.4 GB from ~0.3 GB (5x);
# text ratings rarely compress beyond 10x, a zip bomb by 1000x.
MAX_EXTRACTED_BYTES = 8 * 2**30
MAX_EXPANSION = 50
RATIO_CHECKED_FROM_BYTES = 16 * 2**20  # small archives (tests, samples) expand freely


def cache_dir() -> Path:
    return Path(os.environ.get("SHARDMF_CACHE") or Path.home() / ".cache" / "shardmf")


def fetch_movielens(name: str, cache: str | Path | None = None,
                    base_url: str | None = None) -> Path:
    """The extracted folder of release ``name`` (the one holding its ratings file)."""
    if name not in RELEASES:
        raise InputError(f"movielens={name!r}: expected one of {', '.join(RELEASES)}")
    root = Path(cache) if cache else cache_dir()
    target = root / name
    if (target / DONE_MARKER).is_file():
        return ratings_folder(target)
    base = (base_url or os.environ.get("SHARDMF_MOVIELENS_URL") or DEFAULT_URL).rstrip("/")
    url = f"{base}/{name}.zip"
    root.mkdir(parents=True, exist_ok=True)
    expected = _published_md5(f"{url}.md5")
    tmp = root / f".{name}.zip.tmp-{uuid.uuid4().hex[:8]}"
    try:
        digest = _download(url, tmp)
        if digest != expected:
            raise InputError(f"{url}: MD5 {digest} differs from the published {expected} "
                             "(a corrupt or changed download); nothing was cached, try again")
        os.replace(tmp, root / f"{name}.zip")
    finally:
        tmp.unlink(missing_ok=True)
    return extract_movielens(root / f"{name}.zip", target)


def movielens_path(path: str | Path, cache: str | Path | None = None) -> Path:
    """``--movielens-path``: a local release zip (extracted into the cache) or folder."""
    path = Path(path)
    if path.is_dir():
        return ratings_folder(path)
    if not path.is_file():
        raise InputError(f"movielens_path={path}: no such file or folder")
    if not zipfile.is_zipfile(path):
        raise InputError(f"movielens_path={path}: not a zip archive or a folder")
    stem = re.sub(r"\.zip$", "", path.name)
    key = hashlib.md5(path.read_bytes()).hexdigest()[:12]
    target = (Path(cache) if cache else cache_dir()) / f"{stem}-{key}"
    if (target / DONE_MARKER).is_file():
        return ratings_folder(target)
    return extract_movielens(path, target)


def extract_movielens(archive: Path, target: Path) -> Path:
    """Extract into a temporary folder, then rename: a half-extracted release never counts."""
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(archive) as handle:
            for member in handle.namelist():
                resolved = (tmp / member).resolve()
                if not resolved.is_relative_to(tmp.resolve()):
                    raise InputError(f"{archive}: member {member!r} points outside the archive")
            _check_expanded_size(archive, handle)
            handle.extractall(tmp)
        ratings_folder(tmp)  # fails clearly before anything is kept
        (tmp / DONE_MARKER).write_text(archive.name + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except zipfile.BadZipFile as e:
        raise InputError(f"{archive}: not a valid zip archive ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ratings_folder(target)


def _check_expanded_size(archive: Path, handle: zipfile.ZipFile) -> None:
    """Refuse an archive that would expand far beyond any MovieLens release (a zip bomb
    fills the disk otherwise). The sizes are the members' declared ones, which zipfile
    never reads past."""
    expanded = sum(member.file_size for member in handle.infolist())
    packed = archive.stat().st_size
    if expanded > MAX_EXTRACTED_BYTES or (expanded > RATIO_CHECKED_FROM_BYTES and
                                          expanded > MAX_EXPANSION * packed):
        raise InputError(f"{archive}: would expand from {packed:,} to {expanded:,} bytes, "
                         f"more than a MovieLens release does (at most "
                         f"{MAX_EXTRACTED_BYTES:,} bytes, {MAX_EXPANSION}x its size); "
                         "extract it yourself if you trust it")


def ratings_folder(root: Path) -> Path:
    """The folder holding the ratings: releases differ (ml-10m extracts to ml-10M100K/)."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if any((folder / name).is_file() for name in RATING_FILES):
            return folder
    raise InputError(f"{root}: no MovieLens ratings file ({', '.join(RATING_FILES)}) in it "
                     "or its first-level folders")


# What to do without a network (the command line words `movielens_path` as its flag).
OFFLINE = ("; without a network, download the release's zip elsewhere and pass it (or the "
           "folder it extracts to) as `movielens_path`")


def _published_md5(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            text = response.read(4096).decode("ascii", "replace")
    except (urllib.error.URLError, OSError) as e:
        raise InputError(f"{url}: cannot fetch the published checksum ({e}){OFFLINE}") from e
    match = re.search(r"\b[0-9a-fA-F]{32}\b", text)
    if not match:
        raise InputError(f"{url}: no MD5 checksum found in {text[:80]!r}")
    return match.group(0).lower()


def _download(url: str, path: Path) -> str:
    digest = hashlib.md5()
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, path.open("wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise InputError(f"{url}: download failed ({e}){OFFLINE}") from e
    return digest.hexdigest()
