"""Output folders shardmf owns: built under a temporary sibling, marked, locked, swapped whole.

The on-disk convention, shared by every folder shardmf writes (the trainer writes the same
marker into run folders without importing this package, so keep the two in step)::

    OUT/.shardmf-output.json        {"tool": "shardmf", "kind": KIND, "version": "0.1.0"}
                                    KIND: "shards" | "run" | "export" | "export-split" | "synth"
    PARENT/.OUT.lock                flock()ed by the one process writing OUT, removed after
    PARENT/.OUT.tmp-PID-HEX         the new folder while it is built, renamed to OUT when done
    PARENT/.OUT.old-PID-HEX         a replaced folder, between the swap and its removal

Rules that follow from it:

- ``--overwrite`` replaces OUT only when it carries the marker of the same kind, and never
  when an input lies inside it (symlinks resolved). An empty folder may always be used.
- A second writer of the same OUT fails at once: it cannot take the lock.
- Cleanup removes only what this process made: its temporary folder, and the parent
  folders it created while they are still empty (``rmdir``, never ``rmtree``).
- Leftovers of a killed writer (``.tmp-``/``.old-`` whose PID is dead) are removed by the
  next writer of that OUT, once it holds the lock; an ``.old-`` folder whose swap never
  finished is put back as OUT instead.
- OS errors (disk full, permission denied, a file where a folder should be) become one
  ``InputError`` line naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path

from data_shards.errors import InputError

MARKER_NAME = ".shardmf-output.json"
OUTPUT_KINDS = ("shards", "run", "export", "export-split", "synth")
# Errors that can only come from writing: never blame the input for them.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")


def shardmf_version() -> str:
    try:
        return metadata.version("shardmf")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def write_marker(folder: Path, kind: str) -> None:
    """Mark ``folder`` as written by shardmf (see the module docstring for the format)."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {OUTPUT_KINDS}")
    payload = {"tool": "shardmf", "kind": kind, "version": shardmf_version()}
    (folder / MARKER_NAME).write_text(json.dumps(payload) + "\n")


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder``, or None when it has none (or not a shardmf one)."""
    try:
        payload = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("tool") == "shardmf" else None


def os_error_message(error: OSError, doing: str) -> InputError:
    """One line naming the path, what was being done and the OS's cause."""
    path = error.filename if error.filename is not None else "?"
    cause = error.strerror or str(error)
    hint = {errno.ENOSPC: "free some space or choose another --out",
            errno.EDQUOT: "free some space or choose another --out",
            errno.EACCES: "fix the permissions or choose another --out",
            errno.EPERM: "fix the permissions or choose another --out",
            errno.EROFS: "choose a writable --out"}.get(error.errno, "choose another --out")
    return InputError(f"{path}: {cause} while {doing}; {hint}")


def is_write_fault(error: BaseException) -> bool:
    """An OS error only a write can cause (the disk, not the input, is at fault)."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return True
    # pyarrow raises a plain OSError carrying only the OS's text.
    text = str(error)
    return isinstance(error, OSError) and any(
        os.strerror(code) in text for code in WRITE_ERRNOS)


def as_write_fault(error: OSError, out: Path) -> InputError:
    """Disk full and the like, named at the output (pyarrow's errors carry no path)."""
    cause = error.strerror or str(error).splitlines()[-1]
    return InputError(f"{error.filename or out}: {cause} while writing {out}; free some "
                      "space or choose another --out")


@contextlib.contextmanager
def output_folder(out: str | Path, kind: str, *, overwrite: bool | None = False,
                  inputs: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``out`` whole when the block succeeds.

    ``overwrite`` None: the command has no ``--overwrite`` (only an empty OUT is used).
    The marker is written into it before the swap. ``inputs`` are the paths read to make
    the output (local ones are checked; URLs are ignored). On any exception, Ctrl-C
    included, the temporary folder goes and ``out`` stays as it was.
    """
    out = Path(out)
    _refuse_files_on_the_way(out)
    created = _make_parents(out.parent)
    tmp = None
    try:
        with _target_lock(out):
            _remove_dead_leftovers(out)  # first: it may put a cut-short swap's OUT back
            _check_target(out, kind, overwrite, inputs)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
            except OSError as e:
                raise os_error_message(e, f"creating the output folder for {out}") from e
            try:
                yield tmp
                write_marker(tmp, kind)
                _swap_into_place(tmp, out)
            except OSError as e:
                if is_write_fault(e):
                    raise as_write_fault(e, out) from e
                raise
            tmp = None
    except BaseException:
        with no_interrupts():
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for folder in reversed(created):
                with contextlib.suppress(OSError):  # another writer's files keep it
                    folder.rmdir()
        raise


def _refuse_files_on_the_way(out: Path) -> None:
    """A regular file at OUT or above it: say so before creating anything."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = f"--out {out}" if path == out else f"--out {out}: {path}"
            raise InputError(f"{where} is a file, not a folder; choose another --out")


def _make_parents(parent: Path) -> list[Path]:
    """Create missing parent folders (exist_ok: another writer may create them too)."""
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(exist_ok=True)
        except OSError as e:
            raise os_error_message(e, f"creating the folder {folder}") from e
    return list(reversed(missing))


@contextlib.contextmanager
def _target_lock(out: Path) -> Iterator[None]:
    """flock() on PARENT/.OUT.lock; a second writer fails at once, naming the holder."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error_message(e, f"locking {out}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(f"--out {out}: another shardmf process (pid {holder}) is "
                             "writing it; wait for it to finish or choose another --out"
                             ) from None
        # The previous holder unlinks the file before unlocking: a lock on an unlinked
        # file protects nothing, so take it again on the file now at that path.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: see the inode check above
        os.close(fd)


def _check_target(out: Path, kind: str, overwrite: bool | None,
                  inputs: Iterable[str]) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite is None:
        raise InputError(f"{out} already exists and is not empty; choose another --out or "
                         "remove it first")
    if not overwrite:
        raise InputError(f"{out} already exists and is not empty; pass --overwrite to "
                         "replace it or choose another --out")
    marker = read_marker(out)
    if marker is None:
        raise InputError(f"--overwrite {out}: shardmf did not write this folder (no "
                         f"{MARKER_NAME}), so it is never replaced; remove it yourself or "
                         "choose another --out")
    if marker.get("kind") != kind:
        raise InputError(f"--overwrite {out}: it holds shardmf {marker.get('kind')} output, "
                         f"not {kind}; choose another --out")
    target = out.resolve()
    for spec in inputs:
        local = _local_path(spec)
        if local is not None and target in (local, *local.parents):
            raise InputError(f"--overwrite {out}: the input {spec} is inside it; write the "
                             "output somewhere else")


def _local_path(spec: str) -> Path | None:
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", spec):
        return None
    return Path(spec).resolve()


def _remove_dead_leftovers(out: Path) -> None:
    """Temporary folders of killed writers of OUT; called with the lock held."""
    for entry in out.parent.iterdir():
        match = _LEFTOVER.fullmatch(entry.name)
        if not match or match["name"] != out.name or _alive(int(match["pid"])):
            continue
        if match["what"] == "old" and not out.exists():
            os.replace(entry, out)  # killed between the two renames: the old one is OUT
        else:
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Move an old OUT aside, rename the new one in, then remove the old one."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def no_interrupts() -> Iterator[None]:
    """Hold off a second Ctrl-C while cleaning up, so the cleanup itself finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
