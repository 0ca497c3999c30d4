"""Small helpers for running rrhf-lite under `accelerate launch` / `torchrun`.

We write no distributed engine: the process group is the one torchrun's environment describes,
initialised by accelerate (NCCL on GPUs, gloo on CPUs) the first time something needs it. Every
helper is a no-op in a single process, so stages call them unconditionally.

    rank(), local_rank(), world_size(), is_distributed(), is_main_process()
    init_distributed()        create the process group if the launcher asked for one
    barrier()                 wait for every rank
    all_gather_object(obj)    [obj of rank 0, obj of rank 1, ...] on every rank
    shard_bounds(...)         which rows a rank handles
    distributed_map(fn, rows) shard rows across ranks, run fn, gather the results in order
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from rrhf_lite.errors import UserInputError

T = TypeVar("T")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Number of processes (1 without a launcher). Valid before the process group exists."""
    if _initialised():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    if _initialised():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """Rank on this machine: the GPU index this process owns."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process): the one process that writes files."""
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def local_device() -> str:
    """The device this process should load models on: its own GPU, or the CPU."""
    return f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu"


def init_distributed() -> bool:
    """Create the process group when launched with several processes; return is_distributed().

    accelerate's PartialState picks the backend (NCCL with CUDA, gloo on CPU) and sets this
    process's CUDA device. Without an accelerator (or under `accelerate launch` with use_cpu) it
    must be told so: PartialState() alone creates the process group but records one process of
    rank 0 (DistributedType.NO) on every rank. transformers' TrainingArguments sets the state up
    anew (RRHFConfig passes use_cpu there for the same reason).
    """
    if _env_int("WORLD_SIZE", 1) > 1 and not _initialised():
        from accelerate import PartialState

        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
        PartialState(cpu=use_cpu or not torch.accelerator.is_available())
    return is_distributed()


def barrier() -> None:
    """Wait until every rank gets here (nothing in a single process)."""
    if init_distributed():
        if torch.distributed.get_backend() == "nccl" and torch.cuda.is_available():
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process."""
    if not init_distributed():
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def shard_bounds(n: int, num_shards: int, index: int, block_size: int = 1) -> tuple[int, int]:
    """[start, stop) of shard `index` when n rows are cut into num_shards contiguous shards.

    Rows are dealt in blocks of `block_size` (the earlier shards get one block more when the
    blocks do not divide evenly), so every shard but the last starts on a block boundary: with
    block_size = the generation batch size, each rank's batches are the single-process batches.
    """
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"shard {index} of {num_shards} does not exist")
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    blocks = -(-n // block_size)
    per, extra = divmod(blocks, num_shards)
    first = index * per + min(index, extra)
    count = per + (1 if index < extra else 0)
    return min(first * block_size, n), min((first + count) * block_size, n)


def distributed_map(
    fn: Callable[..., Sequence[T]],
    rows: Sequence[Any],
    *,
    block_size: int = 1,
    pass_offset: bool = False,
) -> list[T]:
    """Run `fn` on this rank's share of `rows`; return every rank's results, in input order.

    fn(shard) -> results for the shard (a list). Every rank calls distributed_map with the same
    rows and gets the same full result list back; in a single process this is just fn(rows).

    Rank r takes one run of consecutive rows (deterministic for a given world size).
    block_size: rows are assigned in blocks of this many (use the stage's batch size so each
        rank sees the same batches as a single process would).
    pass_offset: call fn(shard, offset) with the index of the shard's first row, e.g. to
        derive per-batch seeds from global positions.

    fn may drop rows (e.g. a prompt left without candidates): the ranks' outputs are
    concatenated in rank order, which keeps the input order. If fn raises on any rank, every
    rank raises (no rank is left waiting).
    """
    rows = list(rows)
    if not init_distributed():
        return list(fn(rows, 0) if pass_offset else fn(rows))

    start, stop = shard_bounds(len(rows), world_size(), rank(), block_size)
    shard = rows[start:stop]
    result: list | None = None
    error: tuple[str, str, str | None, str | None] | None = None
    try:
        result = list(fn(shard, start) if pass_offset else fn(shard))
    except Exception as err:  # tell the other ranks instead of leaving them in the gather
        mine = err
        error = (type(err).__name__, getattr(err, "message", str(err)),
                 getattr(err, "where", None), getattr(err, "hint", None))
    gathered = all_gather_object((result, error))
    failed = [(r, e) for r, (_, e) in enumerate(gathered) if e is not None]
    if failed:
        if error is not None:
            raise mine
        r, (kind, message, where, hint) = failed[0]
        if kind == "UserInputError":
            raise UserInputError(message, where=where, hint=hint)
        raise RuntimeError(f"rank {r} failed in distributed_map: {kind}: {message}")
    return [item for part, _ in gathered for item in part]
