"""The `rrhf-lite` command line.

Exit codes (contract): 0 success, 2 bad input (the message names the file, line or key and what
to do), 1 internal error (with the traceback, since that is a bug for us to fix).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
import traceback

from rrhf_lite.errors import UserInputError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
# the machine's, not ours: a full disk, a quota, a read-only file system
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _number(kind, low=None, high=None, *, low_open=False):
    """An argparse type: a finite number in [low, high] (low excluded with low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: "
                                             f"{text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        if bad or (high is not None and value > high):
            lo = "none" if low is None else ("> " if low_open else ">= ") + str(low)
            hi = "" if high is None else f" and <= {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be finite, {lo}{hi})")
        return value
    return parse


def _device(text: str) -> str:
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps|xpu(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda or cuda:N)")
    return text


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML file")
    parser.add_argument("--output-dir", help="run directory (default: the recipe's output_dir)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rrhf-lite",
        description="RRHF on one GPU: sample, score, train (4-bit + LoRA), evaluate, merge.",
    )
    from importlib.metadata import version  # the installed distribution's (= rrhf_lite.__version__)

    parser.add_argument("--version", action="version", version=f"rrhf-lite {version('rrhf-lite')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run every stage the recipe names, in order")
    _add_recipe_args(run)
    run.add_argument(
        "--force", action="store_true",
        help="run in a directory that holds another recipe's results (another name, or a "
        "recipe.yaml this version cannot read), or that is not a run directory: outputs whose "
        "inputs are unchanged are kept, the rest rerun and each removal is listed",
    )

    for stage in ("sample", "score", "train", "evaluate"):
        one = sub.add_parser(stage, help=f"run only the '{stage}' stage of a recipe")
        _add_recipe_args(one)
        one.add_argument("--force", action="store_true", help="as for `run`")

    merge = sub.add_parser("merge", help="merge a LoRA adapter into its full-precision base")
    merge.add_argument("--base",
                       help="base model: a hub name, a directory or a builtin: name "
                       "(builtin:smollm2-135m-instruct); default: the base the adapter records")
    merge.add_argument("--adapter", required=True, help="adapter directory (safetensors)")
    merge.add_argument("--out", required=True, help="output directory for the merged model")
    merge.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                       help="dtype of the merged weights (default: float16, as the recipe key "
                       "merge.torch_dtype)")
    merge.add_argument(
        "--roundtrip-nf4", action=argparse.BooleanOptionalAction, default=None,
        help="merge into the base's weights after their 4-bit round trip (what a 4-bit "
        "training saw), or into the original ones (--no-roundtrip-nf4); default: as the "
        "adapter's training recorded (rrhf_lite.json), else the round trip",
    )
    merge.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    merge.add_argument("--device", default="cpu", type=_device, help="where to merge (cpu, cuda); cuda is much faster for 7B+")
    merge.add_argument("--tolerance", type=_number(float, 0.0),
                       help="max |logit difference| accepted by the check (recipe key "
                       "merge.tolerance; default: relative to the logits' scale, per dtype)")
    merge.add_argument(
        "--allow-mismatch", action="store_true",
        help="keep the merged model even when the logit check fails (exit code 1)",
    )
    merge.add_argument("--trust-remote-code", action="store_true")

    gen = sub.add_parser("generate", help="answer prompts (or chat) with a base, adapter or merged model")
    gen.add_argument("--model",
                     help="model: a hub name, a directory (a merged model too) or a builtin: "
                     "name (builtin:smollm2-135m-instruct, builtin:tiny-world); with --adapter "
                     "the default is the base the adapter records")
    gen.add_argument("--adapter", help="LoRA adapter directory to apply on top")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); none = interactive chat")
    gen.add_argument("--max-new-tokens", type=_number(int, 1), default=128)
    gen.add_argument("--temperature", type=_number(float, 0.0), default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True), default=1.0)
    gen.add_argument(
        "--load-in-4bit", action=argparse.BooleanOptionalAction, default=None,
        help="load the base in 4-bit through bitsandbytes (--no-load-in-4bit: full precision); "
        "default: as the adapter's training did (its rrhf_lite.json), else full precision")
    gen.add_argument("--trust-remote-code", action="store_true")

    sub.add_parser("schema", help="print the recipe's JSON schema (every key, type and default)")
    validate = sub.add_parser("validate", help="check a recipe and print it resolved")
    _add_recipe_args(validate)
    validate.add_argument(
        "--plan", action="store_true",
        help="also print the size of the job, from the recipe alone: what it downloads, and "
        "the prompts, candidates, optimiser steps and tokens of each stage (as YAML comments)",
    )
    plan = sub.add_parser("plan", help="will it fit? peak GPU memory by part, without a GPU")
    _add_recipe_args(plan)
    plan.add_argument("--gpu-memory", default="16GB", help="the card: 16GB, 24GiB, 15360MiB, t4")
    return parser


