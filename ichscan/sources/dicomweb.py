"""Studies pulled from a DICOMweb server (``ichscan pull URL``): QIDO-RS to find them,
WADO-RS to fetch them, each instance written durably to a store folder, then handed over.

What it pulls: studies whose ModalitiesInStudy includes CT (and the filters of
:class:`PullQuery`), of each study its CT series, of each series the instances that are
neither in the store nor screened (by the state file's ledger). So a second run over the
same server fetches and screens nothing, and a study that gained instances gets only those.

Durable first, as ``serve-scp``: an instance goes to
``STORE/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (temporary file,
fsync, rename, fsync of the folder) before it is handed over; at start the store is
scanned, so what an interrupted run fetched but did not screen is screened now.

A background thread fetches, series by series, while the pipeline screens what is there:
a series is handed over once it is complete on disk, in position order and announced to
the series assembler (as ``batch`` does), so models with slice context see every
neighbour. The finite run then completes every study (SR, key image, forwarding).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ichscan.dicom import is_valid_uid
from ichscan.dicomweb import DicomWebError, explain, make_client, parse_base_url
from ichscan.durable import fsync_dir, write_durably
from ichscan.sources.base import Entry, stored_entry

if TYPE_CHECKING:
    from ichscan.pipeline.run import Pipeline

log = logging.getLogger(__name__)

_DATE_RE = re.compile(r"^\d{8}$")
_SINCE_RE = re.compile(r"^\d{8}(\d{2}(\d{2}(\d{2})?)?)?$")
#: ``--since last``: resume at the watermark this state file keeps for the server.
SINCE_LAST = "last"
#: How long :meth:`DicomWebSource.poll` waits for a series when the decoders are idle (a
#: finite run calls poll in a loop and never wait(), so it must not spin).
_IDLE_POLL_S = 0.1
#: Studies per QIDO-RS request.
_PAGE = 500


@dataclass(frozen=True)
class PullQuery:
    """Which studies to pull, besides "ModalitiesInStudy includes CT".

    ``study_date``: ``FROM-TO`` (``YYYYMMDD``, either end may be left out) or one date;
    ``accession``: AccessionNumber; ``study_uid``: StudyInstanceUID; ``since``:
    ``YYYYMMDD[HHMMSS]`` or ``last`` (the watermark) -- studies at or after that
    StudyDate/StudyTime.
    """

    study_date: str | None = None
    accession: str | None = None
    study_uid: str | None = None
    since: str | None = None

    def check(self) -> None:
        """Raises ValueError with a one-line reason for a malformed filter."""
        if self.study_date is not None:
            ends = self.study_date.split("-")
            if len(ends) > 2 or not any(ends) or any(e and not _DATE_RE.match(e) for e in ends):
                raise ValueError(f"--study-date {self.study_date!r}: give YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD")
        if self.study_uid is not None and not is_valid_uid(self.study_uid):
            raise ValueError(f"--study-uid {self.study_uid!r} is not a UID (dotted decimal, at most 64 characters)")
        if self.accession is not None and (not self.accession.strip() or len(self.accession) > 16 or "\\" in self.accession):
            raise ValueError(f"--accession {self.accession!r}: 1-16 characters, no backslash")
        if self.since is not None and self.since != SINCE_LAST and not _SINCE_RE.match(self.since):
            raise ValueError(f"--since {self.since!r}: give YYYYMMDD[HHMMSS] or '{SINCE_LAST}'")

    @property
    def filtered(self) -> bool:
        """Whether a filter other than --since narrows the studies (then no watermark is kept)."""
        return any(v is not None for v in (self.study_date, self.accession, self.study_uid))


@dataclass(frozen=True)
class RemoteStudy:
    uid: str
    when: str  # StudyDate + StudyTime as YYYYMMDDHHMMSS ("" if unknown)


@dataclass
class PullStats:
    studies: int = 0
    fetched: int = 0
    failed: list[str] = field(default_factory=list)  # one line per study that could not be fetched


def watermark_name(url: str) -> str:
    return f"pull {url}"


def _value(item: dict[str, Any], tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON object, as text ("" if none)."""
    element = item.get(tag) or {}
    values = element.get("Value") or []
    return str(values[0]) if values else ""


def _when(date: str, time: str) -> str:
    digits = "".join(ch for ch in time.split(".")[0] if ch.isdigit())
    return (date + (digits + "000000")[:6]) if _DATE_RE.match(date) else ""



def _dicom_json(answer: Any, url: str) -> list[dict[str, Any]]:
    if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
        raise DicomWebError(
            f"{url} did not answer QIDO-RS with DICOM JSON: is it the DICOMweb base URL, e.g. http://host:8042/dicom-web?",
            retry=False,
        )
    return answer


