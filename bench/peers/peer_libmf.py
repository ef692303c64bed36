"""Peer: LIBMF (parallel SGD matrix factorisation in C++) via the `libmf` PyPI wrapper (0.9.2).

    python peer_libmf.py --split SPLIT_DIR --out result.json [--threads 2] [--history]
    python peer_libmf.py --tune --grid full --split SPLIT_DIR --out chosen.json
    python peer_libmf.py --params '{"k": 64, "eta": 0.05, "lambda": 0.05, "nr_iters": 50}' ...

Trains on train.tsv only; --tune fits every grid point on train and scores it on val.
Defaults are those of LIBMF's own mf-train (not the wrapper's, which has L1 0.04, L2 0,
26 bins, 12 threads): k=8, eta=0.1, L2 lambda_p2 = lambda_q2 = 0.1, L1 0, nr_iters=20,
nr_bins=20, loss 0 (real-valued, squared error), with --threads 2. In --params and the grid,
"lambda" sets both L2 terms; the wrapper's own option names (k, eta, nr_iters, nr_bins,
lambda_p1, lambda_p2, lambda_q1, lambda_q2, do_nmf) are accepted too.

LIBMF's model is r ~ p_u . q_i, with no bias terms. Ids are mapped to 0-based indices over
the ids seen in train; users or items absent from train are predicted as the train mean.
Predictions are clipped to the rating scale, as the other peers do. The wrapper passes ids
as float32, so at most 2**24 users and items. Its MF.predict hands the C side an (n, 2)
array that is read column by column, so a row-major array gives wrong predictions without
any error: this script passes a Fortran-ordered one and checks a sample against P.Q.

LIBMF has no seed option (--seed is ignored): its shuffles use fixed internal seeds, and with
more than one thread the block schedule, hence the result, varies from run to run.
The wrapper never frees a trained model (a few MB per grid point).

The LIBMF built into this wrapper can deadlock at the end of training: after the last
iteration its main thread lets the workers go on (resume) before telling them to stop
(terminate), and if they finish a whole extra round of blocks in between (small data, a
busy machine), they wait for a next round that never comes while the main thread waits to
join them. So every fit runs in a thread watched from Python: a fit whose process has used
no CPU for STALL_S seconds is deadlocked, is abandoned (its threads sleep on) and run again;
"libmf_deadlock_retries" counts these, and train_seconds is the successful fit's own time.

History: with --history the (single, timed) fit is LIBMF's train-with-validation run with
its per-iteration log on, read from file descriptor 1 as it is written: each history entry
has the iteration's tr_rmse (LIBMF's running estimate during the pass), val_rmse (LIBMF's
own: val rows of known ids only, unclipped) and seconds (wall time since the previous line,
so the first includes LIBMF's set-up). The logging costs a little time per iteration (the
val pass and the regulariser sums), so without --history the fit is quiet and has no
history: only the final figures.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import re
import sys
import threading
import time
from importlib import metadata

import _common as common
import numpy as np

# LIBMF's mf-train defaults, with this machine's two cores.
DEFAULTS = {"k": 8, "eta": 0.1, "lambda_p1": 0.0, "lambda_q1": 0.0, "lambda_p2": 0.1,
            "lambda_q2": 0.1, "nr_iters": 20, "nr_bins": 20}
TUNABLE = {"k", "eta", "nr_iters", "nr_bins", "lambda_p1", "lambda_p2", "lambda_q1",
           "lambda_q2", "do_nmf"}
# Grids over the four knobs users tune; "small" keeps big sets affordable on 2 cores.
GRIDS = {
    "full": {"k": [16, 64], "eta": [0.05, 0.1], "lambda": [0.05, 0.1], "nr_iters": [20, 50]},
    "small": {"k": [64], "eta": [0.05, 0.1], "lambda": [0.05, 0.1], "nr_iters": [20]},
}
LOG_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+(\S+)\s+\S+\s*$")  # iter tr_rmse va_rmse obj
STALL_S, MAX_TRIES = 2.0, 5  # no CPU for STALL_S seconds: LIBMF deadlocked (see above)


def options(params: dict, threads: int) -> dict:
    """The wrapper's keyword arguments: defaults, then params ("lambda" sets both L2 terms)."""
    params = dict(params)
    if "lambda" in params:
        params["lambda_p2"] = params["lambda_q2"] = params.pop("lambda")
    unknown = set(params) - TUNABLE
    if unknown:  # the wrapper only prints a note for unknown names and ignores them
        raise SystemExit(f"unknown LIBMF parameter(s) {sorted(unknown)}; use {sorted(TUNABLE)}"
                         " or lambda (threads: --threads)")
    return {**DEFAULTS, **params, "nr_threads": threads}


