"""Folders shardmf owns: marked, locked, written atomically; stdlib only, for both packages.

The on-disk convention, shared by every folder shardmf writes::

    OUT/.shardmf-output.json        {"tool": "shardmf", "kind": KIND, "version": "0.1.0",
                                     "entries": [NAME, ...]}
                                    KIND: "shards" | "run" | "export" | "export-split" | "synth"
                                          | "demo"
                                    entries: what a folder built whole holds (not a run's)
    PARENT/.OUT.lock                flock()ed by the one process writing OUT, removed after
    PARENT/.OUT.tmp-PID-HEX         a new folder while it is built, renamed to OUT when done
    PARENT/.OUT.old-PID-HEX         a replaced folder, between the swap and its removal
    FOLDER/.NAME.PID.HEX.tmp        a file while `replace_atomically` writes it

Rules that follow from it:

- `output_folder` builds OUT aside and swaps it in whole. ``overwrite`` replaces OUT only
  when it carries the marker of the same kind, and never when an input lies inside it
  (symlinks resolved), nor when it holds a name its marker does not list or another
  shardmf output. An empty folder may always be used. (A run folder is written in
  place instead, so that its checkpoint survives a crash: trainer/run_files.py claims it
  with the same marker and lock.)
- A second writer of the same OUT fails at once: it cannot take the lock.
- Cleanup removes only what this process made: its temporary folder, and the parent
  folders it created while they are still empty (``rmdir``, never ``rmtree``).
- Leftovers of a killed writer (whose PID is dead) are removed by the next writer of that
  folder, once it holds the lock; an ``.old-`` folder whose swap never finished is put
  back as OUT instead.
- OS errors (disk full, permission denied, a file where a folder should be) become one
  `InputError` line naming the path and the cause.
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
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from shardmf.errors import InputError

MARKER_NAME = ".shardmf-output.json"
OUTPUT_KINDS = ("shards", "run", "export", "export-split", "synth", "demo")
# Kinds built aside and swapped in whole by `output_folder` (a run is written in place, a
# demo folder holds a synth, shards and a run of its own).
REPLACED_WHOLE = ("shards", "export", "export-split", "synth")
# Errors that can only come from writing: never blame the input for them.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
# What to do about an OS error met while writing, by errno.
_HINTS = {errno.ENOSPC: "free some space or choose another `out`",
          errno.EDQUOT: "free some space or choose another `out`",
          errno.EFBIG: "free some space or choose another `out`",
          errno.EACCES: "fix the permissions or choose another `out`",
          errno.EPERM: "fix the permissions or choose another `out`",
          errno.EROFS: "choose a writable `out`"}
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)-[0-9a-f]+")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp")


def shardmf_version() -> str:
    """The installed shardmf's version (recorded in markers, printed by ``--version``)."""
    try:
        return metadata.version("shardmf")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


# --- the marker ---------------------------------------------------------------


