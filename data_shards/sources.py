"""Turn whatever ratings or interactions a user holds into one Dask DataFrame with a fixed
schema.

Every source (the MovieLens layouts, any CSV/TSV/Parquet, a ``shardmf synth`` folder;
local paths, globs or fsspec URLs) becomes the columns ``user`` and ``item`` (original
ids, as strings for text files), ``rating`` (float64) and, when the source has one,
``timestamp`` (nullable Int64 unix seconds, <NA> where a value is no time: a bad row,
like a bad rating). Interactions (plays, clicks, purchases: no rating) keep the same
schema: ``rating`` holds their weight, from a count or weight column when there is one,
else 1.0 for every row. Problems a user can fix raise ``InputError`` naming the file and,
for text files, the line.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath

import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd

from data_shards.config import SourceOptions
from data_shards.metadata import normalise_name
from shardmf.errors import InputError
from shardmf.outputs import MARKER_NAME

LOGICAL_COLUMNS = ("user", "item", "rating", "timestamp")
# Published scales; a declared scale turns an out-of-range rating into an error.
MOVIELENS_SCALES = {"movielens-100k": (1.0, 5.0), "movielens-dat": (0.5, 5.0),
                    "movielens-csv": (0.5, 5.0)}
# Header names recognised when the user names no columns (compared lower-case, without _ - space).
HEADER_ALIASES = {
    "user": ("userid", "user", "uid", "customerid", "reviewerid", "username"),
    "item": ("itemid", "item", "iid", "movieid", "movie", "productid", "asin", "isbn",
             "bookid", "trackid", "songid", "artistid"),
    "rating": ("rating", "ratings", "score", "stars", "bookrating", "overall", "value"),
    "timestamp": ("timestamp", "time", "ts", "date", "datetime", "unixtime",
                  "unixreviewtime", "ratedat"),
}
# Header names of an interaction weight: such a column (and no rating column) means
# interactions, and its values are their weights.
WEIGHT_ALIASES = ("weight", "weights", "count", "counts", "plays", "playcount", "clicks",
                  "clickcount", "views", "viewcount", "quantity", "qty", "listens",
                  "listencount", "times", "frequency", "purchases", "dwelltime", "duration")
# An interaction weight must be finite and >= 0: checked as a range with no upper end.
WEIGHT_RANGE = (0.0, math.inf)
DELIMITER_CANDIDATES = ("::", "\t", ",", ";", "|")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
TEXT_BLOCKSIZE = 64 * 2**20
FLOAT32_MAX = float(np.finfo(np.float32).max)
UNIX_EPOCH = pd.Timestamp(0, tz="UTC")


@dataclass(frozen=True)
class RatingSource:
    """A resolved input: concrete files, how to parse them and where each column is."""

    paths: tuple[str, ...]
    layout: str  # a FORMATS entry other than "auto"
    kind: str  # "ratings" | "interactions"
    # logical name -> column name in the (named) source columns; "rating" is the weight of
    # interactions and absent when every interaction weighs 1
    columns: dict[str, str]
    delimiter: str | None  # text sources only
    header: bool
    field_names: tuple[str, ...]  # every field of a text row, in order
    encoding: str
    rating_scale: tuple[float, float] | None  # declared by the layout
    items_path: str | None  # item metadata found beside the ratings
    storage_options: dict

    @property
    def is_parquet(self) -> bool:
        return self.layout in ("parquet", "shardmf-synth")

    @property
    def row_name(self) -> str:
        """What a row is called in messages: "rating" or "interaction"."""
        return "rating" if self.kind == "ratings" else "interaction"

    @property
    def value_name(self) -> str:
        """What a row's value is called in messages: "rating" or "weight"."""
        return "rating" if self.kind == "ratings" else "weight"

    def describe(self) -> list[dict]:
        return [{"path": p, "layout": self.layout} for p in self.paths]


def resolve_source(inputs: list[str], options: SourceOptions) -> RatingSource:
    """Expand paths, detect the layout and map the columns, reading only first lines."""
    if not inputs:
        raise InputError("no input given: name at least one ratings or interactions file, "
                         "folder or URL")
    files: list[str] = []
    layout_hint = None if options.format == "auto" else options.format
    items_path = None
    for spec in inputs:
        found, hint, items = _expand(spec, options)
        files.extend(found)
        layout_hint = layout_hint or hint
        items_path = items_path or items
    layout = layout_hint or _detect_layout(files[0], options)
    if layout in ("parquet", "shardmf-synth"):
        return _parquet_source(files, layout, options, items_path)
    return _text_source(files, layout, options, items_path)


