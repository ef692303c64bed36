"""A run and its shards: what needs them (seen items, evaluation) finds them in the run,
where training read them, or where `shards`/--shards says, checked against the identity
the run recorded; without them it stops with one line, never a quietly worse answer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import copy_shards

from launch.cli import main
from shardmf.errors import InputError
from trainer import evaluate_run, load_run


@pytest.fixture(scope="module")
def moved(trainer_shards_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, Path, object, object]:
    """(a run trained on shards outside it, a copy of those shards, a user, their list
    before) with the original shards gone."""
    root = tmp_path_factory.mktemp("moved")
    shards = copy_shards(trainer_shards_dir, root)
    run = root / "run"
    assert main(["train", str(shards), "--out", str(run), "--objective", "rating",
                 "--dim", "8", "--epochs", "3", "--clusters", "0"]) == 0
    user = load_run(run).users["original_user_id"][0]
    before = load_run(run).recommend(user, n=10, min_item_ratings=0)
    copy = Path(shutil.copytree(shards, root / "elsewhere"))
    shutil.rmtree(shards)
    return run, copy, user, before


def test_without_its_shards_recommend_stops_instead_of_listing_seen_items(moved) -> None:
    run, _, user, _ = moved
    with pytest.raises(InputError, match=r"its shards are gone .* pass `shards` with a copy"):
        load_run(run).recommend(user)
    kept_in = load_run(run).recommend(user, n=10, exclude_seen=False, min_item_ratings=0)
    assert len(kept_in) == 10  # seen items asked for: no shards needed
    load_run(run).similar_items(load_run(run).items["original_item_id"][0])


def test_a_copy_of_the_shards_gives_the_same_lists(moved) -> None:
    run, copy, user, before = moved
    again = load_run(run, shards=copy).recommend(user, n=10, min_item_ratings=0)
    assert again.equals(before)
    assert evaluate_run(run, ks=(5,), shards=copy)["ndcg@5"] >= 0


def test_other_shards_are_refused(moved, trainer_user_shards_dir: Path) -> None:
    run, _, user, _ = moved
    with pytest.raises(InputError, match="other shards than .* trained on"):
        load_run(run, shards=trainer_user_shards_dir).recommend(user)
    with pytest.raises(InputError, match="other shards than"):
        evaluate_run(run, shards=trainer_user_shards_dir)


def test_the_command_line_says_it_in_one_line(moved, capsys: pytest.CaptureFixture) -> None:
    run, copy, user, _ = moved
    capsys.readouterr()
    assert main(["recommend", str(run), "--user", str(user)]) == 2
    assert main(["evaluate", str(run)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("pass --shards with a copy" in e for e in errors)
    assert main(["recommend", str(run), "--user", str(user), "--shards", str(copy)]) == 0
    assert main(["evaluate", str(run), "--shards", str(copy), "--k", "5"]) == 0
    assert main(["recommend", str(run), "--user", str(user), "--include-seen"]) == 0
