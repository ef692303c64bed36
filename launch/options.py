"""Command-line flags and TOML files built from the config dataclasses of both packages.

Each dataclass field becomes a kebab-case flag whose help and choices come from the field's
metadata (``field(default=..., metadata={"help": ..., "choices": ...})``), so a config,
its flag and its TOML key cannot drift apart. Precedence: defaults < TOML
(``--config FILE``, flat keys, snake or kebab case) < flags given on the command line.
It lives in ``launch`` because it builds the flags of ``data_shards`` and ``trainer``
alike; the configs themselves (and `config_from_values`) stay with their packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

import tomllib

from shardmf.errors import InputError
from trainer.config import TRAIN_CONFIGS, ClusterConfig, RankingConfig


def add_config_arguments(parser: argparse.ArgumentParser, cls: type,
                         skip: tuple[str, ...] = (), title: str | None = None) -> None:
    """One flag per dataclass field; defaults are left to the dataclass (argparse.SUPPRESS).

    Help, choices and the value's name in usage (``metavar``) come from the field's
    metadata. A field another config of the same command already added (``seed`` of
    prepare and training) keeps one flag, whose help then says what else it drives.
    """
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    existing = {a.dest: a for a in parser._actions}
    for item in dataclasses.fields(cls):
        if item.name in skip:
            continue
        text = flag_help(item)
        if item.name in existing:
            existing[item.name].help += f"; also {item.metadata.get('help', '')}"
            continue
        flag = "--" + item.name.replace("_", "-")
        kind = hints[item.name]
        if kind is bool or set(typing.get_args(kind)) == {bool, type(None)}:  # bool | None
            group.add_argument(flag, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        elif _is_number_list(kind):
            group.add_argument(flag, type=int, nargs="+", default=argparse.SUPPRESS,
                               help=text, metavar="N", action=_StoreTuple)
        elif "choices" in item.metadata:
            group.add_argument(flag, choices=item.metadata["choices"],
                               default=argparse.SUPPRESS, help=text)
        else:
            group.add_argument(flag, type=_parser_for(kind), default=argparse.SUPPRESS,
                               help=text, metavar=item.metadata.get("metavar", _metavar(kind)))


def flag_help(item: dataclasses.Field) -> str:
    """A field's help with its default in words; a None default is explained by the help
    itself (it says "(default: ...)"), never shown as a bare None."""
    text = item.metadata.get("help", "")
    default = item.default
    if "(default:" in text or default is dataclasses.MISSING or default is None:
        shown = ""
    elif isinstance(default, bool):
        shown = f" (default: {'on' if default else 'off'})"
    elif isinstance(default, tuple):
        shown = f" (default: {' '.join(map(str, default))})"
    else:
        shown = f" (default: {default:,})" if isinstance(default, int) else (
            f" (default: {default})")
    return (text + shown).replace("%", "%%")  # argparse formats help with %


def apply_config_file(values: dict, config_classes: tuple[type, ...]) -> dict:
    """Parsed flags on top of the optional ``--config`` TOML file, as one flat dict."""
    values = dict(values)
    path = values.pop("config", None)
    if path:
        values = {**load_toml(Path(path), config_classes), **values}
    return values


def load_toml(path: Path, config_classes: tuple[type, ...]) -> dict:
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"--config {path}: not valid TOML ({e})") from e
    known: dict[str, type] = {}
    for cls in config_classes:
        hints = typing.get_type_hints(cls)
        known.update({f.name: hints[f.name] for f in dataclasses.fields(cls)})
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known:
            raise InputError(f"--config {path}: unknown key {key!r}; known keys are "
                             f"{', '.join(sorted(known))}")
        values[name] = _toml_value(path, key, value, known[name])
    return values


def _toml_value(path: Path, key: str, value, kind):
    """A TOML value checked against its field's type, so a wrong type is one clear error."""
    origin = typing.get_origin(kind)
    union = origin in (typing.Union, getattr(__import__("types"), "UnionType", None))
    for option in [a for a in typing.get_args(kind) if a is not type(None)] if union else [kind]:
        base = typing.get_origin(option) or option
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if base is float and number:
            return float(value)
        if base is int and number and int(value) == value:  # 3 or 3.0, never 3.5
            return int(value)
        if base is tuple and isinstance(value, list):
            return tuple(value)
        if base in (bool, str, dict) and isinstance(value, base):
            return value
    raise InputError(f"--config {path}: {key} = {value!r} is not a valid "
                     f"{getattr(kind, '__name__', str(kind))}")


