"""Ratings in, Parquet shards and a manifest out: reading, validation, id encoding, splits.

Uses Dask and pyarrow, never torch; the manifest is the only contract with ``trainer``.
"""

from data_shards.errors import InputError
from data_shards.movielens import fetch_movielens, movielens_path
from data_shards.prepare import PrepareConfig, prepare
from data_shards.sources import SourceOptions

__all__ = ["InputError", "PrepareConfig", "SourceOptions", "fetch_movielens",
           "movielens_path", "prepare"]