def read_ratings(source: RatingSource) -> dd.DataFrame:
    """Lazily read the source into the fixed schema (no validation beyond parsing); the
    ``rating`` column of interactions is their weight, 1.0 without a weight column."""
    wanted = [name for name in LOGICAL_COLUMNS if name in source.columns]
    if source.is_parquet:
        frame = dd.read_parquet(
            list(source.paths), columns=[source.columns[n] for n in wanted],
            storage_options=source.storage_options or None,
        )
    else:
        # Every field is read, not just usecols: with usecols pandas silently drops the extra
        # fields of a ragged row instead of raising. Unused fields stay text (never inferred
        # per block) and _normalise_partition drops them.
        frame = dd.read_csv(
            list(source.paths),
            sep=_single_char(source.delimiter),
            header=0 if source.header else None,
            names=list(source.field_names),
            dtype=_text_dtypes(source),
            encoding=source.encoding,
            quoting=csv.QUOTE_MINIMAL if source.delimiter != "\t" else csv.QUOTE_NONE,
            blocksize=None if _is_compressed(source.paths[0]) else TEXT_BLOCKSIZE,
            compression="infer",
            storage_options=source.storage_options or None,
            keep_default_na=True,
        )
    columns = {n: source.columns[n] for n in wanted}
    return frame.map_partitions(_normalise_partition, columns,
                                meta=_normalise_partition(frame._meta, columns))


def _text_dtypes(source: RatingSource) -> dict[str, str]:
    """Every field as text, except the rating or weight: a number (NaN where empty)."""
    dtypes = dict.fromkeys(source.field_names, "str")
    if "rating" in source.columns:
        dtypes[source.columns["rating"]] = "float64"
    return dtypes


def diagnose_text(source: RatingSource, scale: tuple[float, float] | None) -> InputError:
    """Find the first bad line of a text source; only runs after the fast path failed.

    Per-line Python is fine here: it stops at the first bad line and runs only when the
    data is known to be broken, so users get a file and line instead of a partition.
    """
    wanted = {n: source.field_names.index(c) for n, c in source.columns.items()}
    expected = len(source.field_names)
    stride = len(source.delimiter) if _is_repeated_char(source.delimiter) else 1
    for path in source.paths:
        line_no = 0
        try:
            with fsspec.open(path, "rt", compression="infer", encoding=source.encoding,
                             newline="", **source.storage_options) as handle:
                for line_no, fields in enumerate(_split_lines(handle, source.delimiter), 1):
                    if line_no == 1 and source.header:
                        continue
                    problem = _row_problem(fields, wanted, expected, stride, scale,
                                           source.value_name)
                    if problem:
                        return InputError(f"{path}, line {line_no}: {problem}")
        except UnicodeDecodeError as e:
            return InputError(f"{path}: not valid {source.encoding} text ({e.reason} at byte "
                              f"{e.start}); pass `encoding` (e.g. latin-1)")
        except csv.Error as e:
            return InputError(f"{path}, line {line_no + 1}: {e}; not one {source.row_name} "
                              "per line (check the delimiter and quoting)")
        except (EOFError, zlib.error, OSError) as e:  # gzip.BadGzipFile is an OSError
            return InputError(f"{path}: cannot be read to the end after line {line_no} ({e}); "
                              "is the file truncated or damaged?")
    return InputError(f"{', '.join(source.paths)}: could not be parsed as "
                      f"{source.layout} {source.kind}")


def _row_problem(fields: list[str], wanted: dict[str, int], expected: int, stride: int,
                 scale: tuple[float, float] | None, value_name: str) -> str | None:
    """What is wrong with one split line, or None; ``value_name`` is "rating" or "weight"."""
    if len(fields) != expected:
        return (f"{len(fields) // stride + (len(fields) % stride > 0)} fields, expected "
                f"{(expected - 1) // stride + 1} (a ragged line: check the delimiter and "
                f"quoting)")
    for name in ("user", "item"):
        if not fields[wanted[name]].strip():
            return f"empty {name} id"
    problem = _value_problem(fields[wanted["rating"]].strip(), scale, value_name) if (
        "rating" in wanted) else None
    if problem:
        return problem
    if "timestamp" in wanted and not _is_time(fields[wanted["timestamp"]].strip()):
        return (f"timestamp {fields[wanted['timestamp']].strip()!r} is not a time (expected "
                "unix seconds or a date)")
    return None


def _value_problem(raw: str, scale: tuple[float, float] | None, value_name: str) -> str | None:
    try:
        value = float(raw)
    except ValueError:
        return f"{value_name} {raw!r} is not a number"
    if not math.isfinite(value):
        return f"{value_name} {raw!r} is not a finite number"
    if abs(value) > FLOAT32_MAX:
        return (f"{value_name} {raw!r} is beyond the largest 32-bit float "
                f"({FLOAT32_MAX:.4g}) that shards store")
    if value_name == "weight" and value < 0:
        return (f"weight {raw} is negative (expected a count or weight >= 0, e.g. plays or "
                "clicks)")
    if scale and not scale[0] <= value <= scale[1]:
        return (f"rating {raw} is outside the rating range {scale[0]:g}..{scale[1]:g} "
                f"(pass rating_range=MIN,MAX if that range is wrong)")
    return None


