"""Built-in webhook notifier: a JSON event POSTed per study result (``--notify URL``).

An implementation of ``ichscan_study_result`` like any plugin's. For each completed study
it decides whether there is an event (``--notify-on positive``: the study became positive,
its first result or a revision from negative; ``all``: every new result), records it with
its deliveries in the state file's message outbox (:mod:`ichscan.state.messages`) and
wakes the sender, a :class:`~ichscan.state.messages.MessageSender` thread that the
``notify`` reporter (a :class:`~ichscan.state.messages.SenderReporter`) runs for the length
of the run and drains for ``--forward-wait`` seconds at its end.

Every result of the study is recorded (those not sent without deliveries), so that
"became positive" compares with what the study last was, and a study completed again
with the same content (a restart) records nothing new.

The body names the study by its UIDs and accession number; it never carries a patient
name or ID, nor an input file's path (folder names may hold either).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from ichscan import hookimpl
from ichscan.events import StudyResult
from ichscan.labels import LABELS
from ichscan.reporting import RunConfig
from ichscan.state.messages import SenderReporter, wake_sender

log = logging.getLogger(__name__)

#: The ``kind`` of webhook messages in the state file's message outbox.
KIND = "webhook"
CONTENT_TYPE = "application/json"
#: Event names: the study became positive; any other new result (``--notify-on all``).
POSITIVE_EVENT = "study.positive"
RESULT_EVENT = "study.result"
#: Body format version (``"schema"``); a change that breaks receivers raises it.
SCHEMA = 1

def event_name(result: StudyResult, last_positive: bool | None, notify_on: str) -> str | None:
    """The event this result makes, or None (recorded, not sent).

    ``last_positive``: the study's previous result (``None``: it has none).
    """
    if result.is_positive and not last_positive:
        return POSITIVE_EVENT
    return RESULT_EVENT if notify_on == "all" else None


def event_body(result: StudyResult, event: str, envelope: Any) -> bytes:
    """The JSON body (UTF-8 bytes) of one event; ``envelope`` is its :class:`~ichscan.state.messages.Envelope`."""
    created = datetime.fromtimestamp(envelope.created_at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = {
        "schema": SCHEMA,
        "event_id": envelope.event_id,
        "event": event,
        "revision": envelope.revision,
        "previous_event_id": envelope.previous_event_id,
        "created_at": created,
        "study_instance_uid": result.study_instance_uid,
        "accession_number": result.accession_number,
        "positive": result.is_positive,
        "top_label": result.top_label,
        "top_probability": round(result.top_probability, 6),
        "probabilities": {label: round(result.probabilities[label], 6) for label in LABELS},
        "positive_by_label": {label: bool(result.positive[label]) for label in LABELS},
        "thresholds": {label: result.thresholds.get(label, 0.5) for label in LABELS},
        "slices": result.slices,
        "positive_slices": result.positive_slices,
        "best_slice": {
            "sop_instance_uid": result.best_sop_instance_uid,
            "series_instance_uid": result.best_series_instance_uid,
        },
        "overlay": result.overlay,
        "dicom_results": [
            {
                "kind": obj.kind,
                "sop_instance_uid": obj.sop_instance_uid,
                "series_instance_uid": obj.series_instance_uid,
                "sop_class_uid": obj.sop_class_uid,
                "revision": obj.revision,
                "file": obj.file,
            }
            for obj in result.dicom_results
        ],
        "model": {"name": result.model_name, "version": result.model_version},
        "demo": result.demo,
        "notice": "Screening aid, not for diagnostic use" + (" (demo weights)" if result.demo else ""),
        "source": result.source,
    }
    return json.dumps(body, ensure_ascii=False).encode("utf-8")


def record_event(store: Any, result: StudyResult, destinations: tuple[Any, ...], notify_on: str) -> str | None:
    """Record the study's result in the message outbox, with deliveries when it makes an
    event; returns the event id when one is to be sent, else None."""
    from ichscan.state.messages import MessageOutbox

    outbox = MessageOutbox(store)
    latest = outbox.latest(KIND, result.study_instance_uid)
    event = event_name(result, latest.positive if latest is not None else None, notify_on)
    event_id = outbox.enqueue(
        KIND,
        result.study_instance_uid,
        result.content_key(),
        lambda envelope: event_body(result, event or RESULT_EVENT, envelope),
        CONTENT_TYPE,
        destinations if event is not None else (),
        positive=result.is_positive,
    )
    if event_id is None or event is None:
        return None
    log.info("study %s: %s event %s recorded for %d destinations", result.study_instance_uid, event, event_id, len(destinations))
    return event_id


@hookimpl
def ichscan_register_reporters(register, config: RunConfig):
    if config.notify:
        register(SenderReporter(config, KIND, config.notify, "notifications", name="notify"))


@hookimpl
def ichscan_study_result(result: StudyResult, config: RunConfig):
    if not config.notify or config.store is None:
        return
    if record_event(config.store, result, tuple(config.notify), config.notify_on) is not None:
        wake_sender(config.store, KIND)
