"""Study-level events: a study's result, handed to ``ichscan_study_result`` hook implementations.

When a study is complete (the end of a ``batch`` run; in ``watch`` and ``serve-scp`` once
it has been quiet for ``--study-timeout`` seconds, and again when late instances revise
it), :class:`StudyEvents`, the last reporter of every run, builds one :class:`StudyResult`
per study and calls every implementation of :func:`ichscan.hookspecs.ichscan_study_result`
with it. The built-in webhook notifier and FHIR writer are such implementations; a
third-party plugin (a pager, a worklist priority, a message queue) is another.

The result is built from what the state file records for the study (every ``ok`` instance,
its probabilities, its series probability), so a study completed again after a restart
gives the same values, and from the header of its most suspicious slice (accession
number, patient ID, study date), read once per event.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ichscan.dicom import read_header, text_value
from ichscan.labels import LABELS
from ichscan.records import top_finding
from ichscan.reporting import Reporter, RunConfig, StudyTable

if TYPE_CHECKING:
    import pluggy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultObject:
    """A DICOM result object the outbox made for the study (its latest SR or key image)."""

    kind: str  # "sr" or "sc" (key image, Secondary Capture)
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    revision: int
    file: str


@dataclass(frozen=True)
class StudyResult:
    """One study's screening result, as study-level hooks see it.

    Probabilities are the study's: per label the highest over its screened slices,
    except ``any`` for a model with a series head (the highest of its series' own
    outputs), the same values as the studies CSV, the HTML report and the SR.
    """

    study_instance_uid: str
    #: AccessionNumber and PatientID of the study (from its most suspicious slice's header;
    #: empty when absent). PatientID is there for results that must name the patient
    #: (FHIR's subject); ichscan's own logs and files never carry patient names.
    accession_number: str
    patient_id: str
    study_date: str
    probabilities: dict[str, float]
    positive: dict[str, bool]
    thresholds: dict[str, float]
    #: The top finding (a subtype, "any", or "none" for a negative study) and its probability.
    top_label: str
    top_probability: float
    slices: int
    positive_slices: int
    #: The slice with the highest probability of any hemorrhage: its file and UIDs.
    best_slice: str
    best_sop_instance_uid: str
    best_series_instance_uid: str
    #: Its overlay PNG when the run writes one (``None`` otherwise, or not written yet).
    overlay: str | None
    model_name: str
    model_version: str
    #: Untrained or bundled demo weights: "not for diagnostic use".
    demo: bool
    #: Which command produced it: "batch", "watch" or "serve-scp".
    source: str
    #: The study's latest DICOM results when the run makes them: the SR, then the key image.
    dicom_results: tuple[ResultObject, ...] = ()
    completed_at: float = field(default_factory=time.time)

    @property
    def is_positive(self) -> bool:
        return self.positive["any"]

    def content_key(self) -> str:
        """Equal for results that say the same: probabilities, decisions, thresholds, model,
        counts (what a notifier compares to tell a new result from a repeat)."""
        payload = {
            "probabilities": [round(self.probabilities[label], 5) for label in LABELS],
            "positive": [bool(self.positive[label]) for label in LABELS],
            "thresholds": [round(self.thresholds.get(label, 0.5), 6) for label in LABELS],
            "model": [self.model_name, self.model_version],
            "slices": [self.slices, self.positive_slices],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``dicom_results`` as a list of dicts)."""
        out = asdict(self)
        out["dicom_results"] = [asdict(obj) for obj in self.dicom_results]
        return out


