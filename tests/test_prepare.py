"""Tests of ``data_shards.prepare``: id vocabularies, duplicates, the hash split, shard files,
the manifest and atomic output. Inputs are small files written under ``tmp_path``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_shards import InputError, PrepareConfig, SourceOptions, prepare


def run_prepare(inputs: list, out: Path, options: SourceOptions | None = None,
                **config) -> dict:
    return prepare([str(i) for i in inputs], out, PrepareConfig(**config), options)


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.glob("*/part-*.parquet"))}


def split_of(ratings: pd.DataFrame) -> dict[tuple, str]:
    return dict(zip(zip(ratings["user"], ratings["item"]), ratings["split"]))


# ------------------------------------------------------------------- duplicates


@pytest.mark.parametrize(("policy", "with_time", "expected"), [
    # (1, 10): ratings 4 @ t=30, 2 @ t=10, 5 @ t=20; (2, 10): 1 @ t=5, 3 @ t=5 (a tie)
    ("last", True, {(1, 10): 4.0, (2, 10): 3.0, (3, 11): 2.5}),
    ("last", False, {(1, 10): 5.0, (2, 10): 3.0, (3, 11): 2.5}),  # input order
    ("mean", True, {(1, 10): 11 / 3, (2, 10): 2.0, (3, 11): 2.5}),
    ("mean", False, {(1, 10): 11 / 3, (2, 10): 2.0, (3, 11): 2.5}),
])
def test_duplicate_policies(tmp_path: Path, shard_reader, policy: str, with_time: bool,
                            expected: dict) -> None:
    rows = [(1, 10, 4.0, 30), (2, 10, 1.0, 5), (1, 10, 2.0, 10), (3, 11, 2.5, 7),
            (2, 10, 3.0, 5), (1, 10, 5.0, 20)]
    header = "user,item,rating,timestamp" if with_time else "user,item,rating"
    # Two files: "input order" runs across files, in the order the files are named.
    for name, part in (("a.csv", rows[:3]), ("b.csv", rows[3:])):
        lines = [",".join(f"{v:g}" for v in (r if with_time else r[:3])) for r in part]
        (tmp_path / name).write_text("\n".join([header, *lines]) + "\n")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "*.csv"], out, duplicates=policy, num_shards=3,
                           val_fraction=0.0, test_fraction=0.0)
    _, ratings = shard_reader(out)
    got = {(u, i): r for u, i, r in zip(ratings["user"], ratings["item"], ratings["rating"])}
    assert len(ratings) == 3
    assert got == pytest.approx(expected, rel=1e-6)  # shards hold float32
    if with_time and policy == "last":
        stamps = dict(zip(zip(ratings["user"], ratings["item"]), ratings["timestamp"]))
        assert stamps == {(1, 10): 30, (2, 10): 5, (3, 11): 7}
    assert manifest["counts"]["duplicate_pairs"] == 2
    assert sum(e["duplicates"]["rows"] for e in manifest["files"]["train"]) == 5
    assert manifest["duplicates"] == policy
    assert manifest["counts"]["ratings"] == {"train": 3, "val": 0, "test": 0}
    assert manifest["rating"]["train_mean"] == pytest.approx(sum(expected.values()) / 3)


def test_duplicates_error_names_count_and_examples(tmp_path: Path, make_ratings,
                                                   ratings_writer) -> None:
    frame = make_ratings(num_ratings=300, seed=1)
    frame = pd.concat([frame, frame.iloc[[5, 9, 9]]], ignore_index=True)
    path = ratings_writer(frame, tmp_path / "raw", "csv")
    with pytest.raises(InputError) as info:
        run_prepare([path], tmp_path / "out", num_shards=2)
    message = str(info.value)
    assert message.startswith(f"{path}: 2 (user, item) pairs are rated more than once, e.g. ")
    for row in (5, 9):
        assert f"(user {frame.user[row]}, item {frame.item[row]})" in message
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


# ------------------------------------------------------------------- id vocabularies


def test_integer_ids_sorted_numerically_and_contiguous(tmp_path: Path, shard_reader) -> None:
    (tmp_path / "r.csv").write_text("user,item,rating\n100,7,1\n9,100,2\n100,10,3\n"
                                    "20,7,4\n9,7,5\n")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "r.csv"], out, num_shards=2)
    users = pd.read_parquet(out / "users.parquet")
    items = pd.read_parquet(out / "items.parquet")
    assert users["user_id"].tolist() == [0, 1, 2]
    assert users["original_user_id"].tolist() == [9, 20, 100]
    assert users["original_user_id"].dtype == np.int64
    assert items["original_item_id"].tolist() == [7, 10, 100]
    assert manifest["id_types"] == {"user": "int64", "item": "int64"}
    assert manifest["counts"]["users"] == 3 and manifest["counts"]["items"] == 3
    _, ratings = shard_reader(out)
    by_pair = dict(zip(zip(ratings["user"], ratings["item"]), ratings["rating"]))
    assert by_pair == {(100, 7): 1, (9, 100): 2, (100, 10): 3, (20, 7): 4, (9, 7): 5}
    train = ratings[ratings["split"] == "train"]
    assert users.set_index("original_user_id")["train_ratings"].to_dict() == {
        u: int((train["user"] == u).sum()) for u in (9, 20, 100)}
    assert items.set_index("original_item_id")["train_ratings"].to_dict() == {
        i: int((train["item"] == i).sum()) for i in (7, 10, 100)}


@pytest.mark.parametrize(("ids", "kind"), [
    (["7", "007", "70"], "string"),  # "007" is not 7: every id stays text, none merged
    (["0", "-0", "5"], "string"),  # nor is "-0" the integer 0
    (["-3", "0", "12"], "int64"),
    (["u_17", "U_17", "u_2"], "string"),
    (["034545104X", "0345451040", "1"], "string"),
    (["9223372036854775807", "1"], "string"),  # beyond 18 digits: kept as text
])
def test_id_vocabulary_never_merges_distinct_strings(tmp_path: Path, shard_reader,
                                                     ids: list[str], kind: str) -> None:
    lines = [f"{uid},{n},{n % 5 + 1}" for n, uid in enumerate(ids)]
    (tmp_path / "r.csv").write_text("\n".join(["user,item,rating", *lines]) + "\n")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "r.csv"], out, num_shards=1, val_fraction=0.0,
                           test_fraction=0.0)
    assert manifest["id_types"]["user"] == kind
    users = pd.read_parquet(out / "users.parquet")
    expected = sorted(ids) if kind == "string" else sorted(int(i) for i in ids)
    assert users["original_user_id"].tolist() == expected
    assert users["user_id"].tolist() == list(range(len(ids)))
    _, ratings = shard_reader(out)
    assert sorted(zip(ratings["user"].astype(str), ratings["item"])) == sorted(
        (uid, n) for n, uid in enumerate(ids))


# ------------------------------------------------------------------- split and shards


@pytest.fixture(scope="module")
def twenty_k(tmp_path_factory: pytest.TempPathFactory, make_ratings, ratings_writer) -> Path:
    """20k unique ratings as one CSV (the module's shared, read-only input)."""
    frame = make_ratings(num_users=400, num_items=300, num_ratings=20_000, seed=11)
    return ratings_writer(frame, tmp_path_factory.mktemp("twenty_k"), "csv")


def test_fractions_close_to_requested(tmp_path: Path, twenty_k: Path) -> None:
    manifest = run_prepare([twenty_k], tmp_path / "out", val_fraction=0.1,
                           test_fraction=0.2, num_shards=3)
    counts = manifest["counts"]["ratings"]
    assert sum(counts.values()) == 20_000
    # Binomial sd at 20k rows is under 0.003; 0.015 is five of them.
    assert counts["val"] / 20_000 == pytest.approx(0.1, abs=0.015)
    assert counts["test"] / 20_000 == pytest.approx(0.2, abs=0.015)
    split = {k: v for k, v in manifest["split"].items() if k not in ("val", "test")}
    assert split == {"method": "random", "seed": 0, "fractions": {
        "train": 0.7, "val": 0.1, "test": 0.2}}
    assert manifest["split"]["val"]["users_unseen_in_train"] == 0


def test_same_seed_gives_identical_shards_and_manifest(tmp_path: Path, twenty_k: Path,
                                                       shard_reader) -> None:
    config = dict(seed=5, num_shards=4, row_group_size=1000)
    first = run_prepare([twenty_k], tmp_path / "a", **config)
    second = run_prepare([twenty_k], tmp_path / "b", **config)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    for name in ("users.parquet", "items.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    first.pop("seconds")
    second.pop("seconds")
    assert first == second

    # Another seed: another split and another order, same ratings.
    run_prepare([twenty_k], tmp_path / "c", **(config | {"seed": 6}))
    _, a = shard_reader(tmp_path / "a")
    _, c = shard_reader(tmp_path / "c")
    assert sorted(zip(a["user"], a["item"])) == sorted(zip(c["user"], c["item"]))
    before = split_of(a)
    changed = np.mean([before[k] != s for k, s in split_of(c).items()])
    assert 0.1 < changed < 0.3  # about 2 * 0.1 * 0.9 of the ratings move


def test_split_does_not_depend_on_files_or_shard_count(tmp_path: Path, twenty_k: Path,
                                                       shard_reader) -> None:
    lines = twenty_k.read_text().splitlines()
    header, body = lines[0], lines[1:]
    for part in range(3):  # the same ratings in three files, rows in another order
        chunk = body[part::3]
        (tmp_path / f"part{part}.csv").write_text("\n".join([header, *chunk]) + "\n")
    run_prepare([twenty_k], tmp_path / "one", num_shards=3)
    run_prepare([tmp_path / "part*.csv"], tmp_path / "three", num_shards=3)
    run_prepare([twenty_k], tmp_path / "seven", num_shards=7)
    # A rating's split, shard and place in the shard come from its (user, item, seed) alone.
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "three")
    _, one = shard_reader(tmp_path / "one")
    _, seven = shard_reader(tmp_path / "seven")
    assert split_of(one) == split_of(seven)
    assert seven["shard"].nunique() == 7


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.dictionaries(st.tuples(st.integers(0, 30), st.integers(0, 30)),
                             st.sampled_from([0.5, 1.0, 2.5, 4.0, 5.0]),
                             min_size=1, max_size=60),
       shards=st.integers(1, 7), files=st.integers(1, 3), seed=st.integers(0, 2**32))
