"""Folders this tool writes: ownership markers, safe replacement, crash-safe writes and locks.

Every folder bora_pyro creates (run, sweep, export, merged model, checkpoint, task store) holds a marker
file, :data:`MARKER`, naming its kind, and a manifest of the files it wrote (``integrity.py``).
``--overwrite`` replaces only a folder of the command's own kind (or an empty one) that holds nothing
the tool did not write, never the command's own source, the working directory, one of its parents, the
home folder or the root; a symbolic link is written through (its target is the folder). A folder is
written in a temporary sibling ``.NAME.tmp-*`` and put in place by rename-aside (the old one to
``.NAME.old-*``), rename-in, then deletion of the old copy: a kill at any moment leaves the old or the
new folder complete, and :func:`recover` (run by every writer and reader, under the folder's lock)
puts a complete old copy back or removes the leftovers. Single files are replaced atomically
(:func:`atomic_write`). A lock (a file under ``cache_dir()/locks``, named after the folder's absolute
path) keeps two processes from writing one folder at once; a reader that finds it held only reads.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from .faults import crash_point

log = logging.getLogger(__name__)

MARKER = ".bora_pyro.json"
JOURNAL = ".scoring"  # present while the tool rewrites files of a complete folder (a run's stage 2)
TEMPORARY = ".*.tmp-[0-9]*"  # atomic_write's temporaries: .STEM.tmp-PID.SUFFIX
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
    from ..version import __version__

    (Path(folder) / MARKER).write_text(json.dumps({"kind": kind, "bora_pyro_version": __version__}) + "\n")


def folder_kind(folder: Path) -> str | None:
    """The kind (see :data:`KINDS`) of a folder bora_pyro wrote, from its marker, or for run and sweep
    folders written before markers existed, from their config.json / sweep.json; None if it is not ours."""
    folder = Path(folder)
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads((folder / MARKER).read_text())
        return marker["kind"] if isinstance(marker, dict) and marker.get("kind") in KINDS else None
    if (folder / MARKER).exists():
        return None  # a marker that cannot be read claims nothing
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((folder / "config.json").read_text())
        if isinstance(config, dict) and "bora_pyro_version" in config and (folder / "adapters.safetensors").is_file():
            return "run"
    with contextlib.suppress(OSError, ValueError):
        sweep = json.loads((folder / "sweep.json").read_text())
        if isinstance(sweep, dict) and "spec" in sweep:
            return "sweep"
    return None


def foreign_entries(folder: Path, own: Iterable[str] = ()) -> list[str]:
    """The entries of ``folder`` (relative paths) that bora_pyro did not write: neither in its manifest (see
    ``integrity.py``; inside a listed sub-folder, every file must be listed), nor its marker or temporaries,
    nor matching a pattern of ``own`` (the names a kind writes outside its manifest, e.g. a checkpoint's
    slots)."""
    from .integrity import MANIFEST, read_manifest

    folder = Path(folder)
    files: set[str] = set()
    unhashed: set[str] = set()
    with contextlib.suppress(ValueError):
        manifest = read_manifest(folder) or {}
        files, unhashed = set(manifest.get("files", {})), set(manifest.get("unhashed", []))
    tops = {rel.split("/")[0] for rel in files}
    patterns = (MARKER, MANIFEST, JOURNAL, TEMPORARY, *own)
    foreign = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():  # the tool writes no links: one is the user's
            foreign.append(entry.name)
        elif entry.name in unhashed or any(fnmatch.fnmatchcase(entry.name, pat) for pat in patterns):
            continue
        elif entry.name not in tops:
            foreign.append(entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            inside = (str(p.relative_to(folder)) for p in entry.rglob("*") if not p.is_dir() or p.is_symlink())
            foreign += sorted(rel for rel in inside if rel not in files)
    return foreign


def is_ours(folder: Path, kind: str, own: Iterable[str] = ()) -> bool:
    """True for a folder of ``kind`` that holds nothing but what bora_pyro wrote (see :func:`foreign_entries`)."""
    return folder_kind(folder) == kind and not foreign_entries(folder, own)


def _a(kind: str) -> str:
    """ "a run", "an export"."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def why_not_ours(folder: Path, kind: str, own: Iterable[str] = ()) -> str:
    """Why ``folder`` is not a ``kind`` folder holding only what the tool wrote (see :func:`is_ours`)."""
    found = folder_kind(folder)
    if found != kind:
        return f"it is not a bora_pyro {kind} folder ({'no marker' if found is None else f'{_a(found)} folder'})"
    foreign = foreign_entries(folder, own)
    return f"it holds entries bora_pyro did not write ({', '.join(map(repr, foreign[:5]))})"