def _is_time(text: str) -> bool:
    """What ``_unix_seconds`` accepts; numbers are tried first (per-line Python stays cheap)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return not pd.isna(_unix_seconds(pd.Series([text], dtype=object)).iloc[0])


def _split_lines(handle: io.TextIOBase, delimiter: str):
    if len(delimiter) == 1 and delimiter != "\t":
        yield from csv.reader(handle, delimiter=delimiter)
        return
    sep = _single_char(delimiter) if _is_repeated_char(delimiter) else delimiter
    for line in handle:
        line = line.rstrip("\r\n")
        if line:
            yield line.split(sep)
        else:
            yield []


def _normalise_partition(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Integer ids stay int64 (cheap to hash and encode); anything else becomes stripped text.

    ``columns`` maps logical names to source columns; other source columns are dropped.
    """
    out = pd.DataFrame(index=frame.index)
    for name in ("user", "item"):
        column = frame[columns[name]]
        if pd.api.types.is_integer_dtype(column.dtype):
            out[name] = column.astype("int64")
        else:
            out[name] = column.astype("str").str.strip().where(column.notna())
    if "rating" in columns:
        values = frame[columns["rating"]].astype("float64")
        # Shards hold float32: a value beyond its range would become inf there, so it is
        # marked non-finite here and refused (or skipped) as such.
        out["rating"] = values.mask(values.abs() > FLOAT32_MAX, np.inf)
    else:  # interactions without a weight column: each row weighs 1
        out["rating"] = np.ones(len(frame), dtype=np.float64)
    if "timestamp" in columns:
        out["timestamp"] = _unix_seconds(frame[columns["timestamp"]])
    return out


def _unix_seconds(column: pd.Series) -> pd.Series:
    """Unix seconds as nullable Int64, value by value: numbers as they are, text as a number
    or else a date. A missing or unparseable value is <NA> (a bad row), never a stand-in."""
    if pd.api.types.is_datetime64_any_dtype(column.dtype):
        return _nullable_int64(_seconds_since_epoch(pd.to_datetime(column, utc=True)))
    if pd.api.types.is_integer_dtype(column.dtype):
        return column.astype("Int64")
    if pd.api.types.is_numeric_dtype(column.dtype):
        return _nullable_int64(column.astype("float64"))
    numbers = pd.to_numeric(column, errors="coerce").astype("float64")
    text = (column.notna() & numbers.isna()).to_numpy()
    if text.any():
        stamps = pd.to_datetime(column[text], errors="coerce", utc=True, format="mixed")
        numbers[text] = _seconds_since_epoch(stamps).to_numpy(dtype="float64")
    return _nullable_int64(numbers)


def _seconds_since_epoch(stamps: pd.Series) -> pd.Series:
    # Through a timedelta, not astype(int64): the datetime unit (s, ms, us, ns) varies.
    return (stamps - UNIX_EPOCH) // pd.Timedelta(seconds=1)


def _nullable_int64(values: pd.Series) -> pd.Series:
    numbers = values.to_numpy(dtype="float64", na_value=np.nan)
    valid = np.isfinite(numbers) & (np.abs(numbers) < 2.0**62)
    array = pd.arrays.IntegerArray(np.where(valid, numbers, 0).astype(np.int64), ~valid)
    return pd.Series(array, index=values.index)


# ---------------------------------------------------------------- resolving inputs


def _expand(spec: str, options: SourceOptions) -> tuple[list[str], str | None, str | None]:
    """Concrete files for one input, plus the layout and item file a folder implies."""
    fs, root = fsspec.core.url_to_fs(spec, **options.storage_options)
    protocol = _protocol_prefix(spec)
    if any(ch in root for ch in "*?["):
        found = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not found:
            raise InputError(f"{spec}: the pattern matches no file")
        for path in found:
            _check_zip(protocol + path, options)
        return [protocol + p for p in found], None, None
    if not fs.exists(root):
        raise InputError(f"{spec}: no such file or folder")
    if fs.isfile(root):
        _check_zip(spec, options)
        return [spec], None, _sibling_items(fs, protocol, root)
    names = {PurePosixPath(p).name: p for p in fs.ls(root, detail=False)}
    _refuse_shardmf_output(spec, fs, names)
    if "synth.json" in names:
        parts = sorted(p for p in fs.glob(f"{root.rstrip('/')}/ratings/*.parquet"))
        if not parts:
            raise InputError(f"{spec}: a shardmf synth folder without ratings/*.parquet")
        items = names.get("items.csv")
        return [protocol + p for p in parts], "shardmf-synth", protocol + items if items else None
    for rating_file in ("u.data", "ratings.dat", "ratings.csv"):
        if rating_file in names:
            path = names[rating_file]
            return [protocol + path], None, _sibling_items(fs, protocol, path)
    parquet = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    if parquet:
        return [protocol + p for p in parquet], "parquet", None
    raise InputError(f"{spec}: a folder with no ratings file shardmf knows "
                     "(u.data, ratings.dat, ratings.csv, *.parquet); name the file instead")


