"""What a folder holds, verified: SHA-256 manifests written last, checked on load.

A run folder gets ``manifest.json`` (the digest and size of every file the tool wrote in it) each time
a stage of it is complete: it is the last file written, so a folder whose files do not match its
manifest was changed (a flipped bit, a truncated copy, an edit) after the tool wrote it, and is refused
with :class:`CorruptFile`, naming the file. The same manifest says which entries of a folder are the
tool's own (see ``folders.foreign_entries``): anything else in it is the user's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "bora_pyro.manifest/1"


class CorruptFile(ValueError):
    """A file the tool wrote does not hold what it wrote (digest, size, format or non-finite values)."""


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path, names: Iterable[str]) -> list[str]:
    """Relative paths of the regular files under the entries ``names`` of ``folder`` (folders walked)."""
    out = []
    for name in names:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            out += sorted(str(p.relative_to(folder)) for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        elif path.is_file() and not path.is_symlink():
            out.append(name)
    return out


def write_manifest(folder: Path, names: Iterable[str] | None = None, unhashed: Iterable[str] = ()) -> dict:
    """Write ``folder/manifest.json`` atomically: the digest of every file under ``names`` (default: every
    entry of the folder but the manifest itself, its marker included), and for the entries ``unhashed``
    (e.g. memory-mapped tables too large to hash) only that they are the tool's. Returns the manifest."""
    folder = Path(folder)
    unhashed = sorted(set(unhashed))
    if names is None:  # the marker included: a changed kind is a changed folder
        names = [p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in unhashed]
    return _write(folder, {"format": MANIFEST_FORMAT, "files": _entries(folder, names), "unhashed": unhashed})


def update_manifest(folder: Path, written: Iterable[str], dropped: Iterable[str] = ()) -> dict:
    """Record in the folder's manifest the files under ``written`` (added or rewritten by the tool just now:
    their digests are taken anew) and forget the entries ``dropped``; every other entry keeps the digest
    it had, so a file damaged since is still refused. A folder without a manifest gets none."""
    folder = Path(folder)
    previous = read_manifest(folder)
    if previous is None:
        return {}
    written, dropped = set(written), set(dropped)
    kept = [rel for rel in previous["files"] if rel.split("/")[0] not in written | dropped]
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {**{rel: previous["files"][rel] for rel in kept}, **_entries(folder, written)},
        "unhashed": sorted(set(previous.get("unhashed", [])) - dropped),
    }
    return _write(folder, manifest)


def _entries(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """The manifest entries (digest and size) of every file under the entries ``names`` of ``folder``."""
    return {
        rel: {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
        for rel in _files(folder, sorted(names))
    }


def _write(folder: Path, manifest: dict) -> dict:
    """Write ``manifest`` (with its own digest) as the folder's manifest.json, atomically; returns it."""
    from .folders import atomic_write

    with atomic_write(folder / MANIFEST) as tmp:
        tmp.write_text(_canonical({**manifest, "sha256": json_digest(manifest)}) + "\n")
    return manifest


def _canonical(value: dict) -> str:
    """Compact JSON with sorted keys: every byte of it is content, so no change goes unnoticed."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def json_digest(value: dict) -> str:
    """The SHA-256 of a JSON object's canonical form (what a file that carries its own digest records)."""
    return hashlib.sha256(_canonical(value).encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest (None if it has none); a manifest that is not one is :class:`CorruptFile`."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        text = path.read_text()
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path} is not valid JSON ({err}): the folder's record of its files is damaged") from None
    if not isinstance(manifest, dict) or text != _canonical(manifest) + "\n":
        raise CorruptFile(f"{path} was changed since bora_pyro wrote it: the folder's record of its files is damaged")
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    files = body.get("files")
    if (
        body.get("format") != MANIFEST_FORMAT
        or manifest.get("sha256") != json_digest(body)
        or not isinstance(files, dict)
        or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in files.values())
    ):
        raise CorruptFile(f"{path} is not an intact bora_pyro manifest ({MANIFEST_FORMAT}): the record is damaged")
    return body


def verify(folder: Path, only: Iterable[str] | None = None) -> dict | None:
    """Check every file the manifest lists (or those of ``only`` that it lists, a folder's name standing for the
    files in it) against its digest and size.

    Raises :class:`CorruptFile` naming the first file that is missing, has another size or another digest, or
    that was added to a folder the tool wrote whole (one the manifest lists files in, e.g. a run's tokenizer/).
    Returns the manifest (None for a folder written before manifests: nothing to check).
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    wanted = None if only is None else set(only)
    listed = manifest["files"]
    owned = {rel.split("/")[0] for rel in listed if "/" in rel} - set(manifest.get("unhashed", []))
    for top in sorted(owned if wanted is None else owned & wanted):  # a folder the tool wrote holds only its files
        for path in sorted((folder / top).rglob("*")):
            if (path.is_file() or path.is_symlink()) and path.relative_to(folder).as_posix() not in listed:
                raise CorruptFile(
                    f"{path} is not a file bora_pyro wrote in {folder / top}, which holds only the files {MANIFEST} "
                    "lists: the folder was changed since; remove it"
                )
    for rel, entry in sorted(listed.items()):
        if wanted is not None and rel not in wanted and rel.split("/")[0] not in wanted:
            continue
        path = folder / rel
        if path.is_symlink():
            raise CorruptFile(f"{path} is a symbolic link where bora_pyro wrote a file: the folder was changed since")
        if not path.is_file():
            raise CorruptFile(f"{path} is missing: {folder} lists it in {MANIFEST}, so the folder is incomplete")
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry["sha256"]:
            raise CorruptFile(
                f"{path} does not match the digest bora_pyro recorded when it wrote it (in {MANIFEST}): the file "
                "was changed or damaged since; restore it from a copy or train the run again"
            )
    return manifest
