"""Progress lines for people: one prefix, and only the main process prints."""

from __future__ import annotations

from rrhf_lite.utils import distributed


def say(message: str) -> None:
    """A progress line for people, from the main process only."""
    if distributed.is_main_process():
        print(f"[rrhf-lite] {message}", flush=True)