def _refuse_shardmf_output(spec: str, fs, names: dict[str, str]) -> None:
    """Shards, a run or an export are shardmf's output, not ratings: reading their Parquet
    files as ratings fails in odd ways (or re-encodes encoded ids)."""
    kind = None
    if MARKER_NAME in names:
        try:
            kind = json.loads(fs.cat_file(names[MARKER_NAME])).get("kind")
        except (OSError, ValueError, AttributeError):
            kind = None
    if kind is None and "manifest.json" in names:
        kind = "shards"
    if kind in ("shards", "run", "export"):
        use = {"shards": f"train on it with `shardmf train {spec} --out RUN_DIR`, or write "
                         f"its splits as TSV with `shardmf export-split {spec} --out DIR`",
               "run": f"its shards are in {spec.rstrip('/')}/shards",
               "export": "it holds embeddings"}[kind]
        raise InputError(f"{spec}: a shardmf {kind} folder, not ratings; {use}")


def _check_zip(path: str, options: SourceOptions) -> None:
    """A .zip input must be a readable archive of one file: the readers take its first
    member and would silently leave the others out. A member of a larger archive is named
    with fsspec's chaining, ``zip://MEMBER::ARCHIVE.zip``."""
    if "::" in path or not path.lower().endswith(".zip"):
        return
    try:
        with fsspec.open(path, "rb", **options.storage_options) as handle, \
                zipfile.ZipFile(handle) as archive:
            members = [m.filename for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise InputError(f"{path}: not a readable zip archive ({e}); is it truncated or "
                         "damaged?") from e
    if len(members) != 1:
        shown = ", ".join(members[:5]) + (f" and {len(members) - 5} more"
                                          if len(members) > 5 else "")
        raise InputError(f"{path}: a zip archive of {len(members)} files"
                         f"{f' ({shown})' if members else ''}, and an input is one file: "
                         f"name the member as zip://MEMBER::{path} (e.g. zip://"
                         f"{members[0] if members else 'ratings.csv'}::{path}), extract it, "
                         "or pass a MovieLens release as `movielens_path`")


def _protocol_prefix(spec: str) -> str:
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", spec)
    return match.group(0) if match and match.group(1) != "file" else ""


def _sibling_items(fs, protocol: str, ratings_path: str) -> str | None:
    """MovieLens ships titles and genres beside the ratings; find them by their names."""
    name = PurePosixPath(ratings_path).name
    sibling = {"u.data": "u.item", "ratings.dat": "movies.dat", "ratings.csv": "movies.csv"}
    if name not in sibling and not re.fullmatch(r"u\d?\.(base|test)|u[ab]\.(base|test)", name):
        return None
    candidate = str(PurePosixPath(ratings_path).parent / sibling.get(name, "u.item"))
    return protocol + candidate if fs.exists(candidate) else None


def _detect_layout(path: str, options: SourceOptions) -> str:
    name = PurePosixPath(re.sub(r"\.(gz|bz2|xz|zst)$", "", path)).name.lower()
    if name.endswith(".parquet") or name.endswith(".pq") or _has_parquet_magic(path, options):
        return "parquet"
    first = _first_lines(path, options, 2)
    if name == "u.data" or re.fullmatch(r"u\d?\.(base|test)|u[ab]\.(base|test)", name):
        return "movielens-100k"
    if name == "ratings.dat" or (first and "::" in first[0]):
        return "movielens-dat"
    if first and first[0].replace(" ", "").lower().startswith("userid,movieid,rating"):
        return "movielens-csv"
    return "tsv" if name.endswith(".tsv") or (first and "\t" in first[0]) else "csv"


def _has_parquet_magic(path: str, options: SourceOptions) -> bool:
    """Parquet files start with PAR1, whatever they are called."""
    try:
        with fsspec.open(path, "rb", **options.storage_options) as handle:
            return handle.read(4) == b"PAR1"
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e})") from e


def _decoding(encoding: str) -> str:
    """UTF-8 is read as utf-8-sig: a byte-order mark is dropped instead of sticking to the
    first column name (or the first id)."""
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def _first_lines(path: str, options: SourceOptions, count: int) -> list[str]:
    try:
        with fsspec.open(path, "rt", compression="infer", encoding=_decoding(options.encoding),
                         newline="", **options.storage_options) as handle:
            lines = []
            for line in handle:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                if len(lines) == count:
                    break
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid {options.encoding} text; pass `encoding` "
                         "(e.g. latin-1)") from e
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e})") from e
    return lines


