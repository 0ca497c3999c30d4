"""File helpers: atomic writes, JSON lines, and directories that only appear once complete.

Why each write goes through a temporary sibling and a rename: a run can be killed at any moment
(SIGKILL, out of memory, a pre-empted cloud machine). A rename is atomic on POSIX file systems, so
a reader (or the next, resumed run) sees either the old file or directory or the whole new one,
never a half-written one that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rrhf_lite.errors import UserInputError

_JSONL_HINT = "each line must be one JSON object"


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: not every platform can open a dir)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_text_utf8(path: str | Path) -> str:
    """The file's text, or a UserInputError that names the file (and the line of bad UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise UserInputError("file not found", where=str(path), hint="check the path")
    if not path.is_file():
        raise UserInputError("not a file", where=str(path), hint="give the path of a file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserInputError(f"cannot read the file ({err.strerror})", where=str(path),
                             hint="check the file's permissions") from None
    try:
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not part of line 1.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserInputError(
            f"invalid UTF-8 at byte {err.start}", where=f"{path} line {line}",
            hint="re-save the file as UTF-8",
        ) from None


def read_jsonl_numbered(path: str | Path) -> list[tuple[int, dict]]:
    """Read JSON lines as (1-based line number, object) pairs; blank lines are skipped.

    Lines are split on "\\n" only: JSON text may hold raw U+2028 or other characters that
    str.splitlines() would wrongly treat as line breaks. A bad line raises UserInputError naming
    the file and line number.
    """
    path = Path(path)
    rows = []
    for number, line in enumerate(read_text_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserInputError(
                f"malformed JSON ({err.msg}, column {err.colno})", where=where, hint=_JSONL_HINT,
            ) from None
        except RecursionError:
            raise UserInputError("JSON nested too deeply to read", where=where,
                                 hint="flatten the row") from None
        except ValueError as err:  # e.g. an integer with more digits than Python will convert
            raise UserInputError(f"unreadable JSON value ({err})", where=where,
                                 hint=_JSONL_HINT) from None
        if not isinstance(row, dict):
            raise UserInputError(
                f"expected a JSON object, got {type(row).__name__}", where=where, hint=_JSONL_HINT,
            )
        check_text(row, where)
        rows.append((number, row))
    return rows


def check_text(value: Any, where: str) -> None:
    """Every string in `value` (a parsed row, walked without recursion) is encodable as UTF-8.

    JSON's "\\ud800" escapes decode to lone surrogates, which no tokenizer can encode: refuse
    them here, naming the file and line, before any model loads.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise UserInputError(
                    f"text with an unpaired surrogate {item[err.start]!r} (not valid Unicode) at "
                    f"character {err.start}: {item[max(0, err.start - 20):err.start]!r}...",
                    where=where, hint="fix the \\uXXXX escape (surrogates come in pairs), or "
                    "re-save the text as UTF-8") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def read_jsonl(path: str | Path) -> list[dict]:
    """Read JSON lines; a bad line raises UserInputError naming the file and line number."""
    return [row for _, row in read_jsonl_numbered(path)]


_PARTIAL = ".partial-"


def _remove_stale_partials(path: Path) -> None:
    """Delete temporary siblings of `path` left by a process that was killed mid-write.

    Their names carry the writer's pid; one whose process is gone can never be finished.
    """
    prefix = f".{path.name}{_PARTIAL}"
    for sibling in path.parent.glob(f"{prefix}*"):
        pid_text = sibling.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(sibling, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _old_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that is renamed to `path` only when the block succeeds.

    A crash inside the block leaves `path` untouched (old content or absent), never half-written.
    With overwrite=False an existing `path` is refused before the block runs (and again at the
    end, in case another process created it meanwhile). With overwrite=True the old directory is
    moved aside, the new one renamed in, then the old one deleted; if the process dies between
    the two renames, the next atomic_directory for the same path puts the old one back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _old_name(path)
    if old.exists() and not path.exists():
        os.replace(old, path)  # a kill between the two renames of an overwrite: restore
    _remove_stale_partials(path)
    if path.exists() and not overwrite:
        raise _exists_error(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{_PARTIAL}{os.getpid()}-"))
    # mkdtemp makes the directory private (0700); give it the permissions a plain mkdir would.
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            if not overwrite:
                raise _exists_error(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _exists_error(path: Path) -> UserInputError:
    return UserInputError(
        "output directory already exists", where=str(path),
        hint="choose another directory or pass --force",
    )


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk, so the renamed directory is complete after a crash."""
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(directory, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(directory))


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest `checkpoint-N` directory that was saved to the end, or None.

    transformers writes a checkpoint in place (weights, optimizer, RNG, then trainer_state.json
    last), so a run killed while saving leaves a `checkpoint-N` without trainer_state.json.
    transformers' get_last_checkpoint would pick it and the resume would fail; skip it instead.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = []
    for child in root.iterdir():
        step = child.name.removeprefix("checkpoint-")
        if child.is_dir() and step.isdigit() and (child / "trainer_state.json").is_file():
            steps.append((int(step), child))
    return max(steps)[1] if steps else None


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """Whether `name` can only mean a path on this machine, never a hub repo id.

    Hub ids are "name" or "org/name". A name that starts with ".", "/" or "~", has a data-file
    suffix, or has more than one "/" (or the platform's own separator) is a path. Callers use
    this to say "not found" for a missing local path instead of asking the hub for it.
    """
    text = str(name)
    if text.startswith((".", "/", "~")) or Path(text).suffix.lower() in DATA_SUFFIXES:
        return True
    return text.count("/") > 1 or (os.sep != "/" and os.sep in text)
