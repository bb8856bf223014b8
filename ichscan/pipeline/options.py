"""Settings of the screening commands and the output files they resolve to.

``batch``, ``watch`` and ``serve-scp`` share :class:`ScreeningOptions`; each adds what its
source needs. :class:`RunOutputs` turns them into checked, absolute paths once, for the
runner, the reporters and the exclusions alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ichscan.dicom import DEFAULT_LIMITS, DecodeLimits
from ichscan.state.ledger import DEFAULT_STATE_NAME, state_files
from ichscan.overlay import OVERLAY_CHOICES
from ichscan.reporting import ResultsOutput
from ichscan.rules import DEFAULT_RULES, SelectionRules
from ichscan.sources.folder import Outputs

#: The outbox folder beside the state file, for DICOM results forwarded without --dicom-out.
OUTBOX_FOLDER_NAME = "ichscan-outbox"


#: The fields of :class:`ScreeningOptions` that choose the model and size the run.
MODEL_SETTINGS = ("weights", "model_name", "thresholds", "device", "workers", "batch_size", "threads", "saliency")


class RunError(Exception):
    """The run could not happen (bad input folder, unwritable output...); one-line message."""


@dataclass(kw_only=True)
class ScreeningOptions:
    """What every screening command has (see ``ichscan batch --help``)."""

    out: Path = Path("results.csv")
    studies_out: Path | None = None  # default: <out stem>_studies.csv beside out
    state: Path | None = None  # default: ichscan-state.sqlite beside out
    overlays_dir: Path | None = None  # default: overlays/ beside out
    overlays_for: str = "positive"
    weights: Path | None = None
    model_name: str | None = None
    thresholds: dict[str, float] | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    #: Grad-CAM heat maps of positive slices on their overlays and key images.
    saliency: bool = False
    plugins_dirs: tuple[Path, ...] = ()
    progress: bool = True
    limits: DecodeLimits = DEFAULT_LIMITS
    #: Which files are screened (--rules FILE); ``None`` (--no-rules): every CT image.
    rules: SelectionRules | None = DEFAULT_RULES
    results: ResultsOutput = field(default_factory=ResultsOutput)
    #: Free-form settings handed to third-party reporters (RunConfig.options).
    options: dict = field(default_factory=dict)

    def model_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ichscan.pipeline.sizing.prepare_screening` these set."""
        return {name: getattr(self, name) for name in MODEL_SETTINGS}


#: Where ``batch`` runs: this machine's decode workers and model, or a Ray cluster.
ENGINES = ("local", "ray")


@dataclass(kw_only=True)
class BatchOptions(ScreeningOptions):
    #: The folder to walk; ``None`` with a ``manifest``.
    input_dir: Path | None = None
    #: A file listing the paths (or file:// URIs) to screen, one a line, instead of a walk.
    manifest: Path | None = None
    #: Skip files the state file records as screened under the same path, size and mtime.
    resume: bool = False
    engine: str = "local"
    #: The Ray cluster (``auto``, ``ray://HOST:10001``); ``None``: start a local Ray.
    address: str | None = None


@dataclass(kw_only=True)
class WatchOptions(ScreeningOptions):
    """Settings of ``ichscan watch`` (see ``ichscan watch --help``)."""

    input_dir: Path
    quarantine_dir: Path | None = None
    poll: bool = False
    poll_interval: float = 1.0
    settle: float = 2.0
    max_latency: float = 1.0
    rescan_interval: float = 60.0
    study_timeout: float = 60.0
    #: With a model that needs neighbouring slices: seconds a series must be quiet before
    #: its slices with missing neighbours are screened anyway.
    series_timeout: float = 10.0
    progress: bool = False
    #: Serve /metrics, /healthz and /readyz on this port (``None``: off; 0: a free port).
    metrics_port: int | None = None
    metrics_bind: str = "127.0.0.1"


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


def _absolute(path: Path | str | None) -> Path | None:
    return Path(os.path.abspath(path)) if path is not None else None


@dataclass
class RunOutputs:
    """The checked, absolute output paths of one run (see :meth:`resolve`)."""

    out: Path
    studies_out: Path
    state: Path
    overlays_dir: Path | None
    html: Path | None
    dicom_out: Path | None
    quarantine: Path | None = None
    fhir_out: Path | None = None

    def config_fields(self) -> dict[str, Path | None]:
        """The :class:`~ichscan.reporting.RunConfig` fields these set."""
        return {name: getattr(self, name) for name in ("out", "studies_out", "overlays_dir", "html", "dicom_out", "state", "fhir_out")}

    @classmethod
    def resolve(cls, opts: ScreeningOptions, quarantine: Path | None = None) -> RunOutputs:
        """Defaults filled in, files checked writable (nothing is created but parent folders).

        Raises
        ------
        RunError
            For an output that cannot be written or would overwrite an input.
        """
        if opts.overlays_for not in OVERLAY_CHOICES:
            raise RunError(f"--overlays-for must be one of {', '.join(OVERLAY_CHOICES)}")
        out = _absolute(opts.out)
        assert out is not None
        outputs = cls(
            out=out,
            studies_out=_absolute(opts.studies_out or default_studies_out(out)),  # type: ignore[arg-type]
            state=_absolute(opts.state or out.with_name(DEFAULT_STATE_NAME)),  # type: ignore[arg-type]
            overlays_dir=_absolute(opts.overlays_dir or out.parent / "overlays") if opts.overlays_for != "none" else None,
            html=_absolute(opts.results.html),
            dicom_out=_absolute(opts.results.dicom_out),
            quarantine=_absolute(quarantine),
            fhir_out=_absolute(opts.results.fhir_out),
        )
        for path, what in ((outputs.out, "--out"), (outputs.studies_out, "--studies-out"), (outputs.state, "--state"), (outputs.html, "--html")):
            if path is not None:
                prepare_output_file(path, what)
        return outputs

    def create_folders(self) -> None:
        """Create the output folders (once the run can happen: a failed start leaves none)."""
        for folder, what in (
            (self.overlays_dir, "overlays folder"),
            (self.dicom_out, "--dicom-out folder"),
            (self.quarantine, "quarantine folder"),
            (self.fhir_out, "--fhir-out folder"),
        ):
            if folder is not None:
                prepare_folder(folder, what)

    @property
    def outbox(self) -> Path:
        """Where DICOM results are written: --dicom-out, else a folder beside the state file."""
        return self.dicom_out or self.state.parent / OUTBOX_FOLDER_NAME

    def exclusions(self) -> Outputs:
        """Our own files and folders: never screened when they lie inside the input."""
        return Outputs(
            [p for p in (self.out, self.studies_out, self.html, *state_files(self.state)) if p is not None],
            [p for p in (self.overlays_dir, self.quarantine, self.outbox, self.fhir_out) if p is not None],
        )
