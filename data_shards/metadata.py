"""Item metadata (titles, genres) from the MovieLens layouts or any delimited item file.

Metadata is small (one row per item), so it is read with pandas, not Dask. Every reader
returns ``item`` (original id as text), ``title`` and ``genres`` (names joined by "|").
"""

from __future__ import annotations

import csv
import re
from pathlib import PurePosixPath

import fsspec
import pandas as pd

from shardmf.errors import InputError

# The 19 genre flags of MovieLens-100K's u.item, in file order (from the dataset's README).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
ID_ALIASES = ("itemid", "movieid", "id", "item", "movie", "bookid", "productid", "asin",
              "isbn")
TITLE_ALIASES = ("title", "movietitle", "name", "itemname", "booktitle")
GENRE_ALIASES = ("genres", "genre", "class", "classes", "categories", "category", "tags")
NO_GENRE = {"", "(no genres listed)", "unknown"}


def read_item_metadata(path: str, genre_sep: str | None = None,
                       storage_options: dict | None = None) -> pd.DataFrame:
    """Read titles and genres, choosing the reader from the file name and first line."""
    options = storage_options or {}
    name = PurePosixPath(path).name.lower()
    try:
        if name == "u.item":
            frame = _read_u_item(path, options)
        elif name == "movies.dat":
            frame = _read_movies_dat(path, options)
        else:
            frame = _read_table(path, genre_sep, options)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise InputError(f"{path}: cannot read item metadata ({e})") from e
    frame["item"] = frame["item"].astype("str").str.strip()
    if frame["item"].duplicated().any():
        dup = frame.loc[frame["item"].duplicated(), "item"].iloc[0]
        raise InputError(f"{path}: item id {dup!r} appears more than once in the item file")
    return frame[["item", "title", "genres"]]


def _read_u_item(path: str, options: dict) -> pd.DataFrame:
    """MovieLens-100K: id|title|release|video release|IMDb URL|19 genre flags, Latin-1."""
    with fsspec.open(path, "rb", compression="infer", **options) as handle:
        raw = pd.read_csv(handle, sep="|", header=None, encoding="latin-1",
                          quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    if raw.shape[1] != 5 + len(ML100K_GENRES):
        raise InputError(f"{path}: {raw.shape[1]} fields, expected {5 + len(ML100K_GENRES)} "
                         "(id|title|release|video release|URL|19 genre flags)")
    flags = raw.iloc[:, 5:].to_numpy() == "1"
    genres = ["|".join(g for g, on in zip(ML100K_GENRES, row) if on and g != "unknown")
              for row in flags]
    return pd.DataFrame({"item": raw[0], "title": raw[1].replace("", None),
                         "genres": pd.Series(genres, dtype="str").replace("", None)})


def _read_movies_dat(path: str, options: dict) -> pd.DataFrame:
    """MovieLens-1M/10M: id::title::genres; 1M is Latin-1, 10M UTF-8."""
    with fsspec.open(path, "rb", compression="infer", **options) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    rows = [line.split("::") for line in text.splitlines() if line.strip()]
    bad = next((i for i, r in enumerate(rows, 1) if len(r) != 3), None)
    if bad is not None:
        raise InputError(f"{path}, line {bad}: expected id::title::genres")
    frame = pd.DataFrame(rows, columns=["item", "title", "genres"])
    frame["genres"] = _clean_genres(frame["genres"], "|")
    return frame


def _read_table(path: str, genre_sep: str | None, options: dict) -> pd.DataFrame:
    """Any delimited item file with a header: movies.csv, items.tsv, a synth items.csv."""
    with fsspec.open(path, "rt", compression="infer", encoding="utf-8", newline="",
                     **options) as handle:
        first = handle.readline()
    # The header's most frequent candidate (',' on a tie, e.g. a one-column header).
    delimiter = "\t" if "\t" in first else max((",", "|", ";"), key=first.count)
    with fsspec.open(path, "rb", compression="infer", **options) as handle:
        raw = pd.read_csv(handle, sep=delimiter, dtype=str, keep_default_na=False)
    normalised = {normalise_name(c): c for c in raw.columns}

    def pick(aliases: tuple[str, ...]) -> str | None:
        return next((normalised[a] for a in aliases if a in normalised), None)

    id_col, title_col, genre_col = pick(ID_ALIASES), pick(TITLE_ALIASES), pick(GENRE_ALIASES)
    if id_col is None:
        raise InputError(f"{path}: no item id column among {', '.join(raw.columns)} "
                         f"(expected one of {', '.join(ID_ALIASES)})")
    frame = pd.DataFrame({"item": raw[id_col]})
    frame["title"] = raw[title_col].replace("", None) if title_col else None
    if genre_col:
        values = raw[genre_col]
        sep = genre_sep or ("|" if values.str.contains("|", regex=False).any() else
                            "," if values.str.contains(",", regex=False).any() else " ")
        frame["genres"] = _clean_genres(values, sep)
    else:
        frame["genres"] = None
    return frame


def normalise_name(column: str) -> str:
    """Compare column names loosely: case, _ - and spaces, and RecBole's ':type' suffix ignored."""
    return re.sub(r"[\s_\-]", "", column.split(":")[0].lower())


def _clean_genres(values: pd.Series, sep: str) -> pd.Series:
    def clean(text: str) -> str | None:
        parts = [p.strip() for p in (text.split() if sep == " " else text.split(sep))]
        kept = [p for p in parts if p and p.lower() not in NO_GENRE]
        return "|".join(kept) or None

    return values.fillna("").map(clean)
