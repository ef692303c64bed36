"""Single-process tests of the trainer: manifest checks, rank striding, batches, model, eval,
options and configs. Rank and world size are arguments, so "rank 1 of 2" is built here
without any process group; the real multi-process runs are in test_distributed.py."""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import threading
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from launch.options import add_config_arguments, apply_config_file
from launch.torchrun import TorchrunOptions
from launch.train_entry import build_parser
from launch.train_entry import main as trainer_main
from shardmf.errors import InputError
from trainer.baseline import bias_baseline_rmse
from trainer.checkpoint import load_trusted
from trainer.config import (
    TRAIN_CONFIGS,
    ClusterConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_from_values,
)
from trainer.data import (
    BLOCK_ROWS,
    RowGroupReader,
    TrainBatches,
    eval_batches,
    localise_users,
    prefetched,
    read_piece,
    steps_per_epoch,
    train_loader,
)
from trainer.distributed import DistEnv, TestFault
from trainer.model import BiasedMF, SquaredErrorWithL2
from trainer.optim import RowSGD
from trainer.ownership import resolve_user_embeddings, user_ownership
from trainer.shards import Piece, open_shards, pieces_for_rank
from trainer.train import evaluate, train

torch.set_num_threads(1)

SINGLE = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1,
                 device=torch.device("cpu"), backend=None)


# --- helpers ---------------------------------------------------------------------------


