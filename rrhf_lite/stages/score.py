"""The score stage: a reward for every candidate, from one of three sources.

- a Hugging Face sequence-classification reward model (one label; the reward is that logit),
  reading prompt text + joiner + response (or the whole chat rendered by its chat template);
  or a raw GPT-J value-head checkpoint (rrhf_lite.models.reward_checkpoint), scored as the reference
  code scores it: EOS appended, the value head read at the first EOS;
- a Python function named "module:function" or "path/to/file.py:function" (found from the
  recipe's directory, then the working directory), called as SIGNATURE below says;
- scores already in the data ("given"), which are only checked.

Rows go in as listwise rows {"prompt" | "query", "responses", ...} and come out the same with
"scores" added (other keys such as "sources" are kept).
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rrhf_lite.builtin.sources import current_module_name
from rrhf_lite.config.sections import ScoringSection
from rrhf_lite.data.listwise import is_finite_number
from rrhf_lite.errors import UserInputError
from rrhf_lite.models.reward_reading import reward_model_scores, reward_model_text
from rrhf_lite.utils.io import write_jsonl

logger = logging.getLogger(__name__)
__all__ = ["normalize_reward_spec", "reward_model_scores", "reward_model_text", "score_candidates"]


# --- reward spec ------------------------------------------------------------------------------

# the recipe's scoring defaults, the one copy of them
_RECIPE_DEFAULT = {name: ScoringSection.model_fields[name].default
                   for name in ("batch_size", "max_length", "joiner", "reward_format")}


def normalize_reward_spec(reward: Any) -> dict:
    """One of {"model": ...}, {"function": "module:function"}, {"given": True}, with options.

    Accepts the recipe's scoring section too (reward_model / reward_function / given keys).
    Options (defaults: the recipe's scoring section): batch_size, max_length (tokens; the start
    of long texts is cut), joiner (between prompt text and response), append_eos (False; some
    reward models read their score at an EOS), read_at ("last_token", the classifier's own
    reading, or "first_eos", the reference scorer's), format ("sequence_classification" or
    "gptj_value_head", which also needs base and implies append_eos and read_at "first_eos"),
    torch_dtype, load_in_4bit, trust_remote_code, device.
    """
    if hasattr(reward, "model_dump"):
        reward = reward.model_dump()
    if not isinstance(reward, Mapping):
        raise UserInputError(f"reward must be a mapping, got {type(reward).__name__}",
                             where="recipe section scoring")
    fmt = reward.get("format", reward.get("reward_format")) or _RECIPE_DEFAULT["reward_format"]
    raw_gptj = fmt == "gptj_value_head"
    spec = {
        "model": reward.get("model", reward.get("reward_model")),
        "format": fmt,
        "base": reward.get("base", reward.get("reward_base")),
        "function": reward.get("function", reward.get("reward_function")),
        "given": bool(reward.get("given", False)),
        "batch_size": reward.get("batch_size") or _RECIPE_DEFAULT["batch_size"],
        "max_length": reward.get("max_length") or _RECIPE_DEFAULT["max_length"],
        "joiner": reward.get("joiner") or _RECIPE_DEFAULT["joiner"],
        "append_eos": raw_gptj or bool(reward.get("append_eos", False)),
        "read_at": "first_eos" if raw_gptj else reward.get("read_at") or "last_token",
        "torch_dtype": reward.get("torch_dtype", "auto"),
        "load_in_4bit": bool(reward.get("load_in_4bit", False)),
        "trust_remote_code": bool(reward.get("trust_remote_code", False)),
        "device": reward.get("device"),
        "search_dirs": tuple(reward.get("search_dirs") or ()),
    }
    chosen = [k for k in ("model", "function", "given") if spec[k]]
    if len(chosen) != 1:
        raise UserInputError(
            f"give exactly one reward source, got {chosen or 'none'}",
            where="recipe section scoring",
            hint="set one of scoring.reward_model, scoring.reward_function (module:function) or "
                 "scoring.given: true when the data already has scores",
        )
    if not isinstance(spec["batch_size"], int) or spec["batch_size"] < 1:
        raise UserInputError("must be a positive integer", where="recipe key scoring.batch_size")
    if fmt not in ("sequence_classification", "gptj_value_head"):
        raise UserInputError(f"unknown reward format {fmt!r}",
                             where="recipe key scoring.reward_format", hint="sequence_classification or gptj_value_head")
    if spec["read_at"] not in ("last_token", "first_eos"):
        raise UserInputError(f"unknown reading {spec['read_at']!r}",
                             where="reward read_at (set by scoring.reward_format)", hint="last_token or first_eos")
    if raw_gptj and isinstance(spec["model"], str) and not spec["base"]:
        raise UserInputError("a gptj_value_head checkpoint needs its base",
                             where="recipe key scoring.reward_base", hint="the model it was trained from, e.g. EleutherAI/gpt-j-6B")
    return spec


# the signature, said wherever a user meets a reward function (docs/recipes.md has the example)
SIGNATURE = ("reward(prompts, responses) -> list[float]: one float per pair, in order; called in "
             "batches of scoring.batch_size; a prompt is the data's own (text, or a list of "
             "{role, content} messages)")
_KEY = "recipe key scoring.reward_function"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # rrhf_lite/


def _split_name(name: str) -> tuple[str, str]:
    module_name, _, attr = str(name).rpartition(":")
    if not module_name or not attr:
        raise UserInputError(f"{name!r} is not 'module:function' or 'path/to/file.py:function'",
                             where=f"{_KEY} ({name})",
                             hint="e.g. my_reward:reward (my_reward.py beside the recipe) or "
                             "rrhf_lite.builtin.tiny.tasks:reward")
    return module_name, attr


def _dirs(search_dirs: Sequence[str | Path]) -> list[Path]:
    """The recipe's directory (when known), then the working directory; each once."""
    out: list[Path] = []
    for d in [*search_dirs, Path.cwd()]:
        d = Path(d).expanduser().resolve()
        if d not in out:
            out.append(d)
    return out


