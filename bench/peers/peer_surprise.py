"""Peer: scikit-surprise SVD (defaults or a small grid chosen on val) and SVDpp (defaults).

    python peer_surprise.py --algo svd --split SPLIT_DIR --out result.json
    python peer_surprise.py --algo svd --tune --grid full --split SPLIT_DIR --out chosen.json
    python peer_surprise.py --algo svd --params '{"n_factors": 50, ...}' --split ... --out ...

Trains on train.tsv only; --tune fits every grid point on train and scores it on val.
Surprise clips predictions to the rating scale given to its Reader; unknown users or items
get the global mean plus whatever biases are known (Surprise's own behaviour).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import _common as common

# Grids over the four knobs users tune; "small" keeps big sets affordable on 2 cores.
GRIDS = {
    "full": {"n_factors": [50, 150], "lr_all": [0.005, 0.01], "reg_all": [0.02, 0.08],
             "n_epochs": [20, 40]},
    "small": {"n_factors": [100], "lr_all": [0.005, 0.01], "reg_all": [0.02, 0.08],
              "n_epochs": [20]},
}


def load(split_dir, scale):
    from surprise import Dataset, Reader

    first = (split_dir / "train.tsv").open().readline().rstrip("\n").split("\t")
    line_format = "user item rating" + (" timestamp" if len(first) > 3 else "")
    reader = Reader(line_format=line_format, sep="\t", rating_scale=scale)
    trainset = Dataset.load_from_file(str(split_dir / "train.tsv"), reader).build_full_trainset()

    def pairs(name):
        with (split_dir / name).open() as handle:
            return [(f[0], f[1], float(f[2])) for f in (line.rstrip("\n").split("\t")
                                                        for line in handle)]
    return trainset, pairs("val.tsv"), pairs("test.tsv")


def make(algo: str, params: dict, seed: int):
    from surprise import SVD, SVDpp

    cls = {"svd": SVD, "svdpp": SVDpp}[algo]
    return cls(random_state=seed, **params)


def evaluate(model, rows) -> dict:
    predicted = [model.predict(u, i, r_ui=r).est for u, i, r in rows]
    return common.scores(predicted, [r for _, _, r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_split_args(parser)
    parser.add_argument("--algo", choices=["svd", "svdpp"], default="svd")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    args = parser.parse_args()
    scale = common.scale_of(args.scale)
    started = time.perf_counter()
    trainset, val, test = load(args.split, scale)
    load_s = time.perf_counter() - started
    info = {"peer": f"surprise-{args.algo}", "load_seconds": round(load_s, 3),
            "train_ratings": trainset.n_ratings, "versions": common.versions("surprise", "numpy")}

    if args.tune:
        grid = GRIDS[args.grid]
        trials = []
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values))
            model = make(args.algo, params, args.seed)
            t0 = time.perf_counter()
            model.fit(trainset)
            fit_s = time.perf_counter() - t0
            val_scores = evaluate(model, val)
            trials.append({"params": params, "val_rmse": val_scores["rmse"],
                           "fit_seconds": round(fit_s, 3)})
            common.log(f"{params}: val RMSE {val_scores['rmse']:.4f} ({fit_s:.1f} s)")
        common.write_tuning(args.out, info, grid, trials, started)
        return

    params = json.loads(args.params) if args.params else {}
    model = make(args.algo, params, args.seed)
    t0 = time.perf_counter()
    model.fit(trainset)
    train_s = time.perf_counter() - t0
    epochs = model.n_epochs
    val_scores, test_scores = evaluate(model, val), evaluate(model, test)
    common.write_result(args.out, {
        **info, "params": params or "defaults",
        "effective_params": {"n_factors": model.n_factors, "n_epochs": epochs,
                             "lr_all": model.lr_bu, "reg_all": model.reg_bu},
        "train_seconds": round(train_s, 3), "epochs": epochs,
        "ratings_per_s_per_epoch": round(trainset.n_ratings * epochs / train_s, 1),
        "val_rmse": val_scores["rmse"], "test_rmse": test_scores["rmse"],
        "test_mae": test_scores["mae"], "test_count": test_scores["count"]})


if __name__ == "__main__":
    main()
