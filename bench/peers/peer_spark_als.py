"""Peer: Spark MLlib ALS (explicit feedback) in local[2], defaults or a grid chosen on val.

    python peer_spark_als.py --split SPLIT_DIR --out result.json [--params '{"rank": 50}']
    python peer_spark_als.py --tune --split SPLIT_DIR --out chosen.json

Trains on train.tsv only. Tuning scores val with coldStartStrategy="drop" (rows of users or
items absent from train are left out of the val RMSE). For test predictions the model uses
coldStartStrategy="nan" and every unseen user or item is predicted as the train mean, so
all test rows count. Predictions are clipped to the rating scale, as the other peers do.
Ids are cast to int (ALS needs integer ids; the exported ids are integers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import _common as common

GRIDS = {
    "full": {"rank": [10, 50, 100], "regParam": [0.05, 0.1, 0.2]},
    "small": {"rank": [10, 50], "regParam": [0.05, 0.1, 0.2]},
}


def session(cores: int, memory: str):
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master(f"local[{cores}]").appName("shardmf-peer-als")
             .config("spark.driver.memory", memory)
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             # 200 shuffle partitions (the default) is for clusters; local mode wants few.
             .config("spark.sql.shuffle.partitions", str(4 * cores))
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def read(spark, path):
    from pyspark.sql import functions as F

    frame = spark.read.csv(str(path), sep="\t", header=False, inferSchema=False)
    return frame.select(F.col("_c0").cast("int").alias("user"),
                        F.col("_c1").cast("int").alias("item"),
                        F.col("_c2").cast("float").alias("rating"))


def score(predictions, scale, fill: float | None) -> dict:
    from pyspark.sql import functions as F

    pred = F.col("prediction")
    if fill is not None:
        pred = F.when(F.isnan(pred), F.lit(fill)).otherwise(pred)
    pred = F.least(F.greatest(pred, F.lit(scale[0])), F.lit(scale[1]))
    error = pred - F.col("rating")
    row = predictions.select(F.sqrt(F.avg(error * error)).alias("rmse"),
                             F.avg(F.abs(error)).alias("mae"), F.count("*").alias("n"),
                             F.sum(F.isnan("prediction").cast("int")).alias("cold")).first()
    return {"rmse": float(row["rmse"]), "mae": float(row["mae"]), "count": int(row["n"]),
            "cold_rows": int(row["cold"] or 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_split_args(parser)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--memory", default="4g", help="spark.driver.memory")
    args = parser.parse_args()
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F

    scale = common.scale_of(args.scale)
    started = time.perf_counter()
    spark = session(args.cores, args.memory)
    train = read(spark, args.split / "train.tsv").cache()
    n_train = train.count()
    train_mean = float(train.agg(F.avg("rating")).first()[0])
    val = read(spark, args.split / "val.tsv").cache()
    test = read(spark, args.split / "test.tsv").cache()
    val.count(), test.count()
    info = {"peer": "spark-als", "load_seconds": round(time.perf_counter() - started, 3),
            "train_ratings": n_train, "train_mean": train_mean,
            "versions": {**common.versions("pyspark"), "java": os.popen(
                "java -version 2>&1 | head -1").read().strip()}}

    def als(params, cold):
        return ALS(userCol="user", itemCol="item", ratingCol="rating", seed=args.seed,
                   nonnegative=False, implicitPrefs=False, coldStartStrategy=cold, **params)

    try:
        if args.tune:
            grid = GRIDS[args.grid]
            trials = []
            for values in itertools.product(*grid.values()):
                params = dict(zip(grid, values))
                t0 = time.perf_counter()
                model = als(params, "drop").fit(train)
                fit_s = time.perf_counter() - t0
                val_scores = score(model.transform(val), scale, None)
                trials.append({"params": params, "val_rmse": val_scores["rmse"],
                               "val_rows_scored": val_scores["count"],
                               "fit_seconds": round(fit_s, 3)})
                common.log(f"{params}: val RMSE {val_scores['rmse']:.4f} ({fit_s:.1f} s)")
            common.write_tuning(args.out, info, grid, trials, started)
            return

        params = json.loads(args.params) if args.params else {}
        estimator = als(params, "nan")
        t0 = time.perf_counter()
        model = estimator.fit(train)
        train_s = time.perf_counter() - t0
        iterations = estimator.getMaxIter()
        val_scores = score(model.transform(val), scale, train_mean)
        test_scores = score(model.transform(test), scale, train_mean)
        common.write_result(args.out, {
            **info, "params": params or "defaults",
            "effective_params": {"rank": estimator.getRank(),
                                 "regParam": estimator.getRegParam(), "maxIter": iterations},
            "train_seconds": round(train_s, 3), "epochs": iterations,
            "ratings_per_s_per_epoch": round(n_train * iterations / train_s, 1),
            "val_rmse": val_scores["rmse"], "test_rmse": test_scores["rmse"],
            "test_mae": test_scores["mae"], "test_count": test_scores["count"],
            "test_cold_rows_filled_with_train_mean": test_scores["cold_rows"]})
    finally:
        spark.stop()


if __name__ == "__main__":
    main()
