"""The user's files, checked before (and around) the third-party loaders that read them.

transformers, peft, safetensors, datasets, pyarrow and tokenizers raise their own exception
types, with messages about their internals, for what is a mistake in the user's files (a
truncated safetensors file, a config.json that is missing or names an unknown model_type, an
adapter whose rank does not match its weights). Everything here either checks such a file
cheaply before a model loads, or turns a loader's error about a named file into a
UserInputError (exit code 2) that names the file and says what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import looks_like_local_path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _first_line(err: BaseException) -> str:
    err = err.__cause__ or err  # e.g. a config validator's ValueError, wrapped by huggingface_hub
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:  # "Error(s) in loading state_dict for X:" + why
        text += " " + lines[1]
    return f"{type(err).__name__}: {text[:300]}".strip()


def loader_error_types() -> tuple[type[BaseException], ...]:
    """What the loaders raise for bad files. Out-of-memory is never the user's file."""
    kinds: list[type[BaseException]] = [OSError, ValueError, KeyError, TypeError,
                                        AttributeError, RuntimeError, struct.error,
                                        json.JSONDecodeError, UnicodeDecodeError]
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    with contextlib.suppress(ImportError):  # a config that fails its own validators
        from huggingface_hub.errors import StrictDataclassError

        kinds.append(StrictDataclassError)
    with contextlib.suppress(ImportError):
        import pyarrow

        kinds.append(pyarrow.ArrowException)
    return tuple(kinds)


@contextlib.contextmanager
def user_file_errors(where: str, what: str, hint: str) -> Iterator[None]:
    """Run a third-party loader on the user's file `where`: its errors become exit code 2.

    Only wrap calls whose every input is the user's file (and our fixed, tested arguments):
    an error there is about the file. Out-of-memory errors pass through unchanged.
    """
    try:
        yield
    except UserInputError:
        raise
    except MemoryError:
        raise
    except loader_error_types() as err:
        if "out of memory" in str(err).lower():
            raise
        raise UserInputError(f"cannot load the {what} ({_first_line(err)})", where=where,
                             hint=hint) from None


# ------------------------------------------------------------------------------ safetensors