def resolve(path: str | Path, what: str = "folder") -> Path:
    """``path`` with symbolic links resolved (a link is written through, never replaced); a dangling link or a
    loop is refused."""
    path = Path(path).expanduser()
    try:
        real = path.resolve(strict=False)
    except (OSError, RuntimeError) as err:
        raise FileExistsError(f"{what} {str(path)!r} cannot be resolved ({err}); choose another folder") from None
    if path.is_symlink() and not real.exists():
        raise FileExistsError(
            f"{what} {str(path)!r} is a symbolic link to {str(real)!r}, which does not exist; "
            "create the folder it points to or choose another"
        )
    return real


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


def _overlap(target: Path, source: Path) -> str | None:
    """How ``target`` would overwrite ``source`` (both resolved), or None."""
    if target == source:
        return "is the source of this command"
    if source in target.parents:
        return f"lies inside the source {str(source)!r}"
    if target in source.parents:
        return f"holds the source {str(source)!r}"
    return None


def check_target(
    target: Path,
    overwrite: bool,
    kind: str,
    own: Iterable[str] = (),
    sources: Iterable[Path] = (),
) -> Path:
    """Refuse to write the ``kind`` folder ``target`` when that could destroy something; returns it resolved.

    A missing or empty folder may be written. A non-empty one only with ``overwrite``, only if it is a
    ``kind`` folder and only if it holds nothing the tool did not write (:func:`foreign_entries`, with
    ``own``). Never a protected folder (:func:`protected`), a file, or one of ``sources`` (the folders the
    command reads), a folder inside one or holding one.
    """
    what = f"{kind} folder"
    shown = str(target)
    target = resolve(target, what)
    why = protected(target)
    if why is not None:
        raise FileExistsError(f"refusing to write the {what} {shown!r}: it is {why}; choose a new folder")
    for source in sources:
        why = _overlap(target, resolve(source))
        if why is not None:
            raise FileExistsError(f"refusing to write the {what} {shown!r}: it {why}; choose another --out")
    if not target.exists():
        return target
    if not target.is_dir():
        raise FileExistsError(f"{what} {shown!r} exists and is a file; choose another folder")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return target
    if not overwrite:
        raise FileExistsError(f"{what} {shown!r} exists and is not empty; choose another --out or pass --overwrite")
    found = folder_kind(target)
    if found is None:
        raise FileExistsError(
            f"--overwrite replaces only folders that bora_pyro wrote, and {shown!r} is not one of them "
            f"(no {MARKER}; it holds {len(entries)} entries, e.g. {entries[0]!r}); choose another --out"
        )
    if found != kind:
        raise FileExistsError(
            f"--overwrite replaces {_a(kind)} folder only with {_a(kind)} folder, and {shown!r} is {_a(found)} "
            "folder; choose another --out"
        )
    foreign = foreign_entries(target, own)
    if foreign:
        raise FileExistsError(
            f"{shown!r} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that bora_pyro did not "
            f"write ({', '.join(repr(f) for f in foreign[:5])}{', ...' if len(foreign) > 5 else ''}); --overwrite "
            "would delete them: move them away or choose another --out"
        )
    _check_unchanged(target, shown)
    return target


def _check_unchanged(target: Path, shown: str) -> None:
    """Refuse to replace a folder whose files were changed since the tool wrote them (edits are the user's);
    a folder the tool was rewriting when it stopped (its journal present) is its own."""
    from .integrity import CorruptFile, verify

    if (target / JOURNAL).exists():
        return
    try:
        verify(target)
    except CorruptFile as err:
        raise FileExistsError(
            f"--overwrite replaces only what bora_pyro wrote, and a file of {shown!r} was changed since ({err}); "
            "move the folder away or choose another --out"
        ) from None


