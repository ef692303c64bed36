"""Scale benchmark of ``shardmf prepare``: wall time, rows/s and peak RSS of the process tree.

    .venv/bin/python bench/prepare_scale.py --sizes 10M 100M --root /tmp/shardmf-scale

Each size is generated once with ``shardmf synth`` (1M users, 100k items; kept under
ROOT/raw-SIZE and reused), then ``shardmf prepare`` runs on it in a fresh process while a
sampler reads the RSS of that process and all its children every 0.2 s. Results are printed
as a Markdown table row and appended to ROOT/results.jsonl. Large data stays under ROOT
(default /tmp), never in the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

SHARDMF = str(Path(sys.executable).with_name("shardmf"))


def parse_size(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].upper() in scale \
        else int(text)


def run_sampled(command: list[str], log_path: Path) -> dict:
    """Run ``command``; sample the RSS of it and its descendants every 0.2 s."""
    peak = 0
    done = threading.Event()
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                total = 0
                try:
                    for p in [root, *root.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            total += p.memory_info().rss
                except psutil.Error:
                    pass
                peak = max(peak, total)
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join(timeout=5)
    return {"code": code, "seconds": time.perf_counter() - started, "peak_rss": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10M", "100M"])
    parser.add_argument("--root", default="/tmp/shardmf-scale")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--synth-only", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the shard folders")
    parser.add_argument("prepare_args", nargs="*", help="extra flags for prepare (after --)")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        rows = parse_size(size)
        raw = root / f"raw-{size}"
        if not (raw / "synth.json").is_file():
            command = [SHARDMF, "synth", "--out", str(raw), "--num-users", str(args.users),
                       "--num-items", str(args.items), "--num-ratings", str(rows),
                       "--seed", "1"]
            result = run_sampled(command, root / f"synth-{size}.log")
            print(f"synth {size}: {result['seconds']:.0f} s, peak "
                  f"{result['peak_rss'] / 2**30:.2f} GiB, exit {result['code']}", flush=True)
            if result["code"]:
                return result["code"]
        if args.synth_only:
            continue
        out = root / f"shards-{size}"
        shutil.rmtree(out, ignore_errors=True)
        command = [SHARDMF, "prepare", str(raw), "--out", str(out), *args.prepare_args]
        result = run_sampled(command, root / f"prepare-{size}.log")
        manifest = json.loads((out / "manifest.json").read_text()) if not result["code"] else {}
        ratings = sum(manifest.get("counts", {}).get("ratings", {}).values())
        record = {"size": size, "ratings": ratings, "seconds": round(result["seconds"], 1),
                  "rows_per_s": round(ratings / result["seconds"]),
                  "peak_rss_gib": round(result["peak_rss"] / 2**30, 2),
                  "num_shards": manifest.get("partition", {}).get("num_shards"),
                  "code": result["code"], "args": args.prepare_args,
                  "machine": f"{platform.processor() or platform.machine()}, "
                             f"{os.cpu_count()} cpus, "
                             f"{psutil.virtual_memory().total / 2**30:.0f} GiB"}
        with (root / "results.jsonl").open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"| {size} | {ratings:,} | {record['seconds']:.0f} | {record['rows_per_s']:,} | "
              f"{record['peak_rss_gib']:.2f} | {record['num_shards']} | exit {result['code']} |",
              flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
