"""The biased matrix factorisation: a plain nn.Module one process can run.

It scores only the (user, item) pairs it is given; the user x item matrix is never built.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import ModelConfig


class BiasedMF(nn.Module):
    """r(u, i) = mean + b_u + b_i + <p_u, q_i>, with per-example L2 on the rows it touches.

    ``forward`` is the training objective (a summed loss, for ``loss.backward()``);
    ``score`` and ``predict`` are what evaluation and users call.

    The tables hold the user's scale, but training moves them as if the ratings had been
    divided by ``rating_unit`` (their standard deviation): factors start ``sqrt(unit)``
    wider, their L2 weight is ``reg * unit`` and their gradient is divided by ``unit``,
    which is exactly SGD on standardised ratings, undone. So one learning rate and one L2
    weight suit a 0.5..4 scale and a -10..10 one alike (bench/scales.md).

    Args:
        num_users, num_items: table sizes: the manifest's, or the users one rank owns.
        global_mean: the training mean, fixed rather than learned.
        config: dimension, initialisation and regularisation.
        sparse: sparse gradients (rows touched only); gloo can all-reduce them, nccl cannot.
        rating_unit: the training ratings' standard deviation (1: the scale as given).
    """

    def __init__(self, num_users: int, num_items: int, global_mean: float,
                 config: ModelConfig, sparse: bool = True, rating_unit: float = 1.0) -> None:
        super().__init__()
        if config.dim is None or config.reg is None:
            raise ValueError("ModelConfig.dim and .reg must be set: resolve the automatic "
                             "ones first (trainer.defaults.resolve_defaults)")
        if not 0 < rating_unit < math.inf:
            raise ValueError(f"rating_unit={rating_unit!r}: expected a finite number > 0")
        self.config = config
        self.rating_unit = float(rating_unit)
        self.factor_reg = config.reg * self.rating_unit  # the L2 weight in the user's scale
        init_std = config.init_std * math.sqrt(self.rating_unit)
        # Items and users draw from generators of their own, seeded from the global RNG
        # before any table exists: ranks that own different numbers of users still start
        # with the same item table.
        seed = int(torch.randint(2**62, ()))
        self.user_factors = nn.Embedding(num_users, config.dim, sparse=sparse)
        self.item_factors = nn.Embedding(num_items, config.dim, sparse=sparse)
        self.user_bias = nn.Embedding(num_users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(num_items, 1, sparse=sparse)
        self.register_buffer("global_mean", torch.tensor(float(global_mean)))
        nn.init.normal_(self.item_factors.weight, std=init_std,
                        generator=torch.Generator().manual_seed(seed))
        nn.init.normal_(self.user_factors.weight, std=init_std,
                        generator=torch.Generator().manual_seed(seed + 1))
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: torch.Tensor, items: torch.Tensor,
                ratings: torch.Tensor) -> torch.Tensor:
        """Summed squared error plus each example's L2 penalty: a 0-dim training loss.

        Args:
            users, items: (B,) int64 contiguous ids; ratings: (B,) float32.
        """
        return SquaredErrorWithL2.apply(
            self.user_factors(users), self.item_factors(items), self.user_bias(users)[:, 0],
            self.item_bias(items)[:, 0], ratings, self.global_mean, self.factor_reg,
            self.config.bias_reg, self.rating_unit)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B,) float32 predictions, unclamped."""
        dot = (self.user_factors(users) * self.item_factors(items)).sum(dim=1)
        return self.global_mean + self.user_bias(users)[:, 0] + self.item_bias(items)[:, 0] + dot

    @torch.no_grad()
    def score_all_items(self, users: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_items) float32 unclamped scores of every item for each of ``users``.

        One matrix product instead of B x num_items pairs through ``score``: ranking needs
        every item's score, and memory is B x num_items, so callers pass users in blocks,
        and may pass the same ``out`` block each time (a fresh one costs page faults as
        large as the product itself on the CPU).
        """
        scores = torch.matmul(self.user_factors(users), self.item_factors.weight.T, out=out)
        scores += self.item_bias.weight[:, 0]
        scores += (self.global_mean + self.user_bias(users))  # (B, 1): every item alike
        return scores

    @torch.no_grad()
    def predict(self, users: torch.Tensor, items: torch.Tensor,
                scale: tuple[float, float]) -> torch.Tensor:
        """(B,) predictions clamped to the rating scale, as evaluation and users see them."""
        return self.score(users, items).clamp_(scale[0], scale[1])


class SquaredErrorWithL2(torch.autograd.Function):
    """sum_b (mean + b_u + b_i + <p, q> - r)^2 + reg (|p|^2 + |q|^2) + bias_reg (b_u^2 + b_i^2),
    with the factors' gradient divided by ``unit`` (BiasedMF: standardised SGD).

    One autograd node with its gradient written out, instead of the dozen nodes and (B, d)
    intermediates autograd would record for the same formula: the step is ~1.1x faster
    (bench/train_throughput.md), and the embeddings' own backward still makes the sparse
    row gradients, so optimizers and synchronisation see ordinary ``.grad`` tensors.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, q: torch.Tensor, b_u: torch.Tensor, b_i: torch.Tensor,
                ratings: torch.Tensor, mean: torch.Tensor, reg: float,
                bias_reg: float, unit: float) -> torch.Tensor:
        error = torch.linalg.vecdot(p, q) + b_u + b_i + mean - ratings
        ctx.save_for_backward(p, q, b_u, b_i, error)
        ctx.reg, ctx.bias_reg, ctx.unit = reg, bias_reg, unit
        flat_p, flat_q = p.reshape(-1), q.reshape(-1)  # sums of squares as dot products:
        return (torch.dot(error, error)  # no (B, d) temporaries
                + reg * (torch.dot(flat_p, flat_p) + torch.dot(flat_q, flat_q))
                + bias_reg * (torch.dot(b_u, b_u) + torch.dot(b_i, b_i)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, q, b_u, b_i, error = ctx.saved_tensors
        e = (2 * grad) * error  # d loss / d prediction, per example
        decay, bias_decay = (2 * ctx.reg) * grad, (2 * ctx.bias_reg) * grad
        e_column = e.unsqueeze(1)
        grad_p = torch.addcmul(p * decay, e_column, q)
        grad_q = torch.addcmul(q * decay, e_column, p)
        if ctx.unit != 1.0:
            grad_p /= ctx.unit
            grad_q /= ctx.unit
        return (grad_p, grad_q, e + bias_decay * b_u, e + bias_decay * b_i, None, None, None,
                None, None)


class RankingMF(nn.Module):
    """The ranking tables: score(u, i) = <w_u, h_i>, no biases and no global mean.

    Trained by iALS (trainer/ials.py): every observed pair pulled towards 1, every unobserved
    pair a weak 0, so the score orders items by how likely a user is to choose them, which a
    rating model (how a user would rate what they chose) does not. ``sparse`` is False: the
    tables move by whole-row solves, not by gradients.
    """

    def __init__(self, num_users: int, num_items: int, dim: int) -> None:
        super().__init__()
        self.user_factors = nn.Embedding(num_users, dim)
        self.item_factors = nn.Embedding(num_items, dim)
        std = 0.1 / math.sqrt(dim)  # row norms ~0.1 whatever the dimension
        for table in (self.user_factors, self.item_factors):
            nn.init.normal_(table.weight, std=std)
        self.requires_grad_(False)

    def score_all_items(self, users: torch.Tensor,
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_items) float32 scores of every item for each of ``users`` (see
        `BiasedMF.score_all_items`)."""
        return torch.matmul(self.user_factors(users), self.item_factors.weight.T, out=out)