def remove_ours(folder: Path, kind: str, own: Iterable[str] = ()) -> bool:
    """Delete ``folder`` if it is a ``kind`` folder holding only what the tool wrote; otherwise leave it
    (saying why if it exists). Returns whether it was deleted."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not is_ours(folder, kind, own):
        log.warning("%s was left in place: %s", folder, why_not_ours(folder, kind, own))
        return False
    shutil.rmtree(folder)
    return True


def _siblings(target: Path, kind: str) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.{kind}-*"))


def _remove(path: Path) -> None:
    """Delete a leftover of ours: a folder, a file or a link (never what a link points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def recover(target: Path) -> bool:
    """Finish or undo a replacement that a crash interrupted: put a complete old copy back if ``target``
    is missing, and delete leftover temporary and old copies. Done under the folder's lock only: while
    another process holds it (it may be writing those temporaries), nothing is touched. Returns whether
    the lock could be taken."""
    target = Path(target)
    if not target.parent.is_dir():
        return True
    lock = _try_lock(target)
    if lock is None:
        return False
    try:
        olds = _siblings(target, "old")
        if olds and not target.exists():
            os.rename(olds[-1], target)  # renamed aside whole: it is complete
            olds = olds[:-1]
        for leftover in olds + _siblings(target, "tmp"):
            _remove(leftover)
    finally:
        lock.release()
    return True


@contextlib.contextmanager
def reading(target: str | Path, what: str = "folder") -> Iterator[Path]:
    """Hold ``target`` for reading: with its lock free, take it for the block and first recover an
    interrupted replacement (:func:`recover`); with another process writing it, only read (never clean up
    after that process). Yields the resolved path."""
    target = resolve(target, what)
    lock = _try_lock(target)
    if lock is None and not target.exists():
        raise FolderBusy(
            f"{what} {str(target)!r} is missing while another bora_pyro process holds its lock (it is being "
            "replaced); try again when that process has finished"
        )
    try:
        if lock is not None:
            recover(target)
        yield target
    finally:
        if lock is not None:
            lock.release()


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
def atomic_folder(
    target: Path,
    kind: str,
    overwrite: bool = False,
    own: Iterable[str] = (),
    sources: Iterable[Path] = (),
    unhashed: Iterable[str] = (),
) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` (see :func:`check_target`) if the block succeeds.

    The folder's lock is held throughout; its manifest (the digest of every file but those under
    ``unhashed``, see ``integrity.py``) is written last. A failure leaves no half-written folder: the
    temporary one is removed and ``target`` untouched.
    """
    from .integrity import write_manifest

    target = resolve(target, f"{kind} folder")
    with folder_lock(target):  # checked once no other process can write it (the lock lives in the cache)
        recover(target)
        check_target(target, overwrite, kind, own, sources)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            with _naming(target):
                mark(tmp, kind)
                yield tmp
                write_manifest(tmp, unhashed=unhashed)
            crash_point("folder.written")
            replace_folder(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OSError that names no file (a full disk while writing) is re-raised naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; if the block succeeds it is flushed and renamed onto ``path``."""
    path = Path(path)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix}"  # the suffix kept: writers pick formats by it
    try:
        with _naming(path):
            yield tmp
            fsync_path(tmp)
        crash_point("file.written")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _lock_of(target: Path) -> FileLock:
    """The (per-process, re-entrant) lock of the folder ``target``: a file under ``cache_dir()/locks``."""
    target = Path(target).expanduser().resolve()
    name = hashlib.sha256(str(target).encode()).hexdigest()[:16]
    (cache_dir() / "locks").mkdir(parents=True, exist_ok=True)
    return FileLock(str(cache_dir() / "locks" / f"{target.name[:40]}-{name}.lock"), is_singleton=True)


def _try_lock(target: Path) -> FileLock | None:
    """The folder's lock, taken, or None if another process holds it."""
    lock = _lock_of(target)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


@contextlib.contextmanager
def folder_lock(target: Path, wait: float = 0.0) -> Iterator[None]:
    """Hold the lock of the folder ``target`` for the block (nothing is written next to it); if another
    process holds it, wait up to ``wait`` seconds, then raise :class:`FolderBusy`. Re-entrant: a process
    that holds a folder's lock may take it again (e.g. a writer that recovers the folder it writes)."""
    lock = _lock_of(target)
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise FolderBusy(
            f"{str(Path(target))!r} is being written by another bora_pyro process (it holds {lock.lock_file}); "
            "wait for it to finish or choose another folder"
        ) from None
    try:
        yield
    finally:
        lock.release()