def copy_shards(shards_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the session's shards, safe to damage."""
    return Path(shutil.copytree(shards_dir, tmp_path / "shards"))


def edit_manifest(shards: Path, change) -> None:
    path = shards / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


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


# --- manifest verification -------------------------------------------------------------


def test_open_shards_reads_global_facts(trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir, "full")
    assert shards.num_users == 300 and shards.num_items == 150
    assert shards.scale == (1.0, 5.0)
    assert 1.0 < shards.train_mean < 5.0
    assert sum(p.rows for p in shards.pieces("train")) == shards.rows("train")
    assert len(shards.pieces("train")) > 4  # several row groups per shard


def test_missing_manifest_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    with pytest.raises(InputError, match=r"manifest\.json: not found.*unfinished"):
        open_shards(tmp_path / "shards")
    with pytest.raises(InputError, match=r"nowhere[/\\]manifest\.json: not found"):
        open_shards(tmp_path / "nowhere")


def test_bad_manifest_version(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m.update(format_version=99))
    with pytest.raises(InputError, match=r"manifest\.json: format version 99"):
        open_shards(shards)


def test_manifest_not_json(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    (shards / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match=r"manifest\.json: not valid JSON"):
        open_shards(shards)


def test_missing_shard_file(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    (shards / "train" / "part-00002.parquet").unlink()
    with pytest.raises(InputError, match=r"shard train/part-00002\.parquet: missing"):
        open_shards(shards)


def test_changed_byte_size(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    with (shards / "val" / "part-00001.parquet").open("ab") as handle:
        handle.write(b"extra")
    with pytest.raises(InputError, match=r"shard val/part-00001\.parquet: [\d,]+ bytes, "
                                         r"manifest says [\d,]+"):
        open_shards(shards)


def test_row_count_mismatch(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m["files"]["train"][1].update(
        rows=m["files"]["train"][1]["rows"] + 1))
    # The manifest no longer agrees with itself (rows against its row groups): named first.
    with pytest.raises(InputError, match=r"manifest\.json: train/part-00001\.parquet has "
                                         r"[\d,]+ rows but row groups of [\d,]+"):
        open_shards(shards)


def test_row_group_mismatch(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)

    def regroup(manifest: dict) -> None:
        groups = manifest["files"]["train"][0]["row_groups"]
        manifest["files"]["train"][0]["row_groups"] = [groups[0] + groups[1], *groups[2:]]

    edit_manifest(shards, regroup)
    with pytest.raises(InputError, match=r"shard train/part-00000\.parquet: row groups"):
        open_shards(shards)


def test_checksum_only_checked_in_full_mode(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    path = shards / "test" / "part-00003.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the data pages: same size, same footer
    path.write_bytes(bytes(data))
    open_shards(shards, "quick")
    open_shards(shards, "none")
    with pytest.raises(InputError, match=r"shard test/part-00003\.parquet: checksum"):
        open_shards(shards, "full")


def test_unknown_verify_mode(trainer_shards_dir: Path) -> None:
    with pytest.raises(InputError, match="--verify 'fast'"):
        open_shards(trainer_shards_dir, "fast")


def test_row_group_size_is_checked_when_reading(trainer_shards_dir: Path,
                                                tmp_path: Path) -> None:
    """With --verify none a wrong manifest is caught where a row group is read."""
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m["files"]["train"][0].update(
        row_groups=[1999, *m["files"]["train"][0]["row_groups"][1:]]))
    piece = open_shards(shards, "none").pieces("train")[0]
    with pytest.raises(ValueError, match=r"train/part-00000\.parquet: row group 0 has 2,000 "
                                         r"rows, manifest says 1,999"):
        read_piece(piece)


# --- row groups per rank ---------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 12])
def test_pieces_for_rank_cover_every_row_group_once(trainer_shards_dir: Path,
                                                    world_size: int) -> None:
    pieces = open_shards(trainer_shards_dir).pieces("train")
    shares = [pieces_for_rank(pieces, rank, world_size) for rank in range(world_size)]
    taken = Counter((p.path, p.row_group) for share in shares for p in share)
    assert sorted(taken) == sorted((p.path, p.row_group) for p in pieces)
    assert set(taken.values()) == {1}
    rows = [sum(p.rows for p in share) for share in shares]
    assert max(rows) - min(rows) <= max(p.rows for p in pieces)
    assert shares == [pieces_for_rank(pieces, rank, world_size) for rank in range(world_size)]


# --- users owned by rank (--partition-by user shards) -----------------------------------


def rank_env(rank: int, world_size: int, backend: str | None = "gloo") -> DistEnv:
    """Rank ``rank`` of ``world_size`` without a process group (ownership needs none)."""
    return DistEnv(rank, rank, world_size, world_size, torch.device("cpu"), backend)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_owned_users_cover_every_user_once_and_only_their_ratings(
        trainer_user_shards_dir: Path, world_size: int) -> None:
    shards = open_shards(trainer_user_shards_dir)
    owners = [user_ownership(shards, rank_env(r, world_size)) for r in range(world_size)]
    users = np.concatenate([o.users for o in owners])
    assert sorted(users.tolist()) == list(range(shards.num_users))
    assert sorted(n for o in owners for n in o.shards) == list(range(4))
    for owner in owners:
        assert np.array_equal(owner.local_rows[owner.users], np.arange(len(owner.users)))
        assert (owner.local_rows >= 0).sum() == len(owner.users)
        for split in ("train", "val", "test"):
            for piece in owner.pieces(shards, split):
                local = localise_users(read_piece(piece), piece, owner.local_rows)[0]
                assert local.min() >= 0 and local.max() < len(owner.users)
    rows = [sum(p.rows for p in o.pieces(shards, "train")) for o in owners]
    assert sum(rows) == shards.rows("train")


def test_user_embeddings_auto_and_its_errors(trainer_user_shards_dir: Path,
                                             trainer_shards_dir: Path) -> None:
    by_user = open_shards(trainer_user_shards_dir)
    random = open_shards(trainer_shards_dir)
    two = rank_env(0, 2)
    assert resolve_user_embeddings("auto", by_user, two, "auto") is not None
    assert resolve_user_embeddings("auto", by_user, two, "dense") is None
    assert resolve_user_embeddings("auto", by_user, rank_env(0, 1, None), "auto") is None
    assert resolve_user_embeddings("auto", random, two, "auto") is None
    assert resolve_user_embeddings("replicated", by_user, two, "auto") is None
    with pytest.raises(InputError, match="--partition-by user"):
        resolve_user_embeddings("owned", random, two, "auto")
    with pytest.raises(InputError, match="drop --gradients dense"):
        resolve_user_embeddings("owned", by_user, two, "dense")
    with pytest.raises(InputError, match="4 non-empty train shards for 5 ranks"):
        resolve_user_embeddings("owned", by_user, rank_env(0, 5), "auto")


def test_owned_users_need_numbered_shards(trainer_user_shards_dir: Path,
                                          tmp_path: Path) -> None:
    shards = copy_shards(trainer_user_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: [e.pop("shard") for e in m["files"]["train"]])
    with pytest.raises(InputError, match="prepare the shards again"):
        user_ownership(open_shards(shards), rank_env(0, 2))


def test_a_foreign_user_in_a_shard_is_an_error(trainer_user_shards_dir: Path) -> None:
    shards = open_shards(trainer_user_shards_dir)
    mine, theirs = (user_ownership(shards, rank_env(r, 2)) for r in (0, 1))
    piece = theirs.pieces(shards, "train")[0]
    with pytest.raises(ValueError, match="users of another rank's shard"):
        localise_users(read_piece(piece), piece, mine.local_rows)


def test_pieces_skip_empty_row_groups(trainer_shards_dir: Path, tmp_path: Path) -> None:
    shards = copy_shards(trainer_shards_dir, tmp_path)
    edit_manifest(shards, lambda m: m["files"]["val"][0].update(row_groups=[0]))
    assert len(open_shards(shards, "none").pieces("val")) == 3


# --- training batches ------------------------------------------------------------------


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


# --- the model -------------------------------------------------------------------------


def small_model(sparse: bool = True, **config) -> BiasedMF:
    torch.manual_seed(0)
    return BiasedMF(6, 4, 3.5, ModelConfig(**{"reg": 0.05, "dim": 3, **config}), sparse=sparse)


@pytest.mark.parametrize("size", [1, 5])
def test_forward_shapes(size: int) -> None:
    model = small_model()
    users = torch.zeros(size, dtype=torch.int64)
    items = torch.arange(size, dtype=torch.int64) % 4
    assert model(users, items, torch.full((size,), 3.0)).shape == ()
    assert model.score(users, items).shape == (size,)
    assert model.predict(users, items, (1.0, 5.0)).shape == (size,)


def test_score_and_loss_math() -> None:
    model = small_model(reg=0.1, bias_reg=0.01)
    with torch.no_grad():
        model.user_factors.weight[2] = torch.tensor([1.0, 2.0, 0.5])
        model.item_factors.weight[3] = torch.tensor([0.5, -1.0, 2.0])
        model.user_bias.weight[2] = 0.25
        model.item_bias.weight[3] = -0.5
    users, items = torch.tensor([2]), torch.tensor([3])
    dot = 0.5 - 2.0 + 1.0
    assert model.score(users, items).item() == pytest.approx(3.5 + 0.25 - 0.5 + dot)
    norms = (1 + 4 + 0.25) + (0.25 + 1 + 4)
    error = 3.5 + 0.25 - 0.5 + dot - 4.0
    assert model(users, items, torch.tensor([4.0])).item() == pytest.approx(
        error ** 2 + 0.1 * norms + 0.01 * (0.25 ** 2 + 0.5 ** 2))
    # predict clamps to the rating scale; score does not.
    with torch.no_grad():
        model.user_bias.weight[2] = 10.0
    assert model.score(users, items).item() > 5
    assert model.predict(users, items, (1.0, 5.0)).item() == 5.0


def reference_loss(model: BiasedMF, users: torch.Tensor, items: torch.Tensor,
                   ratings: torch.Tensor) -> torch.Tensor:
    """The objective written out for autograd to differentiate: what the fused node must match."""
    p, q = model.user_factors(users), model.item_factors(items)
    b_u, b_i = model.user_bias(users)[:, 0], model.item_bias(items)[:, 0]
    error = model.global_mean + b_u + b_i + (p * q).sum(1) - ratings
    return (error.square() + model.config.reg * ((p * p).sum(1) + (q * q).sum(1))
            + model.config.bias_reg * (b_u * b_u + b_i * b_i)).sum()


@pytest.mark.parametrize("sparse", [True, False])
def test_fused_loss_gradients_equal_autograd(sparse: bool) -> None:
    model = small_model(sparse=sparse, reg=0.3, bias_reg=0.2)
    with torch.no_grad():  # non-zero biases, so their gradient terms count
        model.user_bias.weight.normal_()
        model.item_bias.weight.normal_()
    users, items = torch.tensor([1, 4, 1, 0]), torch.tensor([0, 2, 0, 3])
    ratings = torch.tensor([4.0, 1.0, 5.0, 2.5])
    grads = []
    for loss_fn in (model, lambda u, i, r: reference_loss(model, u, i, r)):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(users, items, ratings)
        (loss * 1.7).backward()  # a non-unit upstream gradient, as DDP's scaling sends
        grads.append([p.grad.to_dense() for p in model.parameters()])
    for fused, reference in zip(*grads):
        torch.testing.assert_close(fused, reference)


def test_fused_loss_passes_gradcheck() -> None:
    def loss(p, q, b_u, b_i):
        return SquaredErrorWithL2.apply(p, q, b_u, b_i, ratings, torch.tensor(3.0), 0.3, 0.1)

    gen = torch.Generator().manual_seed(0)
    p, q = (torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(2))
    b_u, b_i = (torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
                for _ in range(2))
    ratings = torch.randn(5, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(loss, (p, q, b_u, b_i))


def test_sparse_gradients_touch_only_batch_rows() -> None:
    model = small_model(sparse=True)
    users, items = torch.tensor([1, 4, 1]), torch.tensor([0, 2, 0])
    model(users, items, torch.full((3,), 4.0)).backward()
    for table, touched in ((model.user_factors, {1, 4}), (model.user_bias, {1, 4}),
                           (model.item_factors, {0, 2}), (model.item_bias, {0, 2})):
        grad = table.weight.grad
        assert grad.is_sparse
        assert set(grad.coalesce().indices()[0].tolist()) == touched
    before = model.user_factors.weight.detach().clone()
    RowSGD(model.parameters(), lr=0.1).step()
    after = model.user_factors.weight.detach()
    assert torch.equal(before[[0, 2, 3, 5]], after[[0, 2, 3, 5]])
    assert not torch.equal(before[[1, 4]], after[[1, 4]])


@pytest.mark.parametrize("sparse", [True, False])
def test_row_sgd_equals_torch_sgd(sparse: bool) -> None:
    """Duplicate rows included: the scatter adds each occurrence, like a coalesced sum."""
    users, items = torch.tensor([1, 4, 1, 1]), torch.tensor([0, 2, 0, 3])
    ratings = torch.tensor([4.0, 1.0, 5.0, 2.0])
    states = []
    for optimizer_class in (RowSGD, torch.optim.SGD):
        model = small_model(sparse=sparse)
        optimizer = optimizer_class(model.parameters(), lr=0.05)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            model(users, items, ratings).backward()
            optimizer.step()
        states.append(model.state_dict())
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name])


def test_dense_gradients_are_zero_off_the_batch() -> None:
    """Per-example regularisation: untouched rows get no gradient (no dense weight decay)."""
    model = small_model(sparse=False, reg=1.0, bias_reg=1.0)
    model(torch.tensor([1]), torch.tensor([2]), torch.tensor([4.0])).backward()
    grad = model.user_factors.weight.grad
    assert not grad.is_sparse
    assert grad[1].abs().sum() > 0 and grad[[0, 2, 3, 4, 5]].abs().sum() == 0


# --- evaluation and the baseline -------------------------------------------------------


def test_evaluate_known_rmse_and_mae(tmp_path: Path) -> None:
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"user_id": pa.array([0, 1, 2, 3], pa.int64()),
                             "item_id": pa.array([0, 1, 0, 1], pa.int64()),
                             "rating": pa.array([1.0, 2.0, 4.0, 5.0], pa.float32())}), path)
    pieces = [Piece(path, 0, 4)]
    model = BiasedMF(4, 2, 3.0, ModelConfig(reg=0.05, dim=2))
    with torch.no_grad():
        model.user_factors.weight.zero_()  # predictions are exactly the global mean
    config = TrainConfig(eval_batch_size=3)  # two evaluation batches
    rmse, mae = evaluate(model, pieces, (1.0, 5.0), config, SINGLE)
    assert rmse == pytest.approx(math.sqrt((4 + 1 + 1 + 4) / 4))
    assert mae == pytest.approx(1.5)
    with torch.no_grad():
        model.global_mean.fill_(9.0)  # clamped to 5 stars before scoring
    rmse, mae = evaluate(model, pieces, (1.0, 5.0), config, SINGLE)
    assert rmse == pytest.approx(math.sqrt((16 + 9 + 1 + 0) / 4))
    assert mae == pytest.approx(2.0)
    assert evaluate(model, [], (1.0, 5.0), config, SINGLE) == (None, None)


