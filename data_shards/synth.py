"""Synthetic MovieLens-shaped rating sets with planted genre structure.

Why: the demo, the tests and the benchmarks need rating sets of any size whose
right answer is known. Items belong to planted genres (a centroid in a latent
space plus a small item-specific deviation); users like one or two genres;
a rating is ``round(mean + user bias + item bias + <taste, item> + noise)``
clipped to 1..5 stars. Matrix factorisation therefore beats a bias-only model
clearly, and K-Means on learned item embeddings can recover the genres.

Generation is out of core: users are cut into blocks whose ratings fit in one
file, each block is one Dask task with its own random stream, so memory per
task is bounded by ``rows_per_file`` and the bytes written do not depend on the
scheduler. Output layout (detected by the data reader)::

    out_dir/ratings/part-00000.parquet ...  user_id int64, item_id int64,
                                            rating float32, timestamp int64
    out_dir/items.csv                       item_id,title,genres
    out_dir/synth.json                      config, realised counts, layout tag

Ids are those of the synthetic world: users ``1..num_users``, items
``1..num_items``; users or items without ratings are absent from the ratings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from dask.callbacks import Callback
from tqdm import tqdm

from data_shards.config import SynthConfig
from data_shards.prepare import tasks_end_before_cleanup
from shardmf.outputs import output_folder
from shardmf.progress import bars_wanted

logger = logging.getLogger(__name__)

LAYOUT = "shardmf-synth"
FORMAT_VERSION = 1

RATINGS_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("rating", pa.float32()),
        ("timestamp", pa.int64()),
    ]
)

# Scales tuned so a default run looks like MovieLens (mean ~3.5 stars, std
# ~1.1, every star used) and biases explain less than the user-item term.
_GLOBAL_MEAN = 3.35  # stars; selection of liked genres lifts the mean to ~3.5
_USER_BIAS_STD = 0.35  # stars
_ITEM_BIAS_STD = 0.3  # stars
_INTERACTION_SCALE = 4.5  # stars per unit of genre affinity
_TASTE_CONCENTRATION = 0.4  # Dirichlet alpha: small puts likes (and dislikes) on 1-2 genres
_DISLIKE_WEIGHT = 1.0  # weight of disliked genres against liked ones
_TASTE_NOISE = 0.15  # norm of a user's idiosyncratic taste, relative to genre affinity
_ITEM_DEVIATION = 0.35  # norm of an item's offset from its genre centroid (centroid norm 1)
_GENRE_SIZE_CONCENTRATION = 4.0  # Dirichlet alpha of genre sizes: uneven but never tiny
_GENRE_CHOICE_A, _GENRE_CHOICE_B = 2.0, 3.0  # Beta of the share of a user's picks by taste
_POPULARITY_EXPONENT = 1.0  # item weight ~ (popularity rank + offset) ** -exponent
_POPULARITY_OFFSET = 10.0  # flattens the head so the top item is not a fifth of all ratings
_ACTIVITY_SIGMA = 1.2  # lognormal sigma of user activity
_MIN_RATINGS_PER_USER = 5  # when num_ratings allows
_SAMPLING_ROUNDS = 8  # rounds of re-drawing items for users short of distinct items
_TIME_START = 946_684_800  # 2000-01-01, unix seconds
_TIME_END = 1_672_531_200  # 2023-01-01
_ACTIVE_DAYS_MEDIAN = 60.0  # median span of one user's rating activity, days
_ACTIVE_DAYS_SIGMA = 1.5
_SCORE_CHUNK_ROWS = 1 << 18  # bounds the (rows, latent_dim) temporaries


@dataclass(frozen=True)
class SynthSummary:
    """What `synthesize` wrote, with the realised (not target) counts."""

    out_dir: Path
    num_ratings: int
    num_users: int  # users with at least one rating
    num_items: int  # items with at least one rating
    files: list[Path]


@dataclass(frozen=True)
class _World:
    """Item-side parameters, O(num_items), shared read-only by every partition task."""

    centroids: np.ndarray  # (G, D) float32 unit-norm genre centroids
    genre: np.ndarray  # (I,) int64 genre index of each item
    item_vec: np.ndarray  # (I, D) float32 item vectors, centred over items
    item_bias: np.ndarray  # (I,) float64 stars
    item_cdf: np.ndarray  # (I,) float64 cumulative popularity, last entry 1
    genre_items: np.ndarray  # (I,) int64 item indices grouped by genre
    genre_cdf: np.ndarray  # (I,) float64 within-genre cumulative popularity, genre g in (g, g+1]
    genre_end: np.ndarray  # (G,) int64 end of each genre's run in genre_items


@dataclass(frozen=True)
class _PartStats:
    """What one partition task reports back, so the summary needs no second pass."""

    rows: int
    users: int
    items_seen: np.ndarray  # (I,) bool
    star_counts: np.ndarray  # (5,) int64 ratings per star 1..5


def synthesize(out_dir: str | Path, config: SynthConfig) -> SynthSummary:
    """Write a synthetic rating set to `out_dir`, atomically.

    Runs on the current Dask scheduler (caller owns any cluster); with a
    distributed cluster the workers must share the filesystem of `out_dir`.
    Everything is built in a hidden sibling directory that replaces `out_dir`
    only once complete, so a crash never leaves a set that looks finished.

    Raises:
        ValueError: `out_dir` exists and is not an empty directory.
    """
    out_dir = Path(out_dir)
    with output_folder(out_dir, "synth", overwrite=None) as tmp_dir, tasks_end_before_cleanup():
        summary = _synthesize_into(tmp_dir, out_dir, config)
    logger.info(
        "synthesized %s ratings (%s users, %s items) in %d files under %s",
        f"{summary.num_ratings:,}",
        f"{summary.num_users:,}",
        f"{summary.num_items:,}",
        len(summary.files),
        out_dir,
    )
    return summary


def _synthesize_into(tmp_dir: Path, out_dir: Path, config: SynthConfig) -> SynthSummary:
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    world = _make_world(rng, config)
    counts = _user_counts(rng, config)
    blocks = _user_blocks(counts, config.rows_per_file)
    (tmp_dir / "ratings").mkdir()
    names = [f"part-{index:05d}.parquet" for index in range(len(blocks))]
    logger.info(
        "synthesizing %s ratings for %s users and %s items in %d files",
        f"{config.num_ratings:,}",
        f"{config.num_users:,}",
        f"{config.num_items:,}",
        len(blocks),
    )

    # One literal node for the item parameters instead of a copy in every task.
    world_node = dask.delayed(world, traverse=False)
    write = dask.delayed(_write_partition, pure=True)
    tasks = [
        write(world_node, config, index, user_ids, user_counts, tmp_dir / "ratings" / name)
        for index, ((user_ids, user_counts), name) in enumerate(zip(blocks, names, strict=True))
    ]
    with (
        tqdm(
            total=len(tasks),
            desc="synth",
            unit="file",
            mininterval=1.0,
            disable=len(tasks) <= 1 or _distributed_client_active() or not bars_wanted(logger),
        ) as bar,
        _PartitionProgress({task.key for task in tasks}, bar),
    ):
        stats: tuple[_PartStats, ...] = dask.compute(*tasks)

    num_ratings = sum(part.rows for part in stats)
    num_users = sum(part.users for part in stats)
    num_items = int(np.logical_or.reduce([part.items_seen for part in stats]).sum())
    star_counts = np.sum([part.star_counts for part in stats], axis=0)
    _write_items(tmp_dir / "items.csv", world.genre, config.num_genres)
    metadata = {
        "layout": LAYOUT,
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(config),
        "num_ratings": num_ratings,
        "num_users": num_users,
        "num_items": num_items,
        "rating_counts": {str(star): int(n) for star, n in enumerate(star_counts, start=1)},
        "files": [
            {"path": f"ratings/{name}", "rows": part.rows}
            for name, part in zip(names, stats, strict=True)
        ],
    }
    # Metadata last: a directory without synth.json is not a finished set.
    (tmp_dir / "synth.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return SynthSummary(
        out_dir=out_dir,
        num_ratings=num_ratings,
        num_users=num_users,
        num_items=num_items,
        files=[out_dir / "ratings" / name for name in names],
    )


def _genre_names(num_genres: int) -> list[str]:
    width = max(2, len(str(num_genres)))
    return [f"genre-{g:0{width}d}" for g in range(1, num_genres + 1)]


def _make_world(rng: np.random.Generator, config: SynthConfig) -> _World:
    """Genres, item vectors, biases and popularity: small, drawn once from the global stream."""
    num_items, num_genres, dim = config.num_items, config.num_genres, config.latent_dim
    centroids = rng.standard_normal((num_genres, dim))
    if num_genres <= dim:
        # Orthonormal centroids are as far apart as the space allows.
        q, _ = np.linalg.qr(centroids.T)
        centroids = q.T
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)

    shares = rng.dirichlet(np.full(num_genres, _GENRE_SIZE_CONCENTRATION))
    genre = rng.choice(num_genres, size=num_items, p=shares)
    # Every genre non-empty: the first num_genres items of a random order take one each.
    genre[rng.permutation(num_items)[:num_genres]] = np.arange(num_genres)

    deviation = rng.standard_normal((num_items, dim)) * (_ITEM_DEVIATION / math.sqrt(dim))
    item_vec = centroids[genre] + deviation
    item_vec -= item_vec.mean(axis=0)
    item_bias = rng.normal(0.0, _ITEM_BIAS_STD, size=num_items)

    # Popularity follows a random rank, independent of genre.
    rank = rng.permutation(num_items)
    weight = (rank + _POPULARITY_OFFSET) ** -_POPULARITY_EXPONENT
    item_cdf = np.cumsum(weight)
    item_cdf /= item_cdf[-1]

    genre_items = np.argsort(genre, kind="stable")
    genre_end = np.cumsum(np.bincount(genre, minlength=num_genres))
    genre_cdf = np.cumsum(weight[genre_items])
    mass_before = np.concatenate([[0.0], genre_cdf[genre_end[:-1] - 1]])
    run_total = genre_cdf[genre_end - 1] - mass_before
    run_genre = genre[genre_items]
    genre_cdf = run_genre + (genre_cdf - mass_before[run_genre]) / run_total[run_genre]
    genre_cdf[genre_end - 1] = np.arange(1, num_genres + 1)  # exact ends despite rounding
    return _World(
        centroids=centroids.astype(np.float32),
        genre=genre.astype(np.int64),
        item_vec=item_vec.astype(np.float32),
        item_bias=item_bias,
        item_cdf=item_cdf,
        genre_items=genre_items.astype(np.int64),
        genre_cdf=genre_cdf,
        genre_end=genre_end.astype(np.int64),
    )


def _user_counts(rng: np.random.Generator, config: SynthConfig) -> np.ndarray:
    """(num_users,) int64 ratings per user: heavy-tailed, capped, summing to num_ratings."""
    num_users, total = config.num_users, config.num_ratings
    cap = config.max_ratings_per_user
    base = min(_MIN_RATINGS_PER_USER, total // num_users, cap)
    weight = rng.lognormal(0.0, _ACTIVITY_SIGMA, size=num_users)
    counts = np.full(num_users, base, dtype=np.int64)
    # Water-filling: share what is left by weight among users below the cap;
    # each pass caps at least one more user, so this ends within num_users passes.
    while (left := total - int(counts.sum())) > 0:
        open_users = counts < cap
        share = np.where(open_users, weight, 0.0)
        exact = left * share / share.sum()
        add = np.floor(exact).astype(np.int64)
        short = left - int(add.sum())
        if short:
            # Largest remainders first; stable order keeps it deterministic.
            order = np.argsort(-(exact - add), kind="stable")[:short]
            add[order] += 1
        counts = np.minimum(counts + add, cap)
    return counts


def _user_blocks(counts: np.ndarray, rows_per_file: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut users with ratings into consecutive blocks of at most rows_per_file ratings.

    Returns (user ids 1-based int64, counts int64) per block. A block holds the
    users whose running total starts inside one window of
    ``rows_per_file - max count`` ratings, so the last user still fits.
    """
    user_ids = np.flatnonzero(counts) + 1
    counts = counts[counts > 0]
    window = rows_per_file - int(counts.max())
    start = np.cumsum(counts) - counts
    _, first = np.unique(start // window, return_index=True)
    bounds = [*first.tolist(), len(counts)]
    return [(user_ids[a:b], counts[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _write_partition(
    world: _World,
    config: SynthConfig,
    index: int,
    user_ids: np.ndarray,
    counts: np.ndarray,
    path: Path,
) -> _PartStats:
    """Generate one block of users' ratings and write it as one Parquet file."""
    table = _partition_table(world, config, index, user_ids, counts)
    pq.write_table(table, path)
    stars = table.column("rating").to_numpy().astype(np.int64)
    items = table.column("item_id").to_numpy() - 1
    return _PartStats(
        rows=table.num_rows,
        users=len(np.unique(table.column("user_id").to_numpy())),
        items_seen=np.bincount(items, minlength=config.num_items) > 0,
        star_counts=np.bincount(stars, minlength=6)[1:],
    )


def _partition_table(
    world: _World,
    config: SynthConfig,
    index: int,
    user_ids: np.ndarray,
    counts: np.ndarray,
) -> pa.Table:
    # The partition's own stream: results do not depend on scheduling order.
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, index)))
    num_genres, dim = config.num_genres, config.latent_dim
    num_users = len(user_ids)

    concentration = np.full(num_genres, _TASTE_CONCENTRATION)
    likes = rng.dirichlet(concentration, size=num_users)
    dislikes = rng.dirichlet(concentration, size=num_users)
    affinity = likes - _DISLIKE_WEIGHT * dislikes
    affinity -= affinity.mean(axis=1, keepdims=True)
    taste_noise = rng.standard_normal((num_users, dim)) * (_TASTE_NOISE / math.sqrt(dim))
    taste = (_INTERACTION_SCALE * (affinity @ world.centroids + taste_noise)).astype(np.float32)
    user_bias = rng.normal(0.0, _USER_BIAS_STD, size=num_users)
    by_taste = rng.beta(_GENRE_CHOICE_A, _GENRE_CHOICE_B, size=num_users)

    user, item = _sample_pairs(rng, world, likes, by_taste, counts)

    start = rng.integers(_TIME_START, _TIME_END, size=num_users)
    active_s = rng.lognormal(math.log(_ACTIVE_DAYS_MEDIAN * 86_400), _ACTIVE_DAYS_SIGMA, num_users)
    active_s = np.minimum(active_s, _TIME_END - start)
    timestamp = start[user] + (rng.random(len(user)) * active_s[user]).astype(np.int64)
    order = np.lexsort((timestamp, user))
    user, item, timestamp = user[order], item[order], timestamp[order]

    score = np.empty(len(user))
    for lo in range(0, len(user), _SCORE_CHUNK_ROWS):
        hi = lo + _SCORE_CHUNK_ROWS
        u, i = user[lo:hi], item[lo:hi]
        interaction = np.einsum("rd,rd->r", taste[u], world.item_vec[i])
        score[lo:hi] = _GLOBAL_MEAN + user_bias[u] + world.item_bias[i] + interaction
    rating = _to_stars(rng, score, config.noise)
    return pa.Table.from_arrays(
        [
            pa.array(user_ids[user], pa.int64()),
            pa.array(item + 1, pa.int64()),
            pa.array(rating, pa.float32()),
            pa.array(timestamp, pa.int64()),
        ],
        schema=RATINGS_SCHEMA,
    )


def _to_stars(rng: np.random.Generator, score: np.ndarray, noise: float) -> np.ndarray:
    """(N,) float32 whole stars 1..5 from noise-free scores."""
    noisy = score + noise * rng.standard_normal(len(score))
    return np.clip(np.rint(noisy), 1, 5).astype(np.float32)


def _sample_pairs(
    rng: np.random.Generator,
    world: _World,
    likes: np.ndarray,
    by_taste: np.ndarray,
    counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw counts[u] distinct items per local user u.

    Items are drawn with replacement (by popularity, or by popularity within a
    genre picked from the user's liked genres), repeats dropped, and users
    still short draw again with growing oversampling. Returns (local user,
    item index) int64 arrays in no particular order; a user can end short of
    counts[u] only if every round kept missing new items.
    """
    num_items = len(world.genre)
    num_genres = len(world.genre_end)
    taste_cdf = np.cumsum(likes, axis=1)
    taste_cdf[:, -1] = 1.0
    taste_cdf += np.arange(len(counts))[:, None]  # user u's row spans (u, u+1]
    taste_cdf = taste_cdf.ravel()

    finished: list[np.ndarray] = []  # keys of users who have all their items
    keys = np.empty(0, dtype=np.int64)  # user * num_items + item of users still short
    deficit = counts
    for round_index in range(_SAMPLING_ROUNDS):
        draws = np.ceil(deficit * (1.0 + 0.25 * 2**round_index)).astype(np.int64)
        user = np.repeat(np.arange(len(counts)), draws)
        item = np.minimum(np.searchsorted(world.item_cdf, rng.random(len(user))), num_items - 1)

        pick = np.flatnonzero(rng.random(len(user)) < by_taste[user])
        picker = user[pick]
        slot = np.searchsorted(taste_cdf, picker + rng.random(len(pick)), side="right")
        genre = np.minimum(slot, picker * num_genres + num_genres - 1) - picker * num_genres
        pos = np.searchsorted(world.genre_cdf, genre + rng.random(len(pick)), side="right")
        item[pick] = world.genre_items[np.minimum(pos, world.genre_end[genre] - 1)]

        # Accepted keys come first, so np.unique's first occurrence keeps them all.
        merged = np.concatenate([keys, user * num_items + item])
        _, first = np.unique(merged, return_index=True)
        merged = merged[np.sort(first)]
        merged = merged[np.argsort(merged // num_items, kind="stable")]
        owner = merged // num_items
        have = np.bincount(owner, minlength=len(counts))
        run_start = np.cumsum(have) - have
        keep = np.arange(len(merged)) - run_start[owner] < counts[owner]
        merged, owner = merged[keep], owner[keep]
        deficit = np.where(deficit > 0, counts - np.minimum(have, counts), 0)
        # Complete users leave the working set, so later rounds stay small.
        complete = deficit[owner] == 0
        finished.append(merged[complete])
        keys = merged[~complete]
        if not deficit.any():
            break
    keys = np.concatenate([*finished, keys])
    return keys // num_items, keys % num_items


def _write_items(path: Path, genre: np.ndarray, num_genres: int) -> None:
    names = pd.Series(_genre_names(num_genres), dtype=object)[genre].reset_index(drop=True)
    item_ids = pd.Series(np.arange(1, len(genre) + 1))
    title = "Synthetic " + item_ids.astype(str) + " (" + names + ")"
    frame = pd.DataFrame({"item_id": item_ids, "title": title, "genres": names})
    frame.to_csv(path, index=False)


def _distributed_client_active() -> bool:
    """Local-scheduler callbacks never fire under a distributed client; skip the bar there."""
    try:
        from distributed import default_client

        default_client()
    except (ImportError, ValueError):
        return False
    return True


class _PartitionProgress(Callback):
    """Advances a tqdm bar as each partition's file is written (local schedulers)."""

    def __init__(self, keys: set[str], bar: tqdm) -> None:
        super().__init__()
        self._keys = keys
        self._bar = bar

    def _posttask(
        self, key: str, result: object, dsk: object, state: object, worker_id: object
    ) -> None:
        if key in self._keys:
            self._bar.update(1)