def _text_source(files: list[str], layout: str, options: SourceOptions,
                 items_path: str | None) -> RatingSource:
    for path in files:
        if not _first_lines(path, options, 1):
            raise InputError(f"{path}: the file is empty; expected one rating or interaction "
                             "per line")
    first = _first_lines(files[0], options, 20)
    try:
        delimiter = options.delimiter or _layout_delimiter(layout) or _sniff_delimiter(
            first, files[0])
        delimiter = {"\\t": "\t", "tab": "\t", "space": " "}.get(delimiter, delimiter)
        sample = list(_split_lines(io.StringIO("\n".join(first)), delimiter))
    except csv.Error as e:  # e.g. a megabyte-long line: csv's field size limit
        raise InputError(f"{files[0]}: {e} in the first lines; not one rating or interaction "
                         "per line (check the file, or pass `delimiter`)") from e
    width = len(sample[0])
    header = options.header
    if header is None:
        header = layout == "movielens-csv" or _looks_like_header(sample, options)
    if header:
        names = tuple(_unique_names([f.strip() for f in sample[0]]))
    else:
        names = tuple(f"field{i}" for i in range(width))
    if _is_repeated_char(delimiter) and not header:
        # '::' read as ':' leaves empty fields between values: positions stride by 2.
        stride = len(delimiter)
        names = tuple(f"field{i}" for i in range(width))
        logical = [f"field{i}" for i in range(0, width, stride)]
    else:
        logical = list(names)
    rows = sample[1:] if header else sample
    numeric = {name for name in logical if not rows or any(
        names.index(name) < len(row) and _is_number(row[names.index(name)]) for row in rows)}
    columns, kind = _map_columns(logical, header, options, files[0], numeric)
    scale = MOVIELENS_SCALES.get(layout) if kind == "ratings" else None
    return RatingSource(
        paths=tuple(files), layout=layout, kind=kind, columns=columns, delimiter=delimiter,
        header=header, field_names=names, encoding=_decoding(options.encoding),
        rating_scale=scale,
        items_path=items_path, storage_options=dict(options.storage_options),
    )


def _parquet_source(files: list[str], layout: str, options: SourceOptions,
                    items_path: str | None) -> RatingSource:
    import pyarrow.parquet as pq

    try:
        with fsspec.open(files[0], "rb", **options.storage_options) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{files[0]}: not a readable Parquet file ({e})") from e
    names = schema.names
    numeric = {name for name in names if _is_arrow_number(schema.field(name).type)}
    columns, kind = _map_columns(list(names), True, options, files[0], numeric)
    for role, name in columns.items():
        role = "weight" if role == "rating" and kind == "interactions" else role
        _check_parquet_type(files[0], role, name, schema.field(name).type)
    scale = (1.0, 5.0) if layout == "shardmf-synth" and kind == "ratings" else None
    return RatingSource(
        paths=tuple(files), layout=layout, kind=kind, columns=columns, delimiter=None,
        header=True,
        field_names=tuple(names), encoding=options.encoding, rating_scale=scale,
        items_path=items_path, storage_options=dict(options.storage_options),
    )


def _check_parquet_type(path: str, role: str, name: str, arrow_type) -> None:
    """Ids: numbers or strings; ratings and weights: numbers (not booleans); times: numbers,
    times or text. Anything else (lists, structs, booleans) would become ids like "[0]" or
    1.0."""
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    text = pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
        pa.types.is_string_view(arrow_type))
    number = _is_arrow_number(arrow_type)
    allowed = {"user": (number or text, "numbers or strings"),
               "item": (number or text, "numbers or strings"),
               "rating": (number, "numbers"),
               "weight": (number, "numbers"),
               "timestamp": (number or text or pa.types.is_timestamp(arrow_type)
                             or pa.types.is_date(arrow_type), "numbers, times or text")}
    ok, expected = allowed[role]
    if not ok:
        raise InputError(f"{path}: column {name!r} ({role}) holds {arrow_type}; expected "
                         f"{expected} (pass `{_field(role)}` to name another column)")


def _is_arrow_number(arrow_type) -> bool:
    """Integers, floats and decimals (booleans are not numbers here)."""
    import pyarrow as pa

    return (pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type)
            or pa.types.is_decimal(arrow_type))


def _layout_delimiter(layout: str) -> str | None:
    return {"movielens-100k": "\t", "movielens-dat": "::", "movielens-csv": ",",
            "tsv": "\t"}.get(layout)


def _sniff_delimiter(lines: list[str], path: str) -> str:
    """The first candidate that splits the first line, and at least half the sampled lines,
    into the same number of fields; a ragged line is left for validation to report.

    Three or more fields are looked for first, and two (user, item) only when no candidate
    gives three: "1;2;3,5" is three fields split by ";", not two by ",".
    """
    for least in (3, 2):
        for candidate in DELIMITER_CANDIDATES:
            counts = [len(list(_split_lines(io.StringIO(line), candidate))[0])
                      for line in lines]
            if counts[0] >= least and 2 * counts.count(counts[0]) >= len(counts):
                return candidate
        if lines and len(lines[0].split()) >= least:
            return " "
    raise InputError(f"{path}: cannot tell the delimiter from the first lines "
                     f"({lines[0][:80]!r}): expected at least a user and an item field per "
                     "line; pass `delimiter`")


