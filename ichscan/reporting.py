"""Results, per-study aggregation and the reporter interface."""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ichscan.labels import LABELS
from ichscan.records import NO_FINDING, SliceResult, Status, top_finding

__all__ = [
    "NO_FINDING",
    "Reporter",
    "ReporterSet",
    "ResultsOutput",
    "RunConfig",
    "RunMode",
    "RunSummary",
    "SliceResult",
    "StudySummary",
    "StudyTable",
    "top_finding",
]

if TYPE_CHECKING:
    from ichscan.state.store import StateStore

log = logging.getLogger(__name__)

#: ``--sr-template``: the study report's SR template, the default first (TID 1500 Imaging
#: Measurement Report, or ichscan's own Comprehensive SR tree; see ichscan.dicom_results).
SR_TEMPLATES = ("tid1500", "comprehensive")
#: ``--notify-on``: which study results make a webhook event, the default first.
NOTIFY_ON = ("positive", "all")


@dataclass
class StudySummary:
    study_instance_uid: str
    slices: int = 0
    positive_slices: int = 0
    #: The study's probabilities: per label the highest over its slices, except ``any``
    #: for a model with a series head, which is the highest of its series' own outputs.
    max_probabilities: dict[str, float] = field(default_factory=lambda: {label: 0.0 for label in LABELS})
    top_label: str = NO_FINDING
    top_probability: float = 0.0
    best_slice: str = ""  # path of the slice with the highest p_any
    best_any: float = -1.0  # that slice's p_any


class StudyTable:
    """Per-study maxima over ``ok`` slices; memory grows with studies, not slices."""

    def __init__(self, thresholds: Mapping[str, float]):
        self.thresholds = dict(thresholds)
        self.studies: dict[str, StudySummary] = {}
        self.changed: set[str] = set()
        #: Studies known to be complete (a finite run's end, a live study gone quiet).
        self.complete: set[str] = set()

    def add(self, results: Iterable[SliceResult]) -> None:
        for result in results:
            if result.status != Status.OK or result.probabilities is None:
                continue
            uid = result.instance.study_key
            study = self.studies.get(uid)
            if study is None:
                study = self.studies[uid] = StudySummary(uid)
            study.slices += 1
            study.positive_slices += int(result.is_positive)
            if result.probabilities["any"] >= study.best_any:
                study.best_slice, study.best_any = result.path, result.probabilities["any"]
            series_any = result.prediction.series_any
            for label in LABELS:
                value = series_any if label == "any" and series_any is not None else result.probabilities[label]
                study.max_probabilities[label] = max(study.max_probabilities[label], value)
            positive = study.max_probabilities["any"] >= self.thresholds["any"]
            study.top_label, study.top_probability = top_finding(study.max_probabilities, positive)
            self.changed.add(uid)

    def __len__(self) -> int:
        return len(self.studies)

    def sorted(self, only: set[str] | None = None) -> list[StudySummary]:
        """Studies by UID; ``only``: just these."""
        studies = self.studies.values() if only is None else (self.studies[u] for u in only if u in self.studies)
        return sorted(studies, key=lambda s: s.study_instance_uid)


@dataclass
class ResultsOutput:
    """Outputs beyond the CSVs and overlays: ``--html``, ``--dicom-out``, ``--sr-template``, ``--forward``, ``--notify``, ``--fhir-out``."""

    html: Path | None = None
    dicom_out: Path | None = None
    sr_template: str = SR_TEMPLATES[0]
    forward: tuple[Any, ...] = ()  # ichscan.state.forwarder.AnyDestination (C-STORE or DICOMweb)
    calling_ae: str = "ICHSCAN"
    forward_wait: float = 30.0
    notify: tuple[Any, ...] = ()  # ichscan.state.messages.HttpDestination (with its token and secret)
    notify_on: str = NOTIFY_ON[0]
    #: ``--fhir-out``: a FHIR R4B Bundle per completed study, ``DIR/<StudyInstanceUID>.json``.
    fhir_out: Path | None = None
    #: ``--fhir-forward``: FHIR servers (:class:`ichscan.state.messages.HttpDestination`) that
    #: get each study's Bundle POSTed, through the durable message outbox.
    fhir_forward: tuple[Any, ...] = ()

    @property
    def wants_dicom(self) -> bool:
        return self.dicom_out is not None or bool(self.forward)

    def config_fields(self) -> dict[str, Any]:
        """The :class:`RunConfig` fields these set."""
        return {
            "html": self.html,
            "dicom_out": self.dicom_out,
            "sr_template": self.sr_template,
            "forward": tuple(self.forward),
            "calling_ae": self.calling_ae,
            "forward_wait": self.forward_wait,
            "notify": tuple(self.notify),
            "notify_on": self.notify_on,
            "fhir_out": self.fhir_out,
            "fhir_forward": tuple(self.fhir_forward),
        }


class RunMode(enum.Enum):
    """Which command runs: a finite folder, or a live source that runs until stopped."""

    BATCH = "batch"
    WATCH = "watch"
    SERVE = "serve-scp"

    @property
    def live(self) -> bool:
        """Files arrive over time; outputs grow across runs (reconciled with the ledger)."""
        return self is not RunMode.BATCH


