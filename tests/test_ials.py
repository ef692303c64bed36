"""The iALS objective (trainer/ials.py) against brute force and autograd on tiny cases.

The reference is the loss written out over the full user x item score matrix in torch,
float64; ``ImplicitALS`` never forms that matrix (Gramians and compiled passes instead).
Checked: the loss itself, CG half-sweeps against exact solves of the normal equations, the
item gradient after an exact sweep, monotone half-sweeps, chunking, 2 gloo ranks (users
owned or replicated) against one process, and recovery of planted tastes.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SINGLE, spawn_ranks

from trainer.distributed import DistEnv
from trainer.ials import ImplicitALS, confidence

NUM_USERS, NUM_ITEMS, DIM = 14, 11, 5
ALPHA0, REG = 0.7, 0.05


def _pairs(seed: int = 0, density: float = 0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random observed pairs with rating-based confidence; user 0 and item 0 have none."""
    rng = np.random.default_rng(seed)
    observed = rng.random((NUM_USERS, NUM_ITEMS)) < density
    observed[0, :] = observed[:, 0] = False
    users, items = np.nonzero(observed)
    ratings = rng.integers(1, 6, size=len(users))
    return (users.astype(np.int64), items.astype(np.int64),
            confidence(ratings, interactions=False, threshold=4, liked_weight=2.0))


def _tables(seed: int = 0, num_users: int = NUM_USERS, num_items: int = NUM_ITEMS,
            dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_users, dim, generator=generator) * 0.3,
            torch.randn(num_items, dim, generator=generator) * 0.3)


def _chunks(users: np.ndarray, items: np.ndarray, weights: np.ndarray,
            size: int | None = None) -> Callable:
    size = size or max(len(users), 1)
    return lambda: ((users[k:k + size], items[k:k + size], weights[k:k + size])
                    for k in range(0, len(users), size))


def _model(user_table: torch.Tensor, item_table: torch.Tensor, pairs, *, cg_steps: int = 3,
           alpha0: float = ALPHA0, chunk_size: int | None = None) -> tuple[ImplicitALS, Callable]:
    model = ImplicitALS(user_table, item_table, alpha0=alpha0, cg_steps=cg_steps,
                        num_users=user_table.shape[0], users_owned=True, env=SINGLE)
    chunks = _chunks(*pairs, size=chunk_size)
    model.count(chunks)
    return model, chunks


def _reference_loss(user_table: torch.Tensor, item_table: torch.Tensor, pairs,
                    alpha0: float = ALPHA0, reg: float = REG) -> torch.Tensor:
    """The iALS loss over every (user, item) pair of the dense score matrix, float64."""
    users, items, weights = (torch.from_numpy(a) for a in pairs)
    w, h = user_table.double(), item_table.double()
    scores = w @ h.T
    observed = (weights.double() * (1 - scores[users, items]) ** 2).sum()
    user_counts = torch.bincount(users, minlength=len(w)).double()
    item_counts = torch.bincount(items, minlength=len(h)).double()
    return (observed + alpha0 * (scores ** 2).sum()
            + reg * ((user_counts + alpha0 * len(h)) * (w ** 2).sum(1)).sum()
            + reg * ((item_counts + alpha0 * len(w)) * (h ** 2).sum(1)).sum())


def _exact_rows(fixed: torch.Tensor, targets: np.ndarray, sources: np.ndarray,
                weights: np.ndarray, num_rows: int, num_other: int) -> torch.Tensor:
    """Each row's normal equations solved by torch.linalg.solve (float64)."""
    fixed = fixed.double()
    dim = fixed.shape[1]
    solved = torch.empty(num_rows, dim, dtype=torch.float64)
    for row in range(num_rows):
        mine = targets == row
        others, c = fixed[sources[mine]], torch.from_numpy(weights[mine]).double()
        matrix = (others.T * c) @ others + ALPHA0 * fixed.T @ fixed
        matrix += REG * (mine.sum() + ALPHA0 * num_other) * torch.eye(dim, dtype=torch.float64)
        solved[row] = torch.linalg.solve(matrix, others.T @ c)
    return solved


def test_loss_is_the_sum_over_every_pair() -> None:
    pairs = _pairs()
    users, items = _tables()
    model, chunks = _model(users, items, pairs)
    assert model.loss(chunks, REG) == pytest.approx(float(_reference_loss(users, items, pairs)),
                                                    rel=1e-6)


