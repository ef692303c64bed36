"""The shardmf command line as a user meets it: help, one-line errors, and using a run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from launch.cli import main

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
       "OMP_NUM_THREADS": "1"}
COMMANDS = ("prepare", "train", "cluster", "run", "synth", "demo", "recommend", "similar",
            "export", "export-split", "verify", "evaluate")


def _write_ratings(path: Path, rows: int = 3000, seed: int = 0) -> None:
    """Ratings where users 1-40 love items 1-30 and hate 31-60, and the rest the opposite."""
    rng = np.random.default_rng(seed)
    users = rng.integers(1, 81, rows)
    items = rng.integers(1, 61, rows)
    likes = (users <= 40) == (items <= 30)
    noise = rng.integers(0, 2, rows)
    ratings = np.where(likes, 5 - noise, 1 + noise)
    frame = pd.DataFrame({"user": users, "item": items, "rating": ratings})
    frame.drop_duplicates(["user", "item"]).to_csv(path, sep="\t", header=False, index=False)
    titles = pd.DataFrame({"item_id": range(1, 61),
                           "title": [f"Film {i}" for i in range(1, 61)],
                           "genres": ["Drama" if i <= 30 else "Horror" for i in range(1, 61)]})
    titles.to_csv(path.parent / "items.csv", index=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: shardmf" in capsys.readouterr().out


def test_every_flag_of_every_command_explains_itself() -> None:
    from launch.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(COMMANDS)
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"shardmf {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{where}: no help"
            assert "(default: None)" not in action.help, f"{where}: says (default: None)"
            assert "FORMATS" not in action.help, f"{where}: a placeholder in its help"
            if action.option_strings and action.nargs != 0 and action.choices is None:
                assert action.metavar, f"{where}: its value shows as {action.dest.upper()}"
        text = sub.format_help()
        assert " TEXT" not in text, f"{name}: a bare TEXT placeholder"


def test_version_and_top_level_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("shardmf ")
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "evaluate" in capsys.readouterr().out


# What a user waits for: a call that only prints help or looks into a run must not import
# these (seconds on 2 cores). A behaviour test; the timings are in the report, never here.
HEAVY_MODULES = ("dask", "distributed", "torch", "sklearn", "matplotlib", "pandas", "numba")


def _heavy_modules_after(calls: list[list[str]]) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``main`` on each argv."""
    code = ("import contextlib, io, json, sys\n"
            "from launch.cli import main\n"
            f"for argv in {calls!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "        assert main(argv) == 0, argv\n"
            "loaded = {m.split('.')[0] for m in sys.modules}\n"
            f"print(json.dumps(sorted(loaded & {set(HEAVY_MODULES)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_help_and_version_import_nothing_heavy() -> None:
    calls = [["--help"], ["--version"], *([command, "--help"] for command in COMMANDS)]
    assert _heavy_modules_after(calls) == []


@pytest.mark.parametrize(("content", "expected"), [
    ("1\t2\t5\t1\n1\t3\t4\t2\t9\n", "line 2"),
    ("1\t2\t5\t1\n1\t3\tabc\t2\n", "'abc' is not a number"),
    ("", "is empty"),
])
def test_bad_file_is_one_line_exit_2_and_nothing_written(
        tmp_path: Path, capsys: pytest.CaptureFixture, content: str, expected: str) -> None:
    source = tmp_path / "ratings.tsv"
    source.write_text(content)
    out = tmp_path / "shards"
    code = main(["prepare", str(source), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("shardmf: error: ") and expected in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ratings.tsv"]


def test_bad_flag_value_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "ratings.tsv"
    _write_ratings(source)
    code = main(["prepare", str(source), "--out", str(tmp_path / "s"), "--val-fraction", "2"])
    assert code == 2
    assert "--val-fraction 2.0" in capsys.readouterr().err


def test_number_list_flags_parse_to_the_configs_tuple() -> None:
    from launch.cli import build_parser
    from trainer.config import RankingConfig, config_from_values

    values = vars(build_parser().parse_args(["train", "s", "--out", "r", "--ranking-ks", "5",
                                             "10", "--ranking-threshold", "3.5"]))
    assert config_from_values(RankingConfig, values) == RankingConfig(ranking_ks=(5, 10),
                                                                      ranking_threshold=3.5)


def test_train_on_missing_shards_names_the_file(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    code = main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "manifest.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_file_takes_the_launch_keys_too(tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.toml"
    config.write_text("nproc = 2\nepochs = 3\nrdzv-id = 'x'\n")
    code = main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                 "--config", str(config)])
    assert code == 2
    assert "manifest.json: not found" in capsys.readouterr().err  # not "unknown key"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    source = root / "u.data"
    _write_ratings(source, rows=6000)
    run = root / "run"
    code = main(["run", str(source), "--items", str(root / "items.csv"), "--out", str(run),
                 "--dim", "8", "--init-std", "0.1", "--lr", "0.02", "--epochs", "15",
                 "--batch-size", "256", "--threads", "1", "--clusters", "2",
                 "--min-item-ratings", "5", "--num-shards", "2"])
    assert code == 0
    return run


def test_nproc_auto_is_one_process_on_a_small_set_and_a_rank_per_core_on_a_large_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from launch.torchrun import _auto_ranks
    from trainer.defaults import RATINGS_PER_RANK_TO_PAY

    cores = len(os.sched_getaffinity(0))
    assert _auto_ranks(RATINGS_PER_RANK_TO_PAY * 1000, "cpu") == cores
    assert _auto_ranks(RATINGS_PER_RANK_TO_PAY * 2 - 1, "cpu") == 1
    source = tmp_path / "u.data"
    _write_ratings(source, rows=2000)
    with caplog.at_level("INFO", logger="launch.torchrun"):
        assert main(["run", str(source), "--out", str(tmp_path / "run"), "--epochs", "1",
                     "--dim", "4", "--threads", "1", "--clusters", "0",
                     "--objective", "rating"]) == 0
    said = [r.message for r in caplog.records if "--nproc auto" in r.message]
    manifest = json.loads((tmp_path / "run" / "shards" / "manifest.json").read_text())
    train_ratings = manifest["counts"]["ratings"]["train"]
    assert said == [f"--nproc auto: 1 rank(s) for {train_ratings:,} training ratings on "
                    f"{cores} core(s)"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 1


def test_run_learns_the_two_tastes(trained_run: Path) -> None:
    from trainer import load_run

    run = load_run(trained_run)
    predicted = run.predict([1, 1, 80, 80], [1, 60, 1, 60])
    assert predicted[0] > 4 and predicted[3] > 4
    assert predicted[1] < 2 and predicted[2] < 2
    clusters = pd.read_parquet(trained_run / "item_clusters.parquet")
    by_genre = clusters.groupby("genres")["cluster"].nunique()
    assert (by_genre == 1).all()  # each planted genre lands in one cluster


def test_recommend_and_similar_print_titles(trained_run: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    assert main(["recommend", str(trained_run), "--user", "3", "-n", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 5
    assert all("Drama" in line for line in lines)  # user 3 loves items 1-30
    assert main(["similar", str(trained_run), "--title", "Film 45", "-n", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "Film 45 (id 45)" in out[0]
    assert all("Horror" in line for line in out[1:])


def test_recommend_and_similar_import_nothing_heavy(trained_run: Path) -> None:
    run = str(trained_run)
    assert _heavy_modules_after([["recommend", run, "--user", "3"],
                                 ["similar", run, "--title", "Film 1"],
                                 ["verify", str(trained_run / "shards")]]) == []


@pytest.mark.parametrize(("args", "expected"), [
    (["recommend", "--user", "999"], "user '999' is not in"),
    (["similar", "--item", "12345"], "item '12345' is not in"),
    (["similar", "--title", "Flim 4"], "close matches: 'Film 4'"),
])
def test_unknown_ids_and_titles(trained_run: Path, capsys: pytest.CaptureFixture,
                                args: list[str], expected: str) -> None:
    code = main([args[0], str(trained_run), *args[1:]])
    assert code == 2
    assert expected in capsys.readouterr().err


def test_a_run_reports_ranking_against_most_popular(trained_run: Path) -> None:
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for k in (10, 20):
        for name in ("precision", "recall", "ndcg", "map", "hit_rate", "coverage"):
            assert 0 <= metrics[f"{name}@{k}"] <= 1
            assert 0 <= metrics[f"popular_{name}@{k}"] <= 1
    assert metrics["ranking_threshold"] == 4.0  # 75 % up the data's 1..5 scale
    # Half the users love what the other half hate: one list for all cannot serve both.
    assert metrics["ndcg@10"] > metrics["popular_ndcg@10"]
    config = json.loads((trained_run / "config.json").read_text())
    assert config["ranking"] == {"ranking_ks": [10, 20], "ranking_threshold": None,
                                 "ranking_users": 10_000}
    report = (trained_run / "report.md").read_text()
    assert "## Ranking: the model against most-popular" in report
    assert (f"| NDCG@10 | {metrics['ndcg@10']:.4f} ± {metrics['ndcg@10_se']:.4f} | "
            f"{metrics['popular_ndcg@10']:.4f} ± {metrics['popular_ndcg@10_se']:.4f} |") in report
    assert "ndcg@10" in (trained_run / "report.html").read_text().lower()


def test_evaluate_merges_ranking_figures_into_metrics(trained_run: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    path = trained_run / "metrics.json"
    trained = json.loads(path.read_text())
    # restored at the end, for the other tests: the file and its record in checksums.json
    as_trained = {name: (trained_run / name).read_bytes()
                  for name in ("metrics.json", "checksums.json")}
    assert main(["evaluate", str(trained_run)]) == 0
    assert "ndcg@10" in capsys.readouterr().out
    again = json.loads(path.read_text())
    ranking = {key: value for key, value in trained.items() if "@" in key}
    assert {key: again[key] for key in ranking} == pytest.approx(ranking)  # the same figures

    assert main(["evaluate", str(trained_run), "--k", "5", "--threshold", "5"]) == 0
    merged = json.loads(path.read_text())
    assert "ndcg@5" in merged and "ndcg@10" not in merged  # replaced, not mixed
    assert merged["ranking_threshold"] == 5.0
    assert merged["test_rmse"] == trained["test_rmse"]  # the other figures are kept

    assert main(["evaluate", str(trained_run), "--threshold", "9"]) == 2
    assert "relevance threshold 9" in capsys.readouterr().err
    assert json.loads(path.read_text()) == merged
    for name, content in as_trained.items():
        (trained_run / name).write_bytes(content)


@pytest.mark.distributed
def test_evaluate_on_two_ranks_gives_the_figures_of_one(trained_run: Path,
                                                        tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # its shards inside: RUN_DIR/shards
    figures = {}
    for nproc in ("1", "2"):
        done = subprocess.run([sys.executable, "-m", "launch.cli", "evaluate", str(run),
                               "--k", "5", "10", "--min-item-ratings", "5", "--nproc", nproc],
                              env=ENV, capture_output=True, text=True, timeout=200)
        assert done.returncode == 0, done.stderr
        assert "ndcg@5" in done.stdout
        metrics = json.loads((run / "metrics.json").read_text())
        figures[nproc] = {key: value for key, value in metrics.items()
                          if "@" in key or key.startswith("ranking_")}
    assert figures["1"]["ranking_users"] > 20 and figures["1"]["ndcg@10"] > 0
    assert figures["2"] == pytest.approx(figures["1"], rel=1e-9)


def test_export_writes_embeddings_with_original_ids(trained_run: Path, tmp_path: Path) -> None:
    assert main(["export", str(trained_run), "--format", "npy", "--out", str(tmp_path)]) == 0
    factors = np.load(tmp_path / "items_factors.npy")
    ids = pd.read_parquet(tmp_path / "items_ids.parquet")
    assert factors.shape == (60, 8) and len(ids) == 60
    assert ids["original_item_id"].tolist() == list(range(1, 61))
    assert main(["export", str(trained_run), "--out", str(tmp_path / "pq")]) == 0
    table = pd.read_parquet(tmp_path / "pq" / "users_embeddings.parquet")
    assert list(table.columns[:2]) == ["original_user_id", "f0"]
    summary = json.loads((tmp_path / "pq" / "model.json").read_text())
    from trainer import load_run

    assert summary["global_mean"] == pytest.approx(load_run(trained_run).global_mean)
    assert summary["rating_scale"] == [1.0, 5.0]


def test_export_folders_are_owned_and_replaced_whole(trained_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "export"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    assert json.loads((out / ".shardmf-output.json").read_text())["kind"] == "export"
    capsys.readouterr()
    assert main(["export", str(trained_run), "--format", "npy", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err  # an earlier export is never lost
    assert (out / "items_embeddings.parquet").is_file()
    assert main(["export", str(trained_run), "--format", "npy", "--out", str(out),
                 "--overwrite"]) == 0
    assert (out / "items_factors.npy").is_file()  # replaced whole: no parquet left beside
    assert not (out / "items_embeddings.parquet").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    capsys.readouterr()
    for target in (foreign, a_file, a_file / "below"):
        assert main(["export", str(trained_run), "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
    assert (foreign / "notes.txt").read_text() == "keep me" and a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "export", "mine"]


def test_export_formats_have_folders_of_their_own(trained_run: Path) -> None:
    """The default folders: RUN/export (parquet) and RUN/export-npy side by side; each
    export replaces only the earlier one of its own format."""
    for _ in range(2):
        assert main(["export", str(trained_run)]) == 0
        assert main(["export", str(trained_run), "--format", "npy"]) == 0
    assert (trained_run / "export" / "items_embeddings.parquet").is_file()
    assert (trained_run / "export-npy" / "items_factors.npy").is_file()
    assert not (trained_run / "export" / "items_factors.npy").exists()


@pytest.mark.timeout(240)
def test_permission_denied_in_train_and_export_is_one_line(trained_run: Path,
                                                           tmp_path: Path) -> None:
    """A real read-only folder (helpers.read_only_folder)."""
    from helpers import ENV, ROOT, read_only_folder

    locked = tmp_path / "locked"
    commands = {
        "train": [sys.executable, "-m", "trainer", str(trained_run / "shards"), "--out",
                  str(locked / "run"), "--epochs", "1", "--dim", "4", "--threads", "1",
                  "--clusters", "0"],
        "export": [sys.executable, "-m", "launch.cli", "export", str(trained_run), "--out",
                   str(locked / "export")]}
    with read_only_folder(locked) as drop:
        for name, command in commands.items():
            done = subprocess.run([*drop, *command], cwd=ROOT, env=ENV, capture_output=True,
                                  text=True, timeout=200)
            lines = [line for line in done.stderr.splitlines() if "error" in line]
            assert done.returncode == 2, (name, done.stderr)
            assert len(lines) == 1 and "Traceback" not in done.stderr, (name, done.stderr)
            assert "Permission denied" in lines[0] and str(locked) in lines[0], lines
        assert list(locked.iterdir()) == []


@pytest.mark.parametrize(("package", "forbidden"), [("data_shards", "torch"),
                                                    ("trainer", "dask")])
def test_packages_meet_only_at_the_manifest(package: str, forbidden: str) -> None:
    # every module of the package: its __init__ imports its names on first use only
    folder = Path(__file__).parents[1] / package
    modules = sorted(f"{package}.{path.stem}" for path in folder.glob("*.py")
                     if path.stem != "__main__")
    code = (f"import sys, {', '.join(modules)}; "
            f"sys.exit(1 if any(m == '{forbidden}' or m.startswith('{forbidden}.') "
            "for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_export_split_round_trips_the_ratings(trained_run: Path, tmp_path: Path) -> None:
    assert main(["export-split", str(trained_run / "shards"), "--out", str(tmp_path)]) == 0
    parts = [pd.read_csv(tmp_path / f"{s}.tsv", sep="\t") for s in ("train", "val", "test")]
    assert all(list(part.columns) == ["user", "item", "rating"] for part in parts)
    exported = pd.concat(parts).sort_values(["user", "item"]).reset_index(drop=True)
    source = pd.read_csv(trained_run.parent / "u.data", sep="\t", header=None,
                         names=["user", "item", "rating"])
    source = source.sort_values(["user", "item"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(exported, source, check_dtype=False)
