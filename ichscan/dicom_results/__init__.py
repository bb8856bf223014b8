"""DICOM result objects written back into a screened study: a structured report and a key image.

Both are built with highdicom and carry the patient and study modules of the screened study
(as DICOM requires for objects placed in it), each in a series of its own, with new UIDs the
caller supplies. ``Manufacturer`` is :data:`ichscan.dicom.ICHSCAN_MANUFACTURER`, so
:func:`ichscan.dicom.decode_instance` skips them and ichscan never screens its own output.

Modules: :mod:`~ichscan.dicom_results.findings` (what both objects report, shared codes
and UIDs), :mod:`~ichscan.dicom_results.sr` (the Comprehensive SR tree and the SR document),
:mod:`~ichscan.dicom_results.tid1500` (the TID 1500 measurement report, the default),
:mod:`~ichscan.dicom_results.report` (the report in the chosen template, reading either back),
:mod:`~ichscan.dicom_results.key_image` (the Secondary Capture key image).
"""

from ichscan.dicom_results.findings import (
    KEY_IMAGE_SERIES_NUMBER,
    LABEL_CODES,
    NOT_FOR_DIAGNOSTIC_USE,
    PRIVATE_SCHEME,
    SC_SOP_CLASS_UID,
    SR_SERIES_NUMBER,
    SR_SOP_CLASS_UID,
    InstanceFinding,
    StudyFindings,
    select_key_instance,
)
from ichscan.dicom_results.key_image import build_key_image
from ichscan.dicom_results.report import COMPREHENSIVE, SR_TEMPLATES, TID1500, build_report, read_sr_findings
from ichscan.dicom_results.sr import build_sr
from ichscan.dicom_results.tid1500 import GROUP_CODES, build_measurement_report

__all__ = [
    "COMPREHENSIVE",
    "GROUP_CODES",
    "KEY_IMAGE_SERIES_NUMBER",
    "LABEL_CODES",
    "NOT_FOR_DIAGNOSTIC_USE",
    "PRIVATE_SCHEME",
    "SC_SOP_CLASS_UID",
    "SR_SERIES_NUMBER",
    "SR_SOP_CLASS_UID",
    "SR_TEMPLATES",
    "TID1500",
    "InstanceFinding",
    "StudyFindings",
    "build_key_image",
    "build_measurement_report",
    "build_report",
    "build_sr",
    "read_sr_findings",
    "select_key_instance",
]
