"""Listwise data: load and validate, tokenise candidates, collate batches, score with a model.

One example, after `load_listwise`, is
    {"prompt": str | [message dicts], "responses": [str | message dict, ...], "scores": [float] | None}
Accepted inputs (DESIGN.md contract): listwise rows with "query" or "prompt"; TRL's pairwise
"prompt/chosen/rejected" (k = 2, scores [1, 0]); the implicit-prompt "chosen/rejected" form where
the shared prefix is the prompt. Plain text or chat messages everywhere.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rrhf_lite.errors import UserInputError
from rrhf_lite.io import read_jsonl_numbered, read_text_utf8

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_FORMATS_HINT = (
    'each row needs {"prompt" or "query", "responses": [...], "scores": [...]}, '
    'or {"prompt", "chosen", "rejected"}, or {"chosen", "rejected"} sharing a prompt prefix'
)


# --------------------------------------------------------------------------- loading


def _rows_from_source(source: Any, split: str) -> tuple[list[dict], str, str]:
    """Return (rows, name used in messages, unit: 'line' | 'row' | 'item')."""
    if isinstance(source, list | tuple):
        return list(source), "data", "row"
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # a datasets.Dataset
        return source.to_list(), "dataset", "row"
    if hasattr(source, "keys") and hasattr(source, "column_names"):  # a DatasetDict
        if split not in source:
            raise UserInputError(f"split {split!r} not found (have {sorted(source.keys())})",
                                 where="dataset", hint="pass an existing split")
        return source[split].to_list(), f"dataset[{split}]", "row"
    path = Path(str(source))
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".jsonl":
            return read_jsonl_numbered(path), str(path), "line"
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            import datasets

            return datasets.Dataset.from_parquet(str(path)).to_list(), str(path), "row"
        raise UserInputError(f"unsupported file type {suffix!r}", where=str(path),
                             hint="use .jsonl, .json or .parquet")
    looks_local = suffix in (".jsonl", ".json", ".parquet") or str(source).startswith((".", "/", "~"))
    if looks_local and not path.exists():
        raise UserInputError("file not found", where=str(path), hint="check the path")
    # anything else is a `datasets` hub name (owner/name)
    import datasets

    try:
        ds = datasets.load_dataset(str(source), split=split)
    except Exception as err:  # the datasets library raises many types; the user sees one message
        raise UserInputError(f"could not load dataset: {err}", where=str(source),
                             hint="pass a local .jsonl/.json/.parquet file or a valid hub name") from None
    return ds.to_list(), f"{source}[{split}]", "row"


def _read_json(path: Path) -> tuple[list, str, str]:
    text = read_text_utf8(path)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError):
        return read_jsonl_numbered(path), str(path), "line"  # JSON lines saved as .json
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserInputError("expected a JSON array of objects", where=str(path), hint=_FORMATS_HINT)
    return data, str(path), "item"


def _is_message(obj: Any) -> bool:
    return isinstance(obj, dict) and "content" in obj and "role" in obj


def _is_messages(obj: Any) -> bool:
    return isinstance(obj, list) and len(obj) > 0 and all(_is_message(m) for m in obj)


def _response(obj: Any, where: str, what: str) -> str | dict:
    """A response is a non-empty string or one assistant message (a one-message list allowed)."""
    if isinstance(obj, list) and len(obj) == 1 and _is_message(obj[0]):
        obj = obj[0]
    if _is_message(obj):
        if not isinstance(obj["content"], str) or not obj["content"].strip():
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
    return dict(stats)


def _warn_counts(stats: dict[str, int], name: str) -> None:
    n = stats["rows"]
    messages = {
        "single_response": "have one response (k = 1): SFT loss only, no rank pair",
        "all_tied": "have all scores tied: no rank pair (SFT on the first response only)",
        "duplicate_responses": "contain duplicate responses",
    }
    for key, text in messages.items():
        if stats.get(key):
            logger.warning("%s: %d of %d rows %s", name, stats[key], n, text)


def load_listwise(source: Any, *, split: str = "train", require_scores: bool = True) -> list[dict]:
    """Load and validate listwise data.

    Args:
        source: a path to a .jsonl / .json / .parquet file, a `datasets` hub name, a
            `datasets.Dataset` / `DatasetDict`, or a list of row dicts.
        split: the split to use for hub names and DatasetDicts.
        require_scores: listwise rows must carry "scores" (False for prompts+responses that the
            score stage will rate; their "scores" is then None).

    Returns a list of {"prompt", "responses", "scores"} dicts. Bad rows raise UserInputError
    naming the file and its 1-based line (JSONL) or row; k = 1, all-tied scores and duplicate
    responses are counted and logged as one warning each.
    """
    rows, name, unit = _rows_from_source(source, split)
    if not rows:
        raise UserInputError("the dataset is empty", where=name, hint="give at least one row")
    if unit == "line":  # (line number, row) pairs: messages name the file's real line
        numbers, rows = [n for n, _ in rows], [row for _, row in rows]
    else:
        numbers = list(range(1, len(rows) + 1))
    examples = [normalize_row(row, f"{name} {unit} {n}", require_scores)
                for row, n in zip(rows, numbers, strict=True)]
    _warn_counts(summarize_listwise(examples), name)
    return examples


# --------------------------------------------------------------------------- tokenisation


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise UserInputError("the tokenizer has no EOS token", where="tokenizer",
                             hint="use a tokenizer with an eos_token (responses end with EOS)")
    return int(tokenizer.eos_token_id)


def _render_prompt(prompt: str | list[dict], tokenizer) -> tuple[str, bool]:
    """(prompt text, whether it came from the chat template).

    The same rendering as sampling and evaluation (rrhf_lite.inference.render_prompt), so the
    trainer sees exactly the prompts the candidates were generated for; chat messages without
    a chat template are an error there and here.
    """
    from rrhf_lite.inference import render_prompt

    return render_prompt(tokenizer, prompt)


def _response_text(prompt: str | list[dict], prompt_text: str, response, tokenizer, templated) -> str:
    content = response if isinstance(response, str) else response["content"]
    if templated and isinstance(prompt, list):
        # Render the whole conversation so the template's own turn markup follows the response;
        # fall back to the bare content when the template does not extend the prompt verbatim.
        message = response if isinstance(response, dict) else {"role": "assistant", "content": content}
        full = tokenizer.apply_chat_template(prompt + [message], tokenize=False)
        if full.startswith(prompt_text) and len(full) > len(prompt_text):
            return full[len(prompt_text):]
    return content


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _truncate(ids: list[int], length: int, side: str) -> list[int]:
    return ids[-length:] if side == "left" else ids[:length]


@dataclass
class TokenizeStats:
    """Counts from `tokenize_listwise`, logged once as a summary."""

    rows: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    rows_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def tokenize_example(
    example: dict, tokenizer, *, max_length: int | None, max_prompt_length: int | None,
    truncation_side: str = "left", stats: TokenizeStats | None = None,
) -> dict | None:
    """Token ids for one prompt and its k candidates, or None when no response token fits.

    The prompt is truncated to max_prompt_length on `truncation_side` ("left" keeps its end,
    as the reference code does). Each response is tokenised without special tokens and ends
    with EOS; prompt + response longer than max_length loses the response's tail. A prompt
    that alone reaches max_length is cut to max_length (per side) and leaves no response token,
    so the row is dropped (counted in stats).
    """
    if truncation_side not in ("left", "right"):
        raise UserInputError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}",
                             where="truncation_side", hint="use 'left' or 'right'")
    stats = stats if stats is not None else TokenizeStats()
    stats.rows += 1
    eos = _eos_id(tokenizer)
    prompt_text, templated = _render_prompt(example["prompt"], tokenizer)
    # a chat template writes its own BOS; plain text gets the tokenizer's usual special tokens
    prompt_ids = _ids(tokenizer, prompt_text, special=not templated)
    if not prompt_ids and tokenizer.bos_token_id is not None:
        prompt_ids = [int(tokenizer.bos_token_id)]
    truncated = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, truncated = _truncate(prompt_ids, max_prompt_length, truncation_side), True
    if max_length is not None and len(prompt_ids) >= max_length:
        prompt_ids, truncated = _truncate(prompt_ids, max_length, truncation_side), True
    stats.prompts_truncated += int(truncated)
    room = None if max_length is None else max_length - len(prompt_ids)
    if room is not None and room <= 0:
        stats.rows_dropped += 1
        return None
    responses_ids = []
    for response in example["responses"]:
        text = _response_text(example["prompt"], prompt_text, response, tokenizer, templated)
        ids = _ids(tokenizer, text, special=False)
        if not ids or ids[-1] != eos:
            ids.append(eos)
        if room is not None and len(ids) > room:
            ids = ids[:room]
            stats.responses_truncated += 1
        responses_ids.append(ids)
    scores = example.get("scores")
    return {"prompt_ids": prompt_ids, "responses_ids": responses_ids,
            "scores": list(scores) if scores is not None else [0.0] * len(responses_ids)}


def tokenize_listwise(
    examples: Iterable[dict], tokenizer, *, max_length: int | None, max_prompt_length: int | None,
    truncation_side: str = "left", keep_dropped: bool = False,
) -> tuple[list[dict | None], TokenizeStats]:
    """Tokenise many examples; returns (features, stats). Dropped rows are removed, or kept as
    None when keep_dropped (so positions still match the input). Truncations are logged."""
    stats = TokenizeStats()
    features = [tokenize_example(ex, tokenizer, max_length=max_length,
                                 max_prompt_length=max_prompt_length,
                                 truncation_side=truncation_side, stats=stats) for ex in examples]
    if not keep_dropped:
        features = [f for f in features if f is not None]
    if stats.prompts_truncated or stats.responses_truncated:
        logger.warning("truncated %d of %d prompts (side %r) and %d responses (max_length %s)",
                       stats.prompts_truncated, stats.rows, truncation_side,
                       stats.responses_truncated, max_length)
    if stats.rows_dropped:
        logger.warning("dropped %d of %d rows: the prompt leaves no room for a response token "
                       "(lower max_prompt_length or raise max_length)", stats.rows_dropped, stats.rows)
    return features, stats


class RRHFCollator:
    """Tokenised examples -> one batch of all candidates of several prompts.

    Output: input_ids, attention_mask, labels [N, T] with N = total candidates (right padded;
    labels are the input ids on response tokens and -100 on prompt and padding, unshifted as
    in HF: the model's logits at t predict labels at t + 1); rewards [B, K] float32 and
    candidate_mask [B, K] bool with K = the largest k in the batch; candidate_index [N] long,
    the flat position b * K + j of each candidate in the [B, K] grid.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        K = max(len(f["responses_ids"]) for f in features)
        seqs, labels, index = [], [], []
        rewards = torch.zeros(len(features), K, dtype=torch.float32)
        mask = torch.zeros(len(features), K, dtype=torch.bool)
        for b, f in enumerate(features):
            prompt = list(f["prompt_ids"])
            for j, response in enumerate(f["responses_ids"]):
                seqs.append(prompt + list(response))
                labels.append([IGNORE_INDEX] * len(prompt) + list(response))
                index.append(b * K + j)
            k = len(f["responses_ids"])
            rewards[b, :k] = torch.tensor(f["scores"], dtype=torch.float32)
            mask[b, :k] = True
        T = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        label_t = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros(len(seqs), T, dtype=torch.long)
        for n, (s, lab) in enumerate(zip(seqs, labels, strict=True)):
            input_ids[n, : len(s)] = torch.tensor(s)
            label_t[n, : len(lab)] = torch.tensor(lab)
            attention[n, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": label_t,
                "rewards": rewards, "candidate_mask": mask,
                "candidate_index": torch.tensor(index, dtype=torch.long)}


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_candidates(
    model, tokenizer, examples: Sequence[dict], max_length: int | None = 512,
    length_penalty: float = 1.0, micro_batch_size: int = 8, *, max_prompt_length: int | None = None,
    truncation_side: str = "left", backend: str = "auto",
) -> list[list[float]]:
    """The model's own candidate scores p_i = (sum of response token log-probs) / |y_i|^lambda.

    Args:
        model: a causal LM (PEFT or plain), used in eval mode without gradients.
        tokenizer: its tokenizer; examples: normalised rows (scores may be None).
        max_length, max_prompt_length, truncation_side: as in training (see tokenize_example).
        length_penalty: lambda. micro_batch_size: candidates per forward pass.
        backend: rrhf_kernels backend ("auto" | "triton" | "torch").

    Returns one list of k floats per example, in order; a row whose prompt leaves no room for a
    response token gets NaN for each candidate.
    """
    from rrhf_lite.modeling import chunk_logprob_sums

    features, _ = tokenize_listwise(examples, tokenizer, max_length=max_length,
                                    max_prompt_length=max_prompt_length,
                                    truncation_side=truncation_side, keep_dropped=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    collate = RRHFCollator(pad)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    flat = [(i, ids) for i, f in enumerate(features) if f is not None
            for ids in [{"prompt_ids": f["prompt_ids"], "responses_ids": [r], "scores": [0.0]}
                        for r in f["responses_ids"]]]
    results: list[list[float]] = [
        [float("nan")] * len(ex["responses"]) if f is None else [] for ex, f in zip(examples, features, strict=True)
    ]
    try:
        for start in range(0, len(flat), max(1, micro_batch_size)):
            part = flat[start: start + micro_batch_size]
            batch = collate([feat for _, feat in part])
            sums, counts = chunk_logprob_sums(
                model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                batch["labels"].to(device), backend=backend)
            scores = sums.float() / counts.clamp(min=1).float() ** length_penalty
            for (i, _), s in zip(part, scores.tolist(), strict=True):
                results[i].append(s)
    finally:
        model.train(was_training)
    return results