def write_marker(folder: Path, kind: str, entries: list[str] | None = None) -> None:
    """Mark ``folder`` as written by shardmf (see the module docstring for the format);
    ``entries``: the names it wrote there, so that a later overwrite can tell them from
    what someone else put inside it."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; expected one of {OUTPUT_KINDS}")
    payload = {"tool": "shardmf", "kind": kind, "version": shardmf_version()}
    if entries is not None:
        payload["entries"] = sorted(entries)
    write_atomic(folder / MARKER_NAME, (json.dumps(payload) + "\n").encode("utf-8"))


def read_marker(folder: Path) -> dict | None:
    """The marker of ``folder``, or None when it has none (or not a shardmf one)."""
    try:
        payload = json.loads((folder / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("tool") == "shardmf" else None


# --- OS errors as one line ------------------------------------------------------


def os_error(error: OSError, doing: str, path: Path | str | None = None) -> InputError:
    """One line naming the path (``path``, else the error's own), what was being done and
    the OS's cause, with what to do about it."""
    where = path if path is not None else error.filename if error.filename is not None else "?"
    cause = error.strerror or (str(error).splitlines() or ["?"])[-1]
    return InputError(f"{where}: {cause} while {doing}; "
                      f"{_HINTS.get(error.errno, 'choose another `out`')}")


def write_fault(error: OSError, path: Path) -> InputError:
    """A failed write of ``path`` as one line (pyarrow's errors carry no path of their own)."""
    return os_error(error, "writing it", path)


def is_write_fault(error: BaseException) -> bool:
    """An OS error only a write can cause (the disk, not the input, is at fault)."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return True
    # pyarrow raises a plain OSError carrying only the OS's text.
    text = str(error)
    return isinstance(error, OSError) and any(
        os.strerror(code) in text for code in WRITE_ERRNOS)


# --- atomic files -----------------------------------------------------------------


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see `replace_atomically`)."""
    replace_atomically(path, lambda handle: handle.write(data))


def replace_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a file under a unique temporary name beside ``path``, fsync, rename.

    The one atomic-write idiom: a crash leaves the previous complete file or none. The
    temporary name is unique per process and call, so two writers never share one; it is
    removed on any failure. ``write`` may stream (torch.save, a file copy) without holding
    the whole file in memory. ``open(..., "xb")`` honours the umask, where
    ``tempfile.mkstemp``'s 0600 mode would make reports unreadable to others.
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    recorder = None
    try:
        with open(temp, "xb") as handle:
            recorder = _WriteRecorder(handle)
            write(recorder)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        interrupt = _interrupt_behind(error)
        if interrupt is not None and interrupt is not error:
            # torch.save's zip writer turns a Ctrl-C mid-write into "unexpected pos" on its
            # way out: the caller must still stop as interrupted, in one line.
            raise interrupt from None
        # torch.save reports a failed write as "unexpected pos": the recorder kept the cause.
        cause = recorder.error if recorder is not None and recorder.error else error
        if isinstance(cause, OSError) and cause.errno in _HINTS:
            raise write_fault(cause, path) from error
        raise


def _interrupt_behind(error: BaseException | None) -> KeyboardInterrupt | None:
    """The Ctrl-C that ``error`` was raised while handling, if any (or ``error`` itself)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return error
        error = error.__context__
    return None


class _WriteRecorder:
    """A file handle that remembers the OS error of a failed write."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.handle.flush()


def write_json(path: Path, payload: Any) -> None:
    """Strict, indented JSON, atomically (NaN refused: readers expect standard JSON)."""
    write_atomic(path, (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Replace ``path`` with one JSON object per line."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def copy_atomic(source: Path, path: Path) -> None:
    """A copy of ``source`` at ``path``, atomically, streamed."""
    with open(source, "rb") as reading:
        replace_atomically(path, lambda handle: shutil.copyfileobj(reading, handle))


def remove_dead_temporaries(folder: Path) -> None:
    """Temporary files of `replace_atomically` whose writer was killed (its pid is gone).

    Call with the folder's lock held."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match and not pid_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)


# --- folders: creating, locking, replacing -------------------------------------------


def refuse_files_on_the_way(out: Path) -> None:
    """A regular file at ``out`` or above it: say so before creating anything."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = f"out={out}" if path == out else f"out={out}: {path}"
            raise InputError(f"{where} is a file, not a folder; choose another `out`")


def create_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first.

    ``exist_ok``: another writer may create one too. On an OS error the ones made here are
    removed again (see `remove_empty`) and the error is one line.
    """
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for path in reversed(missing):
        try:
            path.mkdir(exist_ok=True)
        except OSError as e:
            remove_empty(missing)
            raise os_error(e, f"creating the folder {path}") from e
    return missing


def remove_empty(folders: list[Path]) -> None:
    """rmdir (never rmtree) folders this process created, deepest first."""
    for folder in folders:
        with contextlib.suppress(OSError):  # another writer's files keep it
            folder.rmdir()


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """flock() on PARENT/.OUT.lock for the block; a second writer fails at once, naming the
    holder (the file holds its pid)."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            # O_NOFOLLOW: a symlink planted at the lock's name must not make the lock
            # truncate and write its target.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise InputError(f"{path}: a symbolic link where shardmf keeps the lock of "
                                 f"{out}; remove it (shardmf never follows it)") from e
            raise os_error(e, f"locking {out}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise InputError(f"out={out}: another shardmf process (pid {holder}) is "
                             "writing it; wait for it to finish or choose another `out`"
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
        with no_interrupts(), contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: see the inode check above
        os.close(fd)


@contextlib.contextmanager
def output_folder(out: str | Path, kind: str, *, overwrite: bool | None = False,
                  inputs: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``out`` whole when the block succeeds.

    ``overwrite`` None: the caller never replaces anything (only an empty OUT is used).
    The marker is written into it before the swap. ``inputs`` are the paths read to make
    the output (local ones are checked; URLs are ignored). On any exception, Ctrl-C
    included, the temporary folder goes and ``out`` stays as it was.
    """
    out = Path(out)
    refuse_files_on_the_way(out)
    created = create_folders(out.parent)
    tmp = None
    try:
        with folder_lock(out):
            _remove_dead_leftovers(out)  # first: it may put a cut-short swap's OUT back
            _check_target(out, kind, overwrite, inputs)
            tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            try:
                tmp.mkdir()
            except OSError as e:
                raise os_error(e, f"creating the output folder for {out}") from e
            try:
                yield tmp
                write_marker(tmp, kind, [entry.name for entry in tmp.iterdir()])
                _swap_into_place(tmp, out)
            except OSError as e:
                if is_write_fault(e):
                    raise write_fault(e, out) from e
                raise
            tmp = None
    except BaseException:
        with no_interrupts():
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            remove_empty(created)
        raise


def _check_target(out: Path, kind: str, overwrite: bool | None,
                  inputs: Iterable[str]) -> None:
    if not out.exists() or not any(out.iterdir()):
        return
    if overwrite is None:
        raise InputError(f"{out} already exists and is not empty; choose another `out` or "
                         "remove it first")
    if not overwrite:
        raise InputError(f"{out} already exists and is not empty; pass `overwrite` to "
                         "replace it or choose another `out`")
    marker = read_marker(out)
    if marker is None:
        raise InputError(f"{out}: shardmf did not write this folder (no {MARKER_NAME}), so "
                         "it is never replaced; remove it yourself or choose another `out`")
    if marker.get("kind") != kind:
        raise InputError(f"{out}: it holds shardmf {marker.get('kind')} output, not {kind}, "
                         "so it is not replaced; choose another `out`")
    _refuse_foreign_content(out, marker)
    target = out.resolve()
    for spec in inputs:
        local = _local_path(spec)
        if local is not None and target in (local, *local.parents):
            raise InputError(f"{out}: the input {spec} is inside it, so it is not replaced; "
                             "write the output somewhere else")


def _refuse_foreign_content(out: Path, marker: dict) -> None:
    """What shardmf did not write into OUT as part of it: a name its marker does not list
    (markers of an older shardmf list none), or another shardmf output anywhere inside
    (a run trained into a shard folder): replacing OUT whole would delete it."""
    owned = marker.get("entries")
    if isinstance(owned, list):
        foreign = sorted(entry.name for entry in out.iterdir()
                         if entry.name != MARKER_NAME and entry.name not in owned)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                              if len(foreign) > 3 else "")
            raise InputError(f"{out}: it holds {shown}, which shardmf did not write there "
                             f"as {marker.get('kind')} output, so it is not replaced; move "
                             "it out or choose another `out`")
    for folder, _, files in os.walk(out):
        inner = read_marker(Path(folder)) if MARKER_NAME in files else None
        if inner is not None and Path(folder) != out:
            raise InputError(f"{out}: {folder} inside it holds shardmf {inner.get('kind')} "
                             "output, so it is not replaced; move it out or choose another "
                             "`out`")


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
        if not match or match["name"] != out.name or pid_alive(int(match["pid"])):
            continue
        if match["what"] == "old" and not out.exists():
            os.replace(entry, out)  # killed between the two renames: the old one is OUT
        else:
            shutil.rmtree(entry, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` lives (another user's live process counts)."""
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
    """Hold off a second Ctrl-C or SIGTERM while cleaning up, so the cleanup itself
    finishes (a supervisor often repeats SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, signal.SIG_IGN)
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            if handler is not None:  # None: set outside Python, left as it is now
                signal.signal(number, handler)