def test_property_no_rating_lost_and_split_fixed(tmp_path_factory, shard_reader, pairs: dict,
                                                 shards: int, files: int, seed: int) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    rows = [f"u{u},{i},{r:g}" for (u, i), r in pairs.items()]
    (tmp / "all.csv").write_text("\n".join(rows) + "\n")
    files = min(files, len(rows))
    for part in range(files):  # the same ratings spread over files, in another order
        (tmp / f"part{part}.csv").write_text("\n".join(rows[part::files][::-1]) + "\n")
    config = dict(seed=seed, val_fraction=0.3, test_fraction=0.3)
    try:
        run_prepare([tmp / "all.csv"], tmp / "a", num_shards=shards, **config)
    except InputError as e:  # the hash may leave train empty for a tiny input
        assert "no rating fell into the training split" in str(e)
        return
    run_prepare([tmp / "part*.csv"], tmp / "b", num_shards=shards % 7 + 1, **config)
    _, a = shard_reader(tmp / "a")
    _, b = shard_reader(tmp / "b")
    expected = sorted((f"u{u}", i, r) for (u, i), r in pairs.items())
    for ratings in (a, b):
        assert sorted(zip(ratings["user"], ratings["item"], ratings["rating"])) == expected
    assert split_of(a) == split_of(b)


