"""Built-in study-result handler: a FHIR R4B Bundle per completed study (``--fhir-out DIR``).

Writes ``DIR/<StudyInstanceUID>.json`` with :func:`ichscan.fhir.write_study_bundle` (a
DiagnosticReport, six Observations and the Device, as a transaction of conditional updates),
replacing it when the study is revised. The FHIR modules are imported only when a run
writes FHIR results.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ichscan import hookimpl

if TYPE_CHECKING:
    from ichscan.events import StudyResult
    from ichscan.reporting import RunConfig

log = logging.getLogger(__name__)


@hookimpl
def ichscan_study_result(result: StudyResult, config: RunConfig) -> None:
    if config.fhir_out is None:
        return
    from ichscan.fhir import write_study_bundle

    path = write_study_bundle(config.fhir_out, result)
    log.info("study %s: wrote %s", result.study_instance_uid, path.name, extra={"study_instance_uid": result.study_instance_uid})
