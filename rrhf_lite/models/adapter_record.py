"""What training records beside an adapter (rrhf_lite.json), so that every later load sees the
base as training saw it.

A LoRA adapter is a correction to one particular base. Trained on an NF4 4-bit base, it learnt
against that base's rounding; put on the full-precision base it makes another model, one that
can answer as if it had never been trained. So the adapter carries a record of its base: the
name it is shared under (a hub name, never a local cache directory), where it came from here (a
built-in's name and build settings, a local directory), and how it was loaded (4-bit or not,
quant type, double quantisation, compute dtype, the other weights' dtype). generate, evaluate
and merge default to the record; an explicit different choice wins and is said once; an adapter
without a record (older ones, plain PEFT adapters) loads as before, with a one-line note.

rrhf_lite.json (format 1):

    {"format": 1,
     "base_model": the shared name (also adapter_config.json's base_model_name_or_path),
     "base": {"given": what the user named, "builtin": {"name", "seed", "options"} or null,
              "path": the absolute local directory for a local base, or null},
     "quantization": {"load_in_4bit", "quant_type", "double_quant", "compute_dtype"},
     "torch_dtype": dtype of the weights that are not 4-bit,
     "training": what the model card tells (method, objective, data, hyper-parameters),
     "versions": the packages that trained it, "written": ISO time}
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from rrhf_lite.config.sections import QuantizationSection
from rrhf_lite.errors import UserInputError
from rrhf_lite.utils.io import write_json

logger = logging.getLogger(__name__)

RECORD_FILE = "rrhf_lite.json"
FORMAT = 1
CONFIG_FILE = "adapter_config.json"
DTYPES = ("float32", "bfloat16", "float16")
_said: set[str] = set()


@dataclass(frozen=True)
class BaseQuantization:
    """How the base under an adapter is loaded. Full precision: load_in_4bit False (the other
    fields are then not used). compute_dtype is a resolved name, never "auto"."""

    load_in_4bit: bool
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"

    def bnb_config(self, device: str | None = None):
        """The BitsAndBytesConfig to load the base with, or None in full precision."""
        return QuantizationSection(load_in_4bit=self.load_in_4bit, quant_type=self.quant_type,
                                   double_quant=self.double_quant,
                                   compute_dtype=self.compute_dtype).bnb_config(device=device)

    def describe(self) -> str:
        if not self.load_in_4bit:
            return "full precision"
        double = ", double quantisation" if self.double_quant else ""
        return f"4-bit {self.quant_type}{double}, compute {self.compute_dtype}"

    def same_as(self, other: BaseQuantization) -> bool:
        """Same base for the adapter: both full precision, or the same 4-bit settings."""
        if not (self.load_in_4bit or other.load_in_4bit):
            return True
        return self == other

    @classmethod
    def from_section(cls, section: QuantizationSection, device: str | None = None
                     ) -> BaseQuantization:
        """A recipe's quantization section, its compute dtype resolved for `device`."""
        from rrhf_lite.utils.precision import auto_dtype_name

        compute = (auto_dtype_name(device) if section.compute_dtype == "auto"
                   else section.compute_dtype)
        return cls(section.load_in_4bit, section.quant_type, section.double_quant, compute)


FULL_PRECISION = BaseQuantization(load_in_4bit=False)


# ------------------------------------------------------------------------------ the file