class DicomWebSource:
    """A DICOMweb server as a finite source (``ichscan pull``; ``ichscan screen dicomweb URL``).

    Parameters
    ----------
    url
        The server's DICOMweb base URL (checked: no credentials, no query).
    store
        Where fetched instances are kept, ``STORE/<Study>/<Series>/<SOP>.dcm``.
    query
        Which studies (:class:`PullQuery`).
    token
        A bearer token for the server.
    """

    live = False

    def __init__(self, url: str, store: str | os.PathLike[str] = "ichscan-store", query: PullQuery | None = None, token: str | None = None):
        self.url = parse_base_url(url)
        self.store = Path(os.path.abspath(store))
        self.query = query or PullQuery()
        self.query.check()
        self.client = make_client(self.url, token)
        self.studies: list[RemoteStudy] | None = None
        self.stats = PullStats()
        self._series: queue.SimpleQueue[list[str]] = queue.SimpleQueue()
        self._ready: deque[Entry] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirs_made: set[Path] = set()

    # -- QIDO-RS -----------------------------------------------------------------------

    def list_studies(self, watermark: str | None = None) -> list[RemoteStudy]:
        """The studies to look at, oldest first; raises :class:`DicomWebError` (one line).

        ``watermark``: for ``--since last``, the one the state file keeps (``None``: all).
        """
        since = watermark if self.query.since == SINCE_LAST else self.query.since
        filters: dict[str, str] = {"ModalitiesInStudy": "CT"}
        if self.query.study_uid:
            filters["StudyInstanceUID"] = self.query.study_uid
        if self.query.accession:
            filters["AccessionNumber"] = self.query.accession
        if self.query.study_date:
            filters["StudyDate"] = self.query.study_date
        elif since:
            filters["StudyDate"] = f"{since[:8]}-"
        studies: dict[str, RemoteStudy] = {}
        for item in self._search_studies(filters):
            uid = _value(item, "0020000D")
            modalities = {str(m) for m in (item.get("00080061") or {}).get("Value") or []}
            if modalities and "CT" not in modalities:
                continue  # a server that ignores the ModalitiesInStudy filter
            if not is_valid_uid(uid):
                log.warning("%s lists a study with an invalid UID %r; skipped", self.url, uid[:80])
                continue
            when = _when(_value(item, "00080020"), _value(item, "00080030"))
            if since and (not when or when < (since + "000000")[:14]):
                continue
            studies[uid] = RemoteStudy(uid, when)
        self.studies = sorted(studies.values(), key=lambda s: (s.when, s.uid))
        return self.studies

    def _search_studies(self, filters: dict[str, str]) -> list[dict[str, Any]]:
        """Every matching study, a page at a time (dicomweb-client's ``get_remaining`` loops
        for ever on a server that ignores ``offset``: here a page with nothing new ends it)."""
        found: dict[str, dict[str, Any]] = {}
        while True:
            try:
                page = self.client.search_for_studies(
                    search_filters=filters, fields=["StudyDate", "StudyTime", "ModalitiesInStudy"], limit=_PAGE, offset=len(found)
                )
            except Exception as exc:  # noqa: BLE001 - requests and dicomweb-client errors alike
                raise explain(exc, self.url, "QIDO-RS") from None
            before = len(found)
            for item in _dicom_json(page, self.url):
                found.setdefault(_value(item, "0020000D"), item)
            if len(page) < _PAGE or len(found) == before:
                return list(found.values())

    # -- the Source protocol -----------------------------------------------------------

    def open(self, pipeline: Pipeline) -> None:
        from ichscan.sources.watch import scan_tree
        from ichscan.state.ledger import FileIdentity

        self.pipeline = pipeline
        self.store.mkdir(parents=True, exist_ok=True)
        ledger = pipeline.ledger
        left = [
            e
            for e in map(stored_entry, scan_tree(str(self.store)))
            if e is not None and (ledger is None or ledger.is_done(FileIdentity(e.path, e.size, e.mtime_ns)) is None)
        ]
        if left:
            log.info("screening %d instances an earlier pull fetched but did not screen", len(left))
            self._series.put([e.path for e in left])
        if self.studies is None:
            store = ledger.store if ledger is not None else None
            try:
                self.list_studies(store.watermark(watermark_name(self.url)) if store is not None else None)
            except DicomWebError as exc:
                self.studies = []
                self.stats.failed.append(f"listing the studies: {exc}")
                log.error("%s", exc)
        self._thread = threading.Thread(target=self._fetch_all, name="ichscan-pull", daemon=True)
        self._thread.start()

    def poll(self, now: float, limit: int) -> list[Entry]:
        if limit > 0 and not self._ready:
            self._take_series(block=True)
        self._take_series(block=False)
        out: list[Entry] = []
        while self._ready and len(out) < limit:
            out.append(self._ready.popleft())
        return out

    def _take_series(self, block: bool) -> None:
        from ichscan.sources.folder import order_by_series

        while True:
            try:
                paths = self._series.get(timeout=_IDLE_POLL_S) if block else self._series.get_nowait()
            except queue.Empty:
                return
            block = False
            entries = [e for e in map(stored_entry, paths) if e is not None and e.path not in self.pipeline.in_flight]
            if self.pipeline.series.context > 0:
                entries = order_by_series(entries, self.pipeline.series)
            self._ready.extend(entries)

    def wait(self, timeout: float) -> None:
        pass

    def stop(self) -> None:
        self._stop.set()

    @property
    def finished(self) -> bool:
        thread = self._thread
        return thread is not None and not thread.is_alive() and self._series.empty() and not self._ready

    def on_results(self, results) -> None:
        pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)

    # -- WADO-RS, in the background ----------------------------------------------------

    def _fetch_all(self) -> None:
        studies = self.studies or []
        unfinished: list[RemoteStudy] = []
        for n, study in enumerate(studies):
            if self._stop.is_set():
                unfinished.extend(studies[n:])
                break
            try:
                complete = self._fetch_study(study)
            except OSError as exc:
                complete, error = False, f"cannot store it in {self.store}: {exc.strerror or exc}"
            except Exception as exc:  # noqa: BLE001 - one study must not stop the others
                complete, error = False, str(explain(exc, self.url, "WADO-RS"))
            else:
                error = ""
            if complete:
                self.stats.studies += 1
                continue
            unfinished.append(study)
            if error:
                self.stats.failed.append(f"study {study.uid}: {error}")
                log.error("cannot fetch study %s: %s", study.uid, error)
        self._keep_watermark(studies, unfinished)

    def _fetch_study(self, study: RemoteStudy) -> bool:
        """Fetch what the store and the ledger lack of the study's CT series; False when stopped midway."""
        ledger = self.pipeline.ledger
        screened = ledger.screened_instances(study.uid) if ledger is not None else set()
        series_list = _dicom_json(self.client.search_for_series(study.uid, search_filters={"Modality": "CT"}), self.url)
        for series_item in series_list:
            series = _value(series_item, "0020000E")
            if _value(series_item, "00080060") not in ("", "CT") or not is_valid_uid(series):
                continue
            instances = _dicom_json(self.client.search_for_instances(study.uid, series, fields=["SOPInstanceUID"]), self.url)
            wanted = [_value(i, "00080018") for i in instances]
            missing = [
                sop for sop in wanted if is_valid_uid(sop) and sop not in screened and not (self.store / study.uid / series / f"{sop}.dcm").exists()
            ]
            if not missing:
                continue
            if len(missing) == len(wanted):
                datasets = self.client.iter_series(study.uid, series)
            else:
                datasets = (self.client.retrieve_instance(study.uid, series, sop) for sop in missing)
            paths = []
            for ds in datasets:
                path = self._keep(ds, study.uid, series)
                if path is not None:
                    paths.append(path)
                if self._stop.is_set():
                    break
            log.info("fetched %d instances of series %s (study %s)", len(paths), series, study.uid)
            self.stats.fetched += len(paths)
            if paths:
                self._series.put(paths)
            if self._stop.is_set():
                return False
        return True

    def _keep(self, ds, study_uid: str, series_uid: str) -> str | None:
        """Write one fetched instance durably into the store; its path, or None if refused."""
        import pydicom

        uids = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(map(is_valid_uid, uids)) or uids[:2] != [study_uid, series_uid]:
            log.warning("%s sent an instance with unexpected or invalid UIDs %r; not kept", self.url, [u[:70] for u in uids])
            return None
        target = self.store / study_uid / series_uid / f"{uids[2]}.dcm"
        if target.exists():
            return None  # already fetched (and screened, or found by the scan at start)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        folder = target.parent
        if folder not in self._dirs_made:
            folder.mkdir(parents=True, exist_ok=True)
            fsync_dir(folder.parent)
            fsync_dir(folder.parent.parent)
            self._dirs_made.add(folder)
        write_durably(target, buffer.getvalue())
        return str(target)

    def _keep_watermark(self, studies: list[RemoteStudy], unfinished: list[RemoteStudy]) -> None:
        """``--since`` runs without other filters move the watermark: to the oldest study
        not fetched completely (tried again next time), else to the newest one seen."""
        ledger = self.pipeline.ledger
        if self.query.since is None or self.query.filtered or ledger is None or not studies:
            return
        dated = [s.when for s in (unfinished or studies) if s.when]
        if not dated:
            return
        mark = min(dated) if unfinished else max(dated)
        ledger.store.set_watermark(watermark_name(self.url), mark)
        log.info("pull watermark for %s: %s (the next --since last starts there)", self.url, mark)
