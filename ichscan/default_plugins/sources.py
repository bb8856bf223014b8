"""Built-in sources by name: ``folder`` (the walk of ``batch``), ``watch`` (of ``watch``) and
``dicomweb`` (a DICOMweb server's CT studies, as ``pull`` without filters fetches them)."""

from __future__ import annotations

from ichscan import hookimpl


@hookimpl
def ichscan_register_sources(register):
    from ichscan.sources.dicomweb import DicomWebSource
    from ichscan.sources.folder import FolderSource
    from ichscan.sources.watch import WatchSource

    register("folder", FolderSource)
    register("watch", WatchSource)
    register("dicomweb", DicomWebSource)
