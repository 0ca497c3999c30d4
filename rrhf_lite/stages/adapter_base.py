"""Which base to load under a trained adapter, and in what precision: what the user asked for,
else what the adapter's record (rrhf_lite.json) says training used. generate and merge load
through these; evaluate checks the recipe against the record."""

from __future__ import annotations

import json
from pathlib import Path

from rrhf_lite.builtin.sources import loadable_model, resolve_model
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.adapter_record import read_adapter_record, say_once


def _configured_base(adapter: Path) -> str | None:
    """adapter_config.json's base_model_name_or_path (a plain PEFT adapter's only clue)."""
    config = adapter / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        name = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None  # the adapter's own loading reports a broken config, naming the file
    return name if isinstance(name, str) and name else None


def _recorded_base(record: dict) -> str:
    """The base training loaded, here: the built-in it was built from (the exact weights, even
    when the shared name is a hub model's), else its local directory, else the shared name."""
    base = record.get("base") or {}
    builtin = base.get("builtin")
    if builtin:
        try:
            return resolve_model(builtin["name"], seed=builtin.get("seed", 0),
                                 options=builtin.get("options") or None)
        except UserInputError as err:
            if record["base_model"] == builtin["name"]:
                raise
            say_once(f"cannot build {builtin['name']}, the base this adapter was trained on "
                     f"({err.message}); loading {record['base_model']} "
                     "instead")
            return record["base_model"]
    path = base.get("path")
    if path and Path(path).is_dir():
        return path
    return loadable_model(record["base_model"])


def adapter_base_model(adapter: str | Path, given: str | None, *, record: dict | None = None,
                       flag: str = "--model") -> str:
    """A loadable base for `adapter`: `given` (the user's choice; a built-in name or a built-in's
    hub name resolved as loadable_model does) or, without one, the base the adapter records or
    names in adapter_config.json.

    Raises UserInputError when nothing names a base (`flag` is the option to pass).
    """
    record = record if record is not None else read_adapter_record(adapter)
    if given:
        builtin = ((record or {}).get("base") or {}).get("builtin") or {}
        if builtin.get("name") == given:  # the same built-in: built with training's settings
            return _recorded_base(record)
        return loadable_model(given)
    if record is not None:
        return _recorded_base(record)
    named = _configured_base(Path(adapter).expanduser())
    if named:
        return loadable_model(named)
    raise UserInputError("no base model given and the adapter names none", where=str(adapter),
                         hint=f"pass the base with {flag}")