def test_bias_baseline_beats_the_mean(trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir)
    mean = shards.train_mean
    ratings = np.concatenate([read_piece(p)[2] for p in shards.pieces("test")])
    mean_rmse = float(np.sqrt(np.mean((ratings - mean) ** 2)))
    baseline = bias_baseline_rmse(shards, SINGLE)
    assert baseline < mean_rmse


# --- the loop in one process -----------------------------------------------------------


SMALL = dict(batch_size=256, seed=0, threads=1, patience=0)


def run_train(shards: Path, run: Path, **options) -> dict:
    return train(shards, run, ModelConfig(dim=8, reg=0.02), OptimConfig(optimizer="sgd", lr=0.03),
                 TrainConfig(**{**SMALL, **options}), SINGLE)


def test_a_diverging_loss_is_one_clear_error(trainer_shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"non-finite by step \d+ of epoch 1; lower --lr "
                                         r"\(now 1e\+06\)"):
        train(trainer_shards_dir, tmp_path / "run", ModelConfig(reg=0.05, dim=8, init_std=1.0),
              OptimConfig(lr=1e6), TrainConfig(**SMALL, epochs=1), SINGLE)


def test_train_resume_equals_uninterrupted(trainer_shards_dir: Path, tmp_path: Path) -> None:
    straight = run_train(trainer_shards_dir, tmp_path / "straight", epochs=3)
    run_train(trainer_shards_dir, tmp_path / "resumed", epochs=1)
    resumed = run_train(trainer_shards_dir, tmp_path / "resumed", epochs=3, resume=True)
    assert resumed["test_rmse"] == straight["test_rmse"]
    assert resumed["epochs"] == 3
    history = [json.loads(line) for line in
               (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    straight_history = [json.loads(line) for line in
                        (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [h["val_rmse"] for h in history] == [h["val_rmse"] for h in straight_history]
    assert straight["test_rmse"] < 0.8 * straight["baseline_test_rmse"]


def test_resume_without_checkpoint(trainer_shards_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"--resume: .*checkpoint\.pt not found"):
        run_train(trainer_shards_dir, tmp_path / "run", epochs=1, resume=True)


def test_early_stopping_keeps_the_best_epoch(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """Patience 1 without lr decay: validation RMSE turns up after a few epochs (epoch 5 of
    this data and seed), training stops one epoch later and the model kept is the best."""
    run = tmp_path / "run"
    metrics = train(trainer_shards_dir, run, ModelConfig(dim=8, reg=0.02),
                    OptimConfig(optimizer="sgd", lr=0.03, lr_decay=1.0),
                    TrainConfig(**{**SMALL, "patience": 1}, epochs=8), SINGLE)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = min(history, key=lambda h: h["val_rmse"])
    assert metrics["best_epoch"] == best["epoch"] < metrics["epochs"] == len(history) < 8
    assert metrics["epochs"] == best["epoch"] + 1
    assert metrics["val_rmse"] == best["val_rmse"]
    shards = open_shards(trainer_shards_dir)
    model = BiasedMF(shards.num_users, shards.num_items, shards.train_mean,
                     ModelConfig(reg=0.05, dim=8))
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True)["state_dict"])
    rmse, _ = evaluate(model, shards.pieces("val"), shards.scale, TrainConfig(), SINGLE)
    assert rmse == pytest.approx(best["val_rmse"], abs=1e-9)


def test_a_resumed_run_ends_on_the_best_weights_saved_once(trainer_shards_dir: Path,
                                                           tmp_path: Path) -> None:
    """Checkpointed right after its best epoch, a run holds those weights once (as the
    model); resumed, it never improves again and must end on exactly them."""
    configs = (ModelConfig(dim=8, reg=0.02), OptimConfig(optimizer="sgd", lr=0.03,
                                                         lr_decay=1.0))
    loop = {**SMALL, "patience": 1}
    straight = train(trainer_shards_dir, tmp_path / "straight", *configs,
                     TrainConfig(**loop, epochs=8), SINGLE)
    best = straight["best_epoch"]
    assert best < straight["epochs"]
    run = tmp_path / "resumed"
    train(trainer_shards_dir, run, *configs, TrainConfig(**loop, epochs=best), SINGLE)
    saved = load_trusted(run / "checkpoint.pt")
    assert saved["best_is_model"] and saved["best_model"] is None
    resumed = train(trainer_shards_dir, run, *configs,
                    TrainConfig(**loop, epochs=8, resume=True), SINGLE)
    assert resumed["best_epoch"] == best and resumed["test_rmse"] == straight["test_rmse"]


# --- options and configs ---------------------------------------------------------------


ALL_CONFIGS = (*TRAIN_CONFIGS, ClusterConfig, TorchrunOptions)


@pytest.mark.parametrize("cls", ALL_CONFIGS)
def test_every_field_has_help_and_a_flag(cls) -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    for item in fields(cls):
        assert item.metadata.get("help"), f"{cls.__name__}.{item.name} has no help"
        action = next(a for a in parser._actions if a.dest == item.name)
        assert action.option_strings[0] == "--" + item.name.replace("_", "-")
        assert action.help.startswith(item.metadata["help"].replace("%", "%%"))
        assert "(default:" in action.help and "(default: None)" not in action.help
        assert action.default is argparse.SUPPRESS  # the dataclass owns defaults
        if "choices" in item.metadata:
            assert item.default in item.metadata["choices"]
            assert tuple(action.choices) == item.metadata["choices"]


def test_flags_parse_into_configs() -> None:
    values = vars(build_parser().parse_args(
        ["S", "--out", "R", "--dim", "8", "--lr", "0.1", "--resume", "--no-resume",
         "--verify", "full", "--clusters", "3"]))
    assert values["dim"] == 8 and values["lr"] == 0.1 and values["resume"] is False
    assert "epochs" not in values  # not given: the dataclass default applies
    assert config_from_values(ModelConfig, values) == ModelConfig(dim=8)
    assert config_from_values(TrainConfig, values).verify == "full"


def test_toml_below_flags(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text('epochs = 7\nlr = 0.1\nbatch-size = 64\noptimizer = "adagrad"\n'
                      'resume = true\n')
    parsed = vars(build_parser().parse_args(
        ["S", "--out", "R", "--config", str(config), "--epochs", "3", "--no-resume"]))
    values = apply_config_file(parsed, TRAIN_CONFIGS)
    train_config = config_from_values(TrainConfig, values)
    assert train_config.epochs == 3  # flag wins
    assert train_config.batch_size == 64  # kebab-case key from the file
    assert train_config.resume is False  # a negated flag wins too
    assert config_from_values(OptimConfig, values) == OptimConfig(optimizer="adagrad", lr=0.1)


@pytest.mark.parametrize("text,message", [
    ("epochz = 3\n", r"unknown key 'epochz'; known keys are .*epochs"),
    ("epochs = \n", "not valid TOML"),
    ('epochs = "3"\n', r"epochs = '3' is not a valid int"),
    ("epochs = 2.5\n", r"epochs = 2.5 is not a valid int"),
    ("resume = 1\n", r"resume = 1 is not a valid bool"),
])
def test_bad_toml(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(InputError, match=rf"--config .*bad\.toml: {message}"):
        apply_config_file({"config": str(config)}, TRAIN_CONFIGS)


def test_missing_toml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        apply_config_file({"config": str(tmp_path / "none.toml")}, TRAIN_CONFIGS)


def test_entry_point_reports_bad_config_in_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("epochz = 3\n")
    assert trainer_main(["S", "--out", str(tmp_path / "r"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardmf: error: --config")


def test_entry_point_error_lines_per_rank(capsys) -> None:
    """An InputError is the same on every rank: only rank 0 prints it. Another ValueError may
    be one rank's alone (a damaged row group), so that rank prints it, naming itself."""
    from launch.train_entry import _fail

    assert _fail(InputError("bad flag"), rank=1) == 2
    assert capsys.readouterr().err == ""
    assert _fail(InputError("bad flag"), rank=0) == 2
    assert capsys.readouterr().err == "shardmf: error: bad flag\n"
    assert _fail(ValueError("row group 3 unreadable"), rank=1) == 2
    assert capsys.readouterr().err == "shardmf: error: rank 1: row group 3 unreadable\n"


@pytest.mark.parametrize("build,message", [
    (lambda: ModelConfig(reg=0.05, dim=0), "--dim 0: expected at least 1"),
    (lambda: ModelConfig(reg=-1.0), "--reg -1.0: expected >= 0"),
    (lambda: OptimConfig(optimizer="rmsprop"), "--optimizer 'rmsprop': expected sgd"),
    (lambda: OptimConfig(lr=0.0), "--lr 0.0: expected a finite number > 0"),
    (lambda: OptimConfig(lr=float("inf")), "--lr inf: expected a finite number > 0"),
    (lambda: OptimConfig(lr=float("nan")), "--lr nan: expected a finite number > 0"),
    (lambda: OptimConfig(lr_decay=1.5), "--lr-decay 1.5: expected 0 < x <= 1"),
    (lambda: TrainConfig(epochs=0), "--epochs 0: expected at least 1"),
    (lambda: TrainConfig(batch_size=0), "--batch-size 0"),
    (lambda: TrainConfig(device="tpu"), "--device 'tpu'"),
    (lambda: TrainConfig(verify="some"), "--verify 'some'"),
    (lambda: TrainConfig(timeout_s=5), "--timeout-s 5: expected at least 10"),
    (lambda: ClusterConfig(clusters=1), "--clusters 1: expected at least 2"),
    (lambda: TorchrunOptions(nproc=0), "--nproc 0"),
    (lambda: TorchrunOptions(nnodes=2), "--nnodes 2 needs --rdzv-endpoint"),
])
def test_config_validation(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_pieces_for_rank_balance_rows_not_counts() -> None:
    pieces = [Piece(Path(f"part-{i}"), 0, rows) for i, rows in enumerate([4000, 1000, 1000,
                                                                          1000, 1000])]
    shares = [pieces_for_rank(pieces, rank, 2) for rank in range(2)]
    assert [sum(p.rows for p in share) for share in shares] == [4000, 4000]


# --- mid-epoch checkpoints and the test-only fault hook --------------------------------


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


def test_mid_epoch_resume_equals_uninterrupted(trainer_shards_dir: Path,
                                               tmp_path: Path) -> None:
    """Crash 7 steps into epoch 2, with a checkpoint every 5 steps: the resumed run redoes
    the steps after the last checkpoint and ends with the same figures."""
    straight = run_train(trainer_shards_dir, tmp_path / "straight", epochs=2)
    steps = json.loads((tmp_path / "straight" / "config.json").read_text())["steps_per_epoch"]
    crashing = DistEnv(**{**SINGLE.__dict__, "test_fault": TestFault("raise", 0, steps + 7)})
    run = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match=f"injected failure on rank 0 before step {steps + 7}"):
        train(trainer_shards_dir, run, ModelConfig(dim=8, reg=0.02),
              OptimConfig(optimizer="sgd", lr=0.03),
              TrainConfig(**SMALL, epochs=2, checkpoint_every=5), crashing)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == 1 and 1 <= saved["step"] <= 6
    assert (steps + saved["step"]) % 5 == 0
    assert len(saved["history"]) == 1 and len(saved["loss_sums"]) == 1
    resumed = run_train(trainer_shards_dir, run, epochs=2, resume=True, checkpoint_every=5)
    assert without_measured(resumed) == without_measured(straight)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    straight_lines = [json.loads(x) for x in
                      (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "train_loss", "val_rmse", "val_mae", "lr"):
        assert [h[key] for h in lines] == [h[key] for h in straight_lines], key


def without_measured(metrics: dict) -> dict:
    """Final metrics less what is measured, not computed: times and each rank's peak RSS."""
    kept = {k: v for k, v in metrics.items() if k not in ("train_seconds", "train_ratings_per_s")}
    kept["ranks"] = [{k: v for k, v in rank.items() if k != "peak_rss_bytes"}
                     for rank in metrics["ranks"]]
    return kept


def test_mid_epoch_checkpoint_refuses_another_shape(trainer_shards_dir: Path,
                                                    tmp_path: Path) -> None:
    crashing = DistEnv(**{**SINGLE.__dict__, "test_fault": TestFault("raise", 0, 10)})
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train(trainer_shards_dir, run, ModelConfig(dim=8, reg=0.02),
              OptimConfig(optimizer="sgd", lr=0.03),
              TrainConfig(**SMALL, epochs=1, checkpoint_every=4), crashing)
    with pytest.raises(InputError, match=r"written mid-epoch by a run with 1 rank\(s\), 256 "
                                         r"ratings .* this run has 1 rank\(s\), 512"):
        run_train(trainer_shards_dir, run, epochs=1, resume=True, batch_size=512)


def test_fresh_run_removes_a_stale_checkpoint(trainer_shards_dir: Path, tmp_path: Path) -> None:
    """So that a torchrun restart before this run's first checkpoint cannot resume another."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"an older run's")
    crashing = DistEnv(**{**SINGLE.__dict__, "test_fault": TestFault("raise", 0, 1)})
    with pytest.raises(RuntimeError, match="injected"):
        train(trainer_shards_dir, run, ModelConfig(reg=0.05, dim=8), OptimConfig(),
              TrainConfig(**SMALL, epochs=1), crashing)
    assert not (run / "checkpoint.pt").exists()


@pytest.mark.parametrize("text", ["kill:1", "boom:1:3", "kill:x:3", "raise:0:0"])
def test_test_fault_spec_is_checked(text: str) -> None:
    with pytest.raises(InputError, match="SHARDMF_TEST_FAULT"):
        TestFault.parse(text)
    assert TestFault.parse("kill:1:40") == TestFault("kill", 1, 40)


def test_checkpoint_every_validation() -> None:
    with pytest.raises(ValueError, match="--checkpoint-every -1: expected >= 0"):
        TrainConfig(checkpoint_every=-1)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_sets_glibc_thresholds() -> None:
    """The allocator setting must take where glibc runs (it is worth 30-45 % of a step)."""
    from trainer.distributed import keep_freed_memory

    assert keep_freed_memory() is True


def test_gradients_auto(trainer_shards_dir: Path) -> None:
    from trainer.steps import use_sparse_gradients

    shards = open_shards(trainer_shards_dir)  # 450 rows in all: small next to 1,024 a step
    two = rank_env(0, 2)
    assert use_sparse_gradients("auto", shards, 1024, two) is False
    assert use_sparse_gradients("auto", shards, 64, two) is True
    assert use_sparse_gradients("auto", shards, 1024, two, sync_every=4) is True
    assert use_sparse_gradients("auto", shards, 1024, rank_env(0, 1, None)) is True
    assert use_sparse_gradients("auto", shards, 64, rank_env(0, 2, "nccl")) is False
    with pytest.raises(InputError, match="--gradients sparse needs gloo"):
        use_sparse_gradients("sparse", shards, 64, rank_env(0, 2, "nccl"))
