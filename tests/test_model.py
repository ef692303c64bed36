"""trainer/model.py: the biased MF module: shapes, the loss, the fused loss node against
autograd, and which rows sparse and dense gradients touch."""

from __future__ import annotations

import pytest
import torch
from helpers import small_model

from trainer.config import ModelConfig
from trainer.model import BiasedMF, SquaredErrorWithL2
from trainer.optim import RowSGD


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
        return SquaredErrorWithL2.apply(p, q, b_u, b_i, ratings, torch.tensor(3.0), 0.3, 0.1,
                                        1.0)

    gen = torch.Generator().manual_seed(0)
    p, q = (torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
            for _ in range(2))
    b_u, b_i = (torch.randn(5, dtype=torch.float64, generator=gen, requires_grad=True)
                for _ in range(2))
    ratings = torch.randn(5, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(loss, (p, q, b_u, b_i))


@pytest.mark.parametrize("step", ["autograd", "fused"])
def test_a_rating_unit_is_sgd_on_standardised_ratings(step: str) -> None:
    """Training on ratings with unit s moves the tables exactly as training a unit-1 model on
    (r - mean) / s would, scaled back: factors by sqrt(s), biases by s."""
    from trainer.fused_step import FusedSGDStep, load_fused_kernel

    unit, mean, lr = 2.5, 1.0, 0.02
    config = ModelConfig(dim=3, reg=0.05, bias_reg=0.01, init_std=0.3)
    torch.manual_seed(0)
    scaled = BiasedMF(6, 5, mean, config, rating_unit=unit)
    torch.manual_seed(0)
    standard = BiasedMF(6, 5, 0.0, config)
    with torch.no_grad():  # same draws, sqrt(unit) wider: as the unit promises
        torch.testing.assert_close(scaled.user_factors.weight,
                                   standard.user_factors.weight * unit ** 0.5)
        for model, factor in ((scaled, unit), (standard, 1.0)):
            model.user_bias.weight.copy_(torch.linspace(-1, 1, 6)[:, None] * factor)
    users, items = torch.tensor([0, 1, 1, 4, 5, 0]), torch.tensor([0, 2, 3, 2, 4, 1])
    ratings = torch.tensor([-9.0, 4.0, 7.5, 10.0, -2.0, 0.5])
    for model, targets in ((scaled, ratings), (standard, (ratings - mean) / unit)):
        optimizer = RowSGD(model.parameters(), lr=lr)
        for _ in range(5):
            if step == "fused":
                FusedSGDStep(model, optimizer, load_fused_kernel(), 2)(users, items, targets, 0.0)
            else:
                optimizer.zero_grad(set_to_none=True)
                model(users, items, targets).backward()
                optimizer.step()
    for name in ("user_factors", "item_factors"):
        torch.testing.assert_close(getattr(scaled, name).weight,
                                   getattr(standard, name).weight * unit ** 0.5)
    for name in ("user_bias", "item_bias"):
        torch.testing.assert_close(getattr(scaled, name).weight,
                                   getattr(standard, name).weight * unit)
    with torch.no_grad():
        torch.testing.assert_close(scaled.score(users, items),
                                   mean + unit * standard.score(users, items))


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


def test_dense_gradients_are_zero_off_the_batch() -> None:
    """Per-example regularisation: untouched rows get no gradient (no dense weight decay)."""
    model = small_model(sparse=False, reg=1.0, bias_reg=1.0)
    model(torch.tensor([1]), torch.tensor([2]), torch.tensor([4.0])).backward()
    grad = model.user_factors.weight.grad
    assert not grad.is_sparse
    assert grad[1].abs().sum() > 0 and grad[[0, 2, 3, 4, 5]].abs().sum() == 0
