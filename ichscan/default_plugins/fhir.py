"""Built-in study-result handler: FHIR R4B results per completed study.

``--fhir-out DIR`` writes ``DIR/<StudyInstanceUID>.json`` with
:func:`ichscan.fhir.write_study_bundle` (a DiagnosticReport, six Observations and the
Device, as a transaction of conditional updates), replacing it when the study is revised.

``--fhir-forward URL`` POSTs the same Bundle to a FHIR server's base URL through the durable
message outbox (:mod:`ichscan.state.messages`, kind ``fhir``): recorded with its deliveries
before anything is sent, retried with back-off, sent again with the same bytes after a
crash; a study completed again with the same result records nothing new, and a different
result is recorded as an amendment (``DiagnosticReport.status`` ``amended``). The FHIR
modules are imported only when a run makes FHIR results.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ichscan import hookimpl

if TYPE_CHECKING:
    from ichscan.events import StudyResult
    from ichscan.reporting import RunConfig

log = logging.getLogger(__name__)

#: The ``kind`` of FHIR results in the state file's message outbox.
KIND = "fhir"
CONTENT_TYPE = "application/fhir+json"


def record_bundle(store: Any, result: StudyResult, destinations: Sequence[Any]) -> str | None:
    """Record the study's Bundle for ``destinations`` in the message outbox; returns its
    event id, or None when the study's latest recorded Bundle says the same."""
    from ichscan.fhir import bundle_bytes, study_bundle
    from ichscan.state.messages import MessageOutbox

    outbox = MessageOutbox(store)
    # Only results that differ are recorded: any earlier one makes this an amendment.
    amended = outbox.latest(KIND, result.study_instance_uid) is not None
    return outbox.enqueue(
        KIND,
        result.study_instance_uid,
        result.content_key(),
        lambda envelope: bundle_bytes(study_bundle(result, amended=amended)),
        CONTENT_TYPE,
        destinations,
        positive=result.is_positive,
    )


@hookimpl
def ichscan_register_reporters(register, config: RunConfig) -> None:
    if config.fhir_forward:
        from ichscan.state.messages import SenderReporter

        register(SenderReporter(config, KIND, config.fhir_forward, "FHIR results", name="fhir"))


@hookimpl
def ichscan_study_result(result: StudyResult, config: RunConfig) -> None:
    uid = result.study_instance_uid
    if config.fhir_out is not None:
        from ichscan.fhir import write_study_bundle

        path = write_study_bundle(config.fhir_out, result)
        log.info("study %s: wrote %s", uid, path.name, extra={"study_instance_uid": uid})
    if config.fhir_forward and config.store is not None:
        from ichscan.state.messages import wake_sender

        event_id = record_bundle(config.store, result, config.fhir_forward)
        if event_id is not None:
            log.info("study %s: FHIR Bundle %s recorded for %d servers", uid, event_id, len(config.fhir_forward), extra={"study_instance_uid": uid})
            wake_sender(config.store, KIND)
