"""Design rules checked on the source: no import circle inside ``trainer``, the library
never imports ``launch``, the run folder's file names are spelled in one module, the
contracts both packages share (``shardmf/``) exist once and import neither torch nor Dask,
and no test module imports another (what they share is in tests/helpers.py or conftest.py)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import run_files

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"trainer.__main__"}  # run, never imported


def _modules(package: str) -> dict[str, ast.Module]:
    """Every module of `package` and its subpackages by dotted name (an ``__init__.py`` by
    its package's)."""
    modules = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = ast.parse(path.read_text(), str(path))
    return modules


def _imports(tree: ast.Module) -> set[str]:
    """Every module an import statement names, at any depth (imports inside functions too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            # `from trainer import report` names the module trainer.report
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_trainer_modules_import_no_circle() -> None:
    modules = _modules("trainer")
    graph = {name: {m for m in _imports(tree) if m in modules and m != name}
             for name, tree in modules.items()}
    state: dict[str, str] = {}  # "open" while on the current path, then "done"

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "trainer.analysis.post_step" in graph and "trainer.run_files" in graph


def test_no_test_module_imports_another() -> None:
    test_modules = {path.stem for path in (ROOT / "tests").glob("test_*.py")}
    offenders = sorted(
        f"{path.name} imports {name}"
        for path in (ROOT / "tests").glob("test_*.py")
        for name in _imports(ast.parse(path.read_text(), str(path)))
        if name.split(".")[0] in test_modules | {"conftest"})
    assert not offenders, "\n".join(offenders)


def test_the_trainer_library_never_imports_launch() -> None:
    for name, tree in _modules("trainer").items():
        if name in ENTRY_POINTS:
            continue
        assert not any(m.split(".")[0] == "launch" for m in _imports(tree)), name


def _docstrings(tree: ast.Module) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes
            if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}


def test_run_folder_file_names_are_spelled_only_in_run_files() -> None:
    names = {value for key, value in vars(run_files).items()
             if key.isupper() and isinstance(value, str) and "." in value}
    names.add(".rank")  # the per-rank parts: checkpoint slices, model parts
    assert ".rank" in run_files.checkpoint_slice("1-0", 0) and ".rank" in run_files.model_part(0)
    assert {"config.json", "metrics.jsonl", "model.pt", "report.html"} <= names
    offenders = []
    for package in ("trainer", "launch"):
        for name, tree in _modules(package).items():
            if name == "trainer.run_files":
                continue
            docstrings = _docstrings(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and id(node) not in docstrings):
                    offenders += [f"{name}:{node.lineno}: {file_name!r}"
                                  for file_name in names if file_name in node.value]
    assert not offenders, "RUN_DIR file names outside trainer/run_files.py:\n" + "\n".join(
        offenders)


SHARED = sorted(f"shardmf.{path.stem}" for path in (ROOT / "shardmf").glob("*.py")
                if path.stem != "__init__")


@pytest.mark.parametrize("module", ["shardmf", *SHARED])
def test_shared_contracts_import_neither_torch_nor_dask(module: str) -> None:
    """Both packages import these, so they may pull in neither package's engine (nor the
    packages themselves: that would be a circle)."""
    forbidden = ("torch", "dask", "data_shards", "trainer", "launch")
    code = (f"import sys, {module}; "
            f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(forbidden)})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"{module} imports {done.stdout.strip()}"


def test_there_is_exactly_one_input_error() -> None:
    import data_shards
    import trainer
    from shardmf.errors import InputError

    defined = [name for package in ("shardmf", "data_shards", "trainer", "launch")
               for name, tree in _modules(package).items()
               for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and node.name == "InputError"]
    assert defined == ["shardmf.errors"]
    assert data_shards.InputError is InputError and trainer.InputError is InputError


def test_every_rank_starts_in_trainer_entry() -> None:
    """One rank entry: the launcher starts ``-m trainer`` only, and nothing in ``launch``
    trains or evaluates on its own (it hands a job to `trainer.entry.run_job`)."""
    assert not (ROOT / "launch" / "train_entry.py").exists()
    assert not (ROOT / "launch" / "evaluate_entry.py").exists()
    for name, tree in _modules("launch").items():
        calls = {node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                 for node in ast.walk(tree) if isinstance(node, ast.Call)
                 and isinstance(node.func, (ast.Name, ast.Attribute))}
        assert not calls & {"train", "evaluate_run", "init_distributed"}, name
    torchrun = (ROOT / "launch" / "torchrun.py").read_text()
    assert '"--module", "trainer"' in torchrun


def _error_texts(tree: ast.Module) -> list[tuple[int, str]]:
    """The literal text of every exception raised with a message."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            for part in ast.walk(node.exc):
                if isinstance(part, ast.Constant) and isinstance(part.value, str):
                    found.append((node.lineno, part.value))
    return found


def test_the_library_names_fields_not_flags() -> None:
    """Below ``launch`` an error names a setting as ``name=value`` or `` `name` ``, which the
    CLI words as ``--name value`` (shardmf.flags.as_flags); a Python user never reads about
    a flag they did not pass. A whole command in backticks keeps its flags."""
    offenders = []
    for package in ("shardmf", "data_shards", "trainer"):
        for name, tree in _modules(package).items():
            if name == "shardmf.flags":  # the flag engine itself: its errors are about flags
                continue
            for line, text in _error_texts(tree):
                outside_commands = re.sub(r"`(shardmf|python -m trainer) [^`]*`", "", text)
                if re.search(r"(^|[\s(/])--[a-z]", outside_commands):
                    offenders.append(f"{name}:{line}: {text!r}")
    assert not offenders, "flag wording in library errors:\n" + "\n".join(offenders)


COLLECTIVE_MODULES = {"trainer.distributed", "trainer.sync"}  # sync: the row exchange's own


def _names_torch_distributed(node: ast.AST) -> bool:
    """``import torch.distributed``, ``from torch import distributed`` or ``torch.distributed``."""
    if isinstance(node, ast.Import):
        return any(a.name.startswith("torch.distributed") for a in node.names)
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module.startswith("torch.distributed.elastic"):
            return False  # torchrun's error recording of a rank's entry, no collective
        return node.module.startswith("torch.distributed") or (
            node.module == "torch" and any(a.name == "distributed" for a in node.names))
    return (isinstance(node, ast.Attribute) and node.attr == "distributed"
            and isinstance(node.value, ast.Name) and node.value.id == "torch")


def test_collectives_are_called_only_in_the_distributed_and_sync_modules() -> None:
    """The rest of the trainer calls trainer.distributed's helpers, never torch.distributed."""
    users = {name for name, tree in _modules("trainer").items()
             if any(_names_torch_distributed(node) for node in ast.walk(tree))}
    assert users == COLLECTIVE_MODULES, "torch.distributed outside trainer/distributed.py " \
        f"and sync.py: {sorted(users - COLLECTIVE_MODULES)}"