def test_manifest_matches_the_files(tmp_path: Path, make_ratings, ratings_writer) -> None:
    frame = make_ratings(num_users=60, num_items=50, num_ratings=1500, seed=2)
    frame = frame[frame["user"] != 60]  # user ids 1..59 rated, the vocabulary is 59 users
    path = ratings_writer(frame, tmp_path / "raw", "ml-dat")
    out = tmp_path / "shards"
    manifest = run_prepare([path], out, num_shards=3, row_group_size=64, val_fraction=0.1,
                           test_fraction=0.1, partition_by="random")
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format_version"] == 1
    assert manifest["partition"] == {"scheme": "random", "num_shards": 3,
                                     "row_group_size": 64}
    assert manifest["bad_rows"] == {} and manifest["rejects_file"] is None
    assert sorted(p.name for p in out.iterdir()) == [
        ".shardmf-output.json", "items.parquet", "manifest.json", "test", "train",
        "users.parquet", "val"]

    total = {"train": 0, "val": 0, "test": 0}
    train_ratings, seen = [], []
    schemas = set()
    for split, entries in manifest["files"].items():
        assert [e["path"] for e in entries] == [f"{split}/part-{k:05d}.parquet"
                                                for k in range(3)]
        assert sorted(p.name for p in (out / split).iterdir()) == [
            f"part-{k:05d}.parquet" for k in range(3)]
        for entry in entries:
            data = (out / entry["path"]).read_bytes()
            assert entry["bytes"] == len(data)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            meta = pq.ParquetFile(out / entry["path"]).metadata
            groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            assert entry["row_groups"] == groups
            assert entry["rows"] == meta.num_rows == sum(groups)
            assert all(g == 64 for g in groups[:-1]) and groups[-1] <= 64
            table = pq.read_table(out / entry["path"])
            schemas.add(str(table.schema.remove_metadata()))
            total[split] += table.num_rows
            if split == "train":
                train_ratings.append(table["rating"].to_numpy())
            seen.append(table.to_pandas())
    # Every shard, empty or not, has the same columns and types.
    assert schemas == {"user_id: int32\nitem_id: int32\nrating: float\ntimestamp: int64"}
    assert manifest["counts"]["ratings"] == total
    assert sum(total.values()) == len(frame)
    train_ratings = np.concatenate(train_ratings).astype(np.float64)
    assert manifest["rating"]["train_mean"] == pytest.approx(train_ratings.mean())
    assert manifest["rating"]["train_std"] == pytest.approx(train_ratings.std())
    assert manifest["rating"]["min"] == frame["rating"].min()
    assert manifest["rating"]["max"] == frame["rating"].max()
    assert manifest["rating"]["scale"] == [0.5, 5.0]

    everything = pd.concat(seen)
    counts = manifest["counts"]
    assert counts["users"] == frame["user"].nunique() == everything["user_id"].max() + 1
    assert counts["items"] == frame["item"].nunique() == everything["item_id"].max() + 1
    users = pd.read_parquet(out / "users.parquet")
    assert counts["users_without_train_ratings"] == int((users["train_ratings"] == 0).sum())
    assert users["train_ratings"].sum() == total["train"]


