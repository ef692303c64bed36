"""SHARDS_DIR/manifest.json: the one contract between ``data_shards`` and its readers.

``data_shards.prepare`` builds the JSON object and writes it last (`write_manifest`);
everyone else reads it through `Manifest.load`, which names the file on any problem, and
checks it at one of two depths before trusting it:

- `Manifest.check_sums`: the manifest agrees with itself (ratings per split against its
  per-file rows, rows against row groups, rating facts in order, a train file per shard),
  and with the id tables (rows, size and SHA-256: they are small);
- `Manifest.check_file`: one shard against its entry, from the file's size and Parquet
  footer (rows, row groups, id ranges from column statistics), and with ``sha256`` also
  every byte (about a tenth of a second per GB; ``bench/verify_cost.md``). The footer's
  bytes are compared with the entry's ``footer`` digest before pyarrow parses them: a
  damaged footer can make pyarrow's C++ abort the process (an uncaught ParquetException),
  which no ``except`` can turn into a line. Manifests from before ``footer`` skip that.

Shards hold ratings or interactions (`Manifest.kind`); both have the same schema, with an
interaction's weight in the ``rating`` column (1.0 each when the input had no weight column,
`Manifest.weight_column` None) and the manifest's ``rating`` entry describing weights, whose
``scale`` is 0..the largest weight.

Uses pyarrow and the standard library only, so both packages can import it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from shardmf.errors import InputError
from shardmf.outputs import write_json

MANIFEST_NAME = "manifest.json"
KINDS = ("ratings", "interactions")
# What prepare writes, per kind: the oldest format whose readers read the shards right.
# Rating shards stay 1 (a reader of 1 reads them unchanged); interaction shards are 2, so
# that a shardmf from before interactions refuses them instead of training on weights as
# ratings. A manifest without ``kind`` holds ratings.
MANIFEST_VERSIONS = {"ratings": 1, "interactions": 2}
SUPPORTED_MANIFEST_VERSIONS = (1, 2)  # what `Manifest.load` reads
SPLITS = ("train", "val", "test")
HASH_CHUNK = 8 * 2**20
ID_FILES_KEY = "id_files"  # {users_file: {"bytes": N, "sha256": HEX}, items_file: {...}}


@dataclass(frozen=True)
class Footer:
    """A Parquet file's footer as written: its metadata, length and magic, the file's end."""

    bytes: int  # how many bytes at the end of the file
    sha256: str  # hex digest of them

    @classmethod
    def of(cls, data: bytes) -> Footer:
        """The footer of a whole Parquet file held in memory (``prepare`` writes these)."""
        size = min(len(data), int.from_bytes(data[-8:-4], "little") + 8)
        return cls(size, hashlib.sha256(data[len(data) - size:]).hexdigest())

    def matches(self, path: Path) -> bool:
        """Whether ``path`` ends in exactly these bytes (read: the footer only)."""
        with path.open("rb") as handle:
            if handle.seek(0, 2) < self.bytes:
                return False
            handle.seek(-self.bytes, 2)
            return hashlib.sha256(handle.read(self.bytes)).hexdigest() == self.sha256


@dataclass(frozen=True)
class ShardFile:
    """One Parquet shard as the manifest lists it."""

    path: str  # relative to SHARDS_DIR, e.g. "train/part-00003.parquet"
    rows: int
    row_groups: tuple[int, ...]  # rows per row group, in file order
    bytes: int  # file size
    sha256: str  # hex digest of the whole file
    shard: int | None  # the partition number (None in manifests of an older shardmf)
    footer: Footer | None = None  # the file's last bytes (None in an older manifest)


@dataclass(frozen=True)
class Manifest:
    """A shard folder's manifest, read and typed; `data` keeps the JSON object as written
    (provenance such as sources, split and config has no accessor of its own)."""

    root: Path  # SHARDS_DIR
    data: dict[str, Any] = field(repr=False)
    num_users: int  # ids 0..num_users-1; users.parquet maps them back
    num_items: int
    split_rows: dict[str, int]  # ratings per split
    train_mean: float  # mean training rating (interactions: mean weight)
    train_std: float | None  # their standard deviation (None: written by an older shardmf)
    scale: tuple[float, float]  # lowest and highest possible rating (interactions: 0..max)
    kind: str  # "ratings" | "interactions"
    weight_column: str | None  # interactions: the input's weight column; None: all weigh 1
    files: dict[str, tuple[ShardFile, ...]]  # per split, in manifest order
    users_file: str  # the id tables, relative to SHARDS_DIR
    items_file: str
    partition_scheme: str | None  # "random" | "user" (None: an older shardmf)
    users_file_column: str  # with partition "user": the users_file column naming the shard
    num_shards: int | None  # train/val/test files per split (None: an older shardmf)
    # users_file and items_file -> (bytes, sha256); empty from an older shardmf
    id_file_sums: dict[str, tuple[int, str]]

    @classmethod
    def load(cls, shards_dir: str | Path) -> Manifest:
        """Read SHARDS_DIR/manifest.json; InputError naming it when missing or malformed."""
        root = Path(shards_dir)
        path = root / MANIFEST_NAME
        if not path.is_file():
            hint = (f" (a folder without {MANIFEST_NAME} is an unfinished or foreign folder)"
                    if root.is_dir() else "")
            raise InputError(f"{path}: not found{hint}; create shards with "
                             "`shardmf prepare INPUT --out SHARDS_DIR`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise InputError(f"{path}: not readable ({e.strerror or e})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise InputError(f"{path}: a JSON {type(data).__name__}, not the object "
                             "`shardmf prepare` writes; re-create the shards")
        version = data.get("format_version")
        if version not in SUPPORTED_MANIFEST_VERSIONS:
            raise InputError(f"{path}: format version {version!r}, this shardmf reads "
                             f"{SUPPORTED_MANIFEST_VERSIONS}; re-create the shards with this "
                             "version")
        try:
            return cls._parse(root, data)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"{path}: a required entry is missing or malformed ({e!r}); "
                             "re-create the shards") from e

    @classmethod
    def _parse(cls, root: Path, data: dict[str, Any]) -> Manifest:
        counts, rating = data["counts"], data["rating"]
        low, high = rating["scale"]
        partition = data.get("partition", {})
        kind = data.get("kind", "ratings")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}, expected one of {', '.join(KINDS)}")
        weight_column = data.get("weight_column") if kind == "interactions" else None
        return cls(
            root=root, data=data, num_users=int(counts["users"]),
            num_items=int(counts["items"]),
            split_rows={split: int(counts["ratings"][split]) for split in SPLITS},
            train_mean=float(rating["train_mean"]),
            train_std=None if rating.get("train_std") is None else float(rating["train_std"]),
            scale=(float(low), float(high)),
            kind=kind, weight_column=None if weight_column is None else str(weight_column),
            files={split: tuple(_shard_file(entry) for entry in data["files"][split])
                   for split in SPLITS},
            users_file=str(data["users_file"]), items_file=str(data["items_file"]),
            partition_scheme=partition.get("scheme"),
            users_file_column=partition.get("users_file_column", "shard"),
            num_shards=None if partition.get("num_shards") is None
            else int(partition["num_shards"]),
            id_file_sums={str(name): (int(entry["bytes"]), str(entry["sha256"]))
                          for name, entry in data.get(ID_FILES_KEY, {}).items()})

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def identity(self) -> str:
        """A short hash of the file entries (paths, sizes, rows, SHA-256s): equal for the
        same shards wherever they lie, different for another split or data set."""
        entries = json.dumps(self.data["files"], sort_keys=True).encode("utf-8")
        return hashlib.sha256(entries).hexdigest()[:16]

    def rows(self, split: str) -> int:
        """Ratings (or interactions) in ``split``."""
        return self.split_rows[split]

    def all_files(self) -> list[ShardFile]:
        """Every shard, split by split."""
        return [entry for split in SPLITS for entry in self.files[split]]

    def check_sums(self) -> None:
        """The counts must follow from the file entries and the id tables, so an edited
        count is named here, not an IndexError in the middle of training."""
        for split in SPLITS:
            for entry in self.files[split]:
                if sum(entry.row_groups) != entry.rows:
                    raise InputError(f"{self.path}: {entry.path} has {entry.rows:,} rows "
                                     f"but row groups of {sum(entry.row_groups):,}")
            listed = sum(entry.rows for entry in self.files[split])
            if listed != self.rows(split):
                raise InputError(f"{self.path}: counts.ratings.{split} is "
                                 f"{self.rows(split):,} but its files hold {listed:,} rows "
                                 "(the manifest was edited or is damaged)")
        for side, name, count in (("users", self.users_file, self.num_users),
                                  ("items", self.items_file, self.num_items)):
            path = self.root / name
            if not path.is_file():
                raise InputError(f"{path}: missing; the manifest lists it (re-run `shardmf "
                                 "prepare` or restore the file)")
            rows = _footer(path, str(path)).num_rows
            if rows != count:
                raise InputError(f"{self.path}: counts.{side} is {count:,} but {name} has "
                                 f"{rows:,} rows (the manifest was edited or is damaged)")
            self._check_id_file(name, path)
        self._check_facts()

    def _check_id_file(self, name: str, path: Path) -> None:
        """An id table against its recorded size and SHA-256 (small files: always hashed,
        since one flipped bit maps ids to the wrong users or items without another sign)."""
        if name not in self.id_file_sums:
            return  # a manifest of an older shardmf records none
        size, digest = self.id_file_sums[name]
        if path.stat().st_size != size or file_sha256(path) != digest:
            raise InputError(f"{path}: differs from the id table prepare wrote (size or "
                             "checksum); it would map ids to the wrong users or items: "
                             "restore it or re-run `shardmf prepare`")

    def _check_facts(self) -> None:
        """The rating facts agree with each other, and every shard has its train file (a
        removed file whose count was lowered to match is still missed)."""
        rating = self.data["rating"]
        low, high = self.scale
        values = [rating.get("min"), rating.get("max"), self.train_mean, low, high]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise InputError(f"{self.path}: rating min, max, train_mean and scale must be "
                             f"finite numbers, found {values} (edited or damaged)")
        slack = 1e-9 * max(1.0, abs(low), abs(high))  # a float64 mean of float32 values
        if not (low <= rating["min"] <= rating["max"] <= high and
                rating["min"] - slack <= self.train_mean <= rating["max"] + slack):
            raise InputError(f"{self.path}: rating facts out of order: scale {low:g}..{high:g}"
                             f", min {rating['min']:g}, train_mean {self.train_mean:g}, max "
                             f"{rating['max']:g} (edited or damaged)")
        if self.rows("train") == 0:
            raise InputError(f"{self.path}: no training ratings listed; a shard set always "
                             "has some (edited or damaged): re-run `shardmf prepare`")
        shards = [entry.shard for entry in self.files["train"]]
        if self.num_shards is not None and None not in shards and (
                sorted(shards) != list(range(self.num_shards))):
            missing = sorted(set(range(self.num_shards)) - set(shards))
            raise InputError(f"{self.path}: partition.num_shards is {self.num_shards} but "
                             f"the train files list shards {sorted(shards)}" +
                             (f" (missing {missing})" if missing else "") +
                             "; a shard's train file was removed or the manifest edited")

    def check_file(self, entry: ShardFile, *, sha256: bool) -> Path:
        """``entry``'s file against it: size, footer rows, row groups and id ranges, and
        with ``sha256`` its checksum too. Returns the file's path."""
        name = entry.path
        path = self.root / name
        if not path.is_file():
            raise InputError(f"shard {name}: missing from {self.root}; the manifest lists it "
                             "(re-run `shardmf prepare` or restore the file)")
        size = path.stat().st_size
        if size != entry.bytes:
            raise InputError(f"shard {name}: {size:,} bytes, manifest says {entry.bytes:,} "
                             "(the file changed after prepare)")
        if entry.footer is not None and not entry.footer.matches(path):
            raise InputError(f"shard {name}: its Parquet footer differs from the one prepare "
                             "wrote (damaged); re-run `shardmf prepare` or restore the file")
        metadata = _footer(path, f"shard {name}")
        if metadata.num_rows != entry.rows:
            raise InputError(f"shard {name}: {metadata.num_rows:,} rows, manifest says "
                             f"{entry.rows:,}")
        groups = tuple(metadata.row_group(i).num_rows for i in range(metadata.num_row_groups))
        if groups != entry.row_groups:
            raise InputError(f"shard {name}: row groups {list(groups)} differ from the "
                             f"manifest's {list(entry.row_groups)}")
        limits = {"user_id": self.num_users, "item_id": self.num_items}
        for group in range(metadata.num_row_groups):  # id ranges from the column statistics
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                limit, stats = limits.get(chunk.path_in_schema), chunk.statistics
                if limit is None or stats is None or not stats.has_min_max:
                    continue
                if stats.min < 0 or stats.max >= limit:
                    raise InputError(f"shard {name}: {chunk.path_in_schema} in "
                                     f"{stats.min}..{stats.max}, the manifest counts {limit:,}")
        if sha256:
            digest = file_sha256(path)
            if digest != entry.sha256:
                raise InputError(f"shard {name}: checksum {digest[:12]}… differs from the "
                                 f"manifest's {entry.sha256[:12]}… (corrupt or replaced)")
        return path


def manifest_version(kind: str) -> int:
    """The ``format_version`` of a manifest of shards holding ``kind``."""
    return MANIFEST_VERSIONS[kind]


def write_manifest(shards_dir: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (built by ``data_shards.prepare``) as SHARDS_DIR/manifest.json."""
    write_json(Path(shards_dir) / MANIFEST_NAME, data)


def is_shard_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a manifest (a finished shard folder, or a damaged one)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def id_file_entry(path: Path) -> dict[str, Any]:
    """The manifest's record of an id table (``ID_FILES_KEY``)."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _shard_file(entry: dict[str, Any]) -> ShardFile:
    shard, footer = entry.get("shard"), entry.get("footer")
    return ShardFile(path=str(entry["path"]), rows=int(entry["rows"]),
                     row_groups=tuple(int(rows) for rows in entry["row_groups"]),
                     bytes=int(entry["bytes"]), sha256=str(entry["sha256"]),
                     shard=None if shard is None else int(shard),
                     footer=None if footer is None else Footer(int(footer["bytes"]),
                                                               str(footer["sha256"])))


def _footer(path: Path, what: str) -> pq.FileMetaData:
    try:
        return pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several types for a damaged footer
        raise InputError(f"{what}: not a readable Parquet file ({e})") from e
