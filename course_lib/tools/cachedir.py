"""The course's cache folder: where it is, manifests that are checked against pins, locks across processes.

Used by :mod:`course_lib.tools.assets` (the pinned models and corpora and the derived float32 copy) and
scripts/gpu_bundle.py. Each cached folder holds a ``MANIFEST.json`` with the size and SHA-256 of every file;
the list itself is checked against a pin that lives in the code (a :func:`tree_digest`), so a file and its
manifest line edited together are caught, not trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

from course_lib.tools.profiles import REPO

MANIFEST = "MANIFEST.json"


def cache_dir() -> Path:
    """Where assets live: ``COURSE_CACHE`` if set, else ``data/cache/`` in the repository."""
    return Path(os.environ.get("COURSE_CACHE") or REPO / "data" / "cache").expanduser().resolve()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


VERIFIED: dict[Path, tuple] = {}  # folder -> the file stats it had when its hashes last verified


def manifest_files(folder: Path) -> dict[str, dict[str, object]]:
    """Size and SHA-256 of every file under ``folder`` (its manifest, if any, left out)."""
    return {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": sha256_of(path)}
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def tree_digest(hashes: dict[str, str]) -> str:
    """SHA-256 of a folder's file list, one line ``SHA-256  relative/path`` per file sorted by path (what
    ``sha256sum`` prints): one pin in the code then covers every file an asset or a derived copy holds."""
    return hashlib.sha256("".join(f"{hashes[path]}  {path}\n" for path in sorted(hashes)).encode()).hexdigest()


def read_manifest(folder: Path) -> tuple[dict, dict[str, dict]] | str:
    """(manifest, its files) of ``folder``, or why there are none."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "it is not in the cache" if not folder.exists() else f"it has no {MANIFEST}"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not all(isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                   for e in files.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MANIFEST} is unreadable"
    return manifest, files


def pin_problem(files: dict[str, dict], pin: str | dict[str, str]) -> str | None:
    """Whether the manifest's list of files is the pinned one: its tree_digest equals ``pin`` (a str), or
    each file named in ``pin`` (a dict) has the pinned SHA-256. A manifest edited together with a file
    fails here, because the pin lives in the code, not in the cache."""
    hashes = {path: entry["sha256"] for path, entry in files.items()}
    if isinstance(pin, str):
        digest = tree_digest(hashes)
        return None if digest == pin else (f"its {MANIFEST} lists other files or hashes than the pinned ones "
                                           f"(tree SHA-256 {digest[:16]}…, pinned {pin[:16]}…)")
    for path, sha in pin.items():
        if hashes.get(path) != sha:
            return f"its {MANIFEST} does not record {path} with the pinned SHA-256 {sha[:16]}…"
    return None


def folder_problem(folder: Path, key: str, expected: str, pin: str | dict[str, str], *,
                    verify: bool = True) -> str | None:
    """What is wrong with a cached folder, or None if it is complete and (with ``verify``) every file
    matches its ``MANIFEST.json``, whose ``key`` must name the pinned source ``expected`` and whose list of
    files must be the pinned one (``pin``: see :func:`pin_problem`).

    Sizes are always checked; SHA-256 hashes are checked once per process and again whenever a
    file's size or modification time changes.
    """
    found = read_manifest(folder)
    if isinstance(found, str):
        return found
    manifest, files = found
    if manifest.get(key) != expected:
        return f"its {MANIFEST} describes another release (source SHA-256 {str(manifest.get(key))[:16]}…)"
    problem = pin_problem(files, pin)
    if problem:
        return problem
    stats = []
    for relative, entry in files.items():
        try:
            stat = (folder / relative).stat()
        except OSError:
            return f"{relative} is missing"
        if stat.st_size != entry["size"]:
            return f"{relative} has {stat.st_size:,} bytes, not the {entry['size']:,} its manifest records"
        stats.append((relative, stat.st_size, stat.st_mtime_ns))
    signature = tuple(stats)
    if not verify or VERIFIED.get(folder) == signature:
        return None
    for relative, entry in files.items():
        try:
            if sha256_of(folder / relative) != entry["sha256"]:
                return f"{relative} does not match the SHA-256 its manifest records (the file was modified)"
        except OSError:
            return f"{relative} is unreadable"
    VERIFIED[folder] = signature
    return None


@contextlib.contextmanager
def locked(target: Path, *, wait: bool = True):
    """Hold an exclusive lock, across processes, on writing the cache folder ``target``; yields whether
    it was acquired (always, with ``wait``). Two fetches of one asset thus never collide at the rename,
    and a fetch that waited finds the folder the other one wrote."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt
            import time

            while True:
                try:
                    msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
                    break
                except OSError:
                    if not wait:
                        yield False
                        return
                    time.sleep(0.5)
            try:
                yield True
            finally:
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def partials(target: Path) -> list[Path]:
    return list(target.parent.glob(f".{target.name}.partial-*"))


def remove_partials(target: Path) -> None:
    """Delete the staging folders a killed fetch left next to ``target`` (call with the lock held: then
    no other process is writing one)."""
    for leftover in partials(target):
        shutil.rmtree(leftover, ignore_errors=True)


def sweep_partials(target: Path) -> None:
    """Remove a killed fetch's leftovers if no fetch of ``target`` is running now."""
    if partials(target):
        with locked(target, wait=False) as acquired:
            if acquired:
                remove_partials(target)