def make(params: dict, threads: int, quiet: bool = True):
    from libmf import mf

    model = mf.MF(**options(params, threads), quiet=quiet)
    # Read back what reached the C struct (mf.py sets it through `is` tests on strings).
    effective = {}
    for name, *_ in mf.get_default_options():
        value = getattr(model._options, name)
        effective[name] = float(f"{value:.6g}") if isinstance(value, float) else value
    return model, effective


class Indexer:
    """0-based contiguous indices over the ids seen in train."""

    def __init__(self, train_ids: np.ndarray) -> None:
        self.vocab = np.unique(train_ids)
        if len(self.vocab) > 2 ** 24:
            raise SystemExit("more than 2**24 ids: the libmf wrapper passes them as float32")

    def __call__(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.vocab, ids), len(self.vocab) - 1)
        return pos, self.vocab[pos] == ids


def rows_of(split: tuple, users: Indexer, items: Indexer) -> dict:
    (u, ku), (i, ki) = users(split[0]), items(split[1])
    return {"u": u, "i": i, "r": split[2], "known": ku & ki}


def triples(rows: dict, known_only: bool = False) -> np.ndarray:
    keep = rows["known"] if known_only else slice(None)
    return np.column_stack([rows["u"][keep], rows["i"][keep], rows["r"][keep]]).astype(
        np.float32)


def predict(model, rows: dict, fill: float, scale: tuple[float, float]) -> np.ndarray:
    known = rows["known"]
    pairs = np.asfortranarray(np.column_stack([rows["u"][known], rows["i"][known]]),
                              dtype=np.float32)
    out = np.full(len(known), fill, dtype=np.float64)
    if len(pairs):
        got = np.asarray(model.predict(pairs), dtype=np.float64)
        sample = slice(0, 256)
        p, q = model.p_factors(), model.q_factors()
        u, i = pairs[sample, 0].astype(np.int64), pairs[sample, 1].astype(np.int64)
        if not np.allclose(got[sample], np.einsum("nk,nk->n", p[u], q[i]), atol=1e-3):
            raise RuntimeError("libmf predict disagrees with P.Q: its input layout changed?")
        out[known] = got
    return np.clip(out, *scale)


def evaluate(model, rows: dict, fill: float, scale) -> dict:
    return common.scores(predict(model, rows, fill, scale), rows["r"])


class StdoutLines:
    """Collect what C code writes to file descriptor 1, each line stamped on arrival."""

    def __enter__(self) -> StdoutLines:
        sys.stdout.flush()
        read_fd, write_fd = os.pipe()
        self.saved, self.lines = os.dup(1), []
        os.dup2(write_fd, 1)
        os.close(write_fd)
        self.thread = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self.thread.start()
        return self

    def _read(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "r") as pipe:
            for line in pipe:
                self.lines.append((time.perf_counter(), line.rstrip("\n")))

    def __exit__(self, *exc) -> None:
        ctypes.CDLL(None).fflush(None)
        os.dup2(self.saved, 1)  # closes the pipe's last write end: the reader sees EOF
        os.close(self.saved)
        self.thread.join()


def finished(thread: threading.Thread) -> bool:
    """Wait for a fit; False if the process stops using CPU before it ends (deadlock)."""
    cpu, since = time.process_time(), time.perf_counter()
    while thread.is_alive():
        thread.join(0.25)
        now_cpu, now = time.process_time(), time.perf_counter()
        if now_cpu - cpu > 0.005:
            cpu, since = now_cpu, now
        elif now - since > STALL_S:
            return False
    return True


def timed_call(box: dict, call, arrays) -> None:
    try:
        box["start"] = time.perf_counter()
        call(*arrays)
        box["seconds"] = time.perf_counter() - box["start"]
    except BaseException as error:  # handed to the main thread
        box["error"] = error