class _StoreTuple(argparse.Action):
    """Store ``nargs`` values as a tuple, the type the config field declares."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(values))


def _is_number_list(kind) -> bool:
    """``tuple[int, ...]``: a flag taking one or more numbers (``--ranking-ks 10 20``)."""
    args = typing.get_args(kind)
    return typing.get_origin(kind) is tuple and len(args) == 2 and args[1] is Ellipsis


def _parser_for(kind):
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        if set(args) == {int, str}:  # e.g. --clusters 20 | auto: a number when it is one
            def int_or_text(text: str) -> int | str:
                try:
                    return int(text)
                except ValueError:
                    return text
            return int_or_text
        return _parser_for(args[0])
    if origin is tuple:
        return _number_pair
    if kind is int:
        return int
    if kind is float:
        return float
    return str


def _metavar(kind) -> str:
    parser = _parser_for(kind)
    if parser.__name__ == "int_or_text":
        return "N|auto"
    return {int: "N", float: "X", _number_pair: "MIN,MAX"}.get(parser)  # None: the name


def _number_pair(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX such as 1,5, got {text!r}") from e
    return low, high


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a training run, shared by ``python -m trainer`` and ``shardmf train``."""
    parser.add_argument("shards_dir", metavar="SHARDS_DIR", help="output of `shardmf prepare`")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="run folder: config, metrics, checkpoint, model, clusters")
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file whose keys are the "
                        "config flags (snake or kebab case; `shardmf train` also takes nproc "
                        "and the other launch flags); flags given here win")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    add_training_config_arguments(parser)


def add_training_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag group per config that training reads (TRAIN_CONFIGS)."""
    for cls, title in zip(TRAIN_CONFIGS, ("model", "optimizer", "training",
                                          "ranking evaluation (test split, after training)")):
        add_config_arguments(parser, cls, title=title)


CLUSTER_SKIP = ("seed",)  # the post-step uses the run's --seed


def add_cluster_arguments(parser: argparse.ArgumentParser, skippable: bool = True) -> None:
    """The clustering flags of ``train``, ``run`` and ``cluster`` (no --seed of their own);
    ``skippable``: training, where ``--clusters 0`` leaves the post-step out."""
    add_config_arguments(parser, ClusterConfig, skip=CLUSTER_SKIP,
                         title="item clusters (--clusters 0 skips them)" if skippable
                         else "item clusters")


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `shardmf evaluate`, which its ranks parse too (launch/train_entry.py)."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    default_ks = RankingConfig.ranking_ks
    parser.add_argument("--k", type=positive_int, nargs="+", default=list(default_ks),
                        metavar="K", help="list lengths (default: "
                        f"{' '.join(map(str, default_ks))})")
    parser.add_argument("--threshold", type=float, metavar="RATING",
                        help="a test rating at or above this is relevant (default: 75 %% "
                        "up the run's rating scale: 4 on 1-5, 3.875 on 0.5-5)")
    parser.add_argument("--min-item-ratings", type=int, default=0, metavar="N",
                        help="recommend only items with at least N training ratings, as "
                        "`recommend` does with 20 (default: 0, every item)")
    default_users = RankingConfig.ranking_users
    parser.add_argument("--users", type=int, default=default_users, metavar="N",
                        help="a seeded sample of about N test users, the same as training's "
                        f"(default: {default_users:,}; 0: every user)")


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {number}")
    return number
