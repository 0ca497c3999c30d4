"""A raw GPT-J value-head reward checkpoint, converted once into a safetensors model directory.

`Dahoas/gptj-rm-static` (the paper's HH reward model) ships one file, `hf_ckpt.pt`: the PyTorch
state dict of a GPT-J-6B body (keys `transformer.*`) plus a linear value head without bias
(`v_head.weight`, [1, n_embd]). It is not a `from_pretrained` directory and, being a pickle,
breaks the house rule "only safetensors are loaded". This module is the one exception, kept
narrow:

- the file is read with `torch.load(weights_only=True)` (the restricted unpickler: tensors and
  plain containers only, no code runs), and anything but a flat {str: Tensor} dict is refused;
- its keys are mapped onto transformers' GPTJForSequenceClassification (`v_head.weight` ->
  `score.weight`, the same [1, n_embd] linear without bias), checked against the shapes that
  the base model's config.json gives, and written once, atomically, as a safetensors directory
  with that config (num_labels 1) and the base's tokenizer, in the rrhf-lite cache;
- every later load is the ordinary safetensors path (rrhf_lite.models.inference_loader.load_reward_model).

The base (recipe key scoring.reward_base, e.g. EleutherAI/gpt-j-6B) gives only config.json and
the tokenizer; its weights are never downloaded. The reference scorer appends EOS to prompt +
" " + response and reads the value head at the first EOS: rrhf_lite.stages.score does that for
this format (`reward_spec` sets append_eos and read_at="first_eos").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import atomic_directory, looks_like_local_path

logger = logging.getLogger(__name__)

FORMAT = "gptj_value_head"
HEAD_KEY = "v_head.weight"  # the reference's nn.Linear(n_embd, 1, bias=False)
BODY_PREFIX = "transformer."
# The reference drops keys under "model." before loading (a second copy some trainers save).
DROPPED_PREFIX = "model."
# Causal-mask and rotary buffers that older transformers saved with GPT-J; the model rebuilds
# them, so they are skipped rather than refused.
_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias|embed_positions)")
CHECKPOINT_SUFFIXES = (".pt", ".bin", ".pth")
_VERSION = "1"  # bump when the conversion changes, so old caches are not reused


def cache_root() -> Path:
    root = os.environ.get("RRHF_LITE_CACHE") or Path.home() / ".cache" / "rrhf-lite"
    return Path(root) / "gptj-value-head"


# ------------------------------------------------------------------------------ the raw file


def find_checkpoint(source: str) -> Path:
    """The raw checkpoint file: `source` itself, the one .pt/.bin/.pth file of a directory
    (hf_ckpt.pt first), or that file of a hub repository (only it is downloaded)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
        named = [p for p in found if p.name == "hf_ckpt.pt"]
        if named or len(found) == 1:
            return (named or found)[0]
        raise UserInputError(
            f"expected one checkpoint file (.pt, .bin or .pth), found {len(found)}",
            where=f"recipe key scoring.reward_model ({path})",
            hint="give the checkpoint file itself, or a directory holding only hf_ckpt.pt")
    if looks_like_local_path(source):
        raise UserInputError("reward checkpoint not found",
                             where=f"recipe key scoring.reward_model ({source})",
                             hint="check the path, or give a hub name such as Dahoas/gptj-rm-static")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(source, allow_patterns=[f"*{s}" for s in CHECKPOINT_SUFFIXES])
    except Exception as err:  # network, missing repo: the user must fix the name
        raise UserInputError(f"cannot fetch the reward checkpoint ({err})",
                             where=f"recipe key scoring.reward_model ({source})",
                             hint="check the hub name, or download hf_ckpt.pt and give its path"
                             ) from None
    return find_checkpoint(folder)


def read_state_dict(path: Path) -> dict:
    """The checkpoint as {name: tensor}, read without running any code from it.

    weights_only=True lets the unpickler build tensors and plain containers only; a file that
    needs anything else fails here. A nested dict, a list or a non-tensor value is refused too.
    """
    import torch

    where = str(path)
    try:
        try:  # mmap: a 12 GB file is not copied into memory (zip-format checkpoints only)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable or unsafe file is the user's
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise UserInputError(
            f"cannot read the checkpoint with torch.load(weights_only=True) "
            f"({type(err).__name__}: {first})", where=where,
            hint="give a state dict saved with torch.save (only tensors are read; a pickle that "
            "needs code to load is refused)") from None
    if not isinstance(state, dict):
        raise UserInputError(f"the checkpoint holds a {type(state).__name__}, not a state dict",
                             where=where, hint="give a flat {name: tensor} state dict")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserInputError(
                f"entry {key!r} is a {type(value).__name__}, not a tensor", where=where,
                hint="give a flat {name: tensor} state dict (no nested dicts or optimiser state)")
    return state


