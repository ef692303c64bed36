"""Benchmark shardmf against the tools users would pick instead, on exactly the same rows.

    make bench-peers                       # creates bench/.venv-peers, then runs this
    bench/.venv-peers/bin/python bench/peers/run_peers.py --shardmf .venv/bin/shardmf \
        --torch-python .venv/bin/python [--ml100k PATH] [--big] [--reps 3] [--budget-min 30]

Data: MovieLens-100K (``u.data``, only when present; never copied into the repository) and
synthetic sets from ``shardmf synth`` (1M ratings; 10M with --big). Each set goes through
``shardmf prepare`` (default seed) and ``shardmf export-split``; every peer reads the same
train/val/test TSV files, shardmf reads the shards they came from.

Every run is a subprocess whose process tree (Spark's JVM and torchrun's ranks included) is
sampled with psutil for peak RSS (sum over the tree, so pages shared between ranks count
once per process), timed from outside (process wall) and time-boxed (--timeout). Training
wall time is what each tool reports for its fit alone.

Repetitions: per data set (MovieLens first), each tuning grid runs once and every row once;
then repetitions are added while that set's cumulative share of --budget-min lasts (with
two sets, MovieLens may use the first half). The tables say how many runs each median is
over, and the notes which repetitions were cut. Writes bench/results.json and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
REPO = BENCH.parent
DEFAULT_ML100K = REPO.parent / "shared" / "data" / "ml-100k" / "u.data"
SHARDMF_ROW_FLAGS = ["--clusters", "0"]  # no peer clusters items: skip the K-Means post-step
TUNED_SHARDMF = {"epochs": 40, "patience": 3}  # the recipe tune_shardmf.py scores

SYNTH = {  # name: (users, items, ratings); sizes a 2-core, 24 GiB machine can hold
    "synth-1m": (10_000, 4_000, 1_000_000),
    "synth-10m": (100_000, 20_000, 10_000_000),
}


@dataclass
class Row:
    """One line of a results table: a peer with fixed settings, maybe tuned first."""

    key: str
    label: str
    kind: str  # surprise | spark | torch | shardmf
    args: list[str] = field(default_factory=list)
    tuned: bool = False
    diagnostic: bool = False  # an extra row explaining a figure; MovieLens only
    nproc: int = 1
    params: dict | None = None  # fixed settings passed as --params (peers) or flags (shardmf)
    datasets: tuple[str, ...] | None = None  # only these data sets (None: all)


# Settings the small grids chose on synth-1m (bench/results.json, 2026-11-28): on synth-10m
# a full grid per peer would take hours, so the peers run these and their defaults.
SYNTH_1M_CHOSEN = {"surprise": {"n_factors": 100, "lr_all": 0.01, "reg_all": 0.02,
                                "n_epochs": 20},
                   "spark": {"rank": 10, "regParam": 0.05}}
# shardmf on large sets: dim and lr as its synth-1m grid chose, 8,192 ratings per rank per
# step, users owned by rank (the set is prepared --partition-by user), a periodic row sync
# every 32 steps (bench/scaling.md), early stopping; init std 0.1 and L2 0.02 chosen on
# synth-10m's val split from three points (init 0.01 / L2 0.05, the ML-100K defaults, first
# measured: 0.5146 val after 40 epochs; 0.1 / 0.02: 0.5080 at epoch 17; 0.1 / 0.04: 0.5102
# at 30 of 30; lr 0.02 diverged in epoch 1).
LARGE_RECIPE = ["--dim", "64", "--lr", "0.01", "--init-std", "0.1", "--reg", "0.02",
                "--batch-size", "{batch}", "--sync-every", "32", "--epochs", "40",
                "--patience", "3"]
PREPARE_FLAGS = {"synth-10m": ["--partition-by", "user"]}


ROWS = [
    Row("surprise-svd", "Surprise SVD (defaults)", "surprise", ["--algo", "svd"]),
    Row("surprise-svd-tuned", "Surprise SVD (grid on val)", "surprise", ["--algo", "svd"],
        tuned=True),
    Row("surprise-svdpp", "Surprise SVDpp (defaults)", "surprise", ["--algo", "svdpp"]),
    Row("spark-als", "Spark ALS local[2] (defaults)", "spark"),
    Row("spark-als-tuned", "Spark ALS local[2] (grid on val)", "spark", tuned=True),
    Row("torch-mf", "PyTorch MF, 1 process (afternoon baseline)", "torch"),
    Row("shardmf-1", "shardmf --nproc 1 (defaults)", "shardmf", nproc=1),
    Row("shardmf-2", "shardmf --nproc 2 (defaults)", "shardmf", nproc=2),
    Row("shardmf-tuned", "shardmf --nproc 1 (grid on val)", "shardmf", tuned=True, nproc=1),
    Row("torch-mf-t1", "diagnostic: PyTorch MF --threads 1", "torch", ["--threads", "1"],
        diagnostic=True),
    Row("shardmf-1-t1", "diagnostic: shardmf --nproc 1 --threads 1 (defaults otherwise)",
        "shardmf", ["--threads", "1"], diagnostic=True, nproc=1),
    Row("surprise-svd-1m", "Surprise SVD (grid point chosen on synth-1m)", "surprise",
        ["--algo", "svd"], params=SYNTH_1M_CHOSEN["surprise"], datasets=("synth-10m",)),
    Row("spark-als-1m", "Spark ALS local[2] (grid point chosen on synth-1m)", "spark",
        params=SYNTH_1M_CHOSEN["spark"], datasets=("synth-10m",)),
    Row("libmf", "LIBMF, 2 threads (defaults)", "libmf", datasets=("synth-1m", "synth-10m")),
    Row("libmf-tuned", "LIBMF, 2 threads (grid on val)", "libmf", tuned=True,
        datasets=("synth-1m", "synth-10m")),
    Row("shardmf-1-large", "shardmf --nproc 1 (large-data recipe)", "shardmf",
        [a.format(batch=8192) for a in LARGE_RECIPE], nproc=1,
        datasets=("synth-1m", "synth-10m")),
    Row("shardmf-2-large", "shardmf --nproc 2 (large-data recipe)", "shardmf",
        [a.format(batch=16384) for a in LARGE_RECIPE], nproc=2,
        datasets=("synth-1m", "synth-10m")),
    # The same at lr 0.015 (0.02 diverges): fewer epochs to its best, at a slightly worse RMSE.
    Row("shardmf-2-large-lr015", "shardmf --nproc 2 (large-data recipe, lr 0.015)", "shardmf",
        [a.format(batch=16384) for a in LARGE_RECIPE] + ["--lr", "0.015"], nproc=2,
        datasets=("synth-10m",)),
    # A fixed schedule, as ALS's 10 sweeps and Surprise's 20 epochs are: 10 epochs, no early
    # stopping (lr decay 0.9 or 0.8 over those 10 ended worse on val: 0.5225 and 0.5484).
    Row("shardmf-2-large-10", "shardmf --nproc 2 (large-data recipe, a fixed 10 epochs)",
        "shardmf", [a.format(batch=16384) for a in LARGE_RECIPE]
        + ["--epochs", "10", "--patience", "0"], nproc=2, datasets=("synth-10m",)),
    # A shorter fixed schedule, chosen on val from the points in bench/RESULTS-10m.md: half
    # the batch (8,192 a step, synced every 64) tolerates lr 0.02, decaying 0.8 an epoch.
    Row("shardmf-2-fast", "shardmf --nproc 2 (fast schedule: a fixed 8 epochs, lr 0.02 "
        "decaying 0.8, 8,192 a step)", "shardmf",
        [a.format(batch=8192) for a in LARGE_RECIPE]
        + ["--lr", "0.02", "--lr-decay", "0.8", "--sync-every", "64", "--epochs", "8",
           "--patience", "0"], nproc=2, datasets=("synth-10m",)),
]


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work: Path = args.work.resolve()
        self.started = time.monotonic()
        self.budget_s = args.budget_min * 60
        self.log_dir = self.work / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.runs: list[dict] = []
        self.tunes: dict[str, dict] = {}
        self.datasets: dict[str, dict] = {}
        self.notes: list[str] = []

    # ---------------------------------------------------------------- processes
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def measure(self, command: list[str], name: str, timeout: float) -> dict:
        """Run one command; wall time, peak RSS of its process tree, exit status, load."""
        log_path = self.log_dir / f"{name}.log"
        load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        with log_path.open("w") as log_file:
            log_file.write("$ " + shlex.join(command) + "\n")
            log_file.flush()
            proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                    cwd=self.work, start_new_session=True)
            root = psutil.Process(proc.pid)
            peak = 0
            timed_out = False
            while proc.poll() is None:
                peak = max(peak, tree_rss(root))
                if time.monotonic() - t0 > timeout:
                    timed_out = True
                    kill_group(proc)
                    break
                time.sleep(0.1)
            proc.wait()
        wall = time.monotonic() - t0
        status = "timed out" if timed_out else ("ok" if proc.returncode == 0 else "failed")
        tail = ""
        if status == "failed":
            text = log_path.read_text(errors="replace")
            tail = text[-800:]
            errors = [line.strip()[:300] for line in text.splitlines()
                      if line.startswith("Fatal") or "error:" in line.lower()]
            self.notes.append(f"{name} failed (exit {proc.returncode}): "
                              + " | ".join(errors[-3:]) + f" (log: {log_path.name})")
        return {"status": status, "returncode": proc.returncode,
                "process_seconds": round(wall, 3), "peak_rss_mb": round(peak / 2**20, 1),
                "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
                "log": str(log_path.relative_to(self.work)), "error_tail": tail,
                "command": shlex.join(command)}

    def tool(self, command: list[str], what: str) -> None:
        """A data preparation step: must succeed."""
        done = subprocess.run(command, cwd=self.work, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{what} failed ({done.returncode}):\n$ {shlex.join(command)}\n"
                     f"{done.stderr[-2000:]}")

    # ---------------------------------------------------------------- data
    def prepare_datasets(self) -> None:
        a = self.args
        wanted = ["ml-100k", "synth-1m"] + (["synth-10m"] if a.big else [])
        if a.datasets:
            wanted = [d for d in wanted if d in a.datasets.split(",")]
        for name in wanted:
            folder = self.work / name
            info: dict = {"name": name}
            if name == "ml-100k":
                source = Path(a.ml100k)
                if not source.is_file():
                    msg = (f"MovieLens-100K is ABSENT: {source} not found (give --ml100k "
                           "PATH/u.data); the MovieLens table was not produced.")
                    print(msg, file=sys.stderr)
                    self.notes.append(msg)
                    self.datasets[name] = {**info, "absent": True, "source": str(source)}
                    continue
                info["source"] = str(source)
                raw = [str(source)]
                make = None
            else:
                users, items, ratings = SYNTH[name]
                raw_dir = folder / "raw"
                make = [a.shardmf, "synth", "--out", str(raw_dir), "--num-users", str(users),
                        "--num-items", str(items), "--num-ratings", str(ratings), "--seed", "0"]
                info["source"] = shlex.join(make)
                raw = [str(raw_dir)]
            shards, split = folder / "shards", folder / "split"
            prepare = [a.shardmf, "prepare", *raw, "--out", str(shards), "--overwrite",
                       *PREPARE_FLAGS.get(name, [])]
            export = [a.shardmf, "export-split", str(shards), "--out", str(split)]
            stamp = folder / "stamp.json"
            recipe = {"make": make, "prepare": prepare, "export": export}
            reuse = (not a.fresh_data and stamp.is_file()
                     and json.loads(stamp.read_text()) == recipe
                     and (split / "test.tsv").is_file())
            t0 = time.monotonic()
            if not reuse:
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                if make:
                    self.tool(make, f"{name}: synth")
                self.tool(prepare, f"{name}: prepare")
                self.tool(export, f"{name}: export-split")
                stamp.write_text(json.dumps(recipe))
            manifest = json.loads((shards / "manifest.json").read_text())
            info.update({
                "shards": str(shards), "split": str(split),
                "prepare_seconds": None if reuse else round(time.monotonic() - t0, 1),
                "users": manifest["counts"]["users"], "items": manifest["counts"]["items"],
                "ratings": manifest["counts"]["ratings"],
                "scale": manifest["rating"]["scale"],
                "train_mean": manifest["rating"]["train_mean"],
                "split_method": manifest["split"]["method"],
                "split_seed": manifest["split"]["seed"],
                "commands": [shlex.join(c) for c in (make, prepare, export) if c]})
            self.datasets[name] = info
            print(f"{name}: {info['ratings']} ({'reused' if reuse else 'prepared'})",
                  file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- rows
    def rows_for(self, dataset: str) -> list[Row]:
        rows = [r for r in ROWS if not (r.diagnostic and dataset != "ml-100k")
                and (r.datasets is None or dataset in r.datasets)]
        if self.args.only:
            keep = set(self.args.only.split(","))
            rows = [r for r in rows if r.key in keep]
        return rows

    def grid_for(self, dataset: str) -> str:
        return "full" if dataset == "ml-100k" else "small"

    def peer_command(self, row: Row, ds: dict, out: Path, extra: list[str]) -> list[str]:
        a = self.args
        scale = ",".join(str(x) for x in ds["scale"])
        common = ["--split", ds["split"], "--scale", scale, "--out", str(out)]
        if row.kind == "surprise":
            return [a.peers_python, str(HERE / "peer_surprise.py"), *row.args, *common, *extra]
        if row.kind == "spark":
            return [a.peers_python, str(HERE / "peer_spark_als.py"), *row.args, *common, *extra]
        if row.kind == "torch":
            return [a.torch_python, str(HERE / "peer_torch_mf.py"), *row.args, *common, *extra]
        if row.kind == "libmf":
            return [a.peers_python, str(HERE / "peer_libmf.py"), *row.args, *common, *extra]
        raise ValueError(row.kind)

    def shardmf_command(self, row: Row, ds: dict, run_dir: Path) -> list[str]:
        command = [self.args.shardmf, "train", ds["shards"], "--out", str(run_dir),
                   "--nproc", str(row.nproc), *SHARDMF_ROW_FLAGS, *row.args]
        if row.tuned:
            chosen = self.tunes[f"{ds['name']}/{row.key}"]["chosen"]
            for key, value in {**chosen, **TUNED_SHARDMF}.items():
                command += [f"--{key}", str(value)]
        return command

    def tune(self, row: Row, ds: dict) -> None:
        key = f"{ds['name']}/{row.key}"
        out = self.work / ds["name"] / "tune" / f"{row.key}.json"
        grid = self.grid_for(ds["name"])
        if row.kind == "shardmf":
            command = [self.args.peers_python, str(HERE / "tune_shardmf.py"),
                       "--shardmf", self.args.shardmf, "--shards", ds["shards"],
                       "--work", str(self.work / ds["name"] / "tune" / "shardmf-runs"),
                       "--out", str(out), "--grid", grid]
        else:
            command = self.peer_command(row, ds, out, ["--tune", "--grid", grid])
        out.unlink(missing_ok=True)
        print(f"[{self.elapsed() / 60:5.1f} min] tune {key} ...", file=sys.stderr, flush=True)
        measured = self.measure(command, f"{ds['name']}-{row.key}-tune", self.args.tune_timeout)
        result = json.loads(out.read_text()) if measured["status"] == "ok" else {}
        self.tunes[key] = {**measured, **result}
        print(f"    {measured['status']}, {measured['process_seconds']:.0f} s, chosen "
              f"{result.get('chosen')}", file=sys.stderr, flush=True)

    def run_row(self, row: Row, ds: dict, rep: int) -> None:
        name = f"{ds['name']}-{row.key}-rep{rep}"
        out_dir = self.work / ds["name"] / "runs" / f"{row.key}-rep{rep}"
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        record = {"dataset": ds["name"], "row": row.key, "rep": rep}
        tune = self.tunes.get(f"{ds['name']}/{row.key}")
        if row.tuned and (not tune or "chosen" not in tune):
            self.runs.append({**record, "status": "skipped: tuning did not finish"})
            return
        if row.kind == "shardmf":
            command = self.shardmf_command(row, ds, out_dir)
        else:
            chosen = tune["chosen"] if row.tuned else row.params
            params = ["--params", json.dumps(chosen)] if chosen else []
            command = self.peer_command(row, ds, out_dir.with_suffix(".json"), params)
        print(f"[{self.elapsed() / 60:5.1f} min] {name} ...", file=sys.stderr, flush=True)
        measured = self.measure(command, name, self.args.timeout)
        record.update(measured)
        if row.kind == "shardmf":
            record.update(read_shardmf(out_dir, measured["status"]))
            shutil.rmtree(out_dir, ignore_errors=True)  # checkpoints: tens of MB per run
        elif measured["status"] == "ok":
            result = json.loads(out_dir.with_suffix(".json").read_text())
            result.pop("history", None)
            record.update(result)
        self.runs.append(record)
        rmse = record.get("test_rmse")
        print(f"    {measured['status']}, process {measured['process_seconds']:.1f} s, train "
              f"{record.get('train_seconds')} s, test RMSE "
              f"{'-' if rmse is None else f'{rmse:.4f}'}, peak {measured['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)

    def last_seconds(self, dataset: str, row: Row) -> float | None:
        done = [r for r in self.runs if r["dataset"] == dataset and r["row"] == row.key]
        if not done or done[-1].get("status") != "ok":
            return None  # timed out, failed or skipped: not repeated
        return done[-1]["process_seconds"]

    def go(self) -> None:
        self.prepare_datasets()
        ready = [d for d in self.datasets.values() if not d.get("absent")]
        for index, ds in enumerate(ready):
            # Phase 1: the tuning grids once, every row once.
            rows = self.rows_for(ds["name"])
            for row in rows:
                if row.tuned:
                    self.tune(row, ds)
                self.run_row(row, ds, 1)
            # Phase 2: more repetitions while this set's cumulative share of the budget
            # lasts (MovieLens comes first and may use up to 1/n of it, and so on).
            share = self.budget_s * (index + 1) / len(ready)
            wanted = self.args.reps if ds["name"] == "ml-100k" else self.args.synth_reps
            for rep in range(2, wanted + 1):
                for row in rows:
                    last = self.last_seconds(ds["name"], row)
                    if last is None:
                        continue  # timed out, failed or skipped: not repeated
                    if self.elapsed() + last > share:
                        self.notes.append(
                            f"{ds['name']} / {row.key}: repetition {rep} of {wanted} cut (its "
                            f"share of the {self.args.budget_min:g}-min budget, "
                            f"{share / 60:.0f} min cumulative, would be exceeded)")
                        continue
                    self.run_row(row, ds, rep)

    # ---------------------------------------------------------------- output
    def summarise(self) -> dict:
        summary = {}
        for ds_name in self.datasets:
            for row in self.rows_for(ds_name):
                runs = [r for r in self.runs if r["dataset"] == ds_name and r["row"] == row.key]
                if not runs:
                    continue
                ok = [r for r in runs if r.get("status") == "ok"]
                entry = {"row": row.key, "label": row.label, "diagnostic": row.diagnostic,
                         "runs": len(runs), "ok_runs": len(ok),
                         "status": "ok" if ok else runs[0].get("status")}
                for key in ("test_rmse", "test_mae", "val_rmse", "train_seconds",
                            "train_seconds_to_best", "process_seconds", "peak_rss_mb",
                            "ratings_per_s_per_epoch", "epochs", "load_before"):
                    values = [r[key] for r in ok if r.get(key) is not None]
                    entry[key] = statistics.median(values) if values else None
                    if key in ("train_seconds", "process_seconds") and len(values) > 1:
                        entry[f"{key}_range"] = [min(values), max(values)]
                if not ok:  # a timed-out shardmf run still tells how far it got
                    partial = runs[0]
                    entry["partial"] = {k: partial.get(k) for k in (
                        "epochs_done", "best_val_rmse_so_far", "process_seconds",
                        "peak_rss_mb") if partial.get(k) is not None}
                tune = self.tunes.get(f"{ds_name}/{row.key}")
                if tune:
                    entry["tuning"] = {"status": tune.get("status"),
                                       "process_seconds": tune.get("process_seconds"),
                                       "grid": tune.get("grid"), "chosen": tune.get("chosen"),
                                       "val_rmse": tune.get("val_rmse"),
                                       "points": len(tune.get("trials", []))}
                params = ok[0].get("effective_params") or ok[0].get("params") if ok else None
                entry["params"] = params
                summary.setdefault(ds_name, []).append(entry)
        return summary

    def machine(self) -> dict:
        def out(command: str) -> str:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=REPO)
            return (done.stdout + done.stderr).strip()

        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        peers = subprocess.run([self.args.peers_python, "-c", (
            "import json, numpy, surprise, pyspark, psutil;"
            "print(json.dumps({'numpy': numpy.__version__, 'scikit-surprise': "
            "surprise.__version__, 'pyspark': pyspark.__version__, 'psutil': "
            "psutil.__version__}))")], capture_output=True, text=True)
        project = subprocess.run([self.args.torch_python, "-c", (
            "import json, torch, numpy, importlib.metadata as m;"
            "print(json.dumps({'torch': torch.__version__, 'numpy': numpy.__version__, "
            "'shardmf': m.version('shardmf'), 'torch_threads': torch.get_num_threads()}))")],
            capture_output=True, text=True)
        return {
            "cpu": cpu, "logical_cores": os.cpu_count(),
            "physical_cores": psutil.cpu_count(logical=False),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(),
            "java": out("java -version 2>&1 | head -1"),
            "peers_venv": json.loads(peers.stdout or "{}"),
            "project_venv": json.loads(project.stdout or "{}"),
            "git_commit": out("git rev-parse --short HEAD"),
            "git_dirty": bool(out("git status --porcelain --untracked-files=no")),
        }

    def write(self, machine: dict, load_start: tuple, finished: str) -> None:
        summary = self.summarise()
        payload = {
            "created": finished, "total_seconds": round(self.elapsed(), 1),
            "budget_min": self.args.budget_min, "timeout_s": self.args.timeout,
            "tune_timeout_s": self.args.tune_timeout, "reps": self.args.reps,
            "synth_reps": self.args.synth_reps, "machine": machine,
            "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "driver_command": shlex.join([sys.executable, *sys.argv]),
            "datasets": self.datasets, "summary": summary, "tuning": self.tunes,
            "runs": self.runs, "notes": self.notes,
        }
        out_json = Path(self.args.out_json)
        out_json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        markdown = render_markdown(payload, self.args.analysis, relative(self.args.out_json))
        Path(self.args.out_md).write_text(markdown)
        print(f"wrote {out_json} and {self.args.out_md}", file=sys.stderr)


def snapshot_head(work: Path, python: str) -> tuple[str, str]:
    """The committed HEAD, extracted with `git archive` (read-only), behind a shardmf wrapper.

    Colleagues may be editing the work tree that the editable install points at; this
    benchmarks the commit instead. PYTHONPATH puts the snapshot ahead of the editable
    finder; runs start in the work folder, so no package is picked up from the cwd.
    """
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    snap = work / "shardmf-HEAD"
    stamp = snap / ".commit"
    if not (stamp.is_file() and stamp.read_text() == commit):
        shutil.rmtree(snap, ignore_errors=True)
        snap.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(snap)], input=archive, check=True)
        stamp.write_text(commit)
    wrapper = snap / "shardmf"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{snap}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{python}" -c '
        "'import sys; from launch.cli import main; sys.argv[0] = \"shardmf\"; "
        "sys.exit(main())' \"$@\"\n")
    wrapper.chmod(0o755)
    return str(wrapper), commit


def tree_rss(root: psutil.Process) -> int:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def kill_group(proc: subprocess.Popen) -> None:
    """The run's own session (start_new_session): its ranks and JVM go with it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def read_shardmf(run_dir: Path, status: str) -> dict:
    """metrics.json of a finished run; for a killed one, how far metrics.jsonl got."""
    found: dict = {"peer": "shardmf"}
    config = run_dir / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        found["params"] = {"dim": cfg["model"]["dim"], "lr": cfg["optim"]["lr"],
                           "reg": cfg["model"]["reg"], "epochs_max": cfg["train"]["epochs"],
                           "patience": cfg["train"]["patience"],
                           "batch_size": cfg["train"]["batch_size"],
                           "threads": cfg["train"]["threads"] or "auto"}
    metrics = run_dir / "metrics.json"
    if status == "ok" and metrics.is_file():
        m = json.loads(metrics.read_text())
        found.update({"test_rmse": m["test_rmse"], "test_mae": m["test_mae"],
                      "val_rmse": m["val_rmse"], "epochs": m["epochs"],
                      "best_epoch": m.get("best_epoch"), "train_seconds": m["train_seconds"],
                      "ratings_per_s_per_epoch": m["train_ratings_per_s"],
                      "train_ratings": m.get("train_ratings")})
    history = run_dir / "metrics.jsonl"
    if history.is_file():
        epochs = [json.loads(line) for line in history.read_text().splitlines() if line]
        vals = [e["val_rmse"] for e in epochs if e.get("val_rmse") is not None]
        found["epochs_done"] = len(epochs)
        found["best_val_rmse_so_far"] = min(vals) if vals else None
        found["median_epoch_seconds"] = (statistics.median(e["seconds"] for e in epochs)
                                         if epochs else None)
        best = found.get("best_epoch")
        if best:  # training time until the kept epoch: what a peer's fixed schedule costs
            found["train_seconds_to_best"] = round(sum(e["seconds"] for e in epochs[:best]), 3)
    return found


