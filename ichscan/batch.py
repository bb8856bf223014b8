"""``ichscan batch``: screen every file under a folder."""

from __future__ import annotations

import logging
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pluggy
import torch

from ichscan.dicom import DEFAULT_LIMITS, DecodeLimits
from ichscan.engine import (
    Progress,
    ScreeningSetup,
    prepare_screening,
    run_stream,
)
from ichscan.overlay import OVERLAY_CHOICES
from ichscan.plugins import get_plugin_manager
from ichscan.state.store import DEFAULT_STATE_NAME, StateError, StateStore, state_files
from ichscan.reporting import Reporter, ReporterSet, ResultsOutput, RunConfig, RunSummary
from ichscan.sources.folder import Outputs, check_input_folder, count_folder, iter_folder

log = logging.getLogger(__name__)


class RunError(Exception):
    """The run could not happen (bad input folder, unwritable output...)."""


@dataclass
class BatchOptions:
    input_dir: Path
    out: Path = Path("results.csv")
    studies_out: Path | None = None  # default: <out stem>_studies.csv beside out
    overlays_dir: Path | None = None  # default: overlays/ beside out
    overlays_for: str = "positive"
    weights: Path | None = None
    model_name: str | None = None
    thresholds: dict[str, float] | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    plugins_dirs: tuple[Path, ...] = ()
    progress: bool = True
    limits: DecodeLimits = DEFAULT_LIMITS
    results: ResultsOutput = field(default_factory=ResultsOutput)
    state: Path | None = None  # default: ichscan-state.sqlite beside out (used with --dicom-out/--forward)
    #: Skip files the state file records as screened under the same path, size and mtime.
    resume: bool = False
    options: dict = field(default_factory=dict)


def default_studies_out(out: Path) -> Path:
    return out.with_name(f"{out.stem}_studies.csv")


def prepare_output_file(path: Path, what: str) -> None:
    """Create the parent folder and check that ``path`` can be written: not a folder, not
    a device or pipe (our writes replace the file), and not a DICOM file (an input)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create folder for {what} {path}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise RunError(f"{what} {path} is a folder, not a file")
    if path.exists() and not path.is_file():
        raise RunError(f"{what} {path} exists and is not a regular file (a device, pipe or socket)")
    if _is_dicom_file(path):
        raise RunError(f"{what} {path} is a DICOM file; refusing to overwrite it with results")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RunError(f"{what} {path} is not writable")


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def prepare_folder(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK):
        raise RunError(f"{what} {path} is not writable")


def collect_reporters(pm: pluggy.PluginManager, config: RunConfig) -> list[Reporter]:
    reporters: list[Reporter] = []
    pm.hook.ichscan_register_reporters(register=reporters.append, config=config)
    return reporters


def run_batch(opts: BatchOptions, pm: pluggy.PluginManager | None = None) -> RunSummary:
    """Screen ``opts.input_dir``; write the CSVs (and overlays); return the counts.

    Raises
    ------
    RunError, ValueError, ichscan.models.ModelError, ichscan.plugins.PluginError
        When the run cannot happen; each carries a one-line message.
    """
    try:
        root = check_input_folder(opts.input_dir)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if opts.overlays_for not in OVERLAY_CHOICES:
        raise RunError(f"--overlays-for must be one of {', '.join(OVERLAY_CHOICES)}")
    out = Path(opts.out)
    studies_out = Path(opts.studies_out) if opts.studies_out else default_studies_out(out)
    overlays_dir = None
    if opts.overlays_for != "none":
        overlays_dir = Path(opts.overlays_dir) if opts.overlays_dir else out.parent / "overlays"
    prepare_output_file(out, "--out")
    prepare_output_file(studies_out, "--studies-out")
    results = opts.results
    state = None
    if results.html is not None:
        prepare_output_file(Path(results.html), "--html")
    if results.wants_dicom:
        state = Path(opts.state) if opts.state else out.with_name(DEFAULT_STATE_NAME)
        prepare_output_file(state, "--state")

    pm = pm or get_plugin_manager(opts.plugins_dirs)
    setup = prepare_screening(
        pm,
        weights=opts.weights,
        model_name=opts.model_name,
        thresholds=opts.thresholds,
        device=opts.device,
        workers=opts.workers,
        batch_size=opts.batch_size,
        threads=opts.threads,
    )
    if overlays_dir is not None:  # created once the run can happen: a failed start leaves no folder
        prepare_folder(overlays_dir, "overlays folder")
    if results.dicom_out is not None:
        prepare_folder(Path(results.dicom_out), "--dicom-out folder")
    store = None
    if state is not None:
        # Opened here, once, for the whole run: a second run on the same file stops now.
        try:
            store = StateStore(state)
        except StateError as exc:
            raise RunError(str(exc)) from None
    try:
        return _run(opts, pm, setup, root, out, studies_out, overlays_dir, state, store)
    finally:
        if store is not None:
            store.close()


def _run(
    opts: BatchOptions,
    pm: pluggy.PluginManager,
    setup: ScreeningSetup,
    root: Path,
    out: Path,
    studies_out: Path,
    overlays_dir: Path | None,
    state: Path | None,
    store: StateStore | None,
) -> RunSummary:
    """:func:`run_batch` once the run can happen and its state file (if any) is open."""
    loaded, device, screener = setup.loaded, setup.device, setup.screener
    workers, batch_size = setup.workers, setup.batch_size
    results = opts.results  # what run_batch checked
    config = RunConfig(
        out=out,
        studies_out=studies_out,
        overlays_dir=overlays_dir,
        overlays_for=opts.overlays_for,
        thresholds=loaded.thresholds,
        model_name=loaded.name,
        weights=loaded.source,
        trained=loaded.trained,
        input_root=root,
        state=state,
        store=store,
        **results.config_fields(),
        options=dict(opts.options),
    )
    try:
        reporters = collect_reporters(pm, config)
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise RunError(f"cannot open output: {exc}") from None
    log.debug("reporters: %s", ", ".join(r.name for r in reporters) or "none")
    # Our own outputs are not screened when they lie inside the input folder.
    from ichscan.default_plugins.dicom_report import OUTBOX_FOLDER_NAME

    outputs = Outputs(
        [p for p in (out, studies_out, results.html) if p is not None]
        + (state_files(state) if state else []),
        [p for p in (overlays_dir, results.dicom_out, state.parent / OUTBOX_FOLDER_NAME if state else None) if p is not None],
    )
    total = count_folder(root, outputs) if opts.progress else None
    log.info(
        "screening %s with %s (%s) on %s: batch %d, %d decode workers, %d torch threads",
        root,
        loaded.name,
        loaded.source,
        device,
        batch_size,
        workers,
        torch.get_num_threads(),
    )
    summary, _ = run_stream(
        iter_folder(root, outputs),
        screener,
        ReporterSet(reporters),
        batch_size=batch_size,
        workers=workers,
        limits=opts.limits,
        overlays_dir=overlays_dir,
        overlays_for=opts.overlays_for,
        progress=Progress(total=total, enabled=opts.progress),
    )
    return summary
