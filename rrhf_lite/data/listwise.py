"""Listwise data: read rows from any source, validate them, name the file and line of a bad one.

One example, after `load_listwise`, is
    {"prompt": str | [message dicts], "responses": [str | message dict, ...], "scores": [float] | None}
Accepted inputs (a stable format users rely on): listwise rows with "query" or "prompt"; TRL's pairwise
"prompt/chosen/rejected" (k = 2, scores [1, 0]); the implicit-prompt "chosen/rejected" form where
the shared prefix is the prompt. Plain text or chat messages everywhere.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import check_text, read_jsonl_numbered, read_text_utf8

logger = logging.getLogger(__name__)

_FORMATS_HINT = (
    'each row needs {"prompt" or "query", "responses": [...], "scores": [...]}, '
    'or {"prompt", "chosen", "rejected"}, or {"chosen", "rejected"} sharing a prompt prefix'
)


# --------------------------------------------------------------------------- loading


def read_rows(source: Any, split: str = "train", *, name: str = "data"
              ) -> tuple[list, list[str], str]:
    """Rows of any source, with the place each row's error messages should name.

    Args:
        source: a .jsonl / .json / .parquet file, a `datasets` hub name (or a local directory
            `datasets` can load), a `datasets.Dataset` / `DatasetDict`, or in-memory rows.
        split: the split to use for hub names and DatasetDicts.
        name: what in-memory rows are called in messages ("data row 3", "prompts row 3").

    Returns (rows, places, source name): places[i] is "FILE line N" (JSON lines), "FILE item N"
    (a .json array) or "NAME row N". Rows are returned as read; callers check each is an object.
    Unreadable files raise UserInputError naming the file (and line) and what to do.
    """
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # a datasets.Dataset
        return _numbered(source.to_list(), "dataset", "row")
    if hasattr(source, "keys") and hasattr(source, "column_names"):  # a DatasetDict
        if split not in source:
            raise UserInputError(f"split {split!r} not found (have {sorted(source.keys())})",
                                 where="dataset", hint="pass an existing split")
        return _numbered(source[split].to_list(), f"dataset[{split}]", "row")
    if isinstance(source, Sequence) and not isinstance(source, str | bytes):
        return _checked(_numbered(list(source), name, "row"))
    path = Path(str(source)).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            return _jsonl(path)
        if suffix == ".json":
            return _checked(_read_json(path))
        if suffix == ".parquet":
            return _checked(_read_parquet(path))
        raise UserInputError(f"unsupported file type {suffix!r}", where=str(path),
                             hint="use .jsonl, .json or .parquet, or a datasets hub name")
    looks_local = suffix in (".jsonl", ".json", ".parquet") or str(source).startswith((".", "/", "~"))
    if looks_local and not path.exists():
        raise UserInputError("file not found", where=str(path), hint="check the path")
    # anything else is a `datasets` hub name (owner/name) or a directory it can load
    import datasets

    where = f"{source}[{split}]"
    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as err:  # the datasets library raises many types; the user sees one message
        raise UserInputError(f"cannot load the dataset ({err})", where=where,
                             hint="give a local .jsonl/.json/.parquet file or a valid hub name (a "
                             "directory must hold data files of one format only)") from None
    return _checked(_numbered(ds.to_list(), where, "row"))


def _read_parquet(path: Path) -> tuple[list, list[str], str]:
    import datasets
    import pyarrow.parquet

    from rrhf_lite.utils.user_files import user_file_errors

    with user_file_errors(str(path), "parquet file", "check that it is a parquet file (re-save "
                          "it with pandas.DataFrame.to_parquet), or use .jsonl"):
        pyarrow.parquet.read_metadata(str(path))  # not parquet: said here, not logged below
        rows = datasets.Dataset.from_parquet(str(path)).to_list()
    return _numbered(rows, str(path), "row")


def _checked(read: tuple[list, list[str], str]) -> tuple[list, list[str], str]:
    """Rows whose every string is valid Unicode (see io.check_text), else an error naming it."""
    for row, where in zip(read[0], read[1], strict=True):
        check_text(row, where)
    return read


def _numbered(rows: list, name: str, unit: str) -> tuple[list, list[str], str]:
    return rows, [f"{name} {unit} {n}" for n in range(1, len(rows) + 1)], name


def _jsonl(path: Path) -> tuple[list, list[str], str]:
    numbered = read_jsonl_numbered(path)
    return [row for _, row in numbered], [f"{path} line {n}" for n, _ in numbered], str(path)


def _read_json(path: Path) -> tuple[list, list[str], str]:
    """A JSON array of objects (or one object); JSON lines saved as .json are read as such."""
    text = read_text_utf8(path)
    if not text.strip():
        return [], [], str(path)  # the caller says the data is empty
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # a whole value, then more: JSON lines saved as .json
            return _jsonl(path)
        raise UserInputError(
            f"malformed JSON ({err.msg}, column {err.colno})", where=f"{path} line {err.lineno}",
            hint="a .json file holds one JSON array of objects (or one object per line)") from None
    except (RecursionError, ValueError):  # too deep, or a huge integer: name the line
        return _jsonl(path)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise UserInputError("expected a JSON array of objects", where=str(path), hint=_FORMATS_HINT)
    return _numbered(data, str(path), "item")


def _is_message(obj: Any) -> bool:
    return isinstance(obj, dict) and "content" in obj and "role" in obj


def _check_messages(obj: list, where: str, what: str) -> None:
    for i, message in enumerate(obj):
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise UserInputError(
                    f"{what}[{i}].{key} must be a string, got {type(message[key]).__name__}",
                    where=where, hint='chat messages are {"role": "user", "content": "text"}')


def _is_messages(obj: Any) -> bool:
    return isinstance(obj, list) and len(obj) > 0 and all(_is_message(m) for m in obj)


def _response(obj: Any, where: str, what: str) -> str | dict:
    """A response is a non-empty string or one assistant message (a one-message list allowed)."""
    if isinstance(obj, list) and len(obj) == 1 and _is_message(obj[0]):
        obj = obj[0]
    if _is_message(obj):
        _check_messages([obj], where, what)
        if not obj["content"].strip():
            raise UserInputError(f"{what} is an empty message", where=where,
                                 hint="remove the row or give the response some text")
        return {"role": obj["role"], "content": obj["content"]}
    if isinstance(obj, str):
        if not obj.strip():
            raise UserInputError(f"{what} is empty", where=where,
                                 hint="remove the empty response (and its score) or the row")
        return obj
    raise UserInputError(f"{what} must be a string or one chat message, got {type(obj).__name__}",
                         where=where, hint=_FORMATS_HINT)


def _prompt(obj: Any, where: str) -> str | list[dict]:
    if isinstance(obj, str):
        return obj
    if _is_messages(obj):
        _check_messages(obj, where, "prompt")
        return [{"role": m["role"], "content": m["content"]} for m in obj]
    raise UserInputError(f"prompt must be a string or a list of chat messages, got {type(obj).__name__}",
                         where=where, hint=_FORMATS_HINT)


def is_finite_number(value: Any) -> bool:
    """A real, finite number (bools are not scores; 10**400 overflows a float: not finite)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _score(value: Any, where: str, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserInputError(f"scores[{index}] = {value!r} is not a number", where=where,
                             hint="scores must be finite numbers, one per response")
    if not is_finite_number(value):
        raise UserInputError(f"scores[{index}] = {value!r} is not finite", where=where,
                             hint="replace NaN/inf scores or drop those responses")
    return float(value)


def _split_shared_prefix(chosen: Any, rejected: Any, where: str):
    """Implicit prompt: the longest shared prefix (whole messages, or text cut at a word boundary)."""
    if _is_messages(chosen) and _is_messages(rejected):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        rest_c, rest_r = chosen[n:], rejected[n:]
        if n == 0 or len(rest_c) != 1 or len(rest_r) != 1:
            raise UserInputError(
                "chosen and rejected must share every message but the last", where=where,
                hint='add an explicit "prompt" field')
        return chosen[:n], rest_c[0], rest_r[0]
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = 0
        while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
            cut += 1
        # back up to a word boundary and leave the whitespace with the responses
        if cut < min(len(chosen), len(rejected)) or len(chosen) != len(rejected):
            while cut > 0 and not chosen[cut - 1].isspace():
                cut -= 1
        while cut > 0 and chosen[cut - 1].isspace():
            cut -= 1
        if cut == 0:
            raise UserInputError("chosen and rejected share no prompt prefix", where=where,
                                 hint='add an explicit "prompt" field')
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise UserInputError("chosen and rejected must both be strings or both message lists",
                         where=where, hint=_FORMATS_HINT)


def normalize_row(row: dict, where: str, require_scores: bool = True) -> dict:
    """One raw row -> {"prompt", "responses", "scores"}; raises UserInputError naming `where`."""
    if not isinstance(row, dict):
        raise UserInputError(f"expected an object, got {type(row).__name__}", where=where,
                             hint=_FORMATS_HINT)
    prompt = row.get("prompt", row.get("query"))
    if "responses" in row:
        if prompt is None:
            raise UserInputError('missing field "prompt" (or "query")', where=where, hint=_FORMATS_HINT)
        raw = row["responses"]
        if not isinstance(raw, list) or not raw:
            raise UserInputError('"responses" must be a non-empty list', where=where,
                                 hint="give at least one response per prompt")
        responses = [_response(r, where, f"responses[{i}]") for i, r in enumerate(raw)]
        scores = row.get("scores")
        if scores is None:
            if require_scores:
                raise UserInputError('missing field "scores"', where=where,
                                     hint="add one score per response, or run the score stage")
        else:
            if not isinstance(scores, list):
                raise UserInputError('"scores" must be a list of numbers', where=where,
                                     hint="one score per response")
            if len(scores) != len(responses):
                raise UserInputError(
                    f"{len(responses)} responses but {len(scores)} scores", where=where,
                    hint="give exactly one score per response")
            scores = [_score(s, where, i) for i, s in enumerate(scores)]
        return {"prompt": _prompt(prompt, where), "responses": responses, "scores": scores}
    if "chosen" in row and "rejected" in row:
        chosen, rejected = row["chosen"], row["rejected"]
        if prompt is None:
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected, where)
        return {
            "prompt": _prompt(prompt, where),
            "responses": [_response(chosen, where, "chosen"), _response(rejected, where, "rejected")],
            "scores": [1.0, 0.0],
        }
    missing = [k for k in ("responses", "scores") if k not in row]
    raise UserInputError(f"missing field(s) {', '.join(map(repr, missing))} "
                         f"(found keys {sorted(row)})", where=where, hint=_FORMATS_HINT)