def write_adapter_record(directory: str | Path, record: dict) -> None:
    """Write `record` as rrhf_lite.json into an adapter directory and name its shared base in
    adapter_config.json (base_model_name_or_path), both atomically. PEFT wrote the local path
    it loaded from there; that path means nothing on another machine."""
    directory = Path(directory)
    record = {"format": FORMAT, **record,
              "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    config_file = directory / CONFIG_FILE
    if config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = record["base_model"]
        write_json(config_file, config)
    write_json(directory / RECORD_FILE, record)


def read_adapter_record(adapter_dir: str | Path | None) -> dict | None:
    """The adapter's record, or None when it has none (an older or a plain PEFT adapter, a hub
    name). A record that is there but unreadable is the user's file to fix: exit code 2."""
    if adapter_dir is None:
        return None
    path = Path(adapter_dir).expanduser() / RECORD_FILE
    if not path.is_file():
        return None
    hint = (f"restore {RECORD_FILE} saved with the adapter, or delete it to load the adapter "
            "as a plain PEFT adapter (then say how to load its base: --load-in-4bit or not)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserInputError(f"{RECORD_FILE} is not valid JSON ({err})", where=str(path),
                             hint=hint) from None
    if not isinstance(record, dict) or not isinstance(record.get("base_model"), str):
        raise UserInputError(f"{RECORD_FILE} must be an object naming base_model",
                             where=str(path), hint=hint)
    version = record.get("format", FORMAT)
    if not isinstance(version, int) or version > FORMAT:
        raise UserInputError(f"{RECORD_FILE} has format {version!r}; this rrhf-lite reads "
                             f"format {FORMAT}", where=str(path),
                             hint="upgrade rrhf-lite (or restore the file)")
    recorded_quantization(record, str(path))  # checked here, once, with the file's name
    return record


def recorded_quantization(record: dict, where: str = RECORD_FILE) -> BaseQuantization:
    """The record's quantisation, checked."""
    raw = record.get("quantization")
    hint = f"restore {RECORD_FILE} saved with the adapter"
    if not isinstance(raw, dict) or not isinstance(raw.get("load_in_4bit"), bool):
        raise UserInputError("the record's quantization must be an object with load_in_4bit "
                             "true or false", where=where, hint=hint)
    if not raw["load_in_4bit"]:
        return FULL_PRECISION
    quant = BaseQuantization(True, raw.get("quant_type"), raw.get("double_quant"),
                             raw.get("compute_dtype"))
    if (quant.quant_type not in ("nf4", "fp4") or not isinstance(quant.double_quant, bool)
            or quant.compute_dtype not in DTYPES):
        raise UserInputError(f"the record's 4-bit settings are not valid: {raw}", where=where,
                             hint=hint)
    return quant


def record_quantization(quant: BaseQuantization) -> dict:
    """The record's "quantization" entry."""
    return asdict(quant) if quant.load_in_4bit else {"load_in_4bit": False}


# ------------------------------------------------------------------------------ the choice


def say_once(message: str) -> None:
    """One line on stderr, once per process (a note about loading must not repeat per prompt
    set or per variant, nor land among generate's answers on stdout)."""
    if message not in _said:
        _said.add(message)
        logger.warning("rrhf-lite: %s", message)


def choose_quantization(adapter_dir: str | Path, *, requested: BaseQuantization | None,
                        asked_by: str, without_record: BaseQuantization,
                        record: dict | None = None, hint: str = "") -> BaseQuantization:
    """How to load the base under `adapter_dir`.

    requested: the user's explicit choice (a flag, a recipe section), or None. It wins; when it
    differs from what training recorded, that is said once. None: the recorded quantisation.
    without_record: what to load when the adapter has no record and nothing was asked (what
    rrhf-lite did before records existed), with a one-line note.
    record: the adapter's record when the caller read it already.
    hint: how to choose otherwise, for the note on an adapter without a record.
    """
    record = record if record is not None else read_adapter_record(adapter_dir)
    if record is None:
        if requested is None:
            say_once(f"{adapter_dir} has no {RECORD_FILE} (an older or a plain PEFT adapter): "
                     f"taking its base as {without_record.describe()}"
                     + (f"; if training used another, say so ({hint})" if hint else ""))
            return without_record
        return requested
    trained = recorded_quantization(record, str(Path(adapter_dir) / RECORD_FILE))
    if requested is None:
        return trained
    if not requested.same_as(trained):
        say_once(f"taking the base of {adapter_dir} as {requested.describe()} ({asked_by}), "
                 f"not as it was trained ({trained.describe()}): its answers may differ from "
                 "the trained and evaluated policy's")
    return requested


def flag_choice(load_in_4bit: bool | None, record: dict | None) -> BaseQuantization | None:
    """A --load-in-4bit / --no-load-in-4bit flag as a choice: None when not given; 4-bit with the
    recorded settings when training was 4-bit too, else with rrhf-lite's default ones."""
    if load_in_4bit is None:
        return None
    if not load_in_4bit:
        return FULL_PRECISION
    if record is not None:
        trained = recorded_quantization(record)
        if trained.load_in_4bit:
            return trained
    return BaseQuantization.from_section(QuantizationSection())
