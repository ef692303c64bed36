"""Peer: the afternoon baseline, a single-process PyTorch biased MF with everything in memory.

    python peer_torch_mf.py --split SPLIT_DIR --out result.json   (the project's .venv: torch)

nn.Embedding tables, Adam, the whole train split as three tensors, shuffled mini-batches,
per-example L2 on the rows a batch touches, early stopping on val RMSE (best epoch kept).
Users or items absent from train map to one extra row that stays zero, so they are predicted
from the mean and whatever bias is known. Predictions are clipped to the rating scale.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import _common as common
import numpy as np
import torch
from torch import nn

DEFAULTS = {"dim": 64, "lr": 0.005, "reg": 0.05, "batch_size": 4096, "epochs": 60,
            "patience": 3}


class MF(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, mean: float) -> None:
        super().__init__()
        self.p, self.q = nn.Embedding(n_users + 1, dim), nn.Embedding(n_items + 1, dim)
        self.bu, self.bi = nn.Embedding(n_users + 1, 1), nn.Embedding(n_items + 1, 1)
        for table in (self.p, self.q):
            nn.init.normal_(table.weight, std=0.01)
        for table in (self.bu, self.bi):
            nn.init.zeros_(table.weight)
        with torch.no_grad():  # the extra last row stands for every unseen id: keep it zero
            for table in (self.p, self.q):
                table.weight[-1].zero_()
        self.mean = mean

    def forward(self, u, i):
        p, q = self.p(u), self.q(i)
        pred = self.mean + self.bu(u)[:, 0] + self.bi(i)[:, 0] + (p * q).sum(1)
        return pred, (p * p).sum(1) + (q * q).sum(1)


def index(ids: np.ndarray, vocab: dict) -> torch.Tensor:
    unknown = len(vocab)
    return torch.from_numpy(np.fromiter((vocab.get(x, unknown) for x in ids.tolist()),
                                        dtype=np.int64, count=len(ids)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_split_args(parser)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args()
    params = {**DEFAULTS, **(json.loads(args.params) if args.params else {})}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    low, high = common.scale_of(args.scale)
    started = time.perf_counter()
    split = {name: common.read_split(args.split / f"{name}.tsv")
             for name in ("train", "val", "test")}
    users = {u: k for k, u in enumerate(np.unique(split["train"][0]).tolist())}
    items = {i: k for k, i in enumerate(np.unique(split["train"][1]).tolist())}
    data = {name: (index(u, users), index(i, items), torch.from_numpy(r))
            for name, (u, i, r) in split.items()}
    load_s = time.perf_counter() - started
    tu, ti, tr = data["train"]
    model = MF(len(users), len(items), params["dim"], float(tr.mean()))
    optimizer = torch.optim.Adam(model.parameters(), lr=params["lr"])

    @torch.no_grad()
    def evaluate(name):
        u, i, r = data[name]
        return common.scores(model(u, i)[0].clamp(low, high).numpy(), r.numpy())

    best, best_state, bad, history, train_s = float("inf"), None, 0, [], 0.0
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(params["epochs"]):
        t0 = time.perf_counter()
        order = torch.randperm(len(tr), generator=generator)
        for start in range(0, len(tr), params["batch_size"]):
            batch = order[start:start + params["batch_size"]]
            pred, penalty = model(tu[batch], ti[batch])
            loss = ((pred - tr[batch]) ** 2 + params["reg"] * penalty).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - t0
        train_s += seconds
        val_rmse = evaluate("val")["rmse"]
        history.append({"epoch": epoch + 1, "val_rmse": val_rmse, "seconds": round(seconds, 4)})
        if val_rmse < best - 1e-6:
            best, best_state, bad = val_rmse, copy.deepcopy(model.state_dict()), 0
        else:
            bad += 1
            if bad >= params["patience"]:
                break
    model.load_state_dict(best_state)
    test_scores = evaluate("test")
    common.write_result(args.out, {
        "peer": "torch-mf", "load_seconds": round(load_s, 3), "train_ratings": len(tr),
        "versions": common.versions("torch", "numpy"), "params": params,
        "threads": torch.get_num_threads(), "train_seconds": round(train_s, 3),
        "epochs": len(history), "best_epoch": min(history, key=lambda h: h["val_rmse"])["epoch"],
        "ratings_per_s_per_epoch": round(len(tr) * len(history) / train_s, 1),
        "val_rmse": best, "test_rmse": test_scores["rmse"], "test_mae": test_scores["mae"],
        "test_count": test_scores["count"], "history": history})


if __name__ == "__main__":
    main()
