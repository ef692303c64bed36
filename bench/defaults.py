"""shardmf at its defaults against LIBMF, Spark ALS and Surprise, side by side.

    python bench/defaults.py --libmf ~/libmf --peers-python bench/.venv-peers/bin/python \
        --datasets ml-100k,synth-5m,synth-10m --repeats 3

For each data set: `shardmf prepare` with its defaults (random 90/5/5 split), `shardmf
export-split` for the peers, then `--repeats` rounds, each running LIBMF's CLI, `shardmf
train SHARDS --out RUN --clusters 0` (no other flag) on 1 process and on 2, one after the
other, so every round sees the same machine. Spark ALS and Surprise SVD run once per set
(they take minutes). Medians per row go to bench/defaults.json and bench/defaults.md.

The synthetic sets are `shardmf synth` worlds (100k users, 20k items, Zipf-like item
popularity, lognormal user activity); synth-5m has rating noise 0.8, synth-10m the
default 0.4. ML-100K is read from ../shared/data/ml-100k when present (never copied into
the repository), else skipped with a note. `--filmtrust FILE` adds FilmTrust's ratings
(35,497 half-star ratings on 0.5-4, 1,508 users x 2,071 items, the sparse trust-network
kind of set where a bias-only model is hard to beat; e.g. the four ratings_*.txt of
LibRec's data/filmtrust/rating, concatenated; three pairs are rated twice, so it is
prepared with `--duplicates mean`). `--reuse-slow-peers` keeps ALS and Surprise results
already in the work folder (they take minutes and do not change with shardmf).

LIBMF (k 32, 20 iterations, 2 threads) is built outside the repository from its public
sources with its own Makefile (SSE and OpenMP on): `--libmf` names that folder. Training
time is what each tool reports for training alone: shardmf's `train_seconds` (epochs,
without start-up or evaluation), LIBMF's mf-train wall time (text parsing included),
ALS's and Surprise's fit time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
ML100K = REPO.parent / "shared" / "data" / "ml-100k"
SYNTH = {"synth-5m": (5_000_000, 0.8, 5), "synth-10m": (10_000_000, 0.4, 10)}
# The synth-1m grid points the peers run with on large sets (bench/peers/run_peers.py).
ALS_PARAMS = {"rank": 10, "regParam": 0.05}
SURPRISE_PARAMS = {"n_factors": 100, "lr_all": 0.01, "reg_all": 0.02, "n_epochs": 20}


def shardmf(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("shardmf")), *args]


def run(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - started


def prepare(name: str, work: Path, log: Path,
            filmtrust: Path | None = None) -> tuple[Path, Path] | None:
    """Shards (prepare's defaults) and the exported split, made once per work folder."""
    shards, split = work / name / "shards", work / name / "split"
    if (split / "test.tsv").is_file():
        return shards, split
    if name == "ml-100k":
        if not (ML100K / "u.data").is_file():
            return None
        source = [str(ML100K / "u.data"), "--items", str(ML100K / "items.tsv")]
    elif name == "filmtrust":
        if filmtrust is None or not filmtrust.is_file():
            return None
        source = [str(filmtrust), "--duplicates", "mean"]
    else:
        ratings, noise, seed = SYNTH[name]
        raw = work / name / "raw"
        run(shardmf("synth", "--out", str(raw), "--num-users", "100000", "--num-items",
                    "20000", "--num-ratings", str(ratings), "--noise", str(noise), "--seed",
                    str(seed)), log)
        source = [str(raw / "ratings"), "--items", str(raw / "items.csv")]
    run(shardmf("prepare", *source, "--out", str(shards), "--overwrite"), log)
    run(shardmf("export-split", str(shards), "--out", str(split), "--overwrite"), log)
    return shards, split


def shardmf_row(shards: Path, run_dir: Path, nproc: int, log: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # this benchmark's own work folder
    command = shardmf("train", str(shards), "--out", str(run_dir), "--clusters", "0",
                      "--nproc", str(nproc))
    process_s = run(command, log)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    return {"test_rmse": metrics["test_rmse"], "train_seconds": metrics["train_seconds"],
            "baseline_test_rmse": metrics["baseline_test_rmse"],
            "ratings_per_s": metrics["train_ratings_per_s"], "epochs": metrics["epochs"],
            "best_epoch": metrics["best_epoch"], "process_seconds": round(process_s, 2),
            "chosen": config.get("chosen_from_data"), "step": config.get("step"),
            "user_embeddings": config.get("user_embeddings")}


def peer_row(python: str, script: str, split: Path, out: Path, log: Path,
             *extra: str, reuse: bool = False) -> dict:
    if not (reuse and out.is_file()):
        run([python, str(BENCH / "peers" / script), "--split", str(split), "--out", str(out),
             *extra], log)
    result = json.loads(out.read_text())
    return {"test_rmse": result["test_rmse"], "train_seconds": result["train_seconds"]}


def median_row(runs: list[dict]) -> dict:
    return {"test_rmse": statistics.median(r["test_rmse"] for r in runs),
            "train_seconds": statistics.median(r["train_seconds"] for r in runs),
            "runs": runs}


LABELS = {"shardmf-1": "shardmf defaults, 1 process", "shardmf-2": "shardmf defaults, --nproc 2",
          "libmf": "LIBMF CLI, k 32, 20 iterations, 2 threads",
          "spark-als": "Spark ALS local[2] (rank 10, reg 0.05; one run)",
          "surprise-svd": "Surprise SVD (100 factors, 20 epochs; one run)"}


def render(results: dict) -> str:
    """bench/defaults.md: one table per data set, medians and the per-run figures."""
    lines = ["# shardmf at its defaults against its peers", "",
             f"Made by `{results['command']}` on {results['date']} (2 shared cores; other "
             "work ran beside it, so compare rows of one set, not absolute figures).", "",
             "Training seconds are what each tool reports for training alone; test RMSE on "
             "the same 5 % test split (predictions clipped to the scale).", ""]
    for name, rows in results["datasets"].items():
        lines += [f"## {name}", ""]
        if "skipped" in rows:
            lines += [f"skipped: {rows['skipped']}", ""]
            continue
        lines += ["| run | test RMSE | training s (median) | per run |",
                  "| --- | ---: | ---: | --- |"]
        for key, row in rows.items():
            runs = row.get("runs", [row])
            each = ", ".join(f"{r['train_seconds']:.1f} s / {r['test_rmse']:.4f}" for r in runs)
            lines.append(f"| {LABELS.get(key, key)} | {row['test_rmse']:.4f} | "
                         f"{row['train_seconds']:.1f} | {each} |")
        one, two = rows.get("shardmf-1"), rows.get("shardmf-2")
        if one:
            lines += ["", "Bias-only baseline (global mean + regularised user and item "
                      f"biases, shardmf's): test RMSE {one['runs'][0]['baseline_test_rmse']:.4f}."]
        if one and two:
            speed = [b["ratings_per_s"] / a["ratings_per_s"]
                     for a, b in zip(one["runs"], two["runs"])]
            lines += ["", "2 processes / 1, ratings/s per epoch, per round: "
                      + ", ".join(f"{x:.2f}x" for x in speed)
                      + f" (median {statistics.median(speed):.2f}x); chosen: "
                      + f"`{one['runs'][0]['chosen']}`"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libmf", type=Path, help="folder with LIBMF's mf-train/mf-predict")
    parser.add_argument("--peers-python", help="python of bench/.venv-peers (ALS, Surprise)")
    parser.add_argument("--datasets", default="ml-100k,synth-5m,synth-10m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slow-peers", default="synth-5m,synth-10m",
                        help="sets on which ALS and Surprise run (once each)")
    parser.add_argument("--work", type=Path, default=BENCH / "_work" / "defaults")
    parser.add_argument("--out", type=Path, default=BENCH / "defaults.json")
    parser.add_argument("--filmtrust", type=Path, help="FilmTrust's ratings file (adds the "
                        "filmtrust set; name it in --datasets)")
    parser.add_argument("--reuse-slow-peers", action="store_true",
                        help="keep ALS and Surprise results already in the work folder")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite bench/defaults.md from --out and stop")
    args = parser.parse_args()
    if args.render_only:
        args.out.with_suffix(".md").write_text(render(json.loads(args.out.read_text())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
               "datasets": {}}
    for name in args.datasets.split(","):
        made = prepare(name, args.work, log, args.filmtrust)
        if made is None:
            missing = args.filmtrust if name == "filmtrust" else ML100K
            results["datasets"][name] = {"skipped": f"{missing} not found"}
            continue
        shards, split = made
        rows: dict[str, list[dict]] = {"shardmf-1": [], "shardmf-2": [], "libmf": []}
        for repeat in range(args.repeats):
            if args.libmf and name != "ml-100k":
                rows["libmf"].append(peer_row(sys.executable, "peer_libmf_cli.py", split,
                                              args.work / name / f"libmf-{repeat}.json", log,
                                              "--libmf", str(args.libmf)))
            for nproc in (1, 2):
                rows[f"shardmf-{nproc}"].append(shardmf_row(
                    shards, args.work / name / f"run-{nproc}", nproc, log))
            print(name, repeat, {k: v[-1]["train_seconds"] for k, v in rows.items() if v},
                  flush=True)
        summary = {key: median_row(runs) for key, runs in rows.items() if runs}
        if args.peers_python and name in args.slow_peers.split(","):
            summary["spark-als"] = peer_row(args.peers_python, "peer_spark_als.py", split,
                                            args.work / name / "als.json", log,
                                            "--params", json.dumps(ALS_PARAMS),
                                            reuse=args.reuse_slow_peers)
            summary["surprise-svd"] = peer_row(args.peers_python, "peer_surprise.py", split,
                                               args.work / name / "surprise.json", log,
                                               "--algo", "svd", "--params",
                                               json.dumps(SURPRISE_PARAMS),
                                               reuse=args.reuse_slow_peers)
        results["datasets"][name] = summary
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(render(results))
    print(json.dumps({n: {k: (round(v["test_rmse"], 4), round(v["train_seconds"], 1))
                          for k, v in d.items() if isinstance(v, dict)}
                      for n, d in results["datasets"].items()}, indent=1))


if __name__ == "__main__":
    main()