def test_a_half_sweep_of_d_cg_steps_solves_each_rows_normal_equations() -> None:
    pairs = _pairs()
    users, items = _tables()
    start_items = items.clone()
    model, chunks = _model(users, items, pairs, cg_steps=DIM)
    model.sweep(chunks, REG)
    # the user half-sweep used the starting items; the item half-sweep the new users
    torch.testing.assert_close(users.double(), _exact_rows(start_items, *pairs, NUM_USERS,
                                                           NUM_ITEMS), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(items.double(), _exact_rows(users, pairs[1], pairs[0], pairs[2],
                                                           NUM_ITEMS, NUM_USERS),
                               rtol=1e-4, atol=1e-6)
    assert users[0].abs().max() > 0  # a user without pairs still has a (Gramian) pull


def test_after_an_exact_sweep_the_item_gradient_vanishes() -> None:
    pairs = _pairs(seed=1)
    users, items = _tables(seed=1)
    model, chunks = _model(users, items, pairs, cg_steps=DIM)
    item_table = items.clone().requires_grad_()
    start_gradient, = torch.autograd.grad(_reference_loss(users, item_table, pairs), item_table)
    model.sweep(chunks, REG)
    user_table, item_table = users.clone().requires_grad_(), items.clone().requires_grad_()
    user_gradient, item_gradient = torch.autograd.grad(
        _reference_loss(user_table, item_table, pairs), (user_table, item_table))
    assert item_gradient.abs().max() < 1e-4 * start_gradient.abs().max()
    assert user_gradient.abs().max() > 1e-2 * start_gradient.abs().max()  # items moved since


@pytest.mark.parametrize("cg_steps", [1, 3])
def test_no_half_sweep_increases_the_loss(cg_steps: int) -> None:
    pairs = _pairs(seed=2)
    users, items = _tables(seed=2)
    model, chunks = _model(users, items, pairs, cg_steps=cg_steps)
    losses = [float(_reference_loss(users, items, pairs))]
    for _ in range(6):
        start_items = items.clone()
        model.sweep(chunks, REG)
        losses += [float(_reference_loss(users, start_items, pairs)),
                   float(_reference_loss(users, items, pairs))]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0.5 * losses[0]


def test_chunking_and_pair_order_do_not_change_the_result() -> None:
    pairs = _pairs(seed=3)
    order = np.random.default_rng(0).permutation(len(pairs[0]))
    shuffled = tuple(column[order] for column in pairs)
    results = []
    for chunk_pairs, chunk_size in ((pairs, None), (pairs, 7), (shuffled, 1), (shuffled, 13)):
        users, items = _tables(seed=3)
        model, chunks = _model(users, items, chunk_pairs, chunk_size=chunk_size)
        for _ in range(3):
            model.sweep(chunks, REG)
        results.append((users, items, model.loss(chunks, REG)))
    for users, items, loss in results[1:]:
        torch.testing.assert_close(users, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(items, results[0][1], rtol=1e-5, atol=1e-6)
        assert loss == pytest.approx(results[0][2], rel=1e-6)


def test_converged_and_empty_rows_never_divide_by_zero() -> None:
    """No regularisation and no all-pairs term: a user without pairs has A = 0 and b = 0,
    and a second exact sweep starts at converged rows (residual ~0)."""
    pairs = _pairs(seed=4)
    users, items = _tables(seed=4)
    users[0] = 0.0
    model, chunks = _model(users, items, pairs, cg_steps=DIM, alpha0=0.0)
    with np.errstate(all="raise"):
        for _ in range(2):
            model.sweep(chunks, 0.0)
    assert torch.isfinite(users).all() and torch.isfinite(items).all()
    assert users[0].abs().max() == 0


def test_a_rebuilt_model_resumes_bit_for_bit() -> None:
    """Tables and counts are the whole state: a model built afresh from the tables after
    one sweep (a resumed run) ends where an uninterrupted one does, to the bit."""
    pairs = _pairs(seed=7)
    users, items = _tables(seed=7)
    model, chunks = _model(users, items, pairs, chunk_size=6)
    for _ in range(2):
        model.sweep(chunks, REG)
    resumed_users, resumed_items = _tables(seed=7)
    first, chunks = _model(resumed_users, resumed_items, pairs, chunk_size=6)
    first.sweep(chunks, REG)
    resumed_users, resumed_items = resumed_users.clone(), resumed_items.clone()
    second, chunks = _model(resumed_users, resumed_items, pairs, chunk_size=6)
    second.sweep(chunks, REG)
    assert torch.equal(resumed_users, users) and torch.equal(resumed_items, items)


def test_importing_the_module_leaves_numba_unloaded() -> None:
    code = "import sys, trainer.ials; print('numba' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]


def _distributed_job(env: DistEnv, users_owned: bool, start: tuple, out: str) -> None:
    """Rank ``env.rank`` of 2: owned users are u % 2 == rank (local row u // 2) with all
    their pairs; replicated users hold every row and every other pair."""
    torch.set_num_threads(1)
    users, items, weights = _pairs(seed=5)
    if users_owned:
        mine = users % 2 == env.rank
        users, items, weights = users[mine] // 2, items[mine], weights[mine]
        user_table = start[0][env.rank::2].clone()
    else:
        users, items, weights = (a[env.rank::2] for a in (users, items, weights))
        user_table = start[0].clone()
    item_table = start[1].clone()
    model = ImplicitALS(user_table, item_table, alpha0=ALPHA0, cg_steps=3, num_users=NUM_USERS,
                        users_owned=users_owned, env=env)
    chunks = _chunks(users, items, weights, size=5)
    model.count(chunks)
    for _ in range(3):
        model.sweep(chunks, REG)
    np.savez(Path(out, f"rank-{env.rank}.npz"), users=user_table.numpy(),
             items=item_table.numpy(), loss=model.loss(chunks, REG))


@pytest.mark.distributed
@pytest.mark.parametrize("users_owned", [True, False], ids=["owned-users", "replicated-users"])
def test_two_ranks_give_the_tables_of_one_process(tmp_path: Path, users_owned: bool) -> None:
    start = _tables(seed=5)
    users, items = start[0].clone(), start[1].clone()
    model, chunks = _model(users, items, _pairs(seed=5))
    for _ in range(3):
        model.sweep(chunks, REG)
    spawn_ranks(_distributed_job, users_owned, start, str(tmp_path), folder=tmp_path / "job")
    ranks = [np.load(tmp_path / f"rank-{rank}.npz") for rank in range(2)]
    np.testing.assert_array_equal(ranks[0]["items"], ranks[1]["items"])  # bit for bit
    np.testing.assert_allclose(ranks[0]["items"], items.numpy(), rtol=1e-5, atol=1e-6)
    for rank, result in enumerate(ranks):
        expected_users = users.numpy()[rank::2] if users_owned else users.numpy()
        np.testing.assert_allclose(result["users"], expected_users, rtol=1e-5, atol=1e-6)
        assert float(result["loss"]) == pytest.approx(model.loss(chunks, REG), rel=1e-6)
    if not users_owned:
        np.testing.assert_array_equal(ranks[0]["users"], ranks[1]["users"])


def test_recovers_two_planted_tastes() -> None:
    """Users of taste A interact with half of items 0..9, taste B with half of 10..19: a
    few sweeps later every user's top unseen items are their own taste's."""
    rng = np.random.default_rng(6)
    num_users, num_items, taste_items = 40, 20, 10
    taste = np.arange(num_users) % 2
    users, items = [], []
    for user in range(num_users):
        chosen = rng.choice(taste_items, size=5, replace=False) + taste[user] * taste_items
        users += [user] * len(chosen)
        items += list(chosen)
    pairs = (np.array(users), np.array(items),
             confidence(np.ones(len(users)), interactions=True, threshold=None))
    user_table, item_table = _tables(seed=6, num_users=num_users, num_items=num_items, dim=8)
    user_table *= 0.1
    item_table *= 0.1
    model, chunks = _model(user_table, item_table, pairs, alpha0=1.0)
    for _ in range(5):
        model.sweep(chunks, REG)
    scores = (user_table @ item_table.T).numpy()
    scores[pairs[0], pairs[1]] = -np.inf  # seen items are not recommended
    top = np.argsort(-scores, axis=1)[:, :3]
    assert (top // taste_items == taste[:, None]).all()


def test_confidence_of_ratings_and_of_interaction_weights() -> None:
    liked = confidence(np.array([1.0, 3.5, 4.0, 5.0]), interactions=False, threshold=4,
                       liked_weight=2.0)
    assert liked.dtype == np.float32 and liked.tolist() == [1.0, 1.0, 3.0, 3.0]
    weighted = confidence(np.array([1.0, 0.0, 3.0, 100.0]), interactions=True, threshold=None)
    assert weighted.dtype == np.float32
    assert weighted[0] == 1.0  # a bare pair, as the defaults were measured
    assert weighted[1] == pytest.approx(1 - math.log(2))
    assert weighted[2] == pytest.approx(1 + math.log(2))
    assert weighted[1] < weighted[0] < weighted[2] < weighted[3]


@pytest.mark.parametrize(("ratings", "options", "message"), [
    ([1.0, -2.0], {"interactions": True, "threshold": None}, "found -2"),
    ([1.0, math.nan], {"interactions": True, "threshold": None}, "found nan"),
    ([1.0], {"interactions": True, "threshold": 4}, "threshold=4"),
    ([4.0], {"interactions": False, "threshold": None}, "threshold=None"),
    ([4.0], {"interactions": False, "threshold": 4, "liked_weight": -1}, "liked_weight=-1"),
])
def test_confidence_refuses_bad_input(ratings, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        confidence(np.array(ratings), **options)


def test_refuses_tables_and_ids_that_do_not_fit() -> None:
    users, items = _tables()
    with pytest.raises(ValueError, match="num_users=20"):
        ImplicitALS(users, items, alpha0=1.0, cg_steps=3, num_users=20, users_owned=False,
                    env=SINGLE)
    with pytest.raises(ValueError, match="float32"):
        ImplicitALS(users.double(), items, alpha0=1.0, cg_steps=3, num_users=NUM_USERS,
                    users_owned=True, env=SINGLE)
    model = ImplicitALS(users, items, alpha0=1.0, cg_steps=3, num_users=NUM_USERS,
                        users_owned=True, env=SINGLE)
    with pytest.raises(RuntimeError, match="count"):
        model.sweep(_chunks(*_pairs()), REG)
    with pytest.raises(ValueError, match=f"item ids: ids from 0 to {NUM_ITEMS}"):
        model.count(_chunks(np.array([0, 1]), np.array([0, NUM_ITEMS]),
                            np.ones(2, np.float32)))