def test_empty_shards_are_valid_files(tmp_path: Path, shard_reader) -> None:
    (tmp_path / "r.csv").write_text("user,item,rating,timestamp\n1,1,4,100\n2,1,3,200\n")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "r.csv"], out, num_shards=6, val_fraction=0.0,
                           test_fraction=0.0)
    empty = [e for s in manifest["files"].values() for e in s if e["rows"] == 0]
    assert len(empty) >= 16  # all of val and test, and most train shards
    for entry in empty:
        table = pq.read_table(out / entry["path"])
        assert table.column_names == ["user_id", "item_id", "rating", "timestamp"]
    # So a whole split reads back as one table with timestamps.
    train = pd.read_parquet(out / "train")
    assert sorted(train["timestamp"]) == [100, 200]


def test_auto_shard_count_and_default_fractions(tmp_path: Path, make_ratings,
                                                ratings_writer) -> None:
    path = ratings_writer(make_ratings(num_ratings=400, seed=8),
                          tmp_path / "raw" / "r.parquet", "parquet")
    manifest = run_prepare([path], tmp_path / "out")
    assert manifest["partition"]["num_shards"] == 8
    assert all(len(manifest["files"][s]) == 8 for s in ("train", "val", "test"))
    assert manifest["split"]["fractions"] == {"train": 0.9, "val": 0.05, "test": 0.05}


