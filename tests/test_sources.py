"""Tests of reading ratings: every MovieLens layout, generic CSV/TSV/Parquet, item metadata,
and the errors bad input gets (naming the file and line, with nothing written).

Every fixture is written here, in the published format, under ``tmp_path``; no test reads
the real MovieLens files or the network.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import zstandard

from data_shards import InputError, PrepareConfig, SourceOptions, prepare
from data_shards.metadata import read_item_metadata
from data_shards.sources import read_ratings, resolve_source

# The 19 genre flags of u.item, in file order, as the ML-100K README lists them.
U_ITEM_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)

# Everything in train, one shard: the read-back is the input, whatever the hash says.
ALL_TRAIN = {"val_fraction": 0.0, "test_fraction": 0.0, "num_shards": 1}


def run_prepare(inputs: list, out: Path, options: SourceOptions | None = None,
                **config) -> dict:
    return prepare([str(i) for i in inputs], out, PrepareConfig(**(ALL_TRAIN | config)),
                   options)


def rows_of(frame: pd.DataFrame, columns=("user", "item", "rating")) -> list[tuple]:
    """Sorted plain tuples, so that ids compare as what they are (int or text)."""
    return sorted(tuple(r) for r in frame[list(columns)].itertuples(index=False))


def items_of(out: Path) -> dict:
    items = pd.read_parquet(out / "items.parquet")
    return {row.original_item_id: (row.title, none_if_na(row.genres))
            for row in items.itertuples()}


def none_if_na(value):
    return None if pd.isna(value) else value


def u_item_line(item: int, title: str, genres: tuple[str, ...]) -> str:
    flags = "|".join("1" if g in genres else "0" for g in U_ITEM_GENRES)
    return f"{item}|{title}|01-Jan-1995||http://us.imdb.com/M/title-exact?{item}|{flags}"


# ------------------------------------------------------------------ MovieLens layouts


@pytest.mark.parametrize("as_folder", [True, False])
def test_movielens_100k_u_data_and_u_item(tmp_path: Path, as_folder: bool,
                                          shard_reader) -> None:
    raw = tmp_path / "ml-100k"
    raw.mkdir()
    (raw / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t3\t891717742\n"
                                "22\t242\t1\t878887116\n196\t51\t5\t880606923\n")
    lines = [u_item_line(51, "Legends of the Fall (1994)", ("Drama", "Romance", "War",
                                                            "Western")),
             u_item_line(242, "Kolya (1996)", ("Comedy",)),
             u_item_line(302, "Misérables, Les (1995)", ("Drama", "Musical")),
             u_item_line(267, "unknown", ("unknown",))]
    (raw / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))

    out = tmp_path / "shards"
    manifest = run_prepare([raw if as_folder else raw / "u.data"], out)

    assert manifest["sources"] == [{"path": str(raw / "u.data"), "layout": "movielens-100k"}]
    assert manifest["rating"]["scale"] == [1.0, 5.0]
    assert manifest["item_metadata"] == {"path": str(raw / "u.item"), "titles": True,
                                         "genres": True}
    assert manifest["id_types"] == {"user": "int64", "item": "int64"}
    _, ratings = shard_reader(out)
    assert rows_of(ratings, ("user", "item", "rating", "timestamp")) == [
        (22, 242, 1.0, 878887116), (186, 302, 3.0, 891717742), (196, 51, 5.0, 880606923),
        (196, 242, 3.0, 881250949)]
    # Only rated items are in the vocabulary (267 is not); titles keep their Latin-1 é.
    assert items_of(out) == {
        51: ("Legends of the Fall (1994)", "Drama|Romance|War|Western"),
        242: ("Kolya (1996)", "Comedy"),
        302: ("Misérables, Les (1995)", "Drama|Musical"),
    }


def test_u_item_unknown_genre_only_means_no_genres(tmp_path: Path) -> None:
    path = tmp_path / "u.item"
    path.write_bytes((u_item_line(267, "unknown", ("unknown",)) + "\n").encode("latin-1"))
    meta = read_item_metadata(str(path))
    assert meta["item"].tolist() == ["267"]
    assert meta["title"].tolist() == ["unknown"]
    assert meta["genres"].isna().all()


def test_u_item_with_wrong_field_count_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "u.item"
    path.write_text("1|Toy Story (1995)|01-Jan-1995||http://x|0|1\n")
    with pytest.raises(InputError, match=r"u\.item: 7 fields, expected 24"):
        read_item_metadata(str(path))


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])  # ML-1M is Latin-1, 10M UTF-8
def test_movielens_dat_ratings_and_movies(tmp_path: Path, encoding: str,
                                          shard_reader) -> None:
    raw = tmp_path / "ml-1m"
    raw.mkdir()
    (raw / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n"
                                     "2::1193::4.5::978298413\n10::3::0.5::978300000\n")
    (raw / "movies.dat").write_bytes((
        "3::Grumpier Old Men (1995)::Comedy|Romance\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "1193::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Sci-Fi\n"
        "2000::Misérables, Les (1998)::(no genres listed)\n").encode(encoding))

    out = tmp_path / "shards"
    manifest = run_prepare([raw], out)

    assert manifest["sources"][0]["layout"] == "movielens-dat"
    assert manifest["rating"]["scale"] == [0.5, 5.0]
    _, ratings = shard_reader(out)
    assert rows_of(ratings, ("user", "item", "rating", "timestamp")) == [
        (1, 661, 3.0, 978302109), (1, 1193, 5.0, 978300760), (2, 1193, 4.5, 978298413),
        (10, 3, 0.5, 978300000)]
    assert items_of(out) == {
        3: ("Grumpier Old Men (1995)", "Comedy|Romance"),
        661: ("James and the Giant Peach (1996)", "Animation|Children's|Musical"),
        1193: ("Star Wars: Episode IV - A New Hope (1977)", "Action|Adventure|Sci-Fi"),
    }
    meta = read_item_metadata(str(raw / "movies.dat"))
    unrated = meta.set_index("item").loc["2000"]
    assert unrated["title"] == "Misérables, Les (1998)"
    assert pd.isna(unrated["genres"])  # "(no genres listed)" means none


def test_movielens_csv_ratings_and_movies(tmp_path: Path, shard_reader) -> None:
    raw = tmp_path / "ml-25m"
    raw.mkdir()
    (raw / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\r\n1,296,5.0,1147880044\r\n1,306,3.5,1147868817\r\n"
        "2,296,0.5,1141415820\r\n3,209171,4.0,1147868828\r\n", newline="")
    (raw / "movies.csv").write_text(
        "movieId,title,genres\n"
        '296,Pulp Fiction (1994),Comedy|Crime|Drama|Thriller\n'
        '306,"Three Colors: Red (Trois couleurs: Rouge) (1994)",Drama\n'
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '209171,"Amélie, ""the fabulous"" (2001)",(no genres listed)\n', encoding="utf-8")

    out = tmp_path / "shards"
    manifest = run_prepare([raw / "ratings.csv"], out)

    assert manifest["sources"][0]["layout"] == "movielens-csv"
    assert manifest["columns"] == {"user": "userId", "item": "movieId", "rating": "rating",
                                   "timestamp": "timestamp"}
    assert manifest["rating"]["scale"] == [0.5, 5.0]
    _, ratings = shard_reader(out)
    assert rows_of(ratings, ("user", "item", "rating", "timestamp")) == [
        (1, 296, 5.0, 1147880044), (1, 306, 3.5, 1147868817), (2, 296, 0.5, 1141415820),
        (3, 209171, 4.0, 1147868828)]
    assert items_of(out) == {
        296: ("Pulp Fiction (1994)", "Comedy|Crime|Drama|Thriller"),
        306: ("Three Colors: Red (Trois couleurs: Rouge) (1994)", "Drama"),
        209171: ('Amélie, "the fabulous" (2001)', None),
    }
    meta = read_item_metadata(str(raw / "movies.csv"))
    assert meta.set_index("item").loc["11", "title"] == "American President, The (1995)"


@pytest.mark.parametrize(("name", "content", "layout", "header"), [
    ("data.txt", "1::10::4::978300760\n2::11::3::978300761\n", "movielens-dat", False),
    ("export.csv", "userId,movieId,rating,timestamp\n1,10,4.5,1\n", "movielens-csv", True),
    ("u1.base", "1\t10\t4\t881250949\n", "movielens-100k", False),
    ("ratings.txt", "1\t10\t4\t881250949\n2\t3\t1\t881250950\n", "tsv", False),
    ("ratings.txt", "user;item;stars\n1;10;4\n", "csv", True),
])
def test_layout_detected_from_name_and_content(tmp_path: Path, name: str, content: str,
                                               layout: str, header: bool) -> None:
    path = tmp_path / name
    path.write_text(content)
    source = resolve_source([str(path)], SourceOptions())
    assert (source.layout, source.header) == (layout, header)
    frame = read_ratings(source).compute()
    assert frame["user"].tolist()[0] == "1"
    assert frame["item"].tolist()[0] == "10"
    assert frame["rating"].dtype == np.float64


def test_explicit_format_overrides_detection(tmp_path: Path) -> None:
    path = tmp_path / "ratings.data"
    path.write_text("1\t10\t4\t881250949\n")
    source = resolve_source([str(path)], SourceOptions(format="movielens-100k"))
    assert source.layout == "movielens-100k"
    assert source.rating_scale == (1.0, 5.0)


@pytest.mark.parametrize(("layout", "content", "message"), [
    ("u.data", "1\t10\t4\t1\n1\t11\t0.5\t1\n", r"u\.data, line 2: rating 0\.5 is outside "
                                                r"the rating range 1\.\.5"),
    ("ratings.dat", "1::10::4::1\n1::11::0::1\n", r"ratings\.dat, line 2: rating 0 is "
                                                  r"outside the rating range 0\.5\.\.5"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,4,1\n2,10,5.5,1\n",
     r"ratings\.csv, line 3: rating 5\.5 is outside the rating range 0\.5\.\.5"),
])
def test_movielens_scales_are_enforced(tmp_path: Path, layout: str, content: str,
                                       message: str) -> None:
    (tmp_path / layout).write_text(content)
    with pytest.raises(InputError, match=message):
        run_prepare([tmp_path / layout], tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_declared_rating_range_overrides_the_layout(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t10\t4\t1\n1\t11\t0.5\t1\n")
    manifest = run_prepare([tmp_path / "u.data"], tmp_path / "out", rating_range=(0.5, 5.0))
    assert manifest["rating"]["scale"] == [0.5, 5.0]
    assert manifest["rating"]["min"] == 0.5


# ------------------------------------------------------------------- generic sources

RATINGS = [("u_17", "034545104X", 4.5, 1000), ("u_17", "0060973129", 0.5, 1001),
           ("u_2", "034545104X", 3.0, 1002), ("u_9", "007", 2.0, 1003), ("u_9", "7", 1.0, 1004)]


def write_delimited(path: Path, sep: str, order: tuple[int, ...], header: list[str] | None,
                    line_end: str = "\n") -> Path:
    lines = [sep.join(header)] if header else []
    lines += [sep.join(f"{row[i]:g}" if isinstance(row[i], float) else str(row[i])
                       for i in order) for row in RATINGS]
    path.write_bytes((line_end.join(lines) + line_end).encode())
    return path


@pytest.mark.parametrize(("sep", "order", "header", "options", "line_end"), [
    # by name, columns in another order, odd delimiters
    (";", (3, 2, 1, 0), ["when", "score", "isbn", "reader"],
     dict(user_col="reader", item_col="isbn", rating_col="score", time_col="when"), "\n"),
    ("|", (1, 0, 3, 2), ["book", "customer", "unixtime", "stars"],
     dict(user_col="customer", item_col="book", rating_col="stars", time_col="unixtime"),
     "\r\n"),
    # by header alias, no flags
    (",", (0, 1, 2, 3), ["user_id", "item_id", "rating", "timestamp"], {}, "\r\n"),
    ("\t", (0, 1, 2, 3), ["UserID", "ISBN", "Book-Rating", "Time"], {}, "\n"),
    # by position, with and without a header
    (",", (2, 0, 1, 3), ["a", "b", "c", "d"],
     dict(user_col="1", item_col="2", rating_col="0", time_col="3"), "\r\n"),
    (";", (2, 0, 1, 3), None,
     dict(user_col="1", item_col="2", rating_col="0", time_col="3"), "\n"),
    ("\t", (0, 1, 2, 3), None, {}, "\r\n"),
    (",", (0, 1, 2, 3), None, {}, "\n"),
])
def test_generic_columns_by_name_and_position(tmp_path: Path, shard_reader, sep: str,
                                              order: tuple[int, ...], header, options: dict,
                                              line_end: str) -> None:
    path = write_delimited(tmp_path / "ratings.txt", sep, order, header, line_end)
    out = tmp_path / "shards"
    manifest = run_prepare([path], out, SourceOptions(**options))
    assert manifest["id_types"] == {"user": "string", "item": "string"}
    _, ratings = shard_reader(out)
    assert rows_of(ratings, ("user", "item", "rating", "timestamp")) == sorted(RATINGS)
    # Leading zeros survive, and "007" and "7" are two items, not one.
    assert sorted(pd.read_parquet(out / "items.parquet")["original_item_id"]) == [
        "0060973129", "007", "034545104X", "7"]


def test_header_flag_overrides_detection(tmp_path: Path) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("user,item,rating\n1,2,3\n")
    with pytest.raises(InputError, match=r"ratings\.csv, line 1: rating 'rating' is not a"):
        run_prepare([path], tmp_path / "out", SourceOptions(header=False))
    manifest = run_prepare([path], tmp_path / "out", SourceOptions(header=True))
    assert manifest["counts"]["ratings"]["train"] == 1


def test_explicit_delimiter(tmp_path: Path) -> None:
    path = tmp_path / "ratings.txt"
    path.write_text("1 2 3\n2 2 4\n")
    manifest = run_prepare([path], tmp_path / "out", SourceOptions(delimiter="space"))
    assert manifest["counts"]["users"] == 2
    manifest = run_prepare([path], tmp_path / "out2")  # whitespace is the fallback
    assert manifest["rating"]["train_mean"] == 3.5


def test_half_stars_and_zero_half_to_four_scale(tmp_path: Path, make_ratings, ratings_writer,
                                                shard_reader) -> None:
    frame = make_ratings(num_ratings=200, seed=3)
    frame["rating"] = np.clip(frame["rating"], 0.5, 4.0)  # a 0.5..4 scale, as in Jester-like
    path = ratings_writer(frame, tmp_path / "raw", "csv")
    out = tmp_path / "shards"
    manifest = run_prepare([path], out)
    assert manifest["rating"]["scale"] == [0.5, 4.0]  # the data's range: nothing declared
    _, ratings = shard_reader(out)
    assert rows_of(ratings) == rows_of(frame)
    with pytest.raises(InputError, match=r"rating 4\.5 is outside the rating range 0\.5\.\.4"):
        frame.loc[7, "rating"] = 4.5
        run_prepare([ratings_writer(frame, tmp_path / "raw2", "csv")], tmp_path / "out2",
                    rating_range=(0.5, 4.0))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_csv(tmp_path: Path, make_ratings, ratings_writer, shard_reader,
                        suffix: str) -> None:
    frame = make_ratings(num_ratings=150, seed=4)
    plain = ratings_writer(frame, tmp_path / "raw", "csv")
    packed = tmp_path / f"ratings.csv{suffix}"
    compress = gzip.compress if suffix == ".gz" else zstandard.ZstdCompressor().compress
    packed.write_bytes(compress(plain.read_bytes()))
    out = tmp_path / "shards"
    manifest = run_prepare([packed], out)
    assert manifest["sources"] == [{"path": str(packed), "layout": "csv"}]
    _, ratings = shard_reader(out)
    assert rows_of(ratings, ("user", "item", "rating", "timestamp")) == rows_of(
        frame, ("user", "item", "rating", "timestamp"))


def test_glob_of_several_files(tmp_path: Path, make_ratings, ratings_writer,
                               shard_reader) -> None:
    frame = make_ratings(num_ratings=240, seed=5)
    for part in range(3):
        ratings_writer(frame.iloc[part * 80:(part + 1) * 80], tmp_path / f"raw{part}", "tsv")
    (tmp_path / "notes.txt").write_text("not ratings\n")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "raw*" / "ratings.tsv"], out)
    assert [s["path"] for s in manifest["sources"]] == [
        str(tmp_path / f"raw{p}" / "ratings.tsv") for p in range(3)]
    _, ratings = shard_reader(out)
    assert rows_of(ratings) == rows_of(frame)


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothing\*\.csv: the pattern matches no file"):
        run_prepare([tmp_path / "nothing*.csv"], tmp_path / "out")


def test_folder_of_parquet_files(tmp_path: Path, make_ratings, ratings_writer,
                                 shard_reader) -> None:
    frame = make_ratings(num_ratings=200, seed=6).rename(
        columns={"user": "user_id", "item": "item_id"})
    frame["user_id"] = frame["user_id"].astype(np.int32)
    for part in range(4):
        ratings_writer(frame.iloc[part * 50:(part + 1) * 50],
                       tmp_path / "raw" / f"year={2000 + part}" / f"part-{part}.parquet",
                       "parquet")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "raw"], out)
    assert len(manifest["sources"]) == 4
    assert {s["layout"] for s in manifest["sources"]} == {"parquet"}
    assert manifest["id_types"] == {"user": "int64", "item": "int64"}
    _, ratings = shard_reader(out)
    expected = frame.rename(columns={"user_id": "user", "item_id": "item"})
    assert rows_of(ratings, ("user", "item", "rating", "timestamp")) == rows_of(
        expected, ("user", "item", "rating", "timestamp"))


def test_parquet_with_string_ids_and_datetime_timestamps(tmp_path: Path,
                                                         shard_reader) -> None:
    frame = pd.DataFrame({
        "customer_id": ["c9", "c1", "c1"], "product_id": ["B000X", "B000Y", "B000X"],
        "overall": [5.0, 1.0, 3.0],
        "reviewTime": pd.to_datetime(["2020-01-01 00:00:00", "2020-01-02 00:00:30",
                                      "1999-12-31 23:59:59"]),
    })
    frame.to_parquet(tmp_path / "reviews.parquet")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "reviews.parquet"], out,
                           SourceOptions(time_col="reviewTime"))
    assert manifest["columns"] == {"user": "customer_id", "item": "product_id",
                                   "rating": "overall", "timestamp": "reviewTime"}
    _, ratings = shard_reader(out)
    assert rows_of(ratings, ("user", "item", "rating", "timestamp")) == [
        ("c1", "B000X", 3.0, 946684799), ("c1", "B000Y", 1.0, 1577923230),
        ("c9", "B000X", 5.0, 1577836800)]


def test_date_string_timestamp_column(tmp_path: Path, shard_reader) -> None:
    path = tmp_path / "ratings.csv"
    path.write_text("user,item,rating,date\n1,1,4,2020-01-01\n1,2,3,2020-01-02 00:00:30\n"
                    "2,1,5,1999-12-31T23:59:59Z\n")
    out = tmp_path / "shards"
    run_prepare([path], out)
    _, ratings = shard_reader(out)
    # Unix seconds, whatever unit pandas parses dates into.
    assert rows_of(ratings, ("user", "item", "timestamp")) == [
        (1, 1, 1577836800), (1, 2, 1577923230), (2, 1, 946684799)]


def test_file_url_and_glob(tmp_path: Path, shard_reader) -> None:
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.csv").write_text("user,item,rating\nx,y,1\n")
    (tmp_path / "raw" / "b.csv").write_text("user,item,rating\nx,z,2\n")
    run_prepare([f"file://{tmp_path}/raw/*.csv"], tmp_path / "shards")
    _, ratings = shard_reader(tmp_path / "shards")
    assert rows_of(ratings) == [("x", "y", 1.0), ("x", "z", 2.0)]


def test_memory_url(tmp_path: Path, shard_reader) -> None:
    fs = fsspec.filesystem("memory")
    root = "/shardmf-test-memory-url"
    try:
        fs.pipe(f"{root}/ml/u.data", b"5\t50\t2\t1\n6\t50\t4\t2\n5\t51\t5\t3\n")
        fs.pipe(f"{root}/ml/u.item",
                (u_item_line(50, "Star Wars (1977)", ("Action", "Sci-Fi", "War")) + "\n"
                 + u_item_line(51, "Misérables (1995)", ("Drama",)) + "\n").encode("latin-1"))
        fs.pipe(f"{root}/csv/a.csv", b"user,item,rating\nx,y,1\n")
        fs.pipe(f"{root}/csv/b.csv", b"user,item,rating\nx,z,2\n")

        out = tmp_path / "shards"
        manifest = run_prepare([f"memory://{root}/ml"], out)
        assert manifest["sources"][0]["path"] == f"memory://{root}/ml/u.data"
        _, ratings = shard_reader(out)
        assert rows_of(ratings) == [(5, 50, 2.0), (5, 51, 5.0), (6, 50, 4.0)]
        assert items_of(out) == {50: ("Star Wars (1977)", "Action|Sci-Fi|War"),
                                 51: ("Misérables (1995)", "Drama")}

        manifest = run_prepare([f"memory://{root}/csv/*.csv"], tmp_path / "shards2")
        _, ratings = shard_reader(tmp_path / "shards2")
        assert rows_of(ratings) == [("x", "y", 1.0), ("x", "z", 2.0)]
    finally:
        fs.rm(root, recursive=True)


# ------------------------------------------------------------------- item metadata


def test_recbole_atomic_files(tmp_path: Path, shard_reader) -> None:
    (tmp_path / "ml.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    (tmp_path / "ml.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery "
        "Thriller\n1\tToy Story\t1995\tAnimation Children's Comedy\n")
    out = tmp_path / "shards"
    manifest = run_prepare([tmp_path / "ml.inter"], out, items=str(tmp_path / "ml.item"))
    assert manifest["columns"] == {"user": "user_id:token", "item": "item_id:token",
                                   "rating": "rating:float", "timestamp": "timestamp:float"}
    assert manifest["item_metadata"]["path"] == str(tmp_path / "ml.item")
    assert items_of(out) == {242: ("Kolya", "Comedy"),
                             302: ("L.A. Confidential", "Crime|Film-Noir|Mystery|Thriller")}


@pytest.mark.parametrize(("content", "genre_sep", "expected"), [
    ("item,name,categories\nb1,\"Dune, Deluxe\",\"Sci-Fi, Classic\"\nb2,Emma,\n", None,
     {"b1": ("Dune, Deluxe", "Sci-Fi|Classic"), "b2": ("Emma", None)}),
    ("ISBN;Book-Title;Book-Author\n034545104X;Flesh Tones: A Novel;M. J. Rose\n", None,
     {"034545104X": ("Flesh Tones: A Novel", None)}),
    ("productId|title|tags\np1|Kettle|kitchen/home\n", "/",
     {"p1": ("Kettle", "kitchen|home")}),
])
def test_generic_item_files(tmp_path: Path, content: str, genre_sep, expected: dict) -> None:
    path = tmp_path / "items.txt"
    path.write_text(content)
    meta = read_item_metadata(str(path), genre_sep)
    got = {r.item: (r.title, none_if_na(r.genres)) for r in meta.itertuples()}
    assert got == expected


def test_item_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "items.csv"
    path.write_text("sku,label\n1,a\n")
    with pytest.raises(InputError, match=r"items\.csv: no item id column among sku, label"):
        read_item_metadata(str(path))
    path.write_text("movieId,title\n1,a\n1,b\n")
    with pytest.raises(InputError, match=r"items\.csv: item id '1' appears more than once"):
        read_item_metadata(str(path))
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Comedy\n2::Heat (1995)\n")
    with pytest.raises(InputError, match=r"movies\.dat, line 2: expected id::title::genres"):
        read_item_metadata(str(tmp_path / "movies.dat"))


def test_item_file_matching_no_rated_item(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("user,item,rating\n1,10,3\n")
    (tmp_path / "items.csv").write_text("movieId,title\n99,Nope\n")
    with pytest.raises(InputError, match=r"items\.csv: none of its item ids match"):
        run_prepare([tmp_path / "r.csv"], tmp_path / "out", items=str(tmp_path / "items.csv"))
    assert_nothing_written(tmp_path, "out")


# ------------------------------------------------------------------- bad input


def assert_nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert leftovers == []


def numbered_rows(count: int, sep: str = ",", start: int = 0) -> list[str]:
    return [sep.join([str(u), str(u % 7 + 1), str(u % 5 + 1), str(10**9 + u)])
            for u in range(start, start + count)]


HEADER = "user,item,rating,timestamp"
BAD_INPUTS = {
    # file name, lines, SourceOptions, PrepareConfig fields, message after "<path>"
    "ragged line (more fields), early": (
        "r.csv", [HEADER, *numbered_rows(2), "7,1,4,5,6", *numbered_rows(2, start=3)], {}, {},
        r", line 4: 5 fields, expected 4 \(a ragged line"),
    "ragged line (more fields), late": (
        "r.csv", [HEADER, *numbered_rows(40), "7,1,4,5,6"], {}, {},
        r", line 42: 5 fields, expected 4"),
    "ragged line (fewer fields)": (
        "r.csv", [HEADER, *numbered_rows(30), "7,1"], {}, {}, r", line 32: 2 fields, expected 4"),
    "ragged line in a tsv": (
        "r.tsv", [*numbered_rows(30, "\t"), "7\t1\t4\t5\t6"], {}, {},
        r", line 31: 5 fields, expected 4"),
    "ragged line in a :: file": (
        "ratings.dat", [*numbered_rows(30, "::"), "7::1::4::5::6"], {}, {},
        r", line 31: 5 fields, expected 4"),
    "text in the rating column": (
        "r.csv", [HEADER, *numbered_rows(30), "7,1,four,5"], {}, {},
        r", line 32: rating 'four' is not a number"),
    "empty rating": (
        "r.csv", [HEADER, *numbered_rows(3), "7,1,,5"], {}, {},
        r", line 5: rating '' is not a number"),
    "NaN rating": (
        "r.csv", [HEADER, *numbered_rows(3), "7,1,NaN,5"], {}, {},
        r", line 5: rating 'NaN' is not a finite number"),
    "infinite rating": (
        "r.tsv", [*numbered_rows(3, "\t"), "7\t1\tinf\t5"], {}, {},
        r", line 4: rating 'inf' is not a finite number"),
    "empty user id": (
        "r.csv", [HEADER, *numbered_rows(3), ",1,3,5"], {}, {}, r", line 5: empty user id"),
    "rating out of the declared range": (
        "r.csv", [HEADER, *numbered_rows(3), "7,1,6,5"], {}, {"rating_range": (1.0, 5.0)},
        r", line 5: rating 6 is outside the rating range 1\.\.5 \(pass rating_range=MIN,MAX"),
    "empty file": ("r.csv", [], {}, {},
                   r": the file is empty; expected one rating or interaction per line"),
    "blank lines only": ("r.csv", ["", ""], {}, {}, r": the file is empty"),
    "header only": ("r.csv", [HEADER], {}, {}, r": no ratings found \(only a header"),
    "missing named column": (
        "r.csv", [HEADER, *numbered_rows(3)], {"rating_col": "stars"}, {},
        r": no column 'stars' for `rating_col`; columns are user, item, rating, timestamp"),
    "position beyond the fields": (
        "r.csv", [HEADER, *numbered_rows(3)], {"time_col": "4"}, {},
        r": time_col=4 but rows have 4 fields"),
    "unknown header names fall back to positions": (
        "r.csv", ["who,what,when", "1,2,3", "1,3,2020-01-01"], {}, {},
        r", line 3: rating '2020-01-01' is not a number"),
    "a header name taking the user's position": (
        "r.csv", ["rating,item,comment", "4,2,ok"], {}, {},
        r": cannot find the user column among rating, item, comment; pass `user_col`"),
    "two roles on one column": (
        "r.csv", [HEADER, *numbered_rows(3)], {"user_col": "item", "item_col": "item"}, {},
        r": two roles map to the same column"),
    "duplicate pairs": (
        "r.csv", [HEADER, *numbered_rows(3), "1,2,5,1", "2,3,1,1", "2,3,2,2"], {}, {},
        r": 2 \(user, item\) pairs are rated more than once, e\.g\. .*\(user 1, item 2\)"),
    "duplicate string pairs": (
        "r.csv", ["user,item,rating", "u_1,0042,5", "u_1,42,5", "u_1,0042,1"], {}, {},
        r": 1 \(user, item\) pairs are rated more than once, e\.g\. \(user u_1, item 0042\);"
        r" pass duplicates='last' or duplicates='mean'"),
    "not valid utf-8": (
        "r.csv", [HEADER, "1,Mis\udce9rables,4,5"], {}, {}, r": not valid utf-8 text"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_names_file_and_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    name, lines, options, config, message = BAD_INPUTS[case]
    path = tmp_path / name
    path.write_bytes(("\n".join(lines) + ("\n" if lines else "")).encode(
        "utf-8", errors="surrogateescape"))
    with pytest.raises(InputError, match=re.escape(str(path)) + message):
        run_prepare([path], tmp_path / "out", SourceOptions(**options), **config)
    assert_nothing_written(tmp_path, "out")


def test_bad_line_in_a_gzip_file_and_in_the_second_file_of_a_glob(tmp_path: Path) -> None:
    packed = tmp_path / "r.csv.gz"
    packed.write_bytes(gzip.compress(
        "\n".join([HEADER, *numbered_rows(30), "7,1,x,5", ""]).encode()))
    with pytest.raises(InputError, match=re.escape(f"{packed}, line 32: rating 'x'")):
        run_prepare([packed], tmp_path / "out")
    assert_nothing_written(tmp_path, "out")

    (tmp_path / "a.csv").write_text("\n".join([HEADER, *numbered_rows(5), ""]))
    (tmp_path / "b.csv").write_text("\n".join([HEADER, *numbered_rows(5, start=5),
                                               "7,1,4,5,6", ""]))
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'b.csv'}, line 7: 5 fields")):
        run_prepare([tmp_path / "*.csv"], tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_unknown_format_and_missing_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"format='netflix' is not one of auto, "):
        SourceOptions(format="netflix")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'none.csv'}: no such file")):
        run_prepare([tmp_path / "none.csv"], tmp_path / "out")
    with pytest.raises(InputError, match=r"no input given"):
        run_prepare([], tmp_path / "out")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "readme.md").write_text("hi\n")
    with pytest.raises(InputError, match=r"folder: a folder with no ratings file"):
        run_prepare([tmp_path / "folder"], tmp_path / "out")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"broken\.parquet: not a readable Parquet file"):
        run_prepare([tmp_path / "broken.parquet"], tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_truncated_parquet_is_an_input_error(tmp_path: Path, make_ratings) -> None:
    whole = tmp_path / "whole.parquet"
    make_ratings(num_ratings=500, seed=2).to_parquet(whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError, match=r"cut\.parquet"):
        run_prepare([cut], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_parquet_with_a_missing_rating_is_an_input_error(tmp_path: Path) -> None:
    pd.DataFrame({"user": [1, 2], "item": [1, 1], "rating": [3.0, np.nan]}).to_parquet(
        tmp_path / "r.parquet")
    with pytest.raises(InputError, match=r"r\.parquet: 1 rows with a missing, non-finite"):
        run_prepare([tmp_path / "r.parquet"], tmp_path / "out")
    assert_nothing_written(tmp_path, "out")


def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text("user,item,rating\n1,1,3\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=re.escape(f"{out} already exists and is not empty; "
                                                   "pass `overwrite`")):
        run_prepare([tmp_path / "r.csv"], out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
