"""The configs (trainer/config.py) and their flags and TOML keys (launch/options.py):
every field has help and a flag, the file lies below the flags, validation names the flag."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import pytest

from launch.options import add_config_arguments, apply_config_file
from launch.torchrun import TorchrunOptions
from launch.train_entry import build_parser
from shardmf.errors import InputError
from trainer.config import (
    TRAIN_CONFIGS,
    ClusterConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_from_values,
)

ALL_CONFIGS = (*TRAIN_CONFIGS, ClusterConfig, TorchrunOptions)


@pytest.mark.parametrize("cls", ALL_CONFIGS)
def test_every_field_has_help_and_a_flag(cls) -> None:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, cls)
    for item in fields(cls):
        assert item.metadata.get("help"), f"{cls.__name__}.{item.name} has no help"
        action = next(a for a in parser._actions if a.dest == item.name)
        assert action.option_strings[0] == "--" + item.name.replace("_", "-")
        assert action.help.startswith(item.metadata["help"].replace("%", "%%"))
        assert "(default:" in action.help and "(default: None)" not in action.help
        assert action.default is argparse.SUPPRESS  # the dataclass owns defaults
        if "choices" in item.metadata:
            assert item.default in item.metadata["choices"]
            assert tuple(action.choices) == item.metadata["choices"]


def test_flags_parse_into_configs() -> None:
    values = vars(build_parser().parse_args(
        ["S", "--out", "R", "--dim", "8", "--lr", "0.1", "--resume", "--no-resume",
         "--verify", "full", "--clusters", "3"]))
    assert values["dim"] == 8 and values["lr"] == 0.1 and values["resume"] is False
    assert "epochs" not in values  # not given: the dataclass default applies
    assert config_from_values(ModelConfig, values) == ModelConfig(dim=8)
    assert config_from_values(TrainConfig, values).verify == "full"


def test_toml_below_flags(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text('epochs = 7\nlr = 0.1\nbatch-size = 64\noptimizer = "adagrad"\n'
                      'resume = true\n')
    parsed = vars(build_parser().parse_args(
        ["S", "--out", "R", "--config", str(config), "--epochs", "3", "--no-resume"]))
    values = apply_config_file(parsed, TRAIN_CONFIGS)
    train_config = config_from_values(TrainConfig, values)
    assert train_config.epochs == 3  # flag wins
    assert train_config.batch_size == 64  # kebab-case key from the file
    assert train_config.resume is False  # a negated flag wins too
    assert config_from_values(OptimConfig, values) == OptimConfig(optimizer="adagrad", lr=0.1)


@pytest.mark.parametrize("text,message", [
    ("epochz = 3\n", r"unknown key 'epochz'; known keys are .*epochs"),
    ("epochs = \n", "not valid TOML"),
    ('epochs = "3"\n', r"epochs = '3' is not a valid int"),
    ("epochs = 2.5\n", r"epochs = 2.5 is not a valid int"),
    ("resume = 1\n", r"resume = 1 is not a valid bool"),
])
def test_bad_toml(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(InputError, match=rf"--config .*bad\.toml: {message}"):
        apply_config_file({"config": str(config)}, TRAIN_CONFIGS)


def test_missing_toml(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        apply_config_file({"config": str(tmp_path / "none.toml")}, TRAIN_CONFIGS)


@pytest.mark.parametrize("build,message", [
    (lambda: ModelConfig(reg=0.05, dim=0), "--dim 0: expected at least 1"),
    (lambda: ModelConfig(reg=-1.0), "--reg -1.0: expected >= 0"),
    (lambda: OptimConfig(optimizer="rmsprop"), "--optimizer 'rmsprop': expected sgd"),
    (lambda: OptimConfig(lr=0.0), "--lr 0.0: expected a finite number > 0"),
    (lambda: OptimConfig(lr=float("inf")), "--lr inf: expected a finite number > 0"),
    (lambda: OptimConfig(lr=float("nan")), "--lr nan: expected a finite number > 0"),
    (lambda: OptimConfig(lr_decay=1.5), "--lr-decay 1.5: expected 0 < x <= 1"),
    (lambda: TrainConfig(epochs=0), "--epochs 0: expected at least 1"),
    (lambda: TrainConfig(batch_size=0), "--batch-size 0"),
    (lambda: TrainConfig(device="tpu"), "--device 'tpu'"),
    (lambda: TrainConfig(verify="some"), "--verify 'some'"),
    (lambda: TrainConfig(timeout_s=5), "--timeout-s 5: expected at least 10"),
    (lambda: ClusterConfig(clusters=1), "--clusters 1: expected at least 2"),
    (lambda: TorchrunOptions(nproc=0), "--nproc 0"),
    (lambda: TorchrunOptions(nnodes=2), "--nnodes 2 needs --rdzv-endpoint"),
])
def test_config_validation(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_checkpoint_every_validation() -> None:
    with pytest.raises(ValueError, match="--checkpoint-every -1: expected >= 0"):
        TrainConfig(checkpoint_every=-1)
