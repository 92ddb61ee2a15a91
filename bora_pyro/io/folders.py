"""Folders this tool writes: ownership markers, safe replacement, crash-safe writes and locks.

Every folder bora_pyro creates (run, sweep, export, merged model, checkpoint) holds a marker file,
:data:`MARKER`. ``--overwrite`` replaces only such folders (or an empty one), never the working
directory, one of its parents, the home folder or the root. A folder is written in a temporary
sibling ``.NAME.tmp-*`` and put in place by rename-aside (the old one to ``.NAME.old-*``),
rename-in, then deletion of the old copy: a kill at any moment leaves the old or the new folder
complete, and :func:`recover` (run before every write and read) puts a complete old copy back or
removes the leftovers. Single files are replaced atomically (:func:`atomic_write`). A lock (a file
under ``cache_dir()/locks``, named after the folder's absolute path) keeps two processes from
writing one folder at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .faults import crash_point

MARKER = ".bora_pyro.json"
KINDS = ("run", "sweep", "export", "merged", "checkpoint", "store")


def cache_dir() -> Path:
    """Where bora_pyro keeps converted models and locks: ``$BORA_PYRO_CACHE`` or ``~/.cache/bora_pyro``."""
    return Path(os.environ.get("BORA_PYRO_CACHE", Path.home() / ".cache" / "bora_pyro"))


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


def mark(folder: Path, kind: str) -> None:
    """Write the ownership marker of a folder of ``kind`` (see :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"folder kind must be one of {KINDS}, got {kind!r}")
    from .. import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind, "bora_pyro_version": __version__}) + "\n")


def is_ours(folder: Path) -> bool:
    """True for a folder bora_pyro wrote: it holds the marker (or is a run / sweep folder written
    before markers existed, recognised by its config.json / sweep.json)."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text())
        if isinstance(config, dict) and "bora_pyro_version" in config and (folder / "adapters.safetensors").is_file():
            return True
    with contextlib.suppress(OSError, ValueError):
        return "spec" in json.loads((folder / "sweep.json").read_text())
    return False


def protected(target: Path) -> str | None:
    """Why ``target`` must never be written as a whole (None if it may be)."""
    target = Path(target).expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if target == Path(target.anchor):
        return "the root folder"
    if target == cwd or target in cwd.parents:
        return "the working directory" if target == cwd else "a parent of the working directory"
    if target == home or target in home.parents:
        return "the home folder" if target == home else "a parent of the home folder"
    return None


def check_target(target: Path, overwrite: bool, what: str = "folder") -> None:
    """Refuse to write ``target`` when that could destroy something this tool did not write.

    A missing or empty folder may be written; a non-empty one only with ``overwrite`` and only if it
    is ours (:func:`is_ours`); a protected one (:func:`protected`) never.
    """
    target = Path(target)
    why = protected(target)
    if why is not None:
        raise FileExistsError(f"refusing to write the {what} {str(target)!r}: it is {why}; choose a new folder")
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{what} {str(target)!r} exists and is a file; choose another folder")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    if not overwrite:
        raise FileExistsError(
            f"{what} {str(target)!r} exists and is not empty; choose another --out or pass --overwrite"
        )
    if not is_ours(target):
        raise FileExistsError(
            f"--overwrite replaces only folders that bora_pyro wrote, and {str(target)!r} is not one of them "
            f"(no {MARKER}; it holds {len(entries)} entries, e.g. {entries[0]!r}); choose another --out"
        )


def _siblings(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{kind}-*"))


def recover(target: Path) -> None:
    """Finish or undo a replacement that a crash interrupted: put a complete old copy back if ``target``
    is missing, and delete leftover temporary and old copies (call it with the folder's lock held)."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    olds = _siblings(target, "old")
    if olds and not target.exists():
        os.rename(olds[-1], target)  # renamed aside whole: it is complete
        olds = olds[:-1]
    for leftover in olds + _siblings(target, "tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` (a sibling), replacing what is there crash-safely."""
    _fsync_tree(new)
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.old-{os.getpid()}-{os.urandom(3).hex()}"
        os.rename(target, aside)
        crash_point("folder.renamed-aside")
    os.rename(new, target)
    fsync_path(target.parent)
    crash_point("folder.renamed-in")
    if aside is not None:
        shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_folder(target: Path, kind: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` (see :func:`check_target`) if the block succeeds.

    A failure leaves no half-written folder: the temporary one is removed and ``target`` untouched.
    """
    target = Path(target)
    check_target(target, overwrite, f"{kind} folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        mark(tmp, kind)
        yield tmp
        crash_point("folder.written")
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; if the block succeeds it is flushed and renamed onto ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix}"  # the suffix kept: writers pick formats by it
    try:
        yield tmp
        fsync_path(tmp)
        crash_point("file.written")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def folder_lock(target: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock of the folder ``target`` for the block (nothing is written next to it); if another
    process holds it, wait up to ``wait`` seconds, then raise :class:`FolderBusy`."""
    target = Path(target).expanduser().resolve()
    name = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    (cache_dir() / "locks").mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache_dir() / "locks" / f"{target.name[:40]}-{name}.lock"))
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise FolderBusy(
            f"{str(target)!r} is being written by another bora_pyro process (it holds {lock.lock_file}); "
            "wait for it to finish or choose another folder"
        ) from None
    try:
        yield
    finally:
        lock.release()
