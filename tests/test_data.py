"""trainer/data.py: a rank's training and evaluation batches: per-rank shares, seeded
order, every rating once, wrap-around, loader workers, the prefetch thread, the row-group
cache and mid-epoch starts."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from trainer.data import (
    BLOCK_ROWS,
    RowGroupReader,
    TrainBatches,
    eval_batches,
    prefetched,
    read_piece,
    steps_per_epoch,
    train_loader,
)
from trainer.shards import Piece, open_shards, pieces_for_rank


def write_pieces(path: Path, sizes: list[int]) -> list[Piece]:
    """One Parquet file whose row groups have the given sizes; user_id numbers the rows
    0..n-1, so a row's identity survives any shuffle."""
    schema = pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                        ("rating", pa.float32())])
    start = 0
    with pq.ParquetWriter(path, schema) as writer:
        for size in sizes:
            ids = np.arange(start, start + size, dtype=np.int64)
            writer.write_table(pa.table({"user_id": ids, "item_id": ids % 7,
                                         "rating": (ids % 5 + 1).astype(np.float32)},
                                        schema=schema), row_group_size=size)
            start += size
    assert [pq.ParquetFile(path).metadata.row_group(i).num_rows
            for i in range(len(sizes))] == sizes
    return [Piece(path, index, size) for index, size in enumerate(sizes)]