def _looks_like_header(sample: list[list[str]], options: SourceOptions) -> bool:
    """A header when a column is named by the user, a first-line field is a known column
    name (userId, item, plays...), the rating field of the first line is no number, or a
    column is a number on every later line but not on the first ("customer,product" over
    numeric ids), unless a field of the first line is a number (column names are not).
    Text ids under unknown names stay ambiguous: pass `header`."""
    if any(c is not None and not c.isdigit() for c in
           (options.user_col, options.item_col, options.rating_col)):
        return True
    first, rest = sample[0], sample[1:]
    known = {alias for names in HEADER_ALIASES.values() for alias in names} | set(
        WEIGHT_ALIASES)
    if any(normalise_name(value) in known for value in first):
        return True
    if any(_is_number(value) for value in first):
        return False  # a data line whose rating is bad: validation names it, line 1
    position = int(options.rating_col) if options.rating_col else 2
    if position < len(first) and not _is_number(first[position]):
        return True
    return bool(rest) and any(
        not _is_number(value) and all(i < len(row) and _is_number(row[i]) for row in rest)
        for i, value in enumerate(first))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for i, name in enumerate(names):
        name = name or f"field{i}"
        if name in seen:
            seen[name] += 1
            name = f"{name}.{seen[name]}"
        else:
            seen[name] = 0
        out.append(name)
    return out


def _map_columns(available: list[str], named: bool, options: SourceOptions, path: str,
                 numeric: set[str]) -> tuple[dict[str, str], str]:
    """Logical column -> source column, and the kind of data: "ratings" | "interactions".

    Columns come from the fields the user names, then header aliases, then positions
    (user 0, item 1, rating 2 and, without a header, timestamp 3), never taking a column
    twice. Interactions take a weight by name only (`rating_col` or an alias such as
    plays), never by position. With kind auto: ratings when a rating column is found (by
    name, or a third field among the ``numeric`` columns: numbers in the first rows, or
    in the Parquet schema), else interactions (rows of two fields, a weight column, or a
    text third field such as an event type).
    """
    requested = {"user": options.user_col, "item": options.item_col,
                 "rating": options.rating_col, "timestamp": options.time_col}
    aliases = dict(HEADER_ALIASES)
    aliases["rating"] = {"ratings": HEADER_ALIASES["rating"], "interactions": WEIGHT_ALIASES,
                         "auto": HEADER_ALIASES["rating"] + WEIGHT_ALIASES}[options.kind]
    normalised = {normalise_name(a): a for a in available}
    columns = {name: _requested_column(spec, name, available, path)
               for name, spec in requested.items() if spec is not None}
    for name in LOGICAL_COLUMNS:
        found = next((normalised[a] for a in aliases[name] if a in normalised), None)
        if named and name not in columns and found not in (None, *columns.values()):
            columns[name] = found
    for position, name in enumerate(LOGICAL_COLUMNS):
        skip = (name in columns or position >= len(available)
                or (name == "rating" and options.kind == "interactions")
                or (name == "rating" and options.kind == "auto"
                    and available[position] not in numeric)
                or (name == "timestamp" and named))
        if not skip and available[position] not in columns.values():
            columns[name] = available[position]
    for name in ("user", "item"):
        if name not in columns:
            raise InputError(f"{path}: cannot find the {name} column among "
                             f"{', '.join(available)}; pass `{_field(name)}`")
    kind = options.kind
    if kind == "auto":
        weighted = "rating" in columns and normalise_name(columns["rating"]) in WEIGHT_ALIASES
        kind = "ratings" if "rating" in columns and not weighted else "interactions"
    if kind == "ratings" and "rating" not in columns:
        raise InputError(f"{path}: cannot find the rating column among "
                         f"{', '.join(available)}; pass `rating_col`, or kind='interactions' "
                         "for data without ratings")
    # in LOGICAL_COLUMNS order, as the manifest lists them
    columns = {name: columns[name] for name in LOGICAL_COLUMNS if name in columns}
    if len(set(columns.values())) != len(columns):
        raise InputError(f"{path}: two roles map to the same column ({columns}); "
                         "pass `user_col`/`item_col`/`rating_col`")
    return columns, kind


def _requested_column(spec: str, name: str, available: list[str], path: str) -> str:
    """The column a `*_col` field names: by name, or by 0-based position as digits."""
    if spec.isdigit():
        if int(spec) >= len(available):
            raise InputError(f"{path}: {_field(name)}={spec} but rows have "
                             f"{len(available)} fields (positions count from 0)")
        return available[int(spec)]
    if spec in available:
        return spec
    raise InputError(f"{path}: no column {spec!r} for `{_field(name)}`; "
                     f"columns are {', '.join(available)}")


