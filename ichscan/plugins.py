"""The plugin manager: built-ins, entry points ``ichscan``, ``--plugins-dir`` files.

Environment:

``ICHSCAN_LOAD_PLUGINS``
    Comma-separated allow-list of third-party plugin names (entry-point names, or file
    stems for ``--plugins-dir``). Unset: load all; empty: load none. Built-ins always load.
``ICHSCAN_TRACE_PLUGINS``
    ``1`` prints every hook call and result to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pluggy

from ichscan import hookspecs

ENTRY_POINT_GROUP = "ichscan"
LOAD_ENV = "ICHSCAN_LOAD_PLUGINS"
TRACE_ENV = "ICHSCAN_TRACE_PLUGINS"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "ichscan.default_plugins.windowing",
    "ichscan.default_plugins.simple_cnn",
    "ichscan.default_plugins.ichnet",
    "ichscan.default_plugins.csv_report",
    "ichscan.default_plugins.html_report",
    "ichscan.default_plugins.dicom_report",
    "ichscan.default_plugins.notify",
    "ichscan.default_plugins.fhir",
    "ichscan.default_plugins.sources",
)


class PluginError(Exception):
    """A plugin could not be loaded; the message says which and why."""


@dataclass(frozen=True)
class PluginInfo:
    name: str
    source: str  # "built-in", "entry point <dist>", or the file path
    hooks: tuple[str, ...]


def allowed_plugins() -> set[str] | None:
    """The ``ICHSCAN_LOAD_PLUGINS`` allow-list, or None when unset (load everything)."""
    raw = os.environ.get(LOAD_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def get_plugin_manager(plugins_dirs: Iterable[str | os.PathLike[str]] = ()) -> pluggy.PluginManager:
    """Build a plugin manager with built-ins, entry-point plugins and directory plugins.

    Raises
    ------
    PluginError
        When a plugin fails to import, or implements a hook that does not exist.
    """
    pm = pluggy.PluginManager("ichscan")
    pm.add_hookspecs(hookspecs)
    sources: dict[str, str] = {}
    # Built-ins first: pluggy calls the most recently registered plugin first, so an
    # installed plugin's hook runs before (and for first-result hooks, instead of) them.
    for dotted in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(dotted), name=dotted)
        sources[dotted] = "built-in"
    allowed = allowed_plugins()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        if pm.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # noqa: BLE001
            raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        pm.register(plugin, name=ep.name)
        dist = ep.dist.name if ep.dist else "?"
        sources[ep.name] = f"entry point ({dist})"
    for directory in plugins_dirs:
        for path in sorted(Path(directory).glob("*.py")):
            if path.name.startswith(("_", ".")):
                continue
            name = path.stem
            if allowed is not None and name not in allowed:
                continue
            if pm.has_plugin(name):
                raise PluginError(f"two plugins are named {name!r} (second: {path})")
            pm.register(_load_file(path), name=name)
            sources[name] = str(path)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    if os.environ.get(TRACE_ENV, "") not in ("", "0"):
        pm.trace.root.setwriter(lambda text: sys.stderr.write(text))
        pm.enable_tracing()
    pm.ichscan_sources = sources  # type: ignore[attr-defined]
    return pm


def _load_file(path: Path) -> ModuleType:
    module_name = f"ichscan_plugins_dir.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        raise PluginError(f"plugin file {path} failed to load: {type(exc).__name__}: {exc}") from exc
    sys.modules[module_name] = module
    return module


def describe_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Loaded plugins with their source and the hooks each implements."""
    sources: dict[str, str] = getattr(pm, "ichscan_sources", {})
    infos = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = tuple(sorted(caller.name for caller in pm.get_hookcallers(plugin) or ()))
        infos.append(PluginInfo(name=name, source=sources.get(name, "?"), hooks=hooks))
    return infos
