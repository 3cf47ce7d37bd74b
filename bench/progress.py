"""A progress line for long runs (benchmarks, sweeps, router data): done/total, a bar,
elapsed time and an ETA, on stderr."""

from __future__ import annotations

import sys
import time

__all__ = ["progress_printer"]


def progress_printer(label: str, unit: str = "problems"):
    """A progress callback (done, total) that prints a bar, elapsed time and an ETA to stderr."""
    started = time.time()
    width = 20

    def report(done: int, total: int) -> None:
        elapsed = time.time() - started
        eta = f"{elapsed / done * (total - done):.0f}s" if done else "?"
        end = "\n" if done == total else ""
        filled = width * done // total if total else width
        bar = "#" * filled + "-" * (width - filled)
        percent = 100 * done // total if total else 100
        print(f"\r{label}: {done}/{total} {unit} [{bar}] {percent}%, {elapsed:.0f}s elapsed, eta {eta}   ",
              end=end, file=sys.stderr, flush=True)
    return report
