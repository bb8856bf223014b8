"""One pipeline for every source: source -> decode -> batch -> (series context) -> screen -> report.

The entry points of the three screening commands, each a source plus a stop condition.
"""

from __future__ import annotations

from ichscan.batch import BatchOptions, RunError, run_batch
from ichscan.serve import ServeOptions, run_serve
from ichscan.watch import WatchOptions, WatchSummary, run_watch

__all__ = [
    "BatchOptions",
    "RunError",
    "ServeOptions",
    "WatchOptions",
    "WatchSummary",
    "run_batch",
    "run_serve",
    "run_watch",
]
