"""One pipeline for every source: source -> decode -> (series context) -> batch -> screen -> report.

The entry points of the three screening commands, each a source plus a stop condition.
"""

from __future__ import annotations

from ichscan.pipeline.commands import (
    PullOptions,
    PullResult,
    ServeOptions,
    WatchSummary,
    collect_reporters,
    run_batch,
    run_pull,
    run_serve,
    run_source,
    run_watch,
    source_factories,
)
from ichscan.pipeline.options import BatchOptions, RunError, ScreeningOptions, WatchOptions

__all__ = [
    "BatchOptions",
    "PullOptions",
    "PullResult",
    "RunError",
    "ScreeningOptions",
    "ServeOptions",
    "WatchOptions",
    "WatchSummary",
    "collect_reporters",
    "run_batch",
    "run_pull",
    "run_serve",
    "run_source",
    "run_watch",
    "source_factories",
]