def build_study_result(uid: str, studies: StudyTable, config: RunConfig, model_version: str | None = None) -> StudyResult | None:
    """The :class:`StudyResult` of a completed study; ``None`` when it has no screened slice.

    ``model_version``: the weights' version when the caller has it (else hashed from the file).
    """
    from ichscan.state.ledger import Ledger

    summary = studies.studies.get(uid)
    if summary is None or summary.slices == 0:
        return None
    thresholds = dict(config.thresholds or studies.thresholds)
    probabilities = dict(summary.max_probabilities)
    best_path, best_sop, best_series = summary.best_slice, "", ""
    dicom_results: tuple[ResultObject, ...] = ()
    if config.store is not None:
        # The state file has every result of the study, also those of earlier runs.
        rows = Ledger(config.store).instance_results(uid)
        if rows:
            best = max(rows, key=lambda row: (row.probabilities["any"], row.sop_instance_uid))
            best_path, best_sop, best_series = best.path, best.sop_instance_uid, best.series_instance_uid
        dicom_results = _dicom_results(config, uid)
    header = (read_header(best_path) or (None, None))[1] if best_path else None
    if header is not None:
        best_sop = best_sop or text_value(header, "SOPInstanceUID")
        best_series = best_series or text_value(header, "SeriesInstanceUID")
    positive = {label: probabilities[label] >= thresholds.get(label, 0.5) for label in LABELS}
    top_label, top_probability = top_finding(probabilities, positive["any"])
    return StudyResult(
        study_instance_uid=uid,
        accession_number=text_value(header, "AccessionNumber"),
        patient_id=text_value(header, "PatientID"),
        study_date=text_value(header, "StudyDate"),
        probabilities=probabilities,
        positive=positive,
        thresholds=thresholds,
        top_label=top_label,
        top_probability=top_probability,
        slices=summary.slices,
        positive_slices=summary.positive_slices,
        best_slice=best_path,
        best_sop_instance_uid=best_sop,
        best_series_instance_uid=best_series,
        overlay=_overlay(config, uid, best_series, best_sop),
        model_name=config.model_name,
        model_version=model_version or _model_version(config.weights),
        demo=config.demo,
        source=config.mode.value,
        dicom_results=dicom_results,
    )


class StudyEvents(Reporter):
    """Calls every ``ichscan_study_result`` implementation for each completed study.

    Registered last, so the DICOM results of the study (made by the reporter before it)
    are in its :attr:`StudyResult.dicom_results`. One implementation's failure is logged
    and the others still run; a failure counts as this reporter's.
    """

    name = "study-events"

    def __init__(self, pm: pluggy.PluginManager, config: RunConfig):
        self.config = config
        self.impls = pm.hook.ichscan_study_result.get_hookimpls()
        self._model_version: str | None = None  # the weights file hashed once per run, not per study

    def on_study_complete(self, uids: list[str], studies: StudyTable) -> None:
        failed: list[str] = []
        for uid in uids:
            if self._model_version is None:
                self._model_version = _model_version(self.config.weights)
            result = build_study_result(uid, studies, self.config, self._model_version)
            if result is None:
                continue
            # Newest plugin first, as pluggy calls them; each isolated from the others.
            for impl in reversed(self.impls):
                try:
                    impl.function(result=result, config=self.config)
                except Exception as exc:  # noqa: BLE001 - one plugin must not stop the others
                    failed.append(f"{impl.plugin_name}: {type(exc).__name__}: {exc}")
                    log.error(
                        "study %s: ichscan_study_result of %s failed: %s: %s",
                        uid,
                        impl.plugin_name,
                        type(exc).__name__,
                        exc,
                        extra={"study_instance_uid": uid},
                    )
        if failed:
            raise RuntimeError(f"{len(failed)} study event handlers failed")


def study_event_reporters(pm: pluggy.PluginManager, config: RunConfig) -> Sequence[Reporter]:
    """``[StudyEvents]`` when some plugin implements ``ichscan_study_result``, else nothing."""
    if not pm.hook.ichscan_study_result.get_hookimpls():
        return []
    return [StudyEvents(pm, config)]


def _dicom_results(config: RunConfig, uid: str) -> tuple[ResultObject, ...]:
    """The study's latest SR and key image from the outbox's table (none without it)."""
    from ichscan.state.ledger import decode_path

    assert config.store is not None
    rows = config.store.query(
        "SELECT kind, sop_instance_uid, series_instance_uid, sop_class_uid, revision, file FROM result_objects o "
        "WHERE study_instance_uid = ? AND revision = (SELECT MAX(revision) FROM result_objects "
        "WHERE study_instance_uid = o.study_instance_uid AND kind = o.kind) ORDER BY kind DESC",
        (uid,),
    )
    return tuple(ResultObject(kind, sop, series, cls, int(rev), decode_path(file)) for kind, sop, series, cls, rev, file in rows)


def _overlay(config: RunConfig, study: str, series: str, sop: str) -> str | None:
    from ichscan.overlay import overlay_file_name

    name = overlay_file_name(study, series, sop)
    if config.overlays_dir is None or name is None:
        return None
    path = Path(config.overlays_dir) / name
    return str(path) if path.exists() else None


def _model_version(weights: str) -> str:
    from ichscan.state.outbox import weights_version

    return weights_version(weights)


__all__ = ["ResultObject", "StudyEvents", "StudyResult", "build_study_result", "study_event_reporters"]
