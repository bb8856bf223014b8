"""One pipeline for every source: source -> decode -> (series context) -> batch -> screen -> report.

The entry points of the three screening commands, each a source plus a stop condition.

The names are loaded on first use (PEP 562), so that a process that needs only a
torch-free step (a Ray decode task imports :mod:`ichscan.pipeline.series` and
:mod:`ichscan.pipeline.decode`) does not import the commands, and torch with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ichscan.lazy import lazy_attributes

if TYPE_CHECKING:
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

_COMMANDS = (
    "PullOptions",
    "PullResult",
    "ServeOptions",
    "WatchSummary",
    "collect_reporters",
    "run_batch",
    "run_pull",
    "run_serve",
    "run_source",
    "run_watch",
    "source_factories",
)
_OPTIONS = ("BatchOptions", "RunError", "ScreeningOptions", "WatchOptions")
_HOME = {**dict.fromkeys(_COMMANDS, "ichscan.pipeline.commands"), **dict.fromkeys(_OPTIONS, "ichscan.pipeline.options")}

__all__ = sorted(_HOME)


__getattr__ = lazy_attributes(__name__, _HOME, globals())
