"""A list of files to screen (``ichscan batch --manifest FILE``), for archives too large to walk.

One path or ``file://`` URI per line; blank lines and lines starting with ``#`` are
ignored, relative paths are relative to the manifest's folder, and a path listed twice is
screened once. Everything else (identity, ``--resume``, series order for the local engine)
is the folder source's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ichscan.sources.base import Entry
from ichscan.sources.folder import FolderSource, Outputs


def check_manifest(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` as an absolute Path, or raise ``ValueError`` with a one-line reason."""
    manifest = Path(os.path.abspath(path))
    if not manifest.is_file():
        raise ValueError(f"manifest {path} does not exist or is not a file")
    if not os.access(manifest, os.R_OK):
        raise ValueError(f"manifest {path} is not readable")
    return manifest


def manifest_entry(line: str, base: Path) -> Entry:
    """The entry of one manifest line: a path, or a refusal for what is not a local file."""
    parts = urlsplit(line)
    if len(parts.scheme) > 1:  # one letter: a Windows drive, not a scheme
        if parts.scheme != "file":
            return Entry(line, f"unsupported URI scheme {parts.scheme}: (only paths and file:// URIs)")
        if parts.netloc not in ("", "localhost"):
            return Entry(line, f"file URI names host {parts.netloc}: only local files can be read")
        line = unquote(parts.path, errors="surrogateescape")
    return Entry(os.path.normpath(os.path.join(base, line)))


class ManifestSource(FolderSource):
    """The files a manifest lists, as a finite source (see the module docstring)."""

    def __init__(self, manifest: str | os.PathLike[str], *, resume: bool = False, by_series: bool = True):
        self.manifest = Path(os.path.abspath(manifest))
        super().__init__(self.manifest.parent, resume=resume, by_series=by_series)

    def walk(self, outputs: Outputs | None = None) -> Iterator[Entry]:
        seen: set[str] = set()
        # Paths are bytes on Linux: odd bytes come through as surrogates, as os.walk gives them.
        with open(self.manifest, encoding="utf-8", errors="surrogateescape") as fh:
            for raw in fh:
                line = raw.rstrip("\r\n")
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                entry = manifest_entry(line, self.manifest.parent)
                if entry.path in seen:
                    continue
                seen.add(entry.path)
                if outputs and not entry.refusal and _is_output(entry.path, outputs):
                    continue
                yield entry


def _is_output(path: str, outputs: Outputs) -> bool:
    """One of our own outputs (by name first: resolving every path costs system calls)."""
    if os.path.basename(path) in outputs.file_names or any(path.startswith(folder + os.sep) for folder in outputs.folders):
        return path in outputs
    return False
