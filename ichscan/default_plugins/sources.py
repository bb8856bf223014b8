"""Built-in sources by name: ``folder`` (the walk of ``batch``) and ``watch`` (of ``watch``)."""

from __future__ import annotations

from ichscan import hookimpl


@hookimpl
def ichscan_register_sources(register):
    from ichscan.sources.folder import FolderSource
    from ichscan.sources.watch import WatchSource

    register("folder", FolderSource)
    register("watch", WatchSource)
