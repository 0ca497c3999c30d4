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
from pydantic import ValidationError

from rrhf_lite.config.sections import GeneratorSection
from rrhf_lite.data.candidate_stats import generated_per_prompt
from rrhf_lite.errors import UserInputError
from rrhf_lite.generation.candidates import generate_candidates
from rrhf_lite.models.inference_loader import load_causal_lm
from rrhf_lite.utils.io import write_jsonl

logger = logging.getLogger(__name__)

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

def generator_settings(spec: Any, index: int, **defaults: Any) -> GeneratorSection:
    """A generator (a GeneratorSection, or a mapping of its keys) with the per-generator
    overrides that are unset taken from `defaults` (max_new_tokens, batch_size, ...)."""
    where = f"generators[{index}]"
    if not isinstance(spec, GeneratorSection):
        if not isinstance(spec, Mapping):
            raise UserInputError(f"a generator must be a mapping, got {type(spec).__name__}",
                                 where=where)
        try:
            spec = GeneratorSection.model_validate(dict(spec))
        except ValidationError as err:
            first = err.errors()[0]
            key = ".".join(str(part) for part in first["loc"])
            if first["type"] == "extra_forbidden":
                raise UserInputError(f"unknown key '{key}'", where=where,
                                     hint=f"valid keys: {', '.join(GeneratorSection.model_fields)}"
                                     ) from None
            raise UserInputError(first["msg"].removeprefix("Value error, "),
                                 where=f"{where}.{key}") from None
    spec = spec.model_copy(update={k: v for k, v in defaults.items() if getattr(spec, k) is None})
    if spec.method == "greedy" and spec.num_candidates > 1:
        logger.warning("%s: greedy decoding gives one candidate per prompt, not %d",
                       where, spec.num_candidates)
    return spec


def _source_label(spec: GeneratorSection) -> str:
    """ "policy:diverse_beam", "Qwen/Qwen2-0.5B:top_p", "my-model:beam" (a local dir's name)."""
    name = spec.name or spec.model
    if not spec.name and Path(name).expanduser().exists():
        name = Path(name).expanduser().resolve().name
    return f"{name}:{spec.method}"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_generator(model, tokenizer, spec: GeneratorSection, prompts: list, progress: bool
                   ) -> list[list[str]]:
    from tqdm.auto import tqdm

    out: list[list[str]] = []
    size = spec.batch_size
    for start in tqdm(range(0, len(prompts), size), desc=f"sample {_source_label(spec)}",
                      unit="batch", disable=not progress):
        # seeded per batch: a batch's samples do not depend on what ran before it
        torch.manual_seed(spec.seed + start)
        out.extend(generate_candidates(
            model, tokenizer, prompts[start:start + size], method=spec.method,
            num_candidates=spec.num_candidates, num_beams=spec.num_beams,
            num_beam_groups=spec.num_beam_groups, diversity_penalty=spec.diversity_penalty,
            temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k,
            max_new_tokens=spec.max_new_tokens, max_prompt_length=spec.max_prompt_length,
            length_penalty=spec.length_penalty,
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
            data set's "chosen", "rejected", "responses" (see rrhf_lite.data.prompts.load_prompts).
        generators: GeneratorSection objects (or mappings of their keys):
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

    if not generators and not include_dataset_responses:
        raise UserInputError("nothing to sample: no generators and no dataset responses",
                             where="generators", hint="add a generator")
    specs = [generator_settings(g, i, max_new_tokens=max_new_tokens,
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
        order.setdefault((spec.model, spec.adapter), []).append(i)
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

    rows, duplicates, empty, short, skipped = [], 0, 0, 0, []
    generated = sum(generated_per_prompt(spec) for spec in specs)
    for p, record in enumerate(records):
        candidates = [(text, _source_label(specs[i])) for i in range(len(specs))
                      for text in outputs[i][p]]
        planned = generated
        if include_dataset_responses:
            answers = dataset_answers(record)
            candidates += answers
            planned += len(answers)
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
            skipped.append(record.get("where", f"prompt {p + 1}"))
            continue
        short += len(responses) < planned
        rows.append({"prompt": record["prompt"], "responses": responses, "sources": sources,
                     "counts": counts})
    if skipped:  # said once, with the count, not once per prompt
        logger.warning("%d of %d prompts skipped: every candidate came out empty (%s%s); a chat "
                       "model given plain-text prompts often stops at once", len(skipped),
                       len(records), ", ".join(map(str, skipped[:3])),
                       ", ..." if len(skipped) > 3 else "")
    logger.info("sampled %d prompts: %d candidates kept, %d duplicates and %d empty dropped; "
                "%d prompts have fewer candidates than planned", len(rows),
                sum(len(r["responses"]) for r in rows), duplicates, empty, short)
    if output_path is not None:
        write_jsonl(output_path, rows)
    return rows
