"""Stream a rank's own row groups as whole-tensor batches.

A batch is cut from Arrow arrays converted once per row group, never built row by row.
Every epoch yields exactly ``steps`` batches on every rank: a rank with fewer ratings wraps
around its row groups (blocks reordered), so uneven shards cannot make one rank wait forever.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Generator, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainer.run_files import USERS
from trainer.shards import Piece

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (B,) users, (B,) items, (B,) ratings
COLUMNS = ["user_id", "item_id", "rating"]
BATCHES_PER_ITEM = 64  # batches a DataLoader item carries when the loader has no workers
BLOCK_ROWS = 1024  # rows per block of a row group whose order an epoch shuffles
ROW_SHUFFLE_STREAM = 1  # spawn key of the seeded streams that shuffle a row group once


def read_piece(piece: Piece) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row group as (int64 users, int64 items, float32 ratings).

    Pages are verified against the Parquet page checksums prepare writes (files without
    them read as before), so a damaged byte fails here instead of training on it.
    """
    try:
        table = pq.ParquetFile(piece.path, page_checksum_verification=True).read_row_group(
            piece.row_group, columns=COLUMNS)
    except (pa.ArrowException, OSError) as e:
        # A ValueError, not an InputError: only the rank reading this row group sees it.
        raise ValueError(f"shard {piece.path.parent.name}/{piece.path.name}: row group "
                         f"{piece.row_group} is damaged ({str(e).splitlines()[0]}); restore "
                         "the file or prepare the shards again") from e
    if table.num_rows != piece.rows:  # possible only with --verify none
        # A ValueError, not an InputError: only the rank reading this row group sees it.
        raise ValueError(f"shard {piece.path.parent.name}/{piece.path.name}: row group "
                         f"{piece.row_group} has {table.num_rows:,} rows, manifest says "
                         f"{piece.rows:,}")
    return (table.column(0).to_numpy().astype(np.int64),
            table.column(1).to_numpy().astype(np.int64),
            table.column(2).to_numpy().astype(np.float32))


