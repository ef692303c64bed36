"""Split methods (random, temporal, leave-last), --partition-by user, pre-split inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_shards import InputError, PrepareConfig, prepare


def run(inputs: list, out: Path, **config) -> dict:
    config.setdefault("overwrite", True)
    return prepare([str(i) for i in inputs], out, PrepareConfig(**config))


@pytest.fixture(scope="module")
def timed(tmp_path_factory) -> Path:
    """1,500 ratings of 60 users with distinct timestamps, as ratings.csv."""
    rng = np.random.default_rng(3)
    pairs = rng.choice(60 * 80, size=1500, replace=False)
    frame = pd.DataFrame({"user": pairs // 80 + 1, "item": pairs % 80 + 1,
                          "rating": rng.integers(1, 6, 1500).astype(float),
                          "timestamp": rng.permutation(1500) * 7 + 10**9})
    path = tmp_path_factory.mktemp("timed") / "ratings.csv"
    frame.to_csv(path, index=False)
    return path


def test_temporal_split_puts_the_latest_ratings_in_val_then_test(tmp_path: Path, timed: Path,
                                                                   shard_reader) -> None:
    manifest = run([timed], tmp_path / "out", split="temporal", val_fraction=0.1,
                   test_fraction=0.2, num_shards=3)
    _, ratings = shard_reader(tmp_path / "out")
    stamps = {s: ratings.loc[ratings["split"] == s, "timestamp"] for s in ("train", "val", "test")}
    assert stamps["train"].max() < stamps["val"].min()
    assert stamps["val"].max() < stamps["test"].min()
    counts = manifest["counts"]["ratings"]
    assert counts["val"] == pytest.approx(150, abs=15)
    assert counts["test"] == pytest.approx(300, abs=15)
    assert manifest["split"]["method"] == "temporal"
    assert manifest["split"]["cutoffs"]["val_from"] <= stamps["val"].min()
    for split in ("val", "test"):
        info = manifest["split"][split]
        assert info["users"] == ratings.loc[ratings["split"] == split, "user"].nunique()
        train_users = set(ratings.loc[ratings["split"] == "train", "user"])
        unseen = set(ratings.loc[ratings["split"] == split, "user"]) - train_users
        assert info["users_unseen_in_train"] == len(unseen)


def test_temporal_and_leave_last_need_a_timestamp(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("user,item,rating\n1,1,3\n2,2,4\n")
    for method in ("temporal", "leave-last"):
        with pytest.raises(InputError, match=f"split='{method}' needs a timestamp column"):
            run([tmp_path / "r.csv"], tmp_path / "out", split=method)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("partition_by", ["random", "user"])
def test_leave_last_takes_each_users_latest(tmp_path: Path, timed: Path, shard_reader,
                                            partition_by: str) -> None:
    manifest = run([timed], tmp_path / "out", split="leave-last", leave_last=2,
                   num_shards=3, partition_by=partition_by)
    _, ratings = shard_reader(tmp_path / "out")
    assert len(ratings) == 1500
    for _, group in ratings.groupby("user"):
        group = group.sort_values("timestamp", ascending=False)
        expected = ["test", "test", "val", "val"] + ["train"] * (len(group) - 4)
        if len(group) <= 4:  # the earliest rating always stays in train
            expected = expected[:len(group) - 1] + ["train"]
        assert list(group["split"]) == expected
    assert manifest["split"]["method"] == "leave-last"
    assert manifest["split"]["leave_last"] == 2
    assert manifest["split"]["test"]["users_unseen_in_train"] == 0


@pytest.mark.parametrize("split", ["random", "temporal", "leave-last"])
@pytest.mark.parametrize("seed", [0, 7])
def test_splits_do_not_change_with_the_partition_scheme(tmp_path: Path, timed: Path,
                                                        shard_reader, split: str,
                                                        seed: int) -> None:
    got = {}
    for scheme in ("random", "user"):
        run([timed], tmp_path / scheme, split=split, seed=seed, num_shards=4,
            partition_by=scheme)
        _, ratings = shard_reader(tmp_path / scheme)
        got[scheme] = dict(zip(zip(ratings["user"], ratings["item"]), ratings["split"]))
    assert len(got["random"]) == 1500
    assert got["random"] == got["user"]


def test_partition_by_user_keeps_each_users_ratings_in_one_shard(tmp_path: Path, timed: Path,
                                                                 shard_reader) -> None:
    out = tmp_path / "out"
    manifest = run([timed], out, partition_by="user", num_shards=4)
    _, ratings = shard_reader(out)
    train = ratings[ratings["split"] == "train"]
    assert (train.groupby("user")["shard"].nunique() == 1).all()
    assert manifest["partition"]["scheme"] == "user"
    users = pd.read_parquet(out / "users.parquet")
    owner = dict(zip(users["original_user_id"], users["shard"]))
    assert all(owner[u] == s for u, s in zip(train["user"], train["shard"]))
    for shard, entry in enumerate(manifest["files"]["train"]):
        mine = train[train["shard"] == shard]
        assert entry["users"] == mine["user"].nunique()
        assert entry["user_id_min"] == mine["user_id"].min()
        assert entry["user_id_max"] == mine["user_id"].max()


def test_pre_split_inputs_are_used_as_given(tmp_path: Path, shard_reader,
                                            make_ratings) -> None:
    """u1.base / u1.test as in MovieLens-100K: train and test as given, val from the base."""
    frame = make_ratings(num_users=50, num_items=40, num_ratings=600, seed=4,
                         half_stars=False)
    frame.loc[590:, "item"] = 41  # item 41 only in the test file: unseen in train
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    for name, part in (("u1.base", frame.iloc[:500]), ("u1.test", frame.iloc[500:])):
        (raw / name).write_text("".join(f"{u}\t{i}\t{r:g}\t{t}\n"
                                        for u, i, r, t in part.itertuples(index=False)))
    out = tmp_path / "out"
    manifest = prepare([str(raw / "u1.base")], out, PrepareConfig(val_fraction=0.1,
                                                                 num_shards=2),
                       test_inputs=[str(raw / "u1.test")])
    _, ratings = shard_reader(out)
    test = ratings[ratings["split"] == "test"]
    assert sorted(zip(test["user"], test["item"])) == sorted(
        zip(frame["user"][500:], frame["item"][500:]))
    assert manifest["counts"]["ratings"]["test"] == 100
    assert manifest["counts"]["ratings"]["val"] + manifest["counts"]["ratings"]["train"] == 500
    assert 20 <= manifest["counts"]["ratings"]["val"] <= 80
    assert manifest["split"]["method"] == "given"
    assert manifest["split"]["test"]["items_unseen_in_train"] == 1
    assert manifest["counts"]["items"] == frame["item"].nunique()
    assert [s["split"] for s in manifest["sources"]] == ["train", "test"]
    with pytest.raises(InputError, match="exclude each other"):
        prepare([str(raw / "u1.base")], out, PrepareConfig(split="temporal", overwrite=True),
                test_inputs=[str(raw / "u1.test")])