def check_safetensors_file(path: Path) -> None:
    """The header is valid JSON and every tensor's bytes lie inside the file (not truncated)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("the file is shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise ValueError("the header is longer than the file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, stop = info["data_offsets"]
            end = max(end, int(stop))
            if not 0 <= int(start) <= int(stop):
                raise ValueError(f"tensor {name!r} has bad offsets")
        if 8 + length + end > size:
            raise ValueError(f"the file is truncated ({size} bytes, the header needs "
                             f"{8 + length + end})")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise UserInputError(f"corrupt or truncated safetensors file ({err})", where=str(path),
                             hint="download or save the weights again") from None


def _json_object(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserInputError(f"{what} is not valid JSON ({_first_line(err)})", where=str(path),
                             hint="restore the file saved with the model") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{what} must hold a JSON object, got {type(data).__name__}",
                             where=str(path), hint="restore the file saved with the model")
    return data


# ------------------------------------------------------------------------------ models


def is_local(name_or_path: str) -> bool:
    return looks_like_local_path(name_or_path) or Path(name_or_path).expanduser().exists()


def check_model_dir(name_or_path: str, what: str = "model", *, tokenizer: bool = True) -> None:
    """A local model directory: config.json readable and known to transformers, the tokenizer's
    files present, every safetensors file intact. Hub names are left to the loaders."""
    if not is_local(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise UserInputError(f"{what} not found", where=str(path),
                             hint="check the path (or give a hub name)")
    if not path.is_dir():
        raise UserInputError(f"{what} must be a directory, this is a file", where=str(path),
                             hint="give the directory holding config.json and the weights")
    config = path / "config.json"
    if not config.is_file():
        raise UserInputError(f"no config.json in the {what} directory", where=str(path),
                             hint="give a directory saved with save_pretrained")
    fields = _json_object(config, "config.json")
    from transformers import AutoConfig

    # a model with its own code (auto_map) is checked when it loads, with trust_remote_code
    if "auto_map" not in fields:
        with user_file_errors(str(config), f"{what}'s config",
                              "check model_type and the sizes in config.json (an unknown "
                              "model_type needs a newer transformers, or trust_remote_code)"):
            AutoConfig.from_pretrained(str(path))
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserInputError(
            f"no tokenizer files in the {what} directory (looked for {', '.join(TOKENIZER_FILES)})",
            where=str(path), hint="save the tokenizer beside the model, or set model.tokenizer")
    for weights in sorted(path.glob("*.safetensors")):
        check_safetensors_file(weights)


def check_tokenizer_source(name_or_path: str) -> None:
    if not is_local(name_or_path):
        return
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise UserInputError("tokenizer directory not found" if not path.exists() else
                             "a tokenizer is a directory, this is a file", where=str(path),
                             hint="give the directory holding the tokenizer files, or a hub name")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserInputError(
            f"no tokenizer files in this directory (looked for {', '.join(TOKENIZER_FILES)})",
            where=str(path), hint="save the tokenizer there with save_pretrained")


def check_loading_info(info: dict, where: str, what: str) -> None:
    """from_pretrained(output_loading_info=True): missing or unexpected weights are errors."""
    problems = []
    for key, text in (("missing_keys", "missing from the weights (would be random)"),
                      ("unexpected_keys", "in the weights but not in the model"),
                      ("mismatched_keys", "of another shape than config.json says")):
        names = sorted(str(n if isinstance(n, str) else n[0]) for n in info.get(key) or ())
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} tensors {text}: {shown}")
    if problems:
        raise UserInputError(f"the {what}'s weights do not match its config.json: "
                             + "; ".join(problems), where=where,
                             hint="check num_hidden_layers and the sizes in config.json against "
                             "the checkpoint, or save the model again")


def load_pretrained(auto_class, name_or_path: str, *, what: str, **kwargs):
    """auto_class.from_pretrained with the model's files checked first, its errors as exit 2,
    and missing, unexpected or mismatched weights refused."""
    check_model_dir(name_or_path, what, tokenizer=False)
    hint = ("check the name or directory (safetensors weights, a config.json that matches "
            "them); or pass trust_remote_code for a model that ships its own code")
    with user_file_errors(str(name_or_path), what, hint):
        model, info = auto_class.from_pretrained(str(name_or_path), output_loading_info=True,
                                                 **kwargs)
    check_loading_info(info, str(name_or_path), what)
    return model


# ------------------------------------------------------------------------------ adapters


def check_adapter_config(path: Path) -> dict:
    """adapter_config.json is an object whose LoRA numbers are numbers."""
    config = _json_object(path / "adapter_config.json", "adapter_config.json")
    where = str(path / "adapter_config.json")
    for key, kind in (("r", int), ("lora_alpha", int | float)):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                                  or value <= 0):
            raise UserInputError(f"{key} must be a positive number, got {value!r}", where=where,
                                 hint="restore the adapter_config.json saved with the adapter")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str | list):
        raise UserInputError(f"target_modules must be a string or a list, got {targets!r}",
                             where=where, hint="restore the adapter_config.json saved with it")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        check_safetensors_file(weights)
    return config


def load_adapter(model, adapter_dir: str, **kwargs):
    """PeftModel.from_pretrained on a local adapter directory, its errors as exit code 2."""
    from peft import PeftModel

    path = Path(adapter_dir)
    check_adapter_config(path)
    loaded_from = getattr(getattr(model, "config", None), "_name_or_path", None)
    with user_file_errors(str(path), "adapter", "the adapter must have been trained on this "
                          "base model (same architecture, modules and LoRA rank); check "
                          "adapter_config.json against its weights"):
        peft_model = PeftModel.from_pretrained(model, str(path), **kwargs)
    # The adapter names its base as shared (a hub name, a builtin: name); here it sits on the
    # base just loaded. PEFT looks that name up when it saves (a hub request for a hub name), so
    # it is pointed at what was loaded; a trained adapter's files name the shared base again.
    if loaded_from:
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = loaded_from
    return peft_model


# ------------------------------------------------------------------------------ outputs


def check_output_path(path: str | Path, where: str) -> Path:
    """A directory we will create or write into: not a file, not under a file, writable."""
    text = str(path)
    if "\x00" in text or not text.strip():
        raise UserInputError("not a usable path", where=where, hint="give a directory path")
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise UserInputError("the output path is a file, not a directory", where=where,
                             hint="choose a directory path (or remove the file)")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe != out and not probe.is_dir():
        raise UserInputError(f"the output path is under a file ({probe})", where=where,
                             hint="choose a directory path that is not inside a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"no permission to write in {probe}", where=where,
                             hint="choose a directory you can write to")
    return out
