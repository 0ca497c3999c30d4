"""Fingerprints of what a stage read, so a rerun can tell whether it changed: the bytes of a file
or a directory (data files, adapters: small enough to hash on every run), or, for a model
directory too large to hash each time (a 7B checkpoint is 14 GB), its files' names, sizes and
modification times. Used by rrhf_lite.pipeline.stage_inputs."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

CHUNK = 1 << 20
DIGEST_CHARS = 20  # 80 bits: a changed file, never a collision, is what this has to notice


def _files(path: Path) -> list[Path]:
    """The files of a directory, sorted; hidden names (an atomic write's temporary file, a lock)
    are not content."""
    return sorted(p for p in path.rglob("*")
                  if p.is_file() and not any(part.startswith(".")
                                             for part in p.relative_to(path).parts))


@functools.lru_cache(maxsize=4096)
def _file_hash(path: str, size: int, mtime_ns: int) -> bytes:
    """One file's sha256, once per process for a file unchanged since (one run reads an adapter
    for the next round's sampling, its evaluation and the merge)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.digest()


def _hash_file(path: Path, into) -> None:
    stat = path.stat()
    into.update(_file_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


def content_digest(path: str | Path) -> str | None:
    """sha256 of a file's bytes, or of a directory's files (their relative names and bytes);
    None when there is nothing at `path`."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _hash_file(path, digest)
    elif path.is_dir():
        for file in _files(path):
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
            _hash_file(file, digest)
            digest.update(b"\0")
    else:
        return None
    return "sha256:" + digest.hexdigest()[:DIGEST_CHARS]


def stat_digest(path: str | Path) -> str | None:
    """A fingerprint of a file's or a directory's files from their names, sizes and modification
    times (not their bytes); None when there is nothing at `path`."""
    path = Path(path)
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files, root = _files(path), path
    else:
        return None
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(root).as_posix()}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return "stat:" + digest.hexdigest()[:DIGEST_CHARS]


def modified_times(path: str | Path) -> tuple[float, float] | None:
    """(oldest, newest) modification time of a file or of a directory's files; None when there
    is no file there."""
    path = Path(path)
    files = [path] if path.is_file() else _files(path) if path.is_dir() else []
    times = [f.stat().st_mtime for f in files]
    return (min(times), max(times)) if times else None