@dataclass
class RunConfig:
    """Settings of one screening run, as reporters see them."""

    out: Path | None = None
    studies_out: Path | None = None
    overlays_dir: Path | None = None
    overlays_for: str = "positive"
    thresholds: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    weights: str = ""
    trained: bool = True
    input_root: Path | None = None
    #: Static HTML report (``--html``); ``None`` for none.
    html: Path | None = None
    #: DICOM results (SR, key images): written to ``dicom_out`` and/or sent to ``forward``.
    dicom_out: Path | None = None
    #: The SR's template: one of :data:`SR_TEMPLATES`.
    sr_template: str = SR_TEMPLATES[0]
    forward: tuple[Any, ...] = ()  # ichscan.state.forwarder.AnyDestination (C-STORE or DICOMweb)
    calling_ae: str = "ICHSCAN"
    #: At the end of a run, seconds to wait for pending deliveries.
    forward_wait: float = 30.0
    #: Path of the SQLite state file (the outbox folder's default place is beside it).
    state: Path | None = None
    #: The open state file: the runner opens it, holds its lock and closes it; reporters
    #: only use it (the ledger of screened files, the outbox of DICOM results).
    store: StateStore | None = None
    #: Which command runs.
    mode: RunMode = RunMode.BATCH
    #: ``batch --resume``: files screened before keep their rows, the CSV is appended to.
    resume: bool = False
    #: ``--saliency``: positive results carry a heat map (``SliceResult.heatmap``), drawn
    #: on overlays and key images.
    saliency: bool = False
    #: Free-form settings for third-party plugins (ichscan itself sets none).
    options: dict[str, Any] = field(default_factory=dict)
    #: ``--notify``: webhook URLs (:class:`ichscan.state.messages.HttpDestination`) that get
    #: a JSON event per study result, as ``notify_on`` (one of :data:`NOTIFY_ON`) says.
    notify: tuple[Any, ...] = ()
    notify_on: str = NOTIFY_ON[0]
    #: FHIR results (``--fhir-out``): a Bundle per completed study written here; ``None`` for none.
    fhir_out: Path | None = None
    #: ``--fhir-forward``: FHIR server base URLs (:class:`ichscan.state.messages.HttpDestination`)
    #: each study's Bundle is POSTed to (a transaction), through the durable message outbox.
    fhir_forward: tuple[Any, ...] = ()

    @property
    def append(self) -> bool:
        """Whether the results CSV keeps the rows of earlier runs (reconciled with the ledger)."""
        return self.mode.live or self.resume

    @property
    def bundled_weights(self) -> bool:
        """Whether ``weights`` names the demo weights shipped in the package."""
        from ichscan.models import is_bundled  # lazy: ichscan.models imports torch

        return is_bundled(self.weights)  # False for "untrained (seed N)"

    @property
    def demo(self) -> bool:
        """Untrained or bundled demo weights: outputs say "not for diagnostic use"."""
        return not self.trained or self.bundled_weights


@dataclass
class RunSummary:
    files: int = 0
    ok: int = 0
    skipped: int = 0
    error: int = 0
    positive: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    reporter_errors: dict[str, int] = field(default_factory=dict)

    def count(self, results: Iterable[SliceResult]) -> None:
        for result in results:
            self.files += 1
            if result.status is Status.OK:
                self.ok += 1
            elif result.status is Status.SKIPPED:
                self.skipped += 1
            else:
                self.error += 1
            self.positive += int(result.is_positive)


class Reporter:
    """Base class for reporters: override what you need.

    ``on_results`` is called with each batch of results (every input file appears in
    exactly one batch) and the study table after it was updated; ``on_finish`` once at
    the end. A reporter that raises is logged and the others carry on.
    """

    name = "reporter"

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        """Handle one batch of results."""

    def on_study_complete(self, uids: list[str], studies: StudyTable) -> None:
        """These studies are complete for now: ``batch`` calls it for every study at the
        end of the run (before ``on_finish``); ``watch`` and ``serve-scp`` when a study
        has had no new instance for ``--study-timeout`` seconds, and again for a study
        that later instances re-opened."""

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        """Flush and close; the run is over."""


class ReporterSet:
    """Calls every reporter, isolating their failures from one another."""

    def __init__(self, reporters: list[Reporter]):
        self.reporters = reporters
        self.errors: dict[str, int] = {}

    def on_results(self, results: list[SliceResult], studies: StudyTable) -> None:
        for reporter in self.reporters:
            self._call(reporter, "on_results", results, studies)
        studies.changed.clear()

    def on_study_complete(self, uids: list[str], studies: StudyTable) -> None:
        for reporter in self.reporters:
            self._call(reporter, "on_study_complete", uids, studies)

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        for reporter in self.reporters:
            self._call(reporter, "on_finish", summary, studies)
        summary.reporter_errors = dict(self.errors)

    def _call(self, reporter: Reporter, method: str, *args: Any) -> None:
        try:
            getattr(reporter, method)(*args)
        except Exception as exc:  # noqa: BLE001 - one reporter must not take the others down
            name = getattr(reporter, "name", type(reporter).__name__)
            self.errors[name] = self.errors.get(name, 0) + 1
            log.error("reporter %s failed in %s: %s: %s", name, method, type(exc).__name__, exc)
