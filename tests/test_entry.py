"""trainer/entry.py, what each rank runs: a job from flags or a job file; a user error is one
line, printed once, in the words of flags."""

from __future__ import annotations

from pathlib import Path

from shardmf.errors import InputError
from trainer.config import ModelConfig, RunConfig
from trainer.entry import EvaluateJob, TrainJob, fail, parse_job, read_job, write_job
from trainer.entry import main as trainer_main


def test_entry_point_reports_bad_config_in_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("epochz = 3\n")
    assert trainer_main(["S", "--out", str(tmp_path / "r"), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("shardmf: error: --config")


def test_entry_point_error_lines_per_rank(capsys) -> None:
    """An InputError is the same on every rank: only rank 0 prints it. Another ValueError may
    be one rank's alone (a damaged row group), so that rank prints it, naming itself."""
    assert fail(InputError("bad flag"), rank=1) == 2
    assert capsys.readouterr().err == ""
    assert fail(InputError("bad flag"), rank=0) == 2
    assert capsys.readouterr().err == "shardmf: error: bad flag\n"
    assert fail(ValueError("row group 3 unreadable"), rank=1) == 2
    assert capsys.readouterr().err == "shardmf: error: rank 1: row group 3 unreadable\n"


def test_a_job_file_carries_the_whole_config(tmp_path: Path) -> None:
    """What the launcher hands torchrun's ranks is what flags would have built."""
    flags = ["S", "--out", str(tmp_path / "r"), "--dim", "8", "--ranking-ks", "5", "10",
             "--clusters", "0"]
    job, debug = parse_job(flags)
    assert not debug and job.config.model == ModelConfig(dim=8)
    assert job.config.ranking.ranking_ks == (5, 10) and job.config.cluster is None
    for sent in (TrainJob(job.config, shards_verified=True),
                 EvaluateJob(str(tmp_path / "r"), (5, 10), 3.5, 2, 0)):
        write_job(sent, tmp_path / "job.json")
        assert read_job(tmp_path / "job.json") == sent
    clustered = RunConfig.from_values("S", "R", {"clusters": 7, "seed": 3})
    assert clustered.cluster.clusters == 7 and clustered.cluster.seed == 3  # the run's seed


def test_a_bad_value_is_one_line_in_flag_words(tmp_path: Path, capsys) -> None:
    assert trainer_main(["S", "--out", str(tmp_path / "r"), "--dim", "0"]) == 2
    assert capsys.readouterr().err.strip() == "shardmf: error: --dim 0: expected at least 1"
    (tmp_path / "job.json").write_text("{}")
    assert trainer_main(["--job", str(tmp_path / "job.json")]) == 2
    assert "not a job shardmf wrote" in capsys.readouterr().err