# ------------------------------------------------------------------- atomic output


def test_overwrite_replaces_the_folder_atomically(tmp_path: Path, make_ratings,
                                                  ratings_writer) -> None:
    path = ratings_writer(make_ratings(num_ratings=100, seed=9), tmp_path / "raw", "tsv")
    out = tmp_path / "shards"
    run_prepare([path], out, num_shards=2)
    (out / "train" / "part-00099.parquet").write_text("a stale shard")  # in prepare's own
    manifest = run_prepare([path], out, num_shards=3, overwrite=True)
    assert manifest["partition"]["num_shards"] == 3
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        f"part-{k:05d}.parquet" for k in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "shards"]  # no .tmp-/.old-

    # A failed overwrite leaves the previous shard set as it was.
    before = shard_bytes(out)
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\t3\n1\t3\toops\n")
    with pytest.raises(InputError, match=r"line 2: rating 'oops'"):
        run_prepare([bad], out, overwrite=True)
    assert shard_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "raw", "shards"]


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("user,item,rating\n1,1,3\n")
    (tmp_path / "out").mkdir()
    manifest = run_prepare([tmp_path / "r.csv"], tmp_path / "out", num_shards=1,
                           val_fraction=0.0, test_fraction=0.0)
    assert manifest["counts"]["ratings"]["train"] == 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("val_fraction", 1.0, r"val_fraction=1\.0: expected 0 <= x < 1"),
    ("test_fraction", -0.1, r"test_fraction=-0\.1: expected 0 <= x < 1"),
    ("val_fraction", 0.6, r"val_fraction=0\.6 plus test_fraction=0\.5 leave no"),
    ("num_shards", 0, r"num_shards=0: expected at least 1"),
    ("row_group_size", 0, r"row_group_size=0: expected at least 1"),
    ("rating_range", (5.0, 1.0), r"rating_range=\(5\.0, 1\.0\): expected MIN < MAX"),
    ("duplicates", "first", r"duplicates='first': expected one of error, last, mean"),
])
def test_config_validation(field: str, value, message: str) -> None:
    base = {"test_fraction": 0.5} if field == "val_fraction" and value == 0.6 else {}
    with pytest.raises(InputError, match=message):
        PrepareConfig(**(base | {field: value}))


def test_failed_prepare_leaves_no_folders_it_created(tmp_path: Path) -> None:
    source = tmp_path / "ratings.csv"
    source.write_text("user,item,rating\n1,2,abc\n")
    with pytest.raises(InputError, match="line 2"):
        prepare([str(source)], tmp_path / "a" / "b" / "shards", PrepareConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.csv"]


def test_parquet_without_its_suffix_is_read_as_parquet(tmp_path: Path) -> None:
    source = tmp_path / "ratings.bin"
    pd.DataFrame({"user_id": [1, 2, 3, 1], "item_id": [1, 1, 2, 2],
                  "rating": [4.0, 3.0, 5.0, 1.0]}).to_parquet(source)
    manifest = prepare([str(source)], tmp_path / "out", PrepareConfig(val_fraction=0,
                                                                      test_fraction=0))
    assert manifest["sources"][0]["layout"] == "parquet"
    assert manifest["counts"]["ratings"]["train"] == 4


def test_auto_partition_is_by_user_only_where_ranks_can_own_users(tmp_path: Path) -> None:
    from data_shards.prepare import USER_PARTITION_RATINGS, partition_scheme

    assert partition_scheme("auto", USER_PARTITION_RATINGS - 1) == "random"
    assert partition_scheme("auto", USER_PARTITION_RATINGS) == "user"
    assert partition_scheme("random", 10**9) == "random"
    assert partition_scheme("user", 10) == "user"
    source = tmp_path / "r.tsv"
    source.write_text("".join(f"{u}\t{i}\t{1 + (u + i) % 5}\n"
                              for u in range(1, 41) for i in range(1, 26)))
    manifest = run_prepare([source], tmp_path / "shards")
    assert manifest["partition"]["scheme"] == "random"  # 1,000 ratings: a small set