def _load(args):
    from rrhf_lite.config.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    return recipe


def dispatch(args) -> int:
    if args.command == "schema":
        from rrhf_lite.config.recipe import recipe_schema

        print(json.dumps(recipe_schema(), indent=2))
        return EXIT_OK
    if args.command == "validate":
        from rrhf_lite.config.recipe import dump_recipe
        from rrhf_lite.pipeline.preflight import check_recipe

        recipe = _load(args)
        check_recipe(recipe)  # paths, model files, the resolved training arguments
        print(dump_recipe(recipe), end="")
        if args.plan:
            from rrhf_lite.plan.job_size import format_job_plan, job_plan

            # comments, so the output stays a loadable recipe
            text = format_job_plan(job_plan(recipe))
            print("\n".join(f"# {line}".rstrip() for line in ["", *text.splitlines()]))
        return EXIT_OK
    if args.command == "plan":
        from rrhf_lite.plan.recipe_memory import format_plan, parse_memory, plan_recipe

        print(format_plan(plan_recipe(_load(args), parse_memory(args.gpu_memory))))
        return EXIT_OK
    if args.command == "merge":
        from rrhf_lite.stages.merge import merge_adapter

        # the base and its round trip: as given, else as the adapter records (a builtin: base
        # is built, once, cached); an adapter without a record gets the round trip, as before
        report = merge_adapter(
            args.base, args.adapter, args.out, torch_dtype=args.dtype,
            roundtrip_nf4=args.roundtrip_nf4, roundtrip_without_record=True, force=args.force,
            trust_remote_code=args.trust_remote_code, device=args.device,
            tolerance=args.tolerance, allow_mismatch=args.allow_mismatch,
        )
        print(json.dumps(report, indent=2, default=str))
        return EXIT_OK if report.get("ok", True) else EXIT_INTERNAL
    if args.command == "generate":
        from rrhf_lite.stages.generate import run_generate_command

        run_generate_command(args)
        return EXIT_OK

    recipe = _load(args)
    # Importing torch and transformers takes seconds on a cold start; say something first
    # (once: under accelerate/torchrun only rank 0 speaks, read from the launcher's env).
    if os.environ.get("RANK", "0") == "0":
        print(f"[rrhf-lite] recipe {recipe.name!r} is valid; loading torch and transformers",
              flush=True)
    from rrhf_lite.pipeline.run import run_recipe

    stages = None if args.command == "run" else [args.command]
    run_recipe(recipe, only_stages=stages, force=args.force)
    return EXIT_OK


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's time limit, `kill`), raised so that locks and open files unwind."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _stdout_closed() -> int:
    # The reader went away (`rrhf-lite schema | head`): not an error of ours. Point stdout at
    # devnull so the interpreter's final flush does not raise again, and exit as a pipe writer does.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # SIGPIPE


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only where nobody else handles SIGTERM (accelerate, a test runner) and only while we run.
    own_sigterm = (threading.current_thread() is threading.main_thread()
                   and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if own_sigterm:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _dispatch_reporting_errors(args)
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _dispatch_reporting_errors(args: argparse.Namespace) -> int:
    try:
        code = dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except UserInputError as err:
        print(f"rrhf-lite: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:
        if err.errno not in _NO_ROOM:
            return _internal_error()
        where = f"{err.filename}: " if err.filename else ""
        print(f"rrhf-lite: error: {where}{err.strerror} (partial outputs were not kept as "
              "results)\n  what to do: free space (or make the disk writable) and rerun: "
              "finished stages and complete checkpoints are reused", file=sys.stderr)
        return EXIT_BAD_INPUT
    except _Terminated:
        print("rrhf-lite: terminated (SIGTERM); completed stages and checkpoints are kept",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("rrhf-lite: interrupted; completed stages and checkpoints are kept", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - an internal error: show everything, exit 1
        return _internal_error()


def _internal_error() -> int:
    traceback.print_exc()
    print(
        "rrhf-lite: internal error (a bug in rrhf-lite, not in your input); "
        "please report it with the traceback above",
        file=sys.stderr,
    )
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
