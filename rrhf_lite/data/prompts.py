"""Prompt files for sampling and evaluation: one row per prompt, with the data set's own answers
(if any) kept beside it for the sample stage."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rrhf_lite.data.listwise import read_rows
from rrhf_lite.errors import UserInputError

# a prompt row's own answers, which sampling may add to the candidates
DATASET_FIELDS = ("chosen", "rejected", "responses")


def single_turn_chats(rows: Sequence[dict]) -> tuple[list[dict], int]:
    """Rows whose "prompt" is a string get it as one user message; (rows, how many changed)."""
    out, changed = [], 0
    for row in rows:
        if isinstance(row.get("prompt"), str):
            row, changed = {**row, "prompt": [{"role": "user", "content": row["prompt"]}]}, changed + 1
        out.append(row)
    return out, changed


def load_prompts(source: Any, *, split: str = "train", limit: int | None = None) -> list[dict]:
    """Read prompts for sampling.

    Args:
        source: anything `rrhf_lite.data.listwise.read_rows` reads (a .jsonl / .json / .parquet file, a
            `datasets` hub name or Dataset), or a list of rows (dicts, or plain strings taken
            as prompts).
        split: split of a hub dataset.
        limit: keep only the first `limit` rows.

    Returns:
        Rows {"prompt": str | [messages], plus any of "chosen", "rejected", "responses"} ("query"
        is renamed "prompt").

    Raises:
        UserInputError naming the file and line (or row) of a row without a prompt.
    """
    given = source
    if isinstance(source, Sequence) and not isinstance(source, str):  # plain strings are prompts
        given = [{"prompt": r} if isinstance(r, str) else r for r in source]
    rows, places, _ = read_rows(given, split, name="prompts")
    if limit is not None:
        rows, places = rows[:limit], places[:limit]
    if not rows:
        raise UserInputError("no prompts", where=str(source), hint="give at least one prompt")
    records = []
    for row, where in zip(rows, places, strict=True):
        if not isinstance(row, dict):
            raise UserInputError(f"expected an object, got {type(row).__name__}", where=where)
        prompt = row.get("prompt", row.get("query"))
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise UserInputError(
                f'missing or empty "prompt" (or "query"); found keys {sorted(row)}', where=where,
                hint='each row needs "prompt": a string or a list of chat messages',
            )
        if not isinstance(prompt, str | list):
            raise UserInputError(
                f'"prompt" must be a string or a list of messages, got {type(prompt).__name__}',
                where=where,
            )
        record = {"prompt": prompt, "where": where}
        record.update({k: row[k] for k in DATASET_FIELDS if row.get(k) is not None})
        records.append(record)
    return records
