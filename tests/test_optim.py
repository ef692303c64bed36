"""trainer/optim.py: the per-row optimizers against torch's own."""

from __future__ import annotations

import pytest
import torch
from helpers import small_model

from trainer.optim import RowSGD


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