def _is_file_name(module_name: str) -> bool:
    return module_name.endswith(".py") or "/" in module_name or "\\" in module_name


def _load_file(module_name: str, dirs: list[Path], name: str):
    import hashlib
    import importlib.util
    import sys

    path = Path(module_name).expanduser()
    found = [path] if path.is_absolute() else [d / path for d in dirs]
    found = [p.resolve() for p in found if p.is_file()]
    if not found:
        tried = ", ".join(str(d) for d in dirs) if not path.is_absolute() else str(path)
        raise UserInputError(f"reward file {module_name!r} not found", where=f"{_KEY} ({name})",
                             hint=f"looked in: {tried} (the recipe's directory, then the "
                             "working directory); give the path relative to one of them")
    file = found[0]
    unique = f"_rrhf_reward_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if unique in sys.modules:
        return sys.modules[unique]
    spec = importlib.util.spec_from_file_location(unique, file)
    module = importlib.util.module_from_spec(spec)
    if str(file.parent) not in sys.path:  # as for a script: the file can import its neighbours
        sys.path.insert(0, str(file.parent))
    sys.modules[unique] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[unique]
        raise
    return module


def _import_module(module_name: str, dirs: list[Path], name: str):
    import sys

    if _is_file_name(module_name):
        return _load_file(module_name, dirs, name)
    module_name = current_module_name(module_name)
    top = module_name.split(".")[0]
    for d in dirs:  # the user's module beside the recipe or in the working directory
        if (d / f"{top}.py").is_file() or (d / top / "__init__.py").is_file():
            if str(d) not in sys.path:
                sys.path.insert(0, str(d))
            break
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not module_name.startswith(err.name):
            raise  # the module itself imports something missing: the user's to fix
        raise UserInputError(
            f"cannot import module {module_name!r}", where=f"{_KEY} ({name})",
            hint=f"put {top}.py in one of: {', '.join(str(d) for d in dirs)} (the recipe's "
            "directory, then the working directory), name a file (path/to/file.py:function), "
            "or install the module") from None


def reward_module(name: str, search_dirs: Sequence[str | Path] = ()):
    """(module, function name) for "module:function" or "path/to/file.py:function".

    Both resolve from `search_dirs` (the recipe's directory) and then the working directory;
    a dotted module may also be any installed one. An error raised while the user's module
    runs (a syntax error, a missing dependency) is a UserInputError naming its file and line.
    """
    module_name, attr = _split_name(name)
    try:
        return _import_module(module_name, _dirs(search_dirs), name), attr
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise user_function_error(err, name, "importing it") from None