def _response_key(response: str | dict) -> str:
    return response if isinstance(response, str) else json.dumps(response, sort_keys=True)


def summarize_listwise(examples: Sequence[dict]) -> dict[str, int]:
    """Counts worth a warning: k = 1 (SFT only), all scores tied (no rank pair), duplicates."""
    stats = Counter(rows=len(examples))
    for ex in examples:
        k = len(ex["responses"])
        stats["candidates"] += k
        if k == 1:
            stats["single_response"] += 1
        scores = ex.get("scores")
        if scores is not None and k > 1 and len(set(scores)) == 1:
            stats["all_tied"] += 1
        if len({_response_key(r) for r in ex["responses"]}) < k:
            stats["duplicate_responses"] += 1
        prompt = ex["prompt"]
        if isinstance(prompt, str) and not prompt.strip():
            stats["empty_prompt"] += 1
    return dict(stats)


def _warn_counts(stats: dict[str, int], name: str) -> None:
    n = stats["rows"]
    messages = {
        "single_response": "have one response (k = 1): SFT loss only, no rank pair",
        "all_tied": "have all scores tied: no rank pair (SFT on the first response only; "
                    "train.skip_tied leaves them out)",
        "duplicate_responses": "contain duplicate responses",
        "empty_prompt": "have an empty or whitespace-only prompt (responses learnt unconditioned)",
    }
    for key, text in messages.items():
        if stats.get(key):
            logger.warning("%s: %d of %d rows %s", name, stats[key], n, text)