def fmt(value, digits=4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def group_notes(notes: list[str]) -> list[str]:
    """One line per (data set, repetition) for the budget cuts, other notes as they are."""
    cuts: dict[tuple[str, str], list[str]] = {}
    other = []
    for note in notes:
        match = re.match(r"(\S+) / (\S+): repetition (\d+ of \d+) cut \((.*)\)$", note)
        if match:
            dataset, row, rep, why = match.groups()
            cuts.setdefault((dataset, rep, why), []).append(row)
        else:
            other.append(note)
    grouped = [f"{dataset}: repetition {rep} cut for {', '.join(rows)} ({why})"
               for (dataset, rep, why), rows in cuts.items()]
    return grouped + other


def relative(path: str) -> str:
    """A path as the repository names it, when it is inside the repository."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(resolved)


def render_markdown(p: dict, analysis: Path, raw: str) -> str:
    m = p["machine"]
    lines = [
        "# shardmf against its peers",
        "",
        f"Generated by `bench/peers/run_peers.py` (`make bench-peers`) on {p['created']}, "
        f"{p['total_seconds'] / 60:.1f} min in all. Raw figures: `{raw}`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['logical_cores']} logical cores "
        f"({m['physical_cores']} physical), {m['memory_gib']} GiB; {m['os']}",
        f"- Python {m['python']}; {m['java']}",
        "- peers venv (`bench/.venv-peers`): "
        + ", ".join(f"{k} {v}" for k, v in m["peers_venv"].items()),
        "- project venv (`.venv`): "
        + ", ".join(f"{k} {v}" for k, v in m["project_venv"].items()),
        f"- shardmf code benchmarked: {m.get('shardmf_code')} (repository HEAD "
        f"{m['git_commit']}" + (", work tree had uncommitted changes)" if m["git_dirty"]
                                  else ")"),
        f"- load average (1 min) at start {p['load_average_start'][0]:.1f}, at end "
        f"{p['load_average_end'][0]:.1f}: the machine is shared; each run's load is in "
        "`results.json` (`load_before`).",
        "",
    ]
    for name, ds in p["datasets"].items():
        lines += [f"## {name}", ""]
        if ds.get("absent"):
            lines += [f"**Absent**: {ds['source']} was not found, so this table was not "
                      "produced (give `--ml100k PATH`).", ""]
            continue
        r = ds["ratings"]
        lines += [f"{ds['users']:,} users × {ds['items']:,} items; ratings train "
                  f"{r['train']:,} / val {r['val']:,} / test {r['test']:,} "
                  f"({ds['split_method']} split, seed {ds['split_seed']}); scale "
                  f"{ds['scale'][0]:g}–{ds['scale'][1]:g}. Source: `{ds['source']}`.", ""]
        lines += ["| peer | test RMSE | test MAE | val RMSE | train s | train s to best val | "
                  "process s | ratings/s per epoch | epochs | peak RSS MB | runs | tuning |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
                  "| --- |"]
        for e in p["summary"].get(name, []):
            tuning = ""
            if e.get("tuning"):
                t = e["tuning"]
                tuning = (f"{t['points']} points, {fmt(t['process_seconds'], 0)} s → "
                          f"{json.dumps(t['chosen'])}" if t.get("chosen")
                          else f"tuning {t.get('status')}")
            if e["status"] != "ok":
                part = e.get("partial") or {}
                extra = ""
                if part.get("epochs_done") is not None:
                    extra = (f" after {part['epochs_done']} epochs (best val RMSE so far "
                             f"{fmt(part.get('best_val_rmse_so_far'))})")
                lines.append(f"| {e['label']} | **{e['status']}**{extra} | | | | | "
                             f"{fmt(part.get('process_seconds'), 0)} | | | "
                             f"{fmt(part.get('peak_rss_mb'), 0)} | {e['runs']} | {tuning} |")
                continue
            spread = ""
            if e.get("train_seconds_range"):
                lo, hi = e["train_seconds_range"]
                spread = f" ({lo:.1f}–{hi:.1f})"
            to_best = e.get("train_seconds_to_best")
            if to_best is None and not e["row"].startswith("shardmf"):
                to_best = e["train_seconds"]  # a fixed schedule (not recorded: shown as -)
            lines.append(
                f"| {e['label']} | {fmt(e['test_rmse'])} | {fmt(e['test_mae'])} | "
                f"{fmt(e['val_rmse'])} | {fmt(e['train_seconds'], 1)}{spread} | "
                f"{fmt(to_best, 1)} | "
                f"{fmt(e['process_seconds'], 1)} | {fmt(e['ratings_per_s_per_epoch'], 0)} | "
                f"{fmt(e['epochs'], 0)} | {fmt(e['peak_rss_mb'], 0)} | {e['ok_runs']} | "
                f"{tuning} |")
        lines += ["", "Commands that made the data:", ""]
        lines += [f"    {c}" for c in ds["commands"]]
        lines += [""]
    lines += [
        "## How to read the tables",
        "",
        "- Figures are medians over `runs` runs (train-time range in brackets when more than "
        "one). RMSE/MAE are on the test split after choosing (epochs, grid points) on val; "
        "every peer predicts every test row, clipped to the rating scale.",
        "- **train s**: the fit alone as each tool reports it (shardmf: `train_seconds`, the "
        "sum of epoch times without per-epoch validation; Surprise: `fit()`; Spark: "
        "`ALS.fit()`; PyTorch MF: its epoch loops). **process s**: the whole subprocess, "
        "start-up (JVM, torchrun, imports), data loading, validation, checkpoints included.",
        "- **train s to best val**: shardmf: the training seconds of the epochs up to the one "
        "it keeps (the best validation RMSE; the epochs after it, run only to see that it "
        "stopped improving, are in train s); every other peer trains a fixed schedule, so "
        "this is its train s.",
        "- **ratings/s per epoch**: training ratings × epochs (ALS: iterations) / train s.",
        "- **peak RSS**: sum of RSS over the process tree, sampled every 0.1 s (Spark's JVM "
        "and each torchrun rank included; pages shared between processes count once per process).",
        f"- shardmf rows run `shardmf train SHARDS --out RUN --nproc N "
        f"{' '.join(SHARDMF_ROW_FLAGS)}`: every training option at its default; the K-Means "
        "post-step is skipped because no peer does it. The tuned row uses the grid point "
        f"chosen by `tune_shardmf.py` with `--epochs {TUNED_SHARDMF['epochs']} --patience "
        f"{TUNED_SHARDMF['patience']}`, as scored in the grid.",
        "- Spark ALS: unseen test users/items (coldStartStrategy \"nan\") are predicted as "
        "the train mean; val tuning uses coldStartStrategy \"drop\".",
        f"- Every run is time-boxed at {p['timeout_s']} s and every tuning grid at "
        f"{p['tune_timeout_s']} s; \"timed out\" means killed there, with how far it got.",
        "",
        "## Peers, settings and installation",
        "",
        "- `make bench-peers` makes `bench/.venv-peers` (never the project's dependencies) "
        "from `bench/peers/requirements.txt`. scikit-surprise 1.1.5 installs from its cp311 "
        "manylinux wheel, built against numpy 2: no compiler, no `numpy<2` pin. pyspark "
        "4.3.0 comes from PyPI with its jars and runs on the machine's Java 17; it warns that "
        "no native BLAS (`libblas.so.3`) is installed and uses its Java fallback.",
        "- `peer_surprise.py`: `SVD` and `SVDpp` with Surprise's defaults (SVD: 100 factors, "
        "20 epochs, lr 0.005, reg 0.02; SVDpp: 20 factors); the tuned SVD grid is "
        "n_factors × lr_all × reg_all × n_epochs (16 points on MovieLens, 4 on synthetic "
        "sets; see `tuning` in results.json).",
        "- `peer_spark_als.py`: explicit `ALS` in `local[2]`, driver memory 4g, 8 shuffle "
        "partitions; defaults rank 10, regParam 0.1, maxIter 10; grid rank × regParam.",
        "- `peer_torch_mf.py` (the project's .venv): nn.Embedding biased MF, dim 64, Adam lr "
        "0.005, per-example L2 0.05, batch 4,096, all data as in-memory tensors, early "
        "stopping on val (patience 3, at most 60 epochs); torch's default threads unless "
        "`--threads`.",
        "- `tune_shardmf.py`: `shardmf train` over dim × lr × reg (8 points on MovieLens, 4 "
        "on synthetic sets), each with `--epochs 40 --patience 3 --threads 1 --clusters 0`.",
        "- Diagnostic rows (MovieLens only) repeat a row with `--threads 1` to show what the "
        "default thread count costs on a shared machine.",
        "",
    ]
    if p["notes"]:
        lines += ["## Notes from this run", ""] + [f"- {n}" for n in group_notes(p["notes"])]
        lines += [""]
    if analysis.is_file():
        lines += [analysis.read_text().rstrip(), ""]
    lines += ["## Command", "", f"    {p['driver_command']}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shardmf", default=str(REPO / ".venv" / "bin" / "shardmf"),
                        help="the shardmf executable for data preparation and shardmf rows")
    parser.add_argument("--torch-python", default=str(REPO / ".venv" / "bin" / "python"),
                        help="a Python with torch, for the PyTorch MF baseline")
    parser.add_argument("--peers-python", default=sys.executable,
                        help="the Python of the peers venv (Surprise, PySpark)")
    parser.add_argument("--ml100k", default=str(DEFAULT_ML100K),
                        help="MovieLens-100K u.data (used only when present)")
    parser.add_argument("--big", action="store_true", help="also the 10M synthetic set")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated subset of ml-100k,synth-1m,synth-10m")
    parser.add_argument("--only", default=None, help="comma-separated row keys to run")
    parser.add_argument("--reps", type=int, default=3, help="runs per row on MovieLens")
    parser.add_argument("--synth-reps", type=int, default=1, help="runs per row, synthetic")
    parser.add_argument("--budget-min", type=float, default=30,
                        help="no repetition starts that would end past this")
    parser.add_argument("--timeout", type=float, default=600, help="time box of one run, s")
    parser.add_argument("--tune-timeout", type=float, default=900,
                        help="time box of one tuning grid, s")
    parser.add_argument("--snapshot-head", action="store_true",
                        help="benchmark the committed HEAD (git archive into the work folder, "
                        "run with --torch-python) instead of --shardmf's work tree")
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "shardmf-bench-peers",
                        help="data, runs and logs; outside the repository by default, since "
                        "it holds a copy of MovieLens that must never be committed")
    parser.add_argument("--fresh-data", action="store_true", help="re-make the data sets")
    parser.add_argument("--out-json", default=str(BENCH / "results.json"))
    parser.add_argument("--out-md", default=str(BENCH / "RESULTS.md"))
    parser.add_argument("--analysis", type=Path, default=HERE / "ANALYSIS.md",
                        help="hand-written analysis appended to --out-md")
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite --out-md from --out-json (e.g. after editing "
                        "bench/peers/ANALYSIS.md)")
    args = parser.parse_args()
    if args.render_only:
        payload = json.loads(Path(args.out_json).read_text())
        markdown = render_markdown(payload, args.analysis, relative(args.out_json))
        Path(args.out_md).write_text(markdown)
        return
    for name in ("shardmf", "torch_python", "peers_python"):
        exe = getattr(args, name)
        if not Path(exe).exists():
            sys.exit(f"{exe}: not found")
        # Runs start in the work folder: absolute, but not resolved (a venv's python is a
        # symlink that must stay one, or the venv is lost).
        setattr(args, name, os.path.abspath(exe))
    args.ml100k = os.path.abspath(args.ml100k)
    load_start = os.getloadavg()
    driver = Driver(args)
    code = "work tree behind " + args.shardmf
    if args.snapshot_head:
        args.shardmf, commit = snapshot_head(driver.work, args.torch_python)
        code = f"committed HEAD {commit[:10]} (git archive snapshot; work tree not used)"
    machine = driver.machine()
    machine["shardmf_code"] = code
    try:
        driver.go()
    finally:
        finished = datetime.datetime.now().isoformat(timespec="seconds")
        driver.write(machine, load_start, finished)


if __name__ == "__main__":
    main()