def import_reward_function(name: str, search_dirs: Sequence[str | Path] = ()) -> Callable:
    """The function a recipe names (imported only when the recipe names one)."""
    module, attr = reward_module(name, search_dirs)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserInputError(f"{_split_name(name)[0]!r} has no function {attr!r}",
                             where=f"{_KEY} ({name})", hint="check the name after the colon")
    return fn


def _own_frame(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


def user_function_error(err: BaseException, name: str, during: str) -> UserInputError:
    """The user's exception as a UserInputError: their traceback (our frames left out), the
    file and line it came from, and the recipe key."""
    import traceback

    frames = [f for f in traceback.extract_tb(err.__traceback__) if not _own_frame(f.filename)]
    if isinstance(err, SyntaxError) and err.filename:
        frames.append(traceback.FrameSummary(err.filename, err.lineno or 0, "<module>",
                                             line=(err.text or "").strip()))
    libraries = ("site-packages", "dist-packages", "/lib/python")
    theirs = [f for f in frames if not any(x in f.filename for x in libraries)] or frames
    at = f" at {theirs[-1].filename} line {theirs[-1].lineno}" if theirs else ""
    shown = "".join(traceback.format_list(frames[-8:])).rstrip()
    detail = f"{type(err).__name__}: {err}"
    return UserInputError(
        f"your reward function raised {detail} while {during}{at}"
        + (f"\n  traceback (most recent call last):\n{shown}" if shown else ""),
        where=f"{_KEY} ({name})",
        hint=f"fix the function or its module; it is called as {SIGNATURE}",
    )


def call_reward_function(fn: Callable, name: str, prompts: Sequence, responses: Sequence[str],
                         *, during: str = "scoring") -> list[float]:
    """fn(prompts, responses), checked: one finite float per pair; the user's exception
    becomes a UserInputError (exit code 2) with their file and line."""
    try:
        values = fn(list(prompts), list(responses))
    except UserInputError:
        raise
    except Exception as err:  # noqa: BLE001
        frames = traceback_frames(err)
        if frames and all(_own_frame(f) for f in frames[1:]):
            raise  # it failed inside rrhf-lite's own task code: ours to fix
        raise user_function_error(err, name, during) from None
    return _checked_function_output(values, len(prompts), name)


def traceback_frames(err: BaseException) -> list[str]:
    import traceback

    return [f.filename for f in traceback.extract_tb(err.__traceback__)]


# --- rows -------------------------------------------------------------------------------------

def _check_rows(rows: Sequence[dict], where: str) -> list[dict]:
    checked = []
    for i, row in enumerate(rows, start=1):
        place = f"{where} row {i}"
        if not isinstance(row, dict):
            raise UserInputError(f"expected an object, got {type(row).__name__}", where=place)
        if "prompt" not in row and "query" not in row:
            raise UserInputError('missing "prompt" (or "query")', where=place)
        responses = row.get("responses")
        if not isinstance(responses, list) or not responses:
            raise UserInputError('"responses" must be a non-empty list', where=place,
                                 hint="run the sample stage first, or give candidates")
        checked.append(row)
    return checked


def _prompt_of(row: dict):
    return row["prompt"] if "prompt" in row else row["query"]


def check_given_scores(rows: Sequence[dict], where: str = "candidates") -> None:
    """Every row has one finite number per response in "scores"; else UserInputError."""
    for i, row in enumerate(rows, start=1):
        place = f"{where} row {i}"
        scores = row.get("scores")
        if not isinstance(scores, list):
            raise UserInputError('missing "scores" list', where=place,
                                 hint="give one score per response, or score with a model")
        if len(scores) != len(row["responses"]):
            raise UserInputError(f"{len(row['responses'])} responses but {len(scores)} scores",
                                 where=place, hint="one score per response")
        for j, value in enumerate(scores):
            if not is_finite_number(value):
                raise UserInputError(
                    f"scores[{j}] = {value!r} is not a finite number", where=place,
                    hint="give one finite number per response (no NaN, inf or strings), or "
                    "score with scoring.reward_model / reward_function",
                )


# --- function ---------------------------------------------------------------------------------

def _checked_function_output(values: Any, expected: int, name: str) -> list[float]:
    if isinstance(values, torch.Tensor) or hasattr(values, "tolist"):
        values = values.tolist()
    if not isinstance(values, list | tuple) or len(values) != expected:
        got = len(values) if isinstance(values, list | tuple) else type(values).__name__
        raise UserInputError(f"returned {got} instead of a list of {expected} floats",
                             where=f"{_KEY} ({name})",
                             hint="return one float per (prompt, response) pair, in order")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise UserInputError(f"value {i} is {value!r}, not a finite float",
                                 where=f"{_KEY} ({name})",
                                 hint="return finite floats (no None, NaN or inf)")
        out.append(float(value))
    return out


# --- the stage --------------------------------------------------------------------------------

def score_candidates(
    rows: Sequence[dict],
    *,
    reward: Any,
    output_path: str | Path | None = None,
    progress: bool = True,
    where: str = "candidates",
) -> list[dict]:
    """Add "scores" (one float per response) to listwise rows.

    Args:
        rows: {"prompt" | "query": str | [messages], "responses": [str | message], ...}.
        reward: {"model": name, dir, or an already loaded (model, tokenizer) pair} or
            {"function": "module:function"} or {"given": True}, with the options listed in
            normalize_reward_spec (batch_size, max_length, joiner, append_eos, loading flags).
            The recipe's scoring section (reward_model / reward_function / given) works too.
        output_path: also write the scored rows there as JSON lines (atomically).
        progress: show a progress bar over the (prompt, response) pairs.
        where: name of the rows' source in error messages.

    Returns:
        New row dicts (input keys kept) with "scores".

    Raises:
        UserInputError: malformed rows, missing/invalid given scores, an unimportable function,
            or a function returning anything but one finite float per pair (names the function).
    """
    from tqdm.auto import tqdm

    spec = normalize_reward_spec(reward)
    rows = _check_rows(rows, where)
    if spec["given"]:
        check_given_scores(rows, where)
        return [dict(row) for row in rows]

    pairs = [(_prompt_of(row), response) for row in rows for response in row["responses"]]
    if spec["function"]:
        fn = import_reward_function(spec["function"], spec["search_dirs"])

        def score_batch(prompts, responses):
            return call_reward_function(fn, spec["function"], prompts, responses)
    else:
        if isinstance(spec["model"], tuple):
            model, tokenizer = spec["model"]
        else:
            from rrhf_lite.models.inference_loader import default_device, load_reward_model

            path, dtype = spec["model"], spec["torch_dtype"]
            if spec["format"] == "gptj_value_head":  # the raw .pt, as safetensors (cached)
                from rrhf_lite.models.reward_checkpoint import converted_reward_dir

                path = str(converted_reward_dir(path, spec["base"]))
                if dtype == "auto" and str(spec["device"] or default_device()).startswith("cuda"):
                    dtype = "float16"  # the reference scores in half precision on the GPU
            model, tokenizer = load_reward_model(
                path, torch_dtype=dtype, load_in_4bit=spec["load_in_4bit"],
                trust_remote_code=spec["trust_remote_code"], device=spec["device"],
            )

        def score_batch(prompts, responses):
            return reward_model_scores(model, tokenizer, prompts, responses,
                                       max_length=spec["max_length"], joiner=spec["joiner"],
                                       append_eos=spec["append_eos"], read_at=spec["read_at"])

    scores: list[float] = []
    size = spec["batch_size"]
    with tqdm(total=len(pairs), desc="score", unit="response", disable=not progress) as bar:
        for start in range(0, len(pairs), size):
            prompts, responses = zip(*pairs[start:start + size], strict=True)
            scores.extend(score_batch(prompts, responses))
            bar.update(len(prompts))

    out, position = [], 0
    for row in rows:
        k = len(row["responses"])
        out.append({**row, "scores": scores[position:position + k]})
        position += k
    if output_path is not None:
        write_jsonl(output_path, out)
    return out