def watched(call, *arrays) -> tuple[float, float, int]:
    """(start, seconds, deadlock retries) of one LIBMF training call, retried on deadlock."""
    for retries in range(MAX_TRIES):
        box: dict = {}
        thread = threading.Thread(target=timed_call, args=(box, call, arrays), daemon=True)
        thread.start()
        if finished(thread):
            if isinstance(box.get("error"), ValueError) and "NULL" in str(box["error"]):
                raise SystemExit("libmf returned no model: it refused the parameters "
                                 "(its reason is printed above)")
            if "error" in box:
                raise box["error"]
            return box["start"], box["seconds"], retries
        common.log(f"libmf: training deadlocked (no CPU for {STALL_S:g} s); running it again")
    raise RuntimeError(f"libmf deadlocked {MAX_TRIES} times in a row")


def fit(model, train: np.ndarray) -> tuple[float, int]:
    _, seconds, retries = watched(model.fit, train)
    return seconds, retries


def fit_with_history(model, train: np.ndarray, val: np.ndarray) -> tuple[float, int, list]:
    with StdoutLines() as captured:
        t0, train_s, retries = watched(model.mf_train_test, train, val)
    history, last = [], t0
    for stamp, line in captured.lines:
        if stamp < t0:
            continue  # the log of a try that deadlocked
        match = LOG_LINE.match(line)
        if match:
            history.append({"epoch": int(match[1]) + 1, "train_rmse": float(match[2]),
                            "val_rmse": float(match[3]), "seconds": round(stamp - last, 4)})
            last = stamp
        elif line.strip() and not line.lstrip().startswith("iter"):
            common.log(f"libmf: {line}")
    return train_s, retries, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_split_args(parser)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--threads", type=int, default=2, help="LIBMF nr_threads")
    parser.add_argument("--history", action="store_true",
                        help="fit with LIBMF's per-iteration log on val and keep it")
    args = parser.parse_args()
    scale = common.scale_of(args.scale)
    started = time.perf_counter()
    split = {name: common.read_split(args.split / f"{name}.tsv")
             for name in ("train", "val", "test")}
    users, items = Indexer(split["train"][0]), Indexer(split["train"][1])
    data = {name: rows_of(rows, users, items) for name, rows in split.items()}
    train = triples(data["train"])
    train_mean = float(np.mean(split["train"][2], dtype=np.float64))
    fill = float(np.clip(train_mean, *scale))
    load_s = time.perf_counter() - started
    info = {"peer": "libmf", "load_seconds": round(load_s, 3), "train_ratings": len(train),
            "train_mean": train_mean, "threads": args.threads,
            "versions": {**common.versions("numpy"), "libmf": metadata.version("libmf")}}

    if args.tune:
        grid = GRIDS[args.grid]
        trials = []
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values))
            model, _ = make(params, args.threads)
            fit_s, retries = fit(model, train)
            val_scores = evaluate(model, data["val"], fill, scale)
            trials.append({"params": params, "val_rmse": val_scores["rmse"],
                           "fit_seconds": round(fit_s, 3), "libmf_deadlock_retries": retries})
            common.log(f"{params}: val RMSE {val_scores['rmse']:.4f} ({fit_s:.2f} s)")
        common.write_tuning(args.out, info, grid, trials, started)
        return

    params = json.loads(args.params) if args.params else {}
    model, effective = make(params, args.threads, quiet=not args.history)
    history = None
    if args.history:
        train_s, retries, history = fit_with_history(
            model, train, triples(data["val"], known_only=True))
    else:
        train_s, retries = fit(model, train)
    epochs = effective["nr_iters"]
    val_scores = evaluate(model, data["val"], fill, scale)
    test_scores = evaluate(model, data["test"], fill, scale)
    result = {
        **info, "params": params or "defaults", "effective_params": effective,
        "train_seconds": round(train_s, 3), "epochs": epochs,
        "ratings_per_s_per_epoch": round(len(train) * epochs / train_s, 1),
        "val_rmse": val_scores["rmse"], "test_rmse": test_scores["rmse"],
        "test_mae": test_scores["mae"], "test_count": test_scores["count"],
        "test_cold_rows_filled_with_train_mean": int((~data["test"]["known"]).sum()),
        "libmf_deadlock_retries": retries}
    if history is not None:
        result["history"] = history
    common.write_result(args.out, result)


if __name__ == "__main__":
    main()
