"""One run at a time in a run directory: a lock file holding the owner's pid, host and start time.

Two `rrhf-lite run` commands writing into one directory would interleave their files (the
recipe.yaml of one beside the train_summary.json of the other). The lock is a file created with
O_EXCL; a second run exits 2 naming the holder. A lock left by a process that died (same host,
pid no longer running) is taken over; a lock from another host is never guessed about.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from rrhf_lite.errors import UserInputError

LOCK_NAME = ".rrhf-lite.lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _stale(holder: dict) -> bool:
    """A lock of a dead process on this host (or an unreadable, half-written lock file)."""
    if not holder:
        return True
    pid = holder.get("pid")
    return (holder.get("host") == socket.gethostname() and isinstance(pid, int)
            and not _pid_alive(pid))


def acquire(run_dir: Path) -> Path:
    """Take the lock of `run_dir` (created if needed); UserInputError when another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder.get("pid") == os.getpid() and holder.get("host") == me["host"]:
                return path  # this process already holds it
            if _stale(holder):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise UserInputError(
                f"another rrhf-lite run is using this run directory (pid {holder.get('pid')} on "
                f"{holder.get('host')}, started {holder.get('started')})", where=str(run_dir),
                hint="wait for it to finish, or use --output-dir for a separate run; if that "
                f"process is gone, delete {path}") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        return path
    raise UserInputError("could not take the run directory's lock", where=str(path),
                         hint="another run keeps replacing it; wait, or use --output-dir")


def release(path: Path) -> None:
    holder = _read(path)
    if holder.get("pid") == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of `run_dir` for the block (only where `enabled`: the main process)."""
    if not enabled:
        yield
        return
    path = acquire(run_dir)
    try:
        yield
    finally:
        release(path)
