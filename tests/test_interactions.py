"""Interactions without ratings (plays, clicks, purchases): (user, item) files and files with
a weight column become shards of the same schema, their weight in ``rating``, the manifest
saying which kind they hold. Inputs are small files written under ``tmp_path``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_shards import InputError, PrepareConfig, SourceOptions, prepare
from data_shards.export import export_split
from data_shards.verify import verify_shards
from launch.cli import main
from launch.estimator import MatrixFactorization
from shardmf.manifest import MANIFEST_NAME, Footer, Manifest

ALL_TRAIN = {"val_fraction": 0.0, "test_fraction": 0.0, "num_shards": 2}


def run_prepare(inputs: list, out: Path, options: SourceOptions | None = None,
                **config) -> dict:
    return prepare([str(i) for i in inputs], out, PrepareConfig(**config), options)


def weights(shard_reader, out: Path) -> dict[tuple, float]:
    """(original user, original item) -> weight, over every split."""
    _, rows = shard_reader(out)
    assert not rows.duplicated(["user", "item"]).any()
    return {(u, i): float(w) for u, i, w in zip(rows["user"], rows["item"], rows["rating"])}


def write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


# ------------------------------------------------------------------ reading each layout


@pytest.mark.parametrize("header", ["user,item", "userId,movieId", "customer,product", None],
                         ids=["aliases", "movielens names", "unknown names", "no header"])
def test_two_column_csv(tmp_path: Path, shard_reader, header: str | None) -> None:
    lines = ["1,10", "2,10", "2,20", "3,30"]
    path = write(tmp_path / "clicks.csv", ([header] if header else []) + lines)
    manifest = run_prepare([path], tmp_path / "out", **ALL_TRAIN)
    assert manifest["kind"] == "interactions" and manifest["weight_column"] is None
    assert manifest["duplicates"] == "sum"
    assert weights(shard_reader, tmp_path / "out") == {(1, 10): 1.0, (2, 10): 1.0,
                                                       (2, 20): 1.0, (3, 30): 1.0}
    assert manifest["rating"]["scale"] == [0.0, 1.0]


@pytest.mark.parametrize(("name", "lines"), [
    ("plays.tsv", ["1\t10", "2\t20"]),
    ("plays.txt", ["1 10", "2 20"]),
    ("plays.csv", ["1;10", "2;20"]),
    ("plays.dat", ["1::10", "2::20"]),
], ids=["tsv", "spaces", "semicolons", "double colons"])
def test_two_fields_with_any_delimiter(tmp_path: Path, shard_reader, name: str,
                                       lines: list[str]) -> None:
    manifest = run_prepare([write(tmp_path / name, lines)], tmp_path / "out", **ALL_TRAIN)
    assert manifest["kind"] == "interactions"
    assert weights(shard_reader, tmp_path / "out") == {(1, 10): 1.0, (2, 20): 1.0}


def test_crlf_string_ids_and_repeated_pairs_summed(tmp_path: Path, shard_reader) -> None:
    lines = ["alice,song 1", "bob,song-2", "alice,song 1", "alice,song 1", "carol,0042"]
    path = write(tmp_path / "listens.csv", lines, newline="\r\n")
    manifest = run_prepare([path], tmp_path / "out", **ALL_TRAIN)
    assert weights(shard_reader, tmp_path / "out") == {
        ("alice", "song 1"): 3.0, ("bob", "song-2"): 1.0, ("carol", "0042"): 1.0}
    assert manifest["id_types"] == {"user": "string", "item": "string"}
    assert manifest["counts"]["duplicate_pairs"] == 1
    assert manifest["counts"]["ratings"]["train"] == 3
    assert manifest["rating"]["scale"] == [0.0, 3.0]


@pytest.mark.parametrize("weight", ["plays", "play_count", "Clicks", "quantity", "times"])
def test_weight_column_by_alias(tmp_path: Path, shard_reader, weight: str) -> None:
    path = write(tmp_path / "w.csv", [f"user_id,track_id,{weight},timestamp",
                                      "u1,t1,3,100", "u1,t2,0,200", "u2,t1,2.5,300",
                                      "u1,t1,4,400"])
    manifest = run_prepare([path], tmp_path / "out", **ALL_TRAIN)
    assert manifest["kind"] == "interactions" and manifest["weight_column"] == weight
    assert manifest["columns"] == {"user": "user_id", "item": "track_id", "rating": weight,
                                   "timestamp": "timestamp"}
    assert weights(shard_reader, tmp_path / "out") == {("u1", "t1"): 7.0, ("u1", "t2"): 0.0,
                                                       ("u2", "t1"): 2.5}
    _, rows = shard_reader(tmp_path / "out")
    assert dict(zip(zip(rows["user"], rows["item"]), rows["timestamp"]))[("u1", "t1")] == 400


def test_weight_column_named_by_rating_col(tmp_path: Path, shard_reader) -> None:
    path = write(tmp_path / "w.csv", ["visitor,page,dwell_ms,referrer",
                                      "1,7,1500,x", "2,7,30,y"])
    manifest = run_prepare([path], tmp_path / "out",
                           SourceOptions(kind="interactions", rating_col="dwell_ms"),
                           **ALL_TRAIN)
    assert manifest["kind"] == "interactions" and manifest["weight_column"] == "dwell_ms"
    assert weights(shard_reader, tmp_path / "out") == {(1, 7): 1500.0, (2, 7): 30.0}
    # kind auto decides by the named column's name: plays is a weight, stars a rating
    plays = write(tmp_path / "p.csv", ["a,b,plays,stars", "1,7,5,4", "2,7,1,2"])
    assert run_prepare([plays], tmp_path / "p", SourceOptions(rating_col="plays"),
                       **ALL_TRAIN)["kind"] == "interactions"
    assert run_prepare([plays], tmp_path / "s", SourceOptions(rating_col="stars"),
                       **ALL_TRAIN)["kind"] == "ratings"


def test_a_header_naming_only_ids_and_a_time_is_interactions(tmp_path: Path) -> None:
    lines = ["user,item,timestamp"] + [f"{u},{i},{100 * u + i}" for u in range(1, 9)
                                        for i in range(1, 6)]
    manifest = run_prepare([write(tmp_path / "t.csv", lines)], tmp_path / "out",
                           split="leave-last", num_shards=2)
    assert manifest["kind"] == "interactions"
    assert manifest["columns"] == {"user": "user", "item": "item", "timestamp": "timestamp"}
    assert manifest["counts"]["ratings"]["test"] == 8  # each user's latest


@pytest.mark.parametrize("layout", ["csv", "parquet"])
def test_an_event_log_with_a_text_third_column_is_interactions(tmp_path: Path, shard_reader,
                                                               layout: str) -> None:
    frame = pd.DataFrame({"visitor": [1, 1, 2], "page": [7, 8, 7],
                          "event": ["view", "click", "view"], "timestamp": [10, 20, 30]})
    path = tmp_path / f"events.{layout}"
    if layout == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    manifest = run_prepare([path], tmp_path / "out", **ALL_TRAIN)
    assert manifest["kind"] == "interactions" and manifest["weight_column"] is None
    assert manifest["columns"] == {"user": "visitor", "item": "page",
                                   "timestamp": "timestamp"}
    assert weights(shard_reader, tmp_path / "out") == {(1, 7): 1.0, (1, 8): 1.0,
                                                       (2, 7): 1.0}


@pytest.mark.parametrize("weighted", [False, True])
def test_parquet(tmp_path: Path, shard_reader, weighted: bool) -> None:
    frame = pd.DataFrame({"user_id": ["a", "b", "a"], "item_id": [1, 2, 1]})
    if weighted:
        frame["views"] = np.array([2, 5, 1], dtype=np.int32)
    frame.to_parquet(tmp_path / "events.parquet")
    manifest = run_prepare([tmp_path / "events.parquet"], tmp_path / "out", **ALL_TRAIN)
    assert manifest["kind"] == "interactions"
    assert manifest["weight_column"] == ("views" if weighted else None)
    expected = {("a", 1): 3.0, ("b", 2): 5.0} if weighted else {("a", 1): 2.0, ("b", 2): 1.0}
    assert weights(shard_reader, tmp_path / "out") == expected


def test_rating_file_forced_to_interactions(tmp_path: Path, shard_reader) -> None:
    lines = ["1\t10\t5\t881250949", "1\t20\t1\t881250950", "2\t10\t3\t881250951"]
    path = write(tmp_path / "u.data", lines)
    manifest = run_prepare([path], tmp_path / "out", SourceOptions(kind="interactions"),
                           **ALL_TRAIN)
    assert manifest["kind"] == "interactions" and manifest["weight_column"] is None
    assert "rating" not in manifest["columns"] and "timestamp" in manifest["columns"]
    assert set(weights(shard_reader, tmp_path / "out").values()) == {1.0}  # ratings dropped
    # ... or weighted by its ratings, named as the weight
    manifest = run_prepare([path], tmp_path / "w",
                           SourceOptions(kind="interactions", rating_col="2"), **ALL_TRAIN)
    assert weights(shard_reader, tmp_path / "w") == {(1, 10): 5.0, (1, 20): 1.0, (2, 10): 3.0}
    assert manifest["rating"]["scale"] == [0.0, 5.0]  # no MovieLens 1..5 scale for weights


def test_movielens_source_as_interactions_from_the_cli(tmp_path: Path, caplog) -> None:
    release = tmp_path / "ml-100k"
    release.mkdir()
    write(release / "u.data", [f"{u}\t{i}\t{(u + i) % 5 + 1}\t{10**9 + i}"
                               for u in range(1, 21) for i in range(1, 11)])
    out = tmp_path / "shards"
    with caplog.at_level(logging.INFO):
        assert main(["prepare", "--movielens-path", str(release), "--kind", "interactions",
                     "--out", str(out)]) == 0
    assert re.search(r"20 users, 10 items, interactions train \d+", caplog.text)
    assert Manifest.load(out).kind == "interactions"


# ------------------------------------------------------------------ duplicates and kinds


def test_duplicates_policy_by_kind_and_recorded(tmp_path: Path, shard_reader) -> None:
    path = write(tmp_path / "c.csv", ["user,item,clicks", "1,1,2", "1,1,5", "2,1,1"])
    last = run_prepare([path], tmp_path / "last", duplicates="last", **ALL_TRAIN)
    assert weights(shard_reader, tmp_path / "last")[(1, 1)] == 5.0
    assert last["duplicates"] == last["config"]["duplicates"] == "last"
    with pytest.raises(InputError, match=r"1 \(user, item\) pairs occur more than once.*"
                                         r"duplicates='sum' \(the default for interactions\)"):
        run_prepare([path], tmp_path / "error", duplicates="error", **ALL_TRAIN)
    ratings = write(tmp_path / "r.csv", ["user,item,rating", "1,1,2", "1,1,5"])
    with pytest.raises(InputError, match="duplicates='sum' adds up the weights of "
                                         "interactions, not ratings"):
        run_prepare([ratings], tmp_path / "sum", duplicates="sum", **ALL_TRAIN)
    with pytest.raises(InputError, match=r"pairs are rated more than once"):  # still the default
        run_prepare([ratings], tmp_path / "default", **ALL_TRAIN)
    with pytest.raises(InputError, match=r"duplicates='first': expected one of error, last, "
                                         r"mean, sum"):
        PrepareConfig(duplicates="first")


@pytest.mark.parametrize(("options", "config", "message"), [
    ({"kind": "ratings"}, {}, r"cannot find the rating column among user, item; pass "
                              r"`rating_col`, or kind='interactions'"),
    ({}, {"rating_range": (1.0, 5.0)}, r"rating_range=\(1\.0, 5\.0\): .* holds interactions"),
    ({"kind": "clicks"}, {}, r"kind='clicks': expected one of auto, ratings, interactions"),
])
def test_kind_errors(tmp_path: Path, options: dict, config: dict, message: str) -> None:
    path = write(tmp_path / "c.csv", ["user,item", "1,1", "2,1"])
    with pytest.raises(InputError, match=message):
        run_prepare([path], tmp_path / "out", SourceOptions(**options), **config)
    assert not (tmp_path / "out").exists()


def test_pre_split_inputs_must_hold_the_same_kind(tmp_path: Path) -> None:
    train = write(tmp_path / "train.csv", ["user,item", "1,1", "2,1"])
    test = write(tmp_path / "test.csv", ["user,item,rating", "1,2,4"])
    with pytest.raises(InputError, match=r"test\.csv \(test\) holds ratings but .*train\.csv "
                                         r"holds unweighted interactions; pass `kind`"):
        prepare([str(train)], tmp_path / "out", PrepareConfig(), test_inputs=[str(test)])


# ------------------------------------------------------------------ bad weights


BAD_WEIGHTS = {"negative": ("u3,i1,-2", r"line 4: weight -2 is negative \(expected a count "
                                        r"or weight >= 0"),
               "NaN": ("u3,i1,NaN", r"line 4: weight 'NaN' is not a finite number"),
               "infinite": ("u3,i1,inf", r"line 4: weight 'inf' is not a finite number"),
               "text": ("u3,i1,many", r"line 4: weight 'many' is not a number"),
               "empty": ("u3,i1,", r"line 4: weight '' is not a number")}
GOOD_PLAYS = ["user,item,plays", "u1,i1,3", "u2,i1,1"]


@pytest.mark.parametrize("case", list(BAD_WEIGHTS))
def test_bad_weight_names_file_and_line(tmp_path: Path, case: str) -> None:
    line, message = BAD_WEIGHTS[case]
    path = write(tmp_path / "plays.csv", [*GOOD_PLAYS, line, "u4,i2,1"])
    with pytest.raises(InputError, match=re.escape(str(path)) + ", " + message):
        run_prepare([path], tmp_path / "out", **ALL_TRAIN)
    assert not (tmp_path / "out").exists()


def test_skip_drops_bad_weights_and_names_them(tmp_path: Path, shard_reader) -> None:
    lines = [*GOOD_PLAYS, *(line for line, _ in BAD_WEIGHTS.values()), "u4,i2,1"]
    path = write(tmp_path / "plays.csv", lines)
    manifest = run_prepare([path], tmp_path / "out", on_bad_rows="skip", **ALL_TRAIN)
    assert weights(shard_reader, tmp_path / "out") == {("u1", "i1"): 3.0, ("u2", "i1"): 1.0,
                                                       ("u4", "i2"): 1.0}
    assert manifest["bad_rows"] == {"ragged_line": 0, "non_numeric_weight": 4,
                                    "negative_weight": 1, "missing_id": 0, "bad_timestamp": 0}
    rejects = pd.read_csv(tmp_path / "out" / "rejects.csv", keep_default_na=False)
    assert dict(zip(rejects["line"], rejects["reason"])) == {
        4: "negative_weight", 5: "non_numeric_weight", 6: "non_numeric_weight",
        7: "non_numeric_weight", 8: "non_numeric_weight"}


def test_bad_weights_in_parquet(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user": [1, 2, 3], "item": [1, 1, 1], "count": [1.0, -1.0, np.nan]})
    frame.to_parquet(tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"2 rows with a missing, non-finite or negative "
                                         r"weight.*expected finite weights >= 0"):
        run_prepare([tmp_path / "c.parquet"], tmp_path / "out", **ALL_TRAIN)
    manifest = run_prepare([tmp_path / "c.parquet"], tmp_path / "skip", on_bad_rows="skip",
                           **ALL_TRAIN)
    assert manifest["counts"]["ratings"]["train"] == 1
    assert manifest["bad_rows"]["negative_weight"] == 1
    assert manifest["bad_rows"]["non_numeric_weight"] == 1


def test_cli_bad_weight_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "plays.csv", [*GOOD_PLAYS, "u3,i1,-2"])
    out = tmp_path / "shards"
    assert main(["prepare", str(path), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
             if line.strip()]
    assert not any("Traceback" in line for line in lines)
    assert lines[-1] == (f"shardmf: error: {path}, line 4: weight -2 is negative (expected a "
                         "count or weight >= 0, e.g. plays or clicks)")
    assert not out.exists()


def test_cli_prepares_a_user_item_file(tmp_path: Path, capsys, caplog) -> None:
    path = write(tmp_path / "clicks.csv", ["user,item"] + [f"{u},{i}" for u in range(30)
                                                           for i in range(u % 5, 10)])
    out = tmp_path / "shards"
    with caplog.at_level(logging.INFO):
        assert main(["prepare", str(path), "--out", str(out)]) == 0
    assert re.search(r"prepared .*: 30 users, 10 items, interactions train \d+ / val \d+ / "
                     r"test \d+", caplog.text), caplog.text
    assert main(["verify", str(out), "--full"]) == 0
    assert "; interactions train " in capsys.readouterr().out


# ------------------------------------------------------------------ manifest, verify, export


def test_manifest_kind_and_older_manifests(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", ["user,item,count", "1,1,2", "2,1,1"])
    run_prepare([path], tmp_path / "weighted", **ALL_TRAIN)
    manifest = Manifest.load(tmp_path / "weighted")
    assert (manifest.kind, manifest.weight_column) == ("interactions", "count")
    assert manifest.data["format_version"] == 2  # a shardmf before interactions refuses it
    ratings = write(tmp_path / "r.csv", ["user,item,rating", "1,1,2", "2,1,1"])
    run_prepare([ratings], tmp_path / "ratings", **ALL_TRAIN)
    data = json.loads((tmp_path / "ratings" / MANIFEST_NAME).read_text())
    assert data["format_version"] == 1 and data["kind"] == "ratings"
    del data["kind"]  # as written before interactions existed
    (tmp_path / "ratings" / MANIFEST_NAME).write_text(json.dumps(data))
    manifest = Manifest.load(tmp_path / "ratings")
    assert (manifest.kind, manifest.weight_column) == ("ratings", None)


def test_verify_and_export_split_round_trip(tmp_path: Path, shard_reader) -> None:
    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 40, 600), rng.integers(0, 25, 600)
    plays = rng.integers(0, 9, 600)
    lines = ["user,item,plays,timestamp"] + [f"u{u},i{i},{p},{10**9 + k}" for k, (u, i, p)
                                             in enumerate(zip(users, items, plays))]
    out = tmp_path / "shards"
    manifest = run_prepare([write(tmp_path / "plays.csv", lines)], out, num_shards=3)
    assert verify_shards(out, full=True).kind == "interactions"
    written = export_split(out, tmp_path / "export")
    assert written == manifest["counts"]["ratings"]
    test = pd.read_csv(tmp_path / "export" / "test.tsv", sep="\t")
    assert list(test.columns) == ["user", "item", "weight", "timestamp"]
    again = run_prepare([tmp_path / "export" / "train.tsv"], tmp_path / "again", **ALL_TRAIN)
    assert (again["kind"], again["weight_column"]) == ("interactions", "weight")
    _, original = shard_reader(out)
    train = original[original["split"] == "train"]
    assert weights(shard_reader, tmp_path / "again") == {
        (u, i): float(w) for u, i, w in zip(train["user"], train["item"], train["rating"])}


def test_verify_full_names_a_negative_weight(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write(tmp_path / "c.csv", ["user,item,count", "1,1,2", "2,1,1"])
    out = tmp_path / "shards"
    run_prepare([path], out, num_shards=1, val_fraction=0.0, test_fraction=0.0)
    data = json.loads((out / MANIFEST_NAME).read_text())
    entry = data["files"]["train"][0]
    table = pq.read_table(out / entry["path"])
    bad = table.set_column(2, "rating", pa.array([-1.0, 2.0], pa.float32()))
    pq.write_table(bad, out / entry["path"])
    entry["bytes"] = (out / entry["path"]).stat().st_size
    entry["sha256"] = hashlib.sha256((out / entry["path"]).read_bytes()).hexdigest()
    entry["footer"] = dataclasses.asdict(Footer.of((out / entry["path"]).read_bytes()))
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"weight -1 outside the manifest's 0\.\.2"):
        verify_shards(out, full=True)


# ------------------------------------------------------------------ the estimator's frames


def test_estimator_frame_without_ratings_is_interactions(tmp_path: Path) -> None:
    frame = pd.DataFrame({"user": [1, 1, 2, 3], "item": [5, 5, 6, 5],
                          "plays": [1, 2, 3, 4]})
    model = MatrixFactorization(val_fraction=0.0, test_fraction=0.0, num_shards=1)
    values = model._config_values()
    unweighted = Manifest.load(model._shards(model._frame(frame, None, fitting=True),
                                             tmp_path / "a", values))
    assert (unweighted.kind, unweighted.weight_column) == ("interactions", None)
    assert unweighted.train_mean == pytest.approx(4 / 3)  # (1, 5) twice: weight 2
    model.set_params(rating_col="plays")
    weighted = Manifest.load(model._shards(model._frame(frame, None, fitting=True),
                                           tmp_path / "b", model._config_values()))
    assert (weighted.kind, weighted.weight_column) == ("interactions", "plays")
    assert weighted.train_mean == pytest.approx(10 / 3)


# ------------------------------------------------------------------ nothing lost


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 5)),
                     min_size=1, max_size=80),
       weighted=st.booleans(), shards=st.integers(1, 5), files=st.integers(1, 3),
       partition_by=st.sampled_from(["random", "user"]), seed=st.integers(0, 2**32))
def test_property_interactions_lose_and_duplicate_nothing(
        tmp_path_factory, shard_reader, rows: list, weighted: bool, shards: int, files: int,
        partition_by: str, seed: int) -> None:
    """Whatever the files, shards and split: every pair once, its weight the sum of its
    rows' (the count of its rows without a weight column), and each pair's split fixed."""
    tmp = tmp_path_factory.mktemp("interactions")
    header = ["user,item,plays"] if weighted else []  # three numbers and no header: ratings
    lines = [f"u{u},{i},{w}" if weighted else f"u{u},{i}" for u, i, w in rows]
    write(tmp / "all.csv", header + lines)
    files = min(files, len(lines))
    for part in range(files):  # the same rows spread over files, in another order
        write(tmp / f"part{part}.csv", header + lines[part::files][::-1])
    config = dict(seed=seed, val_fraction=0.3, test_fraction=0.3, partition_by=partition_by)
    try:
        run_prepare([tmp / "all.csv"], tmp / "a", num_shards=shards, **config)
    except InputError as e:  # the hash may leave train empty for a tiny input
        assert "no interaction fell into the training split" in str(e)
        return
    run_prepare([tmp / "part*.csv"], tmp / "b", num_shards=shards % 5 + 1, **config)
    expected: dict[tuple, float] = {}
    for u, i, w in rows:
        expected[(f"u{u}", i)] = expected.get((f"u{u}", i), 0.0) + (w if weighted else 1.0)
    for out in (tmp / "a", tmp / "b"):
        assert weights(shard_reader, out) == expected
        assert Manifest.load(out).kind == "interactions"
    _, a = shard_reader(tmp / "a")
    _, b = shard_reader(tmp / "b")
    assert (dict(zip(zip(a["user"], a["item"]), a["split"]))
            == dict(zip(zip(b["user"], b["item"]), b["split"])))
