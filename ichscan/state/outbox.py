"""Results back into PACS: the outbox of DICOM result objects per study.

Per completed study, :class:`Outbox` builds a structured report (SR) and, for a positive
study, a Secondary Capture key image (see :mod:`ichscan.dicom_results`), writes them to a
folder and records them, with one delivery per destination, in the state file (its
``result_objects`` and ``deliveries`` tables). The per-instance results it builds them
from are the ledger's (:meth:`ichscan.state.ledger.Ledger.instance_results`): stored
once. :class:`ichscan.state.forwarder.Forwarder` sends the pending deliveries.

Why it cannot lose or double a result:

* An object is written to a temporary file (fsync), then recorded with its deliveries in
  one transaction, then renamed into place. After a crash, a recorded object whose file
  is still temporary is renamed on start; an unrecorded temporary file is deleted
  (nothing was sent from it).
* A study whose content (instances, probabilities, thresholds, model) equals that of its
  latest recorded SR gets no new SR: a restart that completes the same study again
  sends nothing new. Different content (late instances) gives a revised SR: new SOP
  Instance UID, same series, a reference to its predecessor.
* A delivery is marked sent only after the destination answered Success. A crash in
  between re-sends the same object with the same UIDs, which PACS treat as a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ichscan.dicom import OK, decode_instance, is_valid_uid, read_header
from ichscan.durable import fsync_file, rename_durably
from ichscan.labels import LABELS
from ichscan.reporting import SR_TEMPLATES, SliceResult
from ichscan.state.forwarder import FAILED, PENDING, AnyDestination
from ichscan.state.ledger import InstanceResult, Ledger, decode_path, encode_path
from ichscan.state.store import StateStore

log = logging.getLogger(__name__)

SR = "sr"
SC = "sc"

#: The columns of ``result_objects``, in table order (rows are read into dicts by name).
_OBJECT_COLUMNS = (
    "sop_instance_uid",
    "study_instance_uid",
    "kind",
    "revision",
    "series_instance_uid",
    "sop_class_uid",
    "content_key",
    "file",
    "created_at",
)


@dataclass
class ModelInfo:
    """What the SR says about the model."""

    name: str
    version: str
    demo: bool
    thresholds: dict[str, float]


def weights_version(source: str) -> str:
    """``<file name> sha256:<12 hex>`` for a checkpoint file, else the source as given."""
    path = Path(source)
    if not path.is_file():
        return source
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{path.name} sha256:{digest.hexdigest()[:12]}"


class Outbox:
    """DICOM result objects per study, their files and their deliveries.

    Parameters
    ----------
    store
        The open state file; its opener (batch, watch) holds the lock and closes it.
    folder
        Where the objects are written: ``FOLDER/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.
    destinations
        Where each object is to be sent (a pending delivery per destination).
    model
        Model name, version, demo flag and thresholds, for the SR.
    sr_template
        The SR's template, one of :data:`ichscan.reporting.SR_TEMPLATES`.
    """

    def __init__(
        self,
        store: StateStore,
        folder: Path,
        destinations: Sequence[AnyDestination],
        model: ModelInfo,
        *,
        saliency: bool = False,
        sr_template: str = SR_TEMPLATES[0],
    ):
        if sr_template not in SR_TEMPLATES:
            raise ValueError(f"unknown SR template {sr_template!r}; choose one of {', '.join(SR_TEMPLATES)}")
        self.sr_template = sr_template
        self.store = store
        #: ``--saliency``: key images show the heat map of their slice (when this process
        #: screened it: heat maps are kept in memory, one per study, not in the state file).
        self.saliency = saliency
        self._heatmaps: dict[str, tuple[float, str, Any]] = {}  # study -> (p_any, SOP UID, heat map)
        self.ledger = Ledger(store)
        self.folder = Path(os.path.abspath(folder))
        self.destinations = list(dict.fromkeys(destinations))
        self.model = model
        self.folder.mkdir(parents=True, exist_ok=True)
        self._recover_files()
        self._queue_new_destinations()

    # -- start-up ----------------------------------------------------------------------

    def _recover_files(self) -> None:
        """Finish renames cut short by a crash; delete temporary files nobody recorded."""
        known = {decode_path(row[0]) for row in self.store.query("SELECT file FROM result_objects")}
        for path_text in known:
            path = Path(path_text)
            tmp = _tmp_name(path)
            if not path.exists() and tmp.exists():
                rename_durably([(tmp, path)])
                log.info("finished writing %s after an interrupted run", path)
            elif not path.exists():
                log.error("result object %s is recorded but its file is gone", path)
        for tmp in self.folder.glob("*/.ichscan-*.tmp"):
            if str(tmp.parent / tmp.name[len(".ichscan-") : -len(".tmp")]) not in known:
                tmp.unlink(missing_ok=True)

    def _queue_new_destinations(self) -> None:
        """Objects made before a destination was added are sent to it too; deliveries
        given up by an earlier run get one more round of tries."""
        with self.store.transaction():
            self.store.execute(
                "UPDATE deliveries SET state = ?, attempts = 0, next_try = 0 WHERE state = ?", (PENDING, FAILED)
            )
            for destination in self.destinations:
                self.store.execute(
                    "INSERT OR IGNORE INTO deliveries (sop_instance_uid, destination, state) "
                    "SELECT sop_instance_uid, ?, ? FROM result_objects",
                    (str(destination), PENDING),
                )

    # -- while screening ---------------------------------------------------------------

    def record_results(self, results: Iterable[SliceResult]) -> None:
        """Make sure the ledger holds every ``ok`` instance (path and probabilities) for
        its study's SR: ``watch`` recorded them already, ``batch`` did not."""
        screened = [
            r
            for r in results
            if r.status == OK and r.probabilities and is_valid_uid(r.sop_instance_uid) and is_valid_uid(r.study_instance_uid)
        ]
        self.ledger.record_screened(screened)
        for r in screened:
            # The heat map of the study's most suspicious slice so far: the key image's.
            kept = self._heatmaps.get(r.study_instance_uid)
            # Ties go as in complete_study: to the larger SOP Instance UID.
            if r.heatmap is not None and (kept is None or (r.probabilities["any"], r.sop_instance_uid) > kept[:2]):
                self._heatmaps[r.study_instance_uid] = (r.probabilities["any"], r.sop_instance_uid, _compact(r.heatmap))

    def complete_studies(self, uids: Sequence[str]) -> tuple[list[Path], list[str]]:
        """:meth:`complete_study` for each study, remembered until it succeeds: a study
        whose objects failed (full disk, files gone) or were cut short by a crash is
        tried again by :meth:`complete_unfinished` on the next start.

        Returns the new files and one error line per study that failed.
        """
        uids = [uid for uid in dict.fromkeys(uids) if is_valid_uid(uid)]
        with self.store.transaction():
            self.store.executemany(
                "INSERT OR IGNORE INTO studies_to_complete (study_instance_uid, since) VALUES (?, ?)",
                [(uid, time.time()) for uid in uids],
            )
        files: list[Path] = []
        errors: list[str] = []
        for uid in uids:
            try:
                files += self.complete_study(uid)
            except Exception as exc:  # noqa: BLE001 - one study's objects must not stop the others
                errors.append(f"study {uid}: cannot make its DICOM results: {type(exc).__name__}: {exc}")
                continue
            with self.store.transaction():
                self.store.execute("DELETE FROM studies_to_complete WHERE study_instance_uid = ?", (uid,))
            self._heatmaps.pop(uid, None)
        return files, errors

    def unfinished(self) -> list[str]:
        """Studies whose objects an earlier run did not finish."""
        return [uid for (uid,) in self.store.query("SELECT study_instance_uid FROM studies_to_complete ORDER BY since")]

    def complete_study(self, study_uid: str) -> list[Path]:
        """Build (or revise) the study's SR and key image when their content changed.

        The study-level values come from every recorded result of the study; the source
        files are read for their headers (patient and study modules, references), and a
        file gone since it was screened is referenced by its recorded UIDs.

        Returns the files of the new objects (empty when nothing changed). Raises
        ValueError/OSError with a one-line reason when the objects cannot be made.
        """
        if not is_valid_uid(study_uid):
            return []
        rows = [row for row in self.ledger.instance_results(study_uid) if is_valid_uid(row.sop_instance_uid)]
        if not rows:
            return []
        probabilities = {row.sop_instance_uid: row.probabilities for row in rows}
        series_any = [row.series_any for row in rows if row.series_any is not None]
        sr_key = self._content_key(probabilities, max(series_any) if series_any else None)
        best_uid = max(probabilities, key=lambda uid: (probabilities[uid]["any"], uid))
        positive = probabilities[best_uid]["any"] >= self.model.thresholds["any"]
        # With --saliency the key image differs (a heat map on it): a run with it revises
        # the key image of a run without it, and the other way round.
        sc_content: list[object] = [best_uid, [round(probabilities[best_uid][label], 5) for label in LABELS]]
        if self.saliency:
            sc_content.append("saliency")
        sc_key = hashlib.sha256(json.dumps(sc_content).encode()).hexdigest()
        latest_sr, latest_sc = self._latest(study_uid, SR), self._latest(study_uid, SC)
        need_sr = latest_sr is None or latest_sr["content_key"] != sr_key
        # A key image that could not be made before is tried again even when the SR stands.
        need_sc = positive and (latest_sc is None or latest_sc["content_key"] != sc_key)
        if not need_sr and not need_sc:
            return []
        findings = self._findings(study_uid, rows, probabilities)
        made: list[_NewObject] = []
        if need_sr:
            made.append(self._make_sr(study_uid, findings, sr_key, latest_sr))
        if need_sc:
            best_path = next(row.path for row in rows if row.sop_instance_uid == best_uid)
            sc = self._make_key_image(study_uid, findings, best_uid, best_path, sc_key, latest_sc)
            if sc is not None:
                made.append(sc)
        if made:
            self._commit(made)
        return [obj.path for obj in made]

    def _findings(self, study_uid: str, rows: list[InstanceResult], probabilities: dict[str, dict[str, float]]):
        from pydicom import Dataset

        from ichscan.dicom_results import InstanceFinding, StudyFindings

        thresholds = self.model.thresholds
        instances: list[InstanceFinding] = []
        gone = 0
        for row in rows:
            sop_uid, path, series_uid, sop_class = row.sop_instance_uid, row.path, row.series_instance_uid, row.sop_class_uid
            probs = probabilities[sop_uid]
            positive = {label: probs[label] >= thresholds[label] for label in LABELS}
            header = (read_header(path) or (None, None))[1]
            if header is None or str(header.get("SOPInstanceUID", "")) != sop_uid:
                if not (is_valid_uid(series_uid) and is_valid_uid(sop_class)):
                    log.warning("study %s: %s is gone or changed; it is left out of the report's references", study_uid, path)
                    continue
                # Gone since it was screened (a pruned store): referenced by its recorded UIDs.
                header = Dataset()
                header.StudyInstanceUID, header.SeriesInstanceUID = study_uid, series_uid
                header.SOPInstanceUID, header.SOPClassUID = sop_uid, sop_class
                gone += 1
            instances.append(InstanceFinding(header, probs, positive))
        if gone == len(rows) or not instances:
            raise ValueError(f"study {study_uid}: none of its {len(rows)} screened files can be read any more")
        # Every recorded result counts, read back or not: the same values as the study CSV
        # (any: the highest series probability, where a model with a series head gave them).
        study_probs = {label: max(p[label] for p in probabilities.values()) for label in LABELS}
        series_any = [row.series_any for row in rows if row.series_any is not None]
        if series_any:
            study_probs["any"] = max(series_any)
        return StudyFindings(
            instances=instances,
            probabilities=study_probs,
            positive={label: study_probs[label] >= thresholds[label] for label in LABELS},
            thresholds=dict(thresholds),
            model_name=self.model.name,
            model_version=self.model.version,
            demo=self.model.demo,
        )

    def _content_key(self, probabilities: dict[str, dict[str, float]], series_any: float | None = None) -> str:
        payload = {
            "instances": sorted((uid, [round(p[label], 5) for label in LABELS]) for uid, p in probabilities.items()),
            "thresholds": [round(self.model.thresholds[label], 6) for label in LABELS],
            "model": [self.model.name, self.model.version],
        }
        if series_any is not None:  # only then: the keys of results without it stay as they were
            payload["series_any"] = round(series_any, 5)
        if self.sr_template != SR_TEMPLATES[1]:  # comprehensive
            # The template is content too (a run in the other one revises the report), and
            # keys of reports made before there was a choice (all comprehensive) stay as they were.
            payload["sr_template"] = self.sr_template
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _latest(self, study_uid: str, kind: str) -> dict[str, Any] | None:
        row = self.store.query_one(
            f"SELECT {', '.join(_OBJECT_COLUMNS)} FROM result_objects WHERE study_instance_uid = ? AND kind = ? "
            "ORDER BY revision DESC LIMIT 1",
            (study_uid, kind),
        )
        return dict(zip(_OBJECT_COLUMNS, row, strict=True)) if row is not None else None

    def _make_sr(self, study_uid: str, findings, key: str, previous_row) -> _NewObject:
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.uid import generate_uid

        from ichscan.dicom_results import build_report

        previous = None
        if previous_row is not None:
            try:
                previous = pydicom.dcmread(decode_path(previous_row["file"]), stop_before_pixels=True)
            except (OSError, InvalidDicomError) as exc:
                log.warning(
                    "cannot read the earlier SR %s (%s): the revision will not reference it", decode_path(previous_row["file"]), exc
                )
        series = previous_row["series_instance_uid"] if previous_row is not None else generate_uid()
        revision = previous_row["revision"] + 1 if previous_row is not None else 1
        ds = build_report(
            findings,
            template=self.sr_template,
            series_instance_uid=series,
            sop_instance_uid=generate_uid(),
            instance_number=revision,
            previous=previous,
        )
        return self._write(study_uid, SR, revision, key, ds)

    def _make_key_image(
        self, study_uid: str, findings, best_uid: str, path: str, key: str, latest: dict[str, Any] | None
    ) -> _NewObject | None:
        import numpy as np
        from pydicom.uid import generate_uid

        from ichscan.dicom_results import build_key_image
        from ichscan.imaging import brain_window_image
        from ichscan.overlay import render_overlay
        from ichscan.records import Prediction, SliceResult, top_finding

        best = next((i for i in findings.instances if str(i.dataset.SOPInstanceUID) == best_uid), None)
        if best is None:  # gone, and too old a record to reference it
            log.warning("study %s: key image slice %s is gone", study_uid, path)
            return None
        decoded = decode_instance(path)
        if decoded.status != OK or decoded.pixels is None:
            log.warning("study %s: key image slice %s cannot be decoded now: %s", study_uid, path, decoded.error or "file gone")
            return None
        top_label, top_probability = top_finding(best.probabilities, best.positive["any"])
        prediction = Prediction(dict(best.probabilities), dict(best.positive), top_label, top_probability)
        result = SliceResult.of(decoded, prediction)
        if self.saliency:
            kept = self._heatmaps.get(study_uid)
            if kept is not None and kept[1] == best_uid:
                result.heatmap = kept[2].astype(np.float32) / 255.0
            else:
                log.info("study %s: key image without a heat map (its slice was screened by an earlier run)", study_uid)
        overlay = render_overlay(brain_window_image(decoded.pixels, decoded.slope, decoded.intercept), result)
        series = latest["series_instance_uid"] if latest is not None else generate_uid()
        revision = latest["revision"] + 1 if latest is not None else 1
        ds = build_key_image(
            best.dataset,
            np.asarray(overlay.convert("RGB")),
            series_instance_uid=series,
            sop_instance_uid=generate_uid(),
            instance_number=revision,
            demo=self.model.demo,
            heatmap=result.heatmap is not None,
        )
        return self._write(study_uid, SC, revision, key, ds)

    def _write(self, study_uid: str, kind: str, revision: int, key: str, ds) -> _NewObject:
        """Write ``ds`` to its temporary file (fsync); :meth:`_commit` records and renames it."""
        folder = self.folder / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        sop_uid = str(ds.SOPInstanceUID)
        path = folder / f"{sop_uid}.dcm"
        tmp = _tmp_name(path)
        ds.save_as(tmp, enforce_file_format=True)
        fsync_file(tmp)
        return _NewObject(
            sop_uid, study_uid, kind, revision, str(ds.SeriesInstanceUID), str(ds.SOPClassUID), key, path
        )

    def _commit(self, made: list[_NewObject]) -> None:
        now = time.time()
        with self.store.transaction():
            for obj in made:
                self.store.execute(
                    "INSERT INTO result_objects (sop_instance_uid, study_instance_uid, kind, revision, series_instance_uid, "
                    "sop_class_uid, content_key, file, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (obj.sop_uid, obj.study_uid, obj.kind, obj.revision, obj.series_uid, obj.sop_class_uid, obj.key, encode_path(str(obj.path)), now),
                )
                self.store.executemany(
                    "INSERT OR IGNORE INTO deliveries (sop_instance_uid, destination, state) VALUES (?, ?, ?)",
                    [(obj.sop_uid, str(d), PENDING) for d in self.destinations],
                )
        rename_durably((_tmp_name(obj.path), obj.path) for obj in made)


@dataclass
class _NewObject:
    sop_uid: str
    study_uid: str
    kind: str
    revision: int
    series_uid: str
    sop_class_uid: str
    key: str
    path: Path


#: Heat maps kept for key images: at most this many cells a side, as uint8 (at most 4 KB
#: per study a batch run holds; Grad-CAM maps are coarse, the key image stretches them).
KEPT_HEATMAP_SIDE = 64


def _compact(heatmap):
    """A heat map for keeping: uint8 levels (0-255 for 0-1), no larger than 64 x 64."""
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.round(np.clip(np.asarray(heatmap, np.float32), 0, 1) * 255).astype(np.uint8))
    if max(image.size) > KEPT_HEATMAP_SIDE:
        scale = KEPT_HEATMAP_SIDE / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    return np.asarray(image)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".ichscan-{path.name}.tmp")