def map_to_classifier(state: dict, expected: dict, where: str) -> dict:
    """The raw keys as GPTJForSequenceClassification's, checked against `expected` (name ->
    shape, from the base's config). Extra or missing weights and wrong shapes are refused."""
    mapped, extra = {}, []
    for key, tensor in state.items():
        if key.startswith(DROPPED_PREFIX) or _BUFFER.fullmatch(key):
            continue
        name = "score.weight" if key == HEAD_KEY else key
        if name not in expected:
            extra.append(key)
        else:
            mapped[name] = tensor
    missing = sorted(set(expected) - set(mapped))
    wrong = sorted(n for n in mapped if tuple(mapped[n].shape) != tuple(expected[n]))
    problems = []
    for names, text in ((missing, "missing"), (extra, "not part of GPT-J + v_head"),
                        (wrong, "of another shape than the base's config.json gives")):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} tensors {text}: {shown}")
    if problems:
        raise UserInputError(
            "the checkpoint is not a GPT-J value-head reward model matching scoring.reward_base: "
            + "; ".join(problems), where=where,
            hint=f"keys {BODY_PREFIX}* (GPT-J body) and {HEAD_KEY} (value head) are expected; "
            "check scoring.reward_base (its config.json gives the sizes)")
    return mapped


# ------------------------------------------------------------------------------ conversion


def _base_config(base: str):
    from transformers import AutoConfig

    from rrhf_lite.utils.user_files import user_file_errors

    with user_file_errors(base, "reward base config", "give the model the checkpoint was "
                          "trained from (e.g. EleutherAI/gpt-j-6B): its config.json and tokenizer"):
        config = AutoConfig.from_pretrained(base)
    if config.model_type != "gptj":
        raise UserInputError(f"scoring.reward_base is a {config.model_type!r} model, not GPT-J",
                             where=f"recipe key scoring.reward_base ({base})",
                             hint="use EleutherAI/gpt-j-6B (or a directory with its config.json)")
    return config


def _expected_shapes(config) -> dict:
    import torch
    from transformers import GPTJForSequenceClassification

    with torch.device("meta"):  # shapes only, no memory
        model = GPTJForSequenceClassification(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _cache_key(checkpoint: Path, base: str) -> str:
    stat = checkpoint.stat()
    base_path = Path(base).expanduser()
    base_id = str(base_path.resolve()) if base_path.exists() else base
    text = json.dumps([_VERSION, str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, base_id])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def converted_reward_dir(source: str, base: str, *, cache_dir: str | Path | None = None) -> Path:
    """A GPTJForSequenceClassification directory (safetensors, config.json with num_labels 1,
    the base's tokenizer) made from the raw checkpoint `source`, converted once and cached."""
    checkpoint = find_checkpoint(source)
    target = Path(cache_dir or cache_root()) / _cache_key(checkpoint, base)
    if (target / "model.safetensors").is_file():
        return target
    config = _base_config(base)
    config.num_labels = 1
    config.architectures = ["GPTJForSequenceClassification"]
    from rrhf_lite.models.inference_loader import load_tokenizer

    tokenizer = load_tokenizer(base, padding_side="right")
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    state = read_state_dict(checkpoint)
    tensors = map_to_classifier(state, _expected_shapes(config), str(checkpoint))
    config.dtype = tensors["score.weight"].dtype  # torch_dtype "auto" loads it as stored
    dropped = sorted(k for k in state if k.startswith(DROPPED_PREFIX))
    if dropped:
        logger.info("reward checkpoint: %d tensors under %r skipped, as the reference does",
                    len(dropped), DROPPED_PREFIX)
    from safetensors.torch import save_file

    logger.info("converting %s to safetensors in %s (once)", checkpoint, target)
    with atomic_directory(target, overwrite=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt", "converted_from": checkpoint.name})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