def localise_users(columns: tuple[np.ndarray, ...], piece: Piece,
                   local_rows: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """Global user ids to this rank's rows of owned users (trainer/ownership.py); as is if None."""
    if local_rows is None:
        return columns
    users = local_rows[columns[0]]
    if len(users) and users.min() < 0:
        raise ValueError(f"shard {piece.path.parent.name}/{piece.path.name}: row group "
                         f"{piece.row_group} holds users of another rank's shard; the "
                         f"{USERS} shard column does not match the files (prepare again)")
    return (users.astype(np.int64), *columns[1:])


class RowGroupReader:
    """A rank's row groups as localised columns, decoded once and kept up to a byte budget.

    Reading a row group again every epoch (Parquet decoding, page checksums, id
    localisation) would cost a large share of the training steps (bench/train_throughput.md);
    kept decoded (and, for training, shuffled once), an epoch only reorders blocks of
    them. Row groups beyond the budget are read every time, so a rank's memory stays
    bounded whatever the number of ratings.
    Thread-safe for one loader thread beside the loop (dict updates hold the GIL).

    Args:
        local_rows: owned users' global id -> local row (trainer/ownership.py), or None.
        budget_bytes: decoded bytes kept at most (0: read every time).
    """

    def __init__(self, local_rows: np.ndarray | None = None, budget_bytes: int = 0) -> None:
        self.local_rows, self.budget_bytes = local_rows, budget_bytes
        # (file, row group, shuffle key or None) -> columns
        self.kept: dict[tuple[str, int, tuple[int, ...] | None], tuple[np.ndarray, ...]] = {}
        self.kept_bytes = 0

    def __call__(self, piece: Piece, shuffle: tuple[int, ...] | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The row group's columns, in file order or with ``shuffle`` rows permuted by the
        seeded stream of that key (the same permutation whether kept or read again)."""
        key = (str(piece.path), piece.row_group, shuffle)
        columns = self.kept.get(key)
        if columns is None:
            columns = localise_users(read_piece(piece), piece, self.local_rows)
            if shuffle is not None:
                rows = np.random.default_rng(np.random.SeedSequence(
                    list(shuffle), spawn_key=(ROW_SHUFFLE_STREAM,))).permutation(piece.rows)
                columns = tuple(c[rows] for c in columns)
            size = sum(c.nbytes for c in columns)
            if self.kept_bytes + size <= self.budget_bytes:
                self.kept[key] = columns
                self.kept_bytes += size
        return columns


def steps_per_epoch(pieces: list[Piece], batch_size: int) -> int:
    """Batches needed for a rank to see each of its ratings once."""
    rows = sum(p.rows for p in pieces)
    return -(-rows // batch_size)


class TrainBatches(IterableDataset):
    """One epoch of one rank's training batches, shuffled by (seed, epoch, rank).

    Row groups are visited in a seeded random order, wrapping around until ``steps``
    batches are cut. A row group's rows are permuted once per run, by (seed, rank, row
    group), and each visit takes its blocks of BLOCK_ROWS rows in its own seeded order:
    the stream is shuffled anew every epoch, yet a kept row group is only sliced, never
    permuted and gathered row by row again (LIBMF too shuffles once and reorders blocks;
    what that saves, at the RMSE of a full shuffle every visit: bench/train_throughput.md).
    That plan is a function of (seed, epoch, rank) alone: with ``num_workers`` > 0 every
    DataLoader worker cuts its own contiguous run of the same batches, reading only the row
    groups that run covers, so workers yield exactly the batches of a single-process loader
    (each rating once per pass), in the DataLoader's deterministic round-robin order.

    An item is one batch, or with ``batches_per_item`` k > 1 up to k consecutive batches
    laid end to end, which a step takes at once (trainer/steps.py): the DataLoader's own
    cost per item is then paid once per k steps. Only a loader without workers may use
    k > 1, whose items are not taken round robin.

    ``start_step`` resumes an epoch mid-way: batches ``start_step..steps-1`` of the same plan
    are cut from row ``start_step * batch_size`` of the epoch's stream, so a run resumed from
    a mid-epoch checkpoint neither repeats nor skips a batch.
    """

    def __init__(self, pieces: list[Piece], batch_size: int, steps: int, seed: int,
                 epoch: int, rank: int, start_step: int = 0,
                 reader: RowGroupReader | None = None, batches_per_item: int = 1) -> None:
        if not pieces:
            raise ValueError("a rank has no training row groups")
        if not 0 <= start_step <= steps:
            raise ValueError(f"start step {start_step} outside the epoch's 0..{steps} steps")
        self.pieces, self.batch_size, self.steps = pieces, batch_size, steps
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.start_step = start_step
        self.reader = reader or RowGroupReader()
        self.batches_per_item = batches_per_item

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        first, last = self.worker_runs(workers)[worker]
        return self._batches(first * self.batch_size, last * self.batch_size)

    def grouped(self, batches_per_item: int) -> TrainBatches:
        """The same epoch, handed over ``batches_per_item`` batches at a time."""
        twin = copy.copy(self)
        twin.batches_per_item = batches_per_item
        return twin

    def worker_runs(self, workers: int) -> list[tuple[int, int]]:
        """The [first, last) plan steps each DataLoader worker yields, after ``start_step``.

        An epoch gives worker w the contiguous run ``steps * w // W .. steps * (w+1) // W``,
        and the DataLoader takes one batch from each worker in turn, skipping a worker once
        it is exhausted. A resumed epoch replays that round robin for the ``start_step``
        batches already consumed, then rotates the workers so the one whose turn is next
        comes first: the resumed loader yields what the uninterrupted one still had to.
        """
        bounds = [(self.steps * w // workers, self.steps * (w + 1) // workers)
                  for w in range(workers)]
        position = [first for first, _ in bounds]
        turn = 0
        for _ in range(self.start_step):
            while position[turn] >= bounds[turn][1]:  # exhausted: its turn yields nothing
                turn = (turn + 1) % workers
            position[turn] += 1
            turn = (turn + 1) % workers
        order = [(turn + w) % workers for w in range(workers)]
        return [(position[w], bounds[w][1]) for w in order]

    def _batches(self, start: int, stop: int) -> Iterator[Batch]:
        """Batches cut from rows [start, stop) of the epoch's stream (multiples of the batch)."""
        order = np.random.default_rng([self.seed, self.epoch, self.rank]).permutation(
            len(self.pieces))
        pending: list[tuple[np.ndarray, ...]] = []
        buffered = 0
        offset = 0  # stream position of the current visit's first row
        visit = 0
        while offset < stop:
            index = order[visit % len(order)]
            piece = self.pieces[index]
            end = offset + piece.rows
            if end > start:  # rows before this worker's run are skipped without reading
                columns = self.reader(piece, shuffle=(self.seed, self.rank, int(index)))
                blocks = np.random.default_rng([self.seed, self.epoch, self.rank, visit]
                                               ).permutation(-(-piece.rows // BLOCK_ROWS))
                position = offset  # stream position of the next block's first row
                for first in blocks * BLOCK_ROWS:
                    size = min(BLOCK_ROWS, piece.rows - first)
                    lo = first + max(start - position, 0)
                    hi = first + min(stop - position, size)
                    if lo < hi:
                        pending.append(tuple(c[lo:hi] for c in columns))
                        buffered += hi - lo
                    position += size
                if buffered >= self.batch_size:
                    merged = [np.concatenate(parts) for parts in zip(*pending)]
                    used = (buffered // self.batch_size) * self.batch_size
                    item = self.batch_size * self.batches_per_item
                    for cut in range(0, used, item):
                        end_cut = min(cut + item, used)
                        yield tuple(torch.from_numpy(c[cut:end_cut]) for c in merged)
                    pending = [tuple(c[used:] for c in merged)]
                    buffered -= used
            offset = end
            visit += 1


def train_loader(dataset: TrainBatches, workers: int, pin_memory: bool,
                 prefetch: int) -> Generator[Batch, None, None]:
    """The epoch's batches as runs of consecutive batches laid end to end, which a step
    takes at once (trainer/steps.py); batches are whole tensors already, so the DataLoader
    only moves them (batch_size=None).

    Without worker processes a run is BATCHES_PER_ITEM batches, so the DataLoader's per-item
    cost and a step call's are paid once per run, not once per batch of a fused step
    (bench/train_throughput.md). ``prefetch`` > 0 then cuts that many runs ahead in a
    thread: reading a row group (and its one shuffle) and cutting runs go on beside the
    steps (the fused kernel and torch's ops release the GIL), on a core the rank would
    leave idle, instead of between them. Worker processes hand over one batch at a time,
    round robin. Close the generator returned (``contextlib.closing``) when stopping early:
    its prefetch thread is stopped and joined then, not at interpreter exit, where a thread
    still inside pyarrow aborts the process (``PyGILState_Release``) after a Ctrl-C.
    """
    if not workers:
        dataset = dataset.grouped(BATCHES_PER_ITEM)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=False)
    if workers or not prefetch:
        yield from loader
    else:
        yield from prefetched(iter(loader), prefetch)


def prefetched(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """``batches`` produced by a background thread, at most ``depth`` ahead, in order.

    An error in the thread is raised here, at the batch where it happened; a consumer
    that stops early (an exception, a closed generator) makes the thread stop, and waits
    for it: no thread of this run may outlive it into interpreter shutdown.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def offer(item: tuple) -> bool:
        """Queue ``item`` unless the consumer has stopped; False once it has."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer((batch, None)):
                    return
            offer((end, None))
        except BaseException as error:  # noqa: BLE001 (re-raised by the consumer)
            offer((None, error))

    thread = threading.Thread(target=produce, name="shardmf-batches", daemon=True)
    thread.start()
    try:
        while True:
            batch, error = ready.get()
            if error is not None:
                raise error
            if batch is end:
                return
            yield batch
    finally:
        stop.set()
        thread.join()


def eval_batches(pieces: list[Piece], batch_size: int,
                 reader: RowGroupReader | None = None) -> Iterator[Batch]:
    """A rank's share of val or test rows in file order, in large batches."""
    reader = reader or RowGroupReader()
    for piece in pieces:
        users, items, ratings = reader(piece)
        for start in range(0, len(users), batch_size):
            stop = start + batch_size
            yield (torch.from_numpy(users[start:stop]), torch.from_numpy(items[start:stop]),
                   torch.from_numpy(ratings[start:stop]))