def _field(name: str) -> str:
    """The SourceOptions field that names the column of a role."""
    return "time_col" if name == "timestamp" else f"{name}_col"


def _single_char(delimiter: str | None) -> str | None:
    if delimiter and _is_repeated_char(delimiter):
        return delimiter[0]
    return delimiter


def _is_repeated_char(delimiter: str | None) -> bool:
    return bool(delimiter) and len(delimiter) > 1 and len(set(delimiter)) == 1


def _is_compressed(path: str) -> bool:
    return path.endswith(COMPRESSED_SUFFIXES)


# ---------------------------------------------------------------- --on-bad-rows skip

# Why a row was set aside; code i + 1 in the ``reason`` column (0: a good row). The codes
# are the same for both kinds; interactions name theirs for weights (finite and >= 0).
BAD_ROW_REASONS = ("ragged_line", "non_numeric_rating", "rating_out_of_range", "missing_id",
                   "bad_timestamp")
BAD_WEIGHT_REASONS = ("ragged_line", "non_numeric_weight", "negative_weight", "missing_id",
                      "bad_timestamp")
REJECT_COLUMNS = ("reason", "block", "line", "raw")


def read_ratings_checked(source: RatingSource, scale: tuple[float, float] | None
                         ) -> tuple[dd.DataFrame, list[tuple[str, int]]]:
    """The fixed schema plus ``reason`` (int8, 0 good), ``block``, ``line`` and ``raw``.

    For ``--on-bad-rows skip``. A text block is first parsed exactly as ``read_ratings``
    does (pandas C parser, vectorised checks); only a block whose fast parse fails or that
    holds a bad row is parsed again line by line, which gives the line number and raw text
    of each bad row. Good blocks never pay for that. Returns the frame and the blocks as
    (path, byte offset) so that ``block``/``line`` can be turned into a file line later.
    """
    if source.is_parquet:
        frame = read_ratings(source)
        columns = list(frame.columns)
        return frame.map_partitions(_flag_parquet_partition, scale, columns,
                                    meta=_flag_parquet_partition(frame._meta, scale,
                                                                 columns)), []
    blocks: list[tuple[str, int, int | None]] = []
    for path in source.paths:
        if _is_compressed(path):
            blocks.append((path, 0, None))
            continue
        fs, root = fsspec.core.url_to_fs(path, **source.storage_options)
        size = fs.size(root)
        blocks.extend((path, offset, TEXT_BLOCKSIZE)
                      for offset in range(0, max(size, 1), TEXT_BLOCKSIZE))
    meta = _checked_meta(source)
    frame = dd.from_map(_read_text_block, [(i, *b) for i, b in enumerate(blocks)],
                        source=source, scale=scale, meta=meta, enforce_metadata=False,
                        label="read-ratings-checked")
    return frame, [(p, o) for p, o, _ in blocks]


def bad_row_reasons(kind: str) -> tuple[str, ...]:
    """The names of the bad-row codes for "ratings" or "interactions"."""
    return BAD_ROW_REASONS if kind == "ratings" else BAD_WEIGHT_REASONS


def _checked_meta(source: RatingSource) -> pd.DataFrame:
    columns = dict(source.columns)
    empty = pd.DataFrame({n: pd.Series(dtype="str") for n in source.field_names})
    return _with_reasons(_normalise_partition(empty.astype(_text_dtypes(source)), columns),
                         None)


def _reason_codes(frame: pd.DataFrame, scale) -> np.ndarray:
    """Vectorised: 0 for a good row, else 1 + the index of its reason in BAD_ROW_REASONS."""
    codes = np.zeros(len(frame), dtype=np.int8)
    rating = frame["rating"].to_numpy(dtype=np.float64)
    if scale is not None:
        with np.errstate(invalid="ignore"):
            codes[(rating < scale[0]) | (rating > scale[1])] = 3
    codes[~np.isfinite(rating)] = 2
    missing = np.zeros(len(frame), dtype=bool)
    for name in ("user", "item"):
        column = frame[name]
        missing |= column.isna().to_numpy()
        if not pd.api.types.is_integer_dtype(column.dtype):
            missing |= (column == "").fillna(False).to_numpy(dtype=bool)
    codes[missing] = 4
    if "timestamp" in frame:
        codes[(codes == 0) & frame["timestamp"].isna().to_numpy()] = 5
    return codes


def _with_reasons(frame: pd.DataFrame, scale, codes: np.ndarray | None = None,
                  block: int = -1) -> pd.DataFrame:
    codes = _reason_codes(frame, scale) if codes is None else codes
    return frame.assign(reason=codes, block=np.full(len(frame), block, dtype=np.int32),
                        line=np.full(len(frame), -1, dtype=np.int64),
                        raw=pd.Series([None] * len(frame), index=frame.index, dtype=object))


