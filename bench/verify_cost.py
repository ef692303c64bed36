"""What it costs to find a flipped byte in a shard set, and whether each check finds it.

    .venv/bin/python bench/verify_cost.py --rows 20M --files 8 --root /tmp/shardmf-verify

Writes ROWS ratings (uniform ids: 1M users, 50k items; half-star ratings; a timestamp) as
FILES shards with prepare's own writer settings (``SHARD_WRITE_OPTIONS``, row groups of
65,536), with and without page checksums, then times (median of REPEATS, files in the page
cache): reading footers only (the old quick check), SHA-256 of every byte (the new quick
check), decoding every page with and without page-checksum verification, and the whole
``verify_shards`` quick and full. Finally flips one byte inside a data page and reports
which checks notice. Prints a summary and writes it as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_shards.prepare import SHARD_WRITE_OPTIONS
from data_shards.verify import verify_shards
from shardmf.manifest import file_sha256

ROW_GROUP = 65_536
NUM_USERS, NUM_ITEMS = 1_000_000, 50_000


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale \
        else int(text)


def write_set(root: Path, rows: int, files: int, checksums: bool) -> tuple[list[Path], float]:
    """A minimal shard set (train only) that ``verify_shards`` accepts; returns write time."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "train").mkdir(parents=True)
    rng = np.random.default_rng(0)
    options = dict(SHARD_WRITE_OPTIONS, write_page_checksum=checksums)
    entries, paths, seconds = [], [], 0.0
    for shard, count in enumerate(np.diff(np.linspace(0, rows, files + 1).astype(int))):
        table = pa.table({
            "user_id": rng.integers(0, NUM_USERS, count, dtype=np.int32),
            "item_id": rng.integers(0, NUM_ITEMS, count, dtype=np.int32),
            "rating": (rng.integers(1, 11, count) / 2).astype(np.float32),
            "timestamp": rng.integers(9 * 10**8, 16 * 10**8, count, dtype=np.int64),
        })
        path = root / "train" / f"part-{shard:05d}.parquet"
        started = time.perf_counter()
        pq.write_table(table, path, row_group_size=ROW_GROUP, **options)
        seconds += time.perf_counter() - started
        metadata = pq.ParquetFile(path).metadata
        entries.append({"path": f"train/{path.name}", "shard": shard, "rows": int(count),
                        "row_groups": [metadata.row_group(i).num_rows
                                       for i in range(metadata.num_row_groups)],
                        "bytes": path.stat().st_size, "sha256": file_sha256(path)})
        paths.append(path)
    for side, count in (("users", NUM_USERS), ("items", NUM_ITEMS)):
        pq.write_table(pa.table({f"{side[:-1]}_id": np.arange(count, dtype=np.int32)}),
                       root / f"{side}.parquet")
    manifest = {"format_version": 1,
                "counts": {"users": NUM_USERS, "items": NUM_ITEMS,
                           "ratings": {"train": rows, "val": 0, "test": 0}},
                "rating": {"scale": [0.5, 5.0], "train_mean": 2.75},
                "files": {"train": entries, "val": [], "test": []},
                "users_file": "users.parquet", "items_file": "items.parquet"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return paths, seconds


def timed(action, repeats: int) -> float:
    action()  # warm the page cache and the code paths
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def footers(paths: list[Path]) -> None:
    for path in paths:
        pq.ParquetFile(path).metadata  # noqa: B018 (reading the footer is the work)


def decode(paths: list[Path], verify: bool) -> None:
    for path in paths:
        pq.ParquetFile(path, page_checksum_verification=verify).read()


def sha256_all(paths: list[Path]) -> None:
    for path in paths:
        file_sha256(path)


def detects(action) -> bool:
    try:
        action()
    except Exception:  # noqa: BLE001 (any error is a detection)
        return True
    return False


def measure(root: Path, rows: int, files: int, checksums: bool, repeats: int) -> dict:
    paths, write_s = write_set(root, rows, files, checksums)
    return {
        "bytes": sum(p.stat().st_size for p in paths), "write_s": round(write_s, 3),
        "footers_s": round(timed(lambda: footers(paths), repeats), 4),
        "sha256_s": round(timed(lambda: sha256_all(paths), repeats), 3),
        "decode_s": round(timed(lambda: decode(paths, False), repeats), 3),
        "decode_verified_s": round(timed(lambda: decode(paths, checksums), repeats), 3),
        "verify_quick_s": round(timed(lambda: verify_shards(root), repeats), 3),
        "verify_full_s": round(timed(lambda: verify_shards(root, full=True), repeats), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=parse_size, default=parse_size("20M"))
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", type=Path, default=Path("/tmp/shardmf-verify"))
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args()

    results: dict = {"rows": args.rows, "files": args.files, "row_group_size": ROW_GROUP,
                     "repeats": args.repeats, "machine": platform.processor() or
                     platform.machine(), "pyarrow": pa.__version__}
    for checksums in (False, True):
        root = args.root / ("with" if checksums else "without")
        key = "with_page_checksums" if checksums else "without_page_checksums"
        results[key] = measure(root, args.rows, args.files, checksums, args.repeats)
    # One flipped byte in the middle of the first data page of column 0 of a file.
    root = args.root / "with"
    target = root / "train" / "part-00000.parquet"
    chunk = pq.ParquetFile(target).metadata.row_group(0).column(0)
    position = chunk.data_page_offset + 200
    data = bytearray(target.read_bytes())
    data[position] ^= 0x01
    target.write_bytes(bytes(data))
    results["flipped_byte"] = {
        "offset": position,
        "footers_only_detects": detects(lambda: footers([target])),
        "decode_unverified_detects": detects(lambda: decode([target], False)),
        "decode_verified_detects": detects(lambda: decode([target], True)),
        "verify_quick_detects": detects(lambda: verify_shards(root)),
    }
    shutil.rmtree(args.root, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
