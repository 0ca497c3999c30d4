"""The sample stage: k candidate responses per prompt, from one or more models and the data set.

Output rows are listwise, ready for the score stage:
    {"prompt": str | [messages], "responses": [str, ...], "sources": [str, ...], "counts": [int]}
`sources[i]` says who produced responses[i] ("policy:diverse_beam", "dataset:chosen", ...);
identical responses are kept once, the first producer named, and `counts[i]` says how many
times that text came up. Empty responses are dropped (a candidate must have text to be ranked).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from rrhf_lite.data import read_rows
from rrhf_lite.errors import UserInputError
from rrhf_lite.generation import METHODS, generate_candidates
from rrhf_lite.io import write_jsonl

logger = logging.getLogger(__name__)

DATASET_FIELDS = ("chosen", "rejected", "responses")

# Every key a generator spec may set, with its default. None = taken from sample_candidates'
# own keyword argument of the same name.
GENERATOR_DEFAULTS: dict[str, Any] = {
    "model": "policy",
    "adapter": None,
    "name": None,  # label used in `sources`; default: the model string
    "method": "diverse_beam",
    "num_candidates": 4,
    "num_beams": None,  # default num_candidates
    "num_beam_groups": 4,
    "diversity_penalty": 1.0,
    "length_penalty": 1.0,
    "temperature": 0.8,
    "top_p": 1.0,
    "top_k": 0,
    "max_new_tokens": None,
    "max_prompt_length": None,
    "batch_size": None,
    "seed": None,
}


# --- prompts ---------------------------------------------------------------------------------

def load_prompts(source: Any, *, split: str = "train", limit: int | None = None) -> list[dict]:
    """Read prompts for sampling.

    Args:
        source: anything `rrhf_lite.data.read_rows` reads (a .jsonl / .json / .parquet file, a
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


# --- dataset answers ---------------------------------------------------------------------------

def _answer_text(value: Any, where: str, field: str) -> str:
    """A dataset answer as text: a string, a message, or a message list ending in the answer."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        value = value[-1]
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    if isinstance(value, str):
        return value
    raise UserInputError(
        f'"{field}" must be a string or chat message(s), got {type(value).__name__}', where=where
    )


def dataset_answers(record: dict) -> list[tuple[str, str]]:
    """(text, source) for the data set's own answers of one prompt record."""
    where = record.get("where")
    answers = []
    for field in ("chosen", "rejected"):
        if field in record:
            answers.append((_answer_text(record[field], where, field), f"dataset:{field}"))
    if "responses" in record:
        if not isinstance(record["responses"], list):
            raise UserInputError('"responses" must be a list', where=where)
        answers.extend((_answer_text(r, where, "responses"), "dataset:responses")
                       for r in record["responses"])
    return answers


# --- generator specs ---------------------------------------------------------------------------

def normalize_generator(spec: Any, index: int, **defaults: Any) -> dict:
    """A generator spec (dict or pydantic model) with every key filled and checked."""
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump()
    if not isinstance(spec, Mapping):
        raise UserInputError(f"a generator must be a mapping, got {type(spec).__name__}",
                             where=f"generators[{index}]")
    unknown = sorted(set(spec) - set(GENERATOR_DEFAULTS))
    if unknown:
        raise UserInputError(f"unknown key(s) {unknown}", where=f"generators[{index}]",
                             hint=f"valid keys: {', '.join(GENERATOR_DEFAULTS)}")
    full = {**GENERATOR_DEFAULTS, **{k: v for k, v in spec.items() if v is not None}}
    for key, value in defaults.items():
        if full.get(key) is None:
            full[key] = value
    where = f"generators[{index}]"
    if full["method"] not in METHODS:
        raise UserInputError(f"unknown method {full['method']!r}", where=f"{where}.method",
                             hint=f"choose from {', '.join(METHODS)}")
    for key in ("num_candidates", "num_beam_groups", "max_new_tokens", "batch_size"):
        if not isinstance(full[key], int) or full[key] < 1:
            raise UserInputError(f"must be a positive integer, got {full[key]!r}",
                                 where=f"{where}.{key}")
    if full["method"] == "greedy" and full["num_candidates"] > 1:
        logger.warning("%s: greedy decoding gives one candidate per prompt, not %d",
                       where, full["num_candidates"])
    if full["method"] == "diverse_beam":
        beams = full["num_beams"] or full["num_candidates"]
        if beams < full["num_candidates"] or beams % full["num_beam_groups"]:
            raise UserInputError(
                f"num_beams ({beams}) must be >= num_candidates ({full['num_candidates']}) and a "
                f"multiple of num_beam_groups ({full['num_beam_groups']})",
                where=f"{where}.num_beam_groups",
                hint="e.g. num_candidates 4, num_beam_groups 4 (or 2), or set num_beams",
            )
    return full


def _source_label(spec: dict) -> str:
    """ "policy:diverse_beam", "Qwen/Qwen2-0.5B:top_p", "my-model:beam" (a local dir's name)."""
    name = spec["name"] or spec["model"]
    if not spec["name"] and Path(name).expanduser().exists():
        name = Path(name).expanduser().resolve().name
    return f"{name}:{spec['method']}"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_generator(model, tokenizer, spec: dict, prompts: list, progress: bool) -> list[list[str]]:
    from tqdm.auto import tqdm

    out: list[list[str]] = []
    size = spec["batch_size"]
    for start in tqdm(range(0, len(prompts), size), desc=f"sample {_source_label(spec)}",
                      unit="batch", disable=not progress):
        # seeded per batch: a batch's samples do not depend on what ran before it
        torch.manual_seed(spec["seed"] + start)
        out.extend(generate_candidates(
            model, tokenizer, prompts[start:start + size], method=spec["method"],
            num_candidates=spec["num_candidates"], num_beams=spec["num_beams"],
            num_beam_groups=spec["num_beam_groups"], diversity_penalty=spec["diversity_penalty"],
            temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"],
            max_new_tokens=spec["max_new_tokens"], max_prompt_length=spec["max_prompt_length"],
            length_penalty=spec["length_penalty"],
        ))
    return out


def sample_candidates(
    prompts: Sequence[dict],
    *,
    generators: Sequence[Any],
    include_dataset_responses: bool = True,
    max_new_tokens: int = 128,
    max_prompt_length: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    models: Mapping[str, tuple] | None = None,
    load_kwargs: Mapping[str, Any] | None = None,
    output_path: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Generate candidates for every prompt and gather them in listwise rows.

    Args:
        prompts: records with "prompt" (or "query"): a string or chat messages; optionally the
            data set's "chosen", "rejected", "responses" (see load_prompts).
        generators: specs (dicts or pydantic models), each with keys of GENERATOR_DEFAULTS:
            model (a name in `models`, a hub name or a directory), adapter (PEFT dir or None),
            name (label in sources), method ("greedy" | "beam" | "diverse_beam" | "top_p"),
            num_candidates, num_beams, num_beam_groups, diversity_penalty, length_penalty,
            temperature, top_p, top_k, and overrides of max_new_tokens, max_prompt_length,
            batch_size, seed.
        include_dataset_responses: add the data set's own answers after the generated ones.
        max_new_tokens, max_prompt_length, batch_size, seed: defaults for every generator.
            Prompts longer than max_prompt_length tokens keep their end.
        models: already loaded (model, tokenizer) pairs by name, e.g. {"policy": (m, t)}; a
            generator whose model is not here is loaded with load_causal_lm and freed after.
        load_kwargs: extra arguments for load_causal_lm (torch_dtype, load_in_4bit,
            trust_remote_code, device).
        output_path: also write the rows there as JSON lines (atomically).
        progress: show a progress bar per generator.

    Returns:
        One row per prompt: {"prompt", "responses", "sources", "counts"} (a prompt left with
        no non-empty candidate is skipped, with a warning).
    """
    from rrhf_lite.inference import load_causal_lm

    if not generators and not include_dataset_responses:
        raise UserInputError("nothing to sample: no generators and no dataset responses",
                             where="generators", hint="add a generator")
    specs = [normalize_generator(g, i, max_new_tokens=max_new_tokens,
                                 max_prompt_length=max_prompt_length, batch_size=batch_size,
                                 seed=seed) for i, g in enumerate(generators)]
    records = [{"prompt": r["query"], **r} if "prompt" not in r and "query" in r else r
               for r in prompts]
    prompt_values = [r["prompt"] for r in records]
    models = dict(models or {})

    # Run generators model by model, so each model is loaded (and held in memory) once.
    outputs: dict[int, list[list[str]]] = {}
    order: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        order.setdefault((spec["model"], spec["adapter"]), []).append(i)
    for (name, adapter), indices in order.items():
        if adapter is None and name in models:
            model, tokenizer = models[name]
            loaded = False
        else:
            model, tokenizer = load_causal_lm(name, adapter_path=adapter, **(load_kwargs or {}))
            loaded = True
        for i in indices:
            outputs[i] = _run_generator(model, tokenizer, specs[i], prompt_values, progress)
        model = tokenizer = None  # drop our reference before the next model loads
        if loaded:
            _free_memory()

    rows, duplicates, empty = [], 0, 0
    for p, record in enumerate(records):
        candidates = [(text, _source_label(specs[i])) for i in range(len(specs))
                      for text in outputs[i][p]]
        if include_dataset_responses:
            candidates += dataset_answers(record)
        responses, sources, counts, seen = [], [], [], {}
        for text, source in candidates:
            if not text.strip():
                empty += 1
                continue
            if text in seen:
                counts[seen[text]] += 1
                duplicates += 1
                continue
            seen[text] = len(responses)
            responses.append(text)
            sources.append(source)
            counts.append(1)
        if not responses:  # nothing to rank; the trainer would reject the row
            logger.warning("%s: no non-empty candidate, prompt skipped",
                           record.get("where", f"prompt {p + 1}"))
            continue
        rows.append({"prompt": record["prompt"], "responses": responses, "sources": sources,
                     "counts": counts})
    logger.info("sampled %d prompts: %d candidates kept, %d duplicates and %d empty dropped",
                len(rows), sum(len(r["responses"]) for r in rows), duplicates, empty)
    if output_path is not None:
        write_jsonl(output_path, rows)
    return rows
