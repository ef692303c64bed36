"""Ranking metrics (trainer/ranking.py): hand-computed cases, properties, an independent
per-user reference on real shards, and 2 real gloo ranks against one process."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import spawn_ranks
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmf.errors import InputError
from trainer.config import ModelConfig
from trainer.distributed import DistEnv
from trainer.model import BiasedMF
from trainer.ownership import user_ownership
from trainer.ranking import (
    METRICS,
    NO_ITEM,
    ranking_metrics,
    recommended_items,
    relevance_threshold,
    sampled_users,
    top_unseen_items,
    user_metrics,
)
from trainer.shards import ShardSet, open_shards

SINGLE = DistEnv(0, 0, 1, 1, torch.device("cpu"), None)
LOG2_3 = math.log2(3)


# ---------------------------------------------------------------- by hand

def test_two_users_five_items_by_hand() -> None:
    # user 0: recommended 2, 0, 4; relevant {0, 1, 4}: hits at positions 2 and 3.
    # user 1: recommended 1, 3, 0; relevant {1}: a hit at position 1.
    # user 2: nothing relevant: NaN, left out of means.
    top = np.array([[2, 0, 4], [1, 3, 0], [0, 1, 2]])
    metrics = user_metrics(top, np.array([0, 0, 0, 1]), np.array([0, 1, 4, 1]))
    expected = {
        "precision": [2 / 3, 1 / 3],
        "recall": [2 / 3, 1 / 1],
        # DCG = 1/log2(3) + 1/log2(4); ideal DCG over min(3, 3) = 3 hits: 1 + 1/log2(3) + 1/2
        "ndcg": [(1 / LOG2_3 + 1 / 2) / (1 + 1 / LOG2_3 + 1 / 2), 1.0],
        # AP = (precision@2 + precision@3) / min(3, 3) = (1/2 + 2/3) / 3
        "map": [(1 / 2 + 2 / 3) / 3, 1.0],
        "hit_rate": [1.0, 1.0],
    }
    for name in METRICS:
        np.testing.assert_allclose(metrics[name][:2], expected[name], rtol=1e-12)
        assert np.isnan(metrics[name][2])
    assert recommended_items(top).tolist() == [0, 1, 2, 3, 4]


def test_more_relevant_than_k_and_empty_slots_by_hand() -> None:
    # k = 2, four relevant items {0, 1, 2, 3}; recommended 4, 3: a hit at position 2 only.
    # The normalisers are min(k, |R|) = 2: ideal DCG = 1 + 1/log2(3), AP = (1/2) / 2.
    top = np.array([[4, 3], [2, NO_ITEM]])  # user 1: only one unseen item was left
    metrics = user_metrics(top, np.array([0, 0, 0, 0, 1]), np.array([0, 1, 2, 3, 2]))
    np.testing.assert_allclose(metrics["precision"], [1 / 2, 1 / 2])  # still / k
    np.testing.assert_allclose(metrics["recall"], [1 / 4, 1])
    np.testing.assert_allclose(metrics["ndcg"], [(1 / LOG2_3) / (1 + 1 / LOG2_3), 1])
    np.testing.assert_allclose(metrics["map"], [(1 / 2) / 2, 1])
    assert recommended_items(top).tolist() == [2, 3, 4]


def test_threshold_default_scales_with_the_rating_range() -> None:
    assert relevance_threshold((1.0, 5.0)) == 4.0
    assert relevance_threshold((0.5, 5.0)) == 3.875  # 4 and up, as on 1..5
    assert relevance_threshold((0.0, 10.0)) == 7.5
    assert relevance_threshold((1.0, 5.0), 3.5) == 3.5
    for bad in (6.0, 1.0, 0.0):
        with pytest.raises(InputError, match="relevance threshold"):
            relevance_threshold((1.0, 5.0), bad)


def test_seen_items_are_skipped_and_empty_slots_marked() -> None:
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]])
    top = top_unseen_items(scores, np.array([0, 0, 1, 1, 1]), np.array([0, 2, 3, 2, 1]), 3)
    assert top.tolist() == [[1, 3, NO_ITEM], [0, NO_ITEM, NO_ITEM]]
    wide = top_unseen_items(torch.zeros(1, 2), np.array([], dtype=np.int64),
                            np.array([], dtype=np.int64), 4)  # k beyond the catalogue
    assert sorted(wide[0, :2].tolist()) == [0, 1] and wide[0, 2:].tolist() == [NO_ITEM] * 2


# ---------------------------------------------------------------- properties

@st.composite
def ranked_users(draw, max_users: int = 6, max_items: int = 12):
    """(top_items (U, k), relevant_users, relevant_items, num_items); every user has >= 1
    relevant item; a row may end in empty slots."""
    num_items = draw(st.integers(1, max_items))
    num_users = draw(st.integers(1, max_users))
    k = draw(st.integers(1, num_items + 2))
    rows, rel_users, rel_items = [], [], []
    for user in range(num_users):
        order = draw(st.permutations(range(num_items)))
        shown = draw(st.integers(0, min(k, num_items)))
        rows.append(list(order[:shown]) + [NO_ITEM] * (k - shown))
        relevant = draw(st.sets(st.integers(0, num_items - 1), min_size=1))
        rel_users += [user] * len(relevant)
        rel_items += sorted(relevant)
    return (np.array(rows, dtype=np.int64), np.array(rel_users, dtype=np.int64),
            np.array(rel_items, dtype=np.int64), num_items)


@settings(max_examples=200, deadline=None)
@given(ranked_users())
def test_metrics_lie_between_0_and_1(case) -> None:
    top, users, items, _ = case
    for name, values in user_metrics(top, users, items).items():
        assert np.all((values >= 0) & (values <= 1 + 1e-12)), name


@settings(max_examples=200, deadline=None)
@given(ranked_users(), st.randoms(use_true_random=False))
def test_a_perfect_ranking_scores_the_most_it_can(case, rng) -> None:
    _, users, items, num_items = case
    k = rng.randint(1, num_items + 2)
    top, counts = [], np.bincount(users)
    for user in range(len(counts)):
        relevant = items[users == user].tolist()
        rng.shuffle(relevant)  # any order among the relevant ones
        rest = [i for i in range(num_items) if i not in relevant]
        top.append((relevant + rest + [NO_ITEM] * k)[:k])
    metrics = user_metrics(np.array(top), users, items)
    best = np.minimum(k, counts)
    np.testing.assert_allclose(metrics["precision"], best / k)
    np.testing.assert_allclose(metrics["recall"], best / counts)
    for name in ("ndcg", "map", "hit_rate"):
        np.testing.assert_allclose(metrics[name], 1.0)


@settings(max_examples=200, deadline=None)
@given(ranked_users(), st.randoms(use_true_random=False))
def test_relabelling_items_changes_nothing(case, rng) -> None:
    top, users, items, num_items = case
    relabel = list(range(num_items * 3))  # also to ids outside the old range
    rng.shuffle(relabel)
    mapping = np.array(relabel[:num_items])
    renamed = np.where(top == NO_ITEM, NO_ITEM, mapping[np.maximum(top, 0)])
    before = user_metrics(top, users, items)
    after = user_metrics(renamed, users, mapping[items])
    for name in METRICS:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-12)
    assert len(recommended_items(renamed)) == len(recommended_items(top))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.integers(1, 15), st.integers(1, 20), st.data())
def test_seen_items_are_never_recommended(num_users, num_items, k, data) -> None:
    scores = torch.tensor(data.draw(st.lists(
        st.lists(st.floats(-1e6, 1e6, width=32), min_size=num_items, max_size=num_items),
        min_size=num_users, max_size=num_users)), dtype=torch.float32)
    seen = data.draw(st.sets(st.tuples(st.integers(0, num_users - 1),
                                       st.integers(0, num_items - 1))))
    seen_users = np.array([u for u, _ in seen], dtype=np.int64)
    seen_items = np.array([i for _, i in seen], dtype=np.int64)
    original = scores.clone()
    top = top_unseen_items(scores, seen_users, seen_items, k)
    for user in range(num_users):
        unseen = [i for i in range(num_items) if (user, i) not in seen]
        shown = [i for i in top[user] if i != NO_ITEM]
        assert not set(shown) & {i for u, i in seen if u == user}
        assert len(shown) == min(k, len(unseen)) and len(set(shown)) == len(shown)
        picked = original[user, shown]
        assert torch.all(picked[:-1] >= picked[1:])  # best first
        left = sorted(set(unseen) - set(shown))
        if left and shown:  # nothing better was left out
            assert picked[-1] >= original[user, left].max()


# ---------------------------------------------------------------- on real shards

def _model(shards: ShardSet) -> BiasedMF:
    """The same model in every process: random factors plus an item bias that follows
    training popularity, so the seen-item exclusion and the ranking both matter."""
    torch.manual_seed(7)
    model = BiasedMF(shards.num_users, shards.num_items, shards.train_mean,
                     ModelConfig(reg=0.05, dim=8, init_std=0.3))
    counts = np.bincount(_ratings(shards, "train")["item_id"], minlength=shards.num_items)
    with torch.no_grad():
        model.item_bias.weight[:, 0] = torch.from_numpy(np.log1p(counts) * 0.5)
    return model


def _ratings(shards: ShardSet, split: str) -> pd.DataFrame:
    return pd.concat([pq.read_table(shards.root / entry.path).to_pandas()
                      for entry in shards.files[split]], ignore_index=True)


def _reference(shards: ShardSet, model: BiasedMF, ks: tuple[int, ...],
               min_item_ratings: int = 0, keep: float = 1.0) -> dict:
    """The definitions in trainer/ranking.py, one user at a time, in plain Python, over the
    users ``sampled_users`` keeps at the fraction ``keep``."""
    train, test = _ratings(shards, "train"), _ratings(shards, "test")
    cutoff = relevance_threshold(shards.scale)
    relevant = test[test["rating"] >= cutoff].groupby("user_id")["item_id"].apply(set)
    eligible = len(relevant)
    if keep < 1.0:
        relevant = relevant[sampled_users(relevant.index.to_numpy(), keep)]
    seen = train.groupby("user_id")["item_id"].apply(set)
    counts = np.bincount(train["item_id"], minlength=shards.num_items)
    popular_order = np.lexsort((np.arange(shards.num_items), -counts))
    rare = set(np.flatnonzero(counts < min_item_ratings).tolist())
    with torch.no_grad():
        scores = (model.user_factors.weight @ model.item_factors.weight.T
                  + model.item_bias.weight[:, 0]).numpy()
    per_user: dict[str, list[float]] = {}
    shown: dict[str, set] = {}
    for user, wanted in relevant.items():
        exclude = seen.get(user, set()) | rare
        lists = {"": [i for i in np.argsort(-scores[user], kind="stable")
                      if i not in exclude],
                 "popular_": [i for i in popular_order if i not in exclude]}
        for prefix, ranked in lists.items():
            for k in ks:
                top = ranked[:k]
                hits = [1.0 if item in wanted else 0.0 for item in top]
                ideal = min(k, len(wanted))
                values = {
                    "precision": sum(hits) / k,
                    "recall": sum(hits) / len(wanted),
                    "ndcg": sum(h / math.log2(j + 2) for j, h in enumerate(hits))
                    / sum(1 / math.log2(j + 2) for j in range(ideal)),
                    "map": sum(h * sum(hits[:j + 1]) / (j + 1) for j, h in enumerate(hits))
                    / ideal,
                    "hit_rate": float(any(hits)),
                }
                for name, value in values.items():
                    per_user.setdefault(f"{prefix}{name}@{k}", []).append(value)
                shown.setdefault(f"{prefix}coverage@{k}", set()).update(top)
    result = {key: float(np.mean(values)) for key, values in per_user.items()}
    result.update({key + "_se": float(np.std(values, ddof=1) / math.sqrt(len(values)))
                   for key, values in per_user.items()})
    result.update({key: len(items) / shards.num_items for key, items in shown.items()})
    return {**result, "ranking_threshold": cutoff, "ranking_users": len(relevant),
            "ranking_users_eligible": eligible, "ranking_min_item_ratings": min_item_ratings}


def test_one_process_matches_a_per_user_reference(trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir)
    model = _model(shards)
    ks = (5, 10, 20)
    result = ranking_metrics(model, shards, SINGLE, ks=ks, user_block=17)  # uneven blocks
    expected = _reference(shards, model, ks)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # the model follows popularity with noise: it finds something, the baseline more
    assert 0 < result["precision@10"] < result["popular_precision@10"]
    assert result["coverage@10"] > result["popular_coverage@10"]


def test_a_sample_of_users_is_the_reference_over_those_users(
        trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir)
    model = _model(shards)
    everyone = ranking_metrics(model, shards, SINGLE, ks=(5, 10))
    eligible = everyone["ranking_users_eligible"]
    assert everyone["ranking_users"] == eligible > 20
    assert ranking_metrics(model, shards, SINGLE, ks=(5, 10), max_users=eligible) == everyone
    cap = eligible // 3
    sampled = ranking_metrics(model, shards, SINGLE, ks=(5, 10), max_users=cap)
    expected = _reference(shards, model, (5, 10), keep=cap / eligible)
    assert sampled.keys() == expected.keys()
    for key, value in expected.items():
        assert sampled[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert sampled["ranking_users_eligible"] == eligible
    assert 0.6 * cap <= sampled["ranking_users"] <= 1.4 * cap


@given(st.integers(0, 10**9), st.integers(1_000, 50_000), st.floats(0.05, 0.95))
def test_sampled_users_keep_about_the_fraction_asked(first: int, count: int,
                                                     fraction: float) -> None:
    ids = np.arange(first, first + count)
    kept = sampled_users(ids, fraction)
    assert abs(kept.mean() - fraction) < 0.02
    assert np.array_equal(sampled_users(ids[::-1], fraction), kept[::-1])  # id alone decides


def test_rarely_rated_items_can_be_left_out(trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir)
    model = _model(shards)
    counts = np.bincount(_ratings(shards, "train")["item_id"], minlength=shards.num_items)
    cutoff = int(np.quantile(counts, 0.9))  # leaves only the 10 % most rated: slots empty
    result = ranking_metrics(model, shards, SINGLE, ks=(5, 20), min_item_ratings=cutoff)
    expected = _reference(shards, model, (5, 20), min_item_ratings=cutoff)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert result["coverage@20"] <= (counts >= cutoff).mean()


def test_bad_arguments_are_refused(trainer_shards_dir: Path) -> None:
    shards = open_shards(trainer_shards_dir)
    model = _model(shards)
    with pytest.raises(InputError, match="list lengths k 0"):
        ranking_metrics(model, shards, SINGLE, ks=(0,))
    with pytest.raises(InputError, match="min_item_ratings=-1"):
        ranking_metrics(model, shards, SINGLE, min_item_ratings=-1)
    with pytest.raises(InputError, match="relevance threshold 9"):
        ranking_metrics(model, shards, SINGLE, threshold=9)
    top_only = ranking_metrics(model, shards, SINGLE, threshold=shards.scale[1], ks=(3,))
    assert 0 < top_only["ranking_users"] < ranking_metrics(model, shards, SINGLE,
                                                           ks=(3,))["ranking_users"]


SAMPLED_USERS = 25  # of the fixture's ~40 eligible users: the sample spans both ranks


def _distributed_job(env: DistEnv, replicated_dir: str, owned_dir: str, out: str) -> None:
    """Both layouts on 2 ranks: replicated users on random shards, owned users (each rank
    holds only its rows of the model) on shards partitioned by user."""
    torch.set_num_threads(1)
    shards = open_shards(replicated_dir)
    result = ranking_metrics(_model(shards), shards, env, ks=(5, 10), user_block=32,
                             max_users=SAMPLED_USERS)
    Path(out, f"replicated-{env.rank}.json").write_text(json.dumps(result))
    shards = open_shards(owned_dir)
    ownership = user_ownership(shards, env)
    full = _model(shards)
    owned = BiasedMF(len(ownership.users), shards.num_items, shards.train_mean,
                     ModelConfig(reg=0.05, dim=8))
    state = full.state_dict()
    rows = torch.from_numpy(ownership.users)
    state["user_factors.weight"] = state["user_factors.weight"][rows]
    state["user_bias.weight"] = state["user_bias.weight"][rows]
    owned.load_state_dict(state)
    result = ranking_metrics(owned, shards, env, ownership=ownership, ks=(5, 10),
                             user_block=32, max_users=SAMPLED_USERS)
    Path(out, f"owned-{env.rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_two_gloo_ranks_give_the_figures_of_one_process(
        trainer_shards_dir: Path, trainer_user_shards_dir: Path, tmp_path: Path) -> None:
    spawn_ranks(_distributed_job, str(trainer_shards_dir), str(trainer_user_shards_dir),
                str(tmp_path), folder=tmp_path)
    for layout, folder in (("replicated", trainer_shards_dir),
                           ("owned", trainer_user_shards_dir)):
        shards = open_shards(folder)
        alone = ranking_metrics(_model(shards), shards, SINGLE, ks=(5, 10),
                                max_users=SAMPLED_USERS)
        assert alone["ranking_users"] < alone["ranking_users_eligible"]  # a sample indeed
        ranks = [json.loads((tmp_path / f"{layout}-{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1], layout  # every rank returns the same dict
        assert ranks[0].keys() == alone.keys()
        for key, value in alone.items():
            assert ranks[0][key] == pytest.approx(value, rel=1e-9), (layout, key)
