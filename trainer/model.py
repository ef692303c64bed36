"""The biased matrix factorisation: a plain nn.Module one process can run.

It scores only the (user, item) pairs it is given; the user x item matrix is never built.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import ModelConfig


class BiasedMF(nn.Module):
    """r(u, i) = mean + b_u + b_i + <p_u, q_i>, with per-example L2 on the rows it touches.

    Args:
        num_users, num_items: table sizes, from the manifest (never from a rank's shards).
        global_mean: the training mean, fixed rather than learned.
        config: dimension, initialisation and regularisation.
        sparse: sparse gradients (rows touched only); gloo can all-reduce them, nccl cannot.
    """

    def __init__(self, num_users: int, num_items: int, global_mean: float,
                 config: ModelConfig, sparse: bool = True) -> None:
        super().__init__()
        self.config = config
        self.user_factors = nn.Embedding(num_users, config.dim, sparse=sparse)
        self.item_factors = nn.Embedding(num_items, config.dim, sparse=sparse)
        self.user_bias = nn.Embedding(num_users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(num_items, 1, sparse=sparse)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        nn.init.normal_(self.user_factors.weight, std=config.init_std)
        nn.init.normal_(self.item_factors.weight, std=config.init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """Predictions and each example's L2 penalty.

        Args:
            users, items: (B,) int64 contiguous ids.
        Returns:
            (B,) float32 predictions (unclamped) and (B,) float32 penalties.
        """
        p, q = self.user_factors(users), self.item_factors(items)
        b_u, b_i = self.user_bias(users)[:, 0], self.item_bias(items)[:, 0]
        prediction = self.global_mean + b_u + b_i + (p * q).sum(dim=1)
        penalty = (self.config.reg * ((p * p).sum(dim=1) + (q * q).sum(dim=1))
                   + self.config.bias_reg * (b_u * b_u + b_i * b_i))
        return prediction, penalty

    @torch.no_grad()
    def predict(self, users: torch.Tensor, items: torch.Tensor,
                scale: tuple[float, float]) -> torch.Tensor:
        """(B,) predictions clamped to the rating scale, as evaluation and users see them."""
        return self(users, items)[0].clamp_(scale[0], scale[1])