def _flag_parquet_partition(frame: pd.DataFrame, scale, columns: list[str]) -> pd.DataFrame:
    out = _with_reasons(frame, scale)
    bad = out["reason"].to_numpy() > 0
    if bad.any():  # raw text of the few bad rows only
        out.loc[bad, "raw"] = [repr(tuple(row)) for row in
                               frame.loc[bad, columns].itertuples(index=False)]
    return out


def _read_text_block(spec: tuple[int, str, int, int | None], source: RatingSource,
                     scale) -> pd.DataFrame:
    index, path, offset, length = spec
    with fsspec.open(path, "rb", compression="infer", **source.storage_options) as handle:
        if length is None:
            data = handle.read()
        else:
            data = fsspec.utils.read_block(handle, offset, length, delimiter=b"\n")
    skip_header = source.header and offset == 0
    try:
        parsed = pd.read_csv(
            io.BytesIO(data), sep=_single_char(source.delimiter),
            header=0 if skip_header else None, names=list(source.field_names),
            dtype=_text_dtypes(source),
            encoding=source.encoding,
            quoting=csv.QUOTE_MINIMAL if source.delimiter != "\t" else csv.QUOTE_NONE,
            keep_default_na=True)
        frame = _normalise_partition(parsed, source.columns)
        codes = _reason_codes(frame, scale)
        if not codes.any():
            return _with_reasons(frame, scale, codes, index)
    except (ValueError, TypeError, UnicodeDecodeError):  # pandas' ParserError is a ValueError
        pass
    return _read_text_block_slowly(data, index, skip_header, source, scale)


def _read_text_block_slowly(data: bytes, index: int, skip_header: bool,
                            source: RatingSource, scale) -> pd.DataFrame:
    """Line by line: only for a block known to hold a bad row (per-row Python is fine)."""
    from pandas._libs.parsers import STR_NA_VALUES

    try:
        text = data.decode(source.encoding)
    except UnicodeDecodeError as e:
        raise InputError(f"{source.paths[0]}: not valid {source.encoding} text ({e.reason}); "
                         "pass `encoding` (e.g. latin-1)") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    expected = len(source.field_names)
    good_rows, good_lines, bad_lines, bad_raw = [], [], [], []
    for number, line in enumerate(lines):
        line = line.rstrip("\r")
        if (number == 0 and skip_header) or not line.strip():
            continue
        fields = next(_split_lines(io.StringIO(line), source.delimiter), [])
        if len(fields) == expected:
            good_rows.append(fields)
            good_lines.append(number)
        else:
            bad_lines.append(number)
            bad_raw.append(line)
    raw = pd.DataFrame(good_rows, columns=list(source.field_names), dtype=object)
    raw = raw.where(~raw.isin(STR_NA_VALUES), None)
    if "rating" in source.columns:
        value = source.columns["rating"]
        raw[value] = pd.to_numeric(raw[value].astype(object).where(raw[value].notna(), None),
                                   errors="coerce").astype("float64")
    frame = _with_reasons(_normalise_partition(raw, source.columns), scale, block=index)
    frame["line"] = np.asarray(good_lines, dtype=np.int64)
    bad = frame["reason"].to_numpy() > 0
    if bad.any():
        frame.loc[bad, "raw"] = [lines[n].rstrip("\r") for n in frame.loc[bad, "line"]]
    if bad_lines:
        ragged = frame.iloc[:0].reindex(range(len(bad_lines)))
        ragged = ragged.assign(reason=np.int8(1), block=np.int32(index),
                               line=np.asarray(bad_lines, dtype=np.int64), raw=bad_raw)
        frame = pd.concat([frame, ragged], ignore_index=True)
    return frame.astype(_checked_dtypes(frame))


def _checked_dtypes(frame: pd.DataFrame) -> dict:
    dtypes = {"rating": "float64", "reason": "int8", "block": "int32", "line": "int64"}
    if "timestamp" in frame:
        dtypes["timestamp"] = "Int64"
    return dtypes


def line_numbers(blocks: list[tuple[str, int]], block_ids: np.ndarray, lines: np.ndarray,
                 storage_options: dict) -> np.ndarray:
    """1-based file lines of rejects from (block, line within block); -1 where unknown.

    Counts the newlines before each block's start (the first line break at or after its
    byte offset): a scan of the file prefix, run only for the few rejects shown.
    """
    before: dict[int, int] = {}
    for block in sorted({int(b) for b in block_ids if b >= 0}):
        path, offset = blocks[block]
        if offset == 0:
            before[block] = 0
            continue
        count = 0
        with fsspec.open(path, "rb", **storage_options) as handle:
            remaining = offset
            while remaining > 0:
                chunk = handle.read(min(remaining, 16 * 2**20))
                if not chunk:
                    break
                count += chunk.count(b"\n")
                remaining -= len(chunk)
        # The block starts after the first line break at or after its offset.
        before[block] = count + 1
    return np.array([before[int(b)] + int(n) + 1 if b >= 0 and n >= 0 else -1
                     for b, n in zip(block_ids, lines)], dtype=np.int64)