def load_listwise(source: Any, *, split: str = "train", require_scores: bool = True,
                  warn: bool = True) -> list[dict]:
    """Load and validate listwise data.

    Args:
        source: a path to a .jsonl / .json / .parquet file, a `datasets` hub name, a
            `datasets.Dataset` / `DatasetDict`, or a list of row dicts.
        split: the split to use for hub names and DatasetDicts.
        require_scores: listwise rows must carry "scores" (False for prompts+responses that the
            score stage will rate; their "scores" is then None).
        warn: log the counts below (False where rows are only checked or counted). Rows that
            load_listwise returned (a ListwiseRows) are not warned about again when a trainer
            loads them a second time.

    Returns a list of {"prompt", "responses", "scores"} dicts. Bad rows raise UserInputError
    naming the file and its 1-based line (JSONL) or row; k = 1, all-tied scores and duplicate
    responses are counted and logged as one warning each.
    """
    rows, places, name = read_rows(source, split)
    if not rows:
        raise UserInputError("the dataset is empty", where=name, hint="give at least one row")
    examples = [normalize_row(row, where, require_scores)
                for row, where in zip(rows, places, strict=True)]
    if warn and not isinstance(source, ListwiseRows):
        _warn_counts(summarize_listwise(examples), name)
    return ListwiseRows(examples)


class ListwiseRows(list):
    """Rows as load_listwise returns them: checked, and their warnings already logged."""