def batches(dataset: TrainBatches, workers: int = 0,
            prefetch: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """The loader's batches, its runs of consecutive batches cut apart."""
    return [batch for run in train_loader(dataset, workers, pin_memory=False, prefetch=prefetch)
            for batch in zip(*(column.split(dataset.batch_size) for column in run))]


def row_ids(batch_list) -> list[int]:
    return [int(u) for users, _, _ in batch_list for u in users]


@pytest.mark.parametrize("rank", [0, 1])
def test_batches_for_rank_of_two(trainer_shards_dir: Path, rank: int) -> None:
    """Rank r of 2, built in-process: exactly `steps` full batches (steps agreed as max)."""
    pieces = open_shards(trainer_shards_dir).pieces("train")
    rank_batch = 300
    steps = max(steps_per_epoch(pieces_for_rank(pieces, r, 2), rank_batch) for r in (0, 1))
    mine = pieces_for_rank(pieces, rank, 2)
    got = batches(TrainBatches(mine, rank_batch, steps, seed=0, epoch=0, rank=rank))
    assert len(got) == steps
    for users, items, ratings in got:
        assert users.shape == items.shape == ratings.shape == (rank_batch,)
        assert users.dtype == items.dtype == torch.int64 and ratings.dtype == torch.float32
        assert int(users.max()) < 300 and int(items.max()) < 150
    # Every rating of the rank is seen in the epoch (the shortfall rank wraps around).
    mine_rows = {(int(u), int(i)) for piece in mine for u, i in zip(*read_piece(piece)[:2])}
    seen = {(int(u), int(i)) for users, items, _ in got for u, i in zip(users, items)}
    assert seen == mine_rows


def test_batches_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    pieces = write_pieces(tmp_path / "p.parquet", [100, 60, 140])
    one = row_ids(batches(TrainBatches(pieces, 50, 6, seed=3, epoch=1, rank=0)))
    assert one == row_ids(batches(TrainBatches(pieces, 50, 6, seed=3, epoch=1, rank=0)))
    assert sorted(one) == list(range(300))
    for other in (dict(seed=3, epoch=2, rank=0), dict(seed=4, epoch=1, rank=0),
                  dict(seed=3, epoch=1, rank=1)):
        changed = row_ids(batches(TrainBatches(pieces, 50, 6, **other)))
        assert changed != one, other
        assert sorted(changed) == list(range(300)), other


def test_row_groups_within_the_budget_are_decoded_once(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pieces = write_pieces(path, [100, 60, 140])
    row_bytes = 8 + 8 + 4  # int64 user and item, float32 rating
    reader = RowGroupReader(budget_bytes=160 * row_bytes)
    plain = [batches(TrainBatches(pieces, 50, 6, seed=3, epoch=e, rank=0)) for e in (0, 1)]
    kept = [batches(TrainBatches(pieces, 50, 6, seed=3, epoch=e, rank=0, reader=reader))
            for e in (0, 1)]
    for epoch_plain, epoch_kept in zip(plain, kept):  # the same batches, epoch after epoch
        assert all(torch.equal(a, b) for x, y in zip(epoch_plain, epoch_kept)
                   for a, b in zip(x, y))
    # Kept first come, first served, within the budget, each with its one shuffle.
    kept_groups = {row_group for _, row_group, _ in reader.kept}
    assert kept_groups and len(kept_groups) < len(pieces)
    assert reader.kept_bytes == sum(pieces[g].rows for g in kept_groups) * row_bytes
    assert reader.kept_bytes <= 160 * row_bytes
    # Kept row groups are no longer read; one beyond the budget is, every time.
    path.unlink()
    for index, piece in enumerate(pieces):
        if piece.row_group in kept_groups:
            users = reader(piece, shuffle=(3, 0, index))[0]
            assert sorted(users) == list(range(piece_start(pieces, index),
                                               piece_start(pieces, index) + piece.rows))
        else:
            with pytest.raises(ValueError, match=f"row group {piece.row_group}"):
                reader(piece, shuffle=(3, 0, index))


def piece_start(pieces: list[Piece], index: int) -> int:
    """The first row id of ``pieces[index]`` as write_pieces numbers them."""
    return sum(p.rows for p in pieces[:index])


def test_every_rating_once_when_steps_fill_the_epoch(tmp_path: Path) -> None:
    pieces = write_pieces(tmp_path / "p.parquet", [120, 80, 100, 20])
    assert steps_per_epoch(pieces, 40) == 8
    got = batches(TrainBatches(pieces, 40, 8, seed=0, epoch=0, rank=0))
    assert [len(b[0]) for b in got] == [40] * 8
    assert sorted(row_ids(got)) == list(range(320))
    # Ratings travel with their ids (the three columns are permuted together).
    for users, items, ratings in got:
        assert torch.equal(items, users % 7)
        assert torch.equal(ratings, (users % 5 + 1).float())


def test_wrap_around_on_a_short_rank(tmp_path: Path) -> None:
    """A rank asked for the step count of a rank with about twice its rows."""
    sizes = [2 * BLOCK_ROWS + 100, BLOCK_ROWS + 50]
    rows, batch = sum(sizes), 400
    steps = -(-2 * rows // batch)
    pieces = write_pieces(tmp_path / "p.parquet", sizes)
    got = batches(TrainBatches(pieces, batch, steps, seed=0, epoch=0, rank=1))
    ids = row_ids(got)
    assert len(got) == steps and all(len(b[0]) == batch for b in got)
    assert sorted(ids[:rows]) == list(range(rows))  # the first pass sees each rating once
    counts = Counter(ids)
    assert set(counts) == set(range(rows)) and set(counts.values()) <= {2, 3}
    assert ids[rows:2 * rows] != ids[:rows]  # a second pass takes the blocks in a new order


@pytest.mark.parametrize("sizes,batch,steps", [
    ([130, 70, 45, 200], 64, 7),  # uneven row groups, a partial last batch filled by wrapping
    ([100, 100, 100, 100], 50, 8),  # exactly one pass
    ([30], 16, 5),  # more workers' runs than row groups, several passes
])
def test_two_loader_workers_yield_the_same_multiset(tmp_path: Path, sizes, batch,
                                                     steps) -> None:
    pieces = write_pieces(tmp_path / "p.parquet", sizes)
    dataset = TrainBatches(pieces, batch, steps, seed=1, epoch=2, rank=0)
    inline = batches(dataset, workers=0)
    workers = batches(dataset, workers=2)
    assert len(inline) == len(workers) == steps
    assert all(len(b[0]) == batch for b in workers)
    assert Counter(row_ids(inline)) == Counter(row_ids(workers))
    assert row_ids(workers) == row_ids(batches(dataset, workers=2))  # deterministic order


def test_prefetched_batches_arrive_in_order(tmp_path: Path) -> None:
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetched(iter([]), depth=3)) == []
    pieces = write_pieces(tmp_path / "p.parquet", [130, 70, 45, 200])
    dataset = TrainBatches(pieces, 64, 7, seed=1, epoch=2, rank=0)
    inline, ahead = batches(dataset), batches(dataset, prefetch=4)
    assert len(inline) == len(ahead) == 7
    for one, other in zip(inline, ahead):
        assert all(torch.equal(a, b) for a, b in zip(one, other))


def test_an_error_while_prefetching_is_raised_at_its_batch() -> None:
    def failing():
        yield from range(3)
        raise ValueError("row group 7 is short")

    got = []
    with pytest.raises(ValueError, match="row group 7 is short"):
        for value in prefetched(failing(), depth=2):
            got.append(value)
    assert got == [0, 1, 2]


def test_a_consumer_that_stops_early_stops_the_thread() -> None:
    def endless():
        value = 0
        while True:
            yield value
            value += 1

    ahead = prefetched(endless(), depth=2)
    assert [next(ahead), next(ahead)] == [0, 1]
    ahead.close()  # what a for loop left by an exception does to the generator
    threads = [t for t in threading.enumerate() if t.name == "shardmf-batches"]
    for thread in threads:
        thread.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


def test_no_pieces_is_an_error() -> None:
    with pytest.raises(ValueError, match="no training row groups"):
        TrainBatches([], 8, 1, seed=0, epoch=0, rank=0)


def test_eval_batches_cover_rows_in_order(tmp_path: Path) -> None:
    pieces = write_pieces(tmp_path / "p.parquet", [10, 7])
    got = list(eval_batches(pieces, 4))
    assert [len(b[0]) for b in got] == [4, 4, 2, 4, 3]
    assert row_ids(got) == list(range(17))


@pytest.mark.parametrize("workers", [0, 2, 3])
def test_start_step_continues_the_same_sequence(tmp_path: Path, workers: int) -> None:
    """Resuming at step s yields exactly batches s.. of the uninterrupted epoch, also with
    loader workers (whose round robin is replayed, including exhausted workers)."""
    pieces = write_pieces(tmp_path / "p.parquet", [130, 70, 45, 200])
    full = batches(TrainBatches(pieces, 64, 8, seed=1, epoch=2, rank=0), workers)
    for start in range(0, 9):
        rest = batches(TrainBatches(pieces, 64, 8, seed=1, epoch=2, rank=0, start_step=start),
                       workers)
        assert row_ids(rest) == row_ids(full[start:]), start
    with pytest.raises(ValueError, match="start step 9 outside"):
        TrainBatches(pieces, 64, 8, seed=1, epoch=2, rank=0, start_step=9)
