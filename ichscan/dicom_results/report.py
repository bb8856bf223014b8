"""The study's report in the template the run asked for (``--sr-template``), and reading
back either template.

``tid1500`` (the default): a TID 1500 Imaging Measurement Report, the template viewers such
as OHIF interpret (:mod:`ichscan.dicom_results.tid1500`). ``comprehensive``: ichscan's own
Comprehensive SR tree, with per-slice probabilities (:mod:`ichscan.dicom_results.sr`). Both
are Comprehensive SR documents in the same series, so a report of one template can revise a
report of the other.
"""

from __future__ import annotations

from typing import Any

import pydicom

from ichscan.dicom_results.findings import StudyFindings
from ichscan.dicom_results.sr import build_sr, read_comprehensive_sr
from ichscan.dicom_results.tid1500 import build_measurement_report, read_measurement_report
from ichscan.reporting import SR_TEMPLATES

#: The choices of ``--sr-template`` (:data:`ichscan.reporting.SR_TEMPLATES`), the default first.
TID1500, COMPREHENSIVE = SR_TEMPLATES


def build_report(findings: StudyFindings, *, template: str = TID1500, **kwargs: Any) -> pydicom.Dataset:
    """Build the study's SR in ``template``; ``kwargs`` are those of :func:`~ichscan.dicom_results.sr.build_sr`.

    Raises
    ------
    ValueError
        For an unknown template, or as the template's builder.
    """
    if template == TID1500:
        return build_measurement_report(findings, **kwargs)
    if template == COMPREHENSIVE:
        return build_sr(findings, **kwargs)
    raise ValueError(f"unknown SR template {template!r}; choose one of {', '.join(SR_TEMPLATES)}")


def read_sr_findings(ds: pydicom.Dataset) -> dict[str, Any]:
    """Read back an ichscan report of either template (told apart by its template identifier).

    Returns the dict of :func:`~ichscan.dicom_results.sr.read_comprehensive_sr` (TID 1500:
    of :func:`~ichscan.dicom_results.tid1500.read_measurement_report`) with ``template``
    added. Raises ValueError for anything else.
    """
    templates = ds.get("ContentTemplateSequence") or [pydicom.Dataset()]
    if str(templates[0].get("TemplateIdentifier", "")) == "1500":
        return {**read_measurement_report(ds), "template": TID1500}
    return {**read_comprehensive_sr(ds), "template": COMPREHENSIVE}
