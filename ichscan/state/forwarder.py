"""Delivery of DICOM result objects by C-STORE or STOW-RS: destinations and the forwarder thread.

The outbox (:mod:`ichscan.state.outbox`) records each object with a pending delivery per
destination in the state file; :class:`Forwarder` sends them, with back-off, and marks a
delivery sent only once the destination answered Success (C-STORE) or listed the object
as stored (STOW-RS). A destination is a :class:`Destination` (``AE@HOST:PORT``) or a
:class:`~ichscan.dicomweb.WebDestination` (a DICOMweb base URL); both go through the
same table, the same rounds and the same retry rules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ichscan.dicomweb import WebDestination, is_web_url
from ichscan.state.ledger import decode_path
from ichscan.state.rounds import FAILED, PENDING, SENT, DeliveryRounds, Due
from ichscan.logs import uid_fields
from ichscan.state.store import StateStore

log = logging.getLogger(__name__)

__all__ = ["FAILED", "PENDING", "SENT", "AnyDestination", "Destination", "Forwarder", "parse_destination"]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


@dataclass(frozen=True)
class Destination:
    """A C-STORE target, written ``AE@HOST:PORT`` (``AE@[::1]:PORT`` for IPv6)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AE@HOST:PORT``; raises ValueError with a one-line reason."""
        ae, sep, rest = text.rpartition("@")
        if not sep or not ae:
            raise ValueError(f"{text!r} is not AE@HOST:PORT (e.g. ORTHANC@pacs.example.org:4242)")
        if not _AE_RE.match(ae) or not ae.strip():
            raise ValueError(f"AE title {ae!r} must be 1-16 printable characters without a backslash")
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} has no :PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"port {port_text!r} in {text!r} is not a number") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} in {text!r} is not in 1-65535")
        return cls(ae.strip(), host, port)


#: Where results go: C-STORE to an AE, or STOW-RS to a DICOMweb server.
AnyDestination = Destination | WebDestination


def parse_destination(text: str, token: str | None = None) -> AnyDestination:
    """``AE@HOST:PORT`` or a DICOMweb base URL (``http(s)://...``, with ``token`` for it);
    raises ValueError with a one-line reason."""
    if is_web_url(text):
        return WebDestination.parse(text, token)
    return Destination.parse(text)


#: C-STORE statuses that mean the object is stored (Success and the storage Warnings).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116}


def _uids(ds, sop_uid: str) -> dict[str, str]:
    """The log fields of a result object sent."""
    return uid_fields(str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or ""), sop_uid)


class Forwarder(DeliveryRounds):
    """Sends pending deliveries until stopped: per round one association per C-STORE
    destination, one STOW-RS request per object to a DICOMweb one.

    Each round proposes only the SOP classes of the objects it sends. A failure (no
    connection, association rejected or aborted, a failure status; for DICOMweb no
    answer, HTTP 401/403, 5xx, or the object listed as failed) is retried with
    exponential back-off from ``min_backoff`` to ``max_backoff`` seconds, for as long as
    the process runs; what is still pending at exit is sent by the next run (the rounds,
    back-off and bookkeeping are :class:`~ichscan.state.rounds.DeliveryRounds`').
    """

    table = "deliveries"
    key_column = "sop_instance_uid"
    activity = "forwarding"
    things = "objects"

    def __init__(
        self,
        store: StateStore,
        destinations: Sequence[AnyDestination],
        calling_ae: str = "ICHSCAN",
        *,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = 30.0,
    ):
        # Only this run's destinations: one dropped from the command line gets nothing more.
        self.targets = {str(d): d for d in destinations}
        super().__init__(store, list(self.targets), name="ichscan-forwarder", min_backoff=min_backoff, max_backoff=max_backoff)
        self.calling_ae = calling_ae
        self.timeout = timeout

    def _pending(self) -> list[Due]:
        rows = self.store.query(
            "SELECT d.destination, d.sop_instance_uid, d.attempts, d.next_try, o.sop_class_uid, o.file "
            "FROM deliveries d JOIN result_objects o USING (sop_instance_uid) "
            f"WHERE {self._where} ORDER BY o.created_at",
            self._where_params,
        )
        # detail: (SOP class, file)
        return [Due(dest, uid, attempts, next_try, (sop_class, decode_path(file))) for dest, uid, attempts, next_try, sop_class, file in rows]

    def _deliver(self, destination: str, items: list[Due]) -> None:
        target = self.targets[destination]
        if isinstance(target, WebDestination):
            self._send_web(target, items)
        else:
            self._send(target, items)

    def _send(self, destination: Destination, items: list[Due]) -> None:
        from pydicom.uid import UID
        from pynetdicom import AE

        key = str(destination)
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        # Only the SOP classes being sent, each in Explicit and Implicit VR Little Endian.
        for sop_class in sorted({item.detail[0] for item in items}):
            ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        try:
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        except (OSError, ValueError, RuntimeError) as exc:
            self._unreachable(key, items, f"cannot connect: {exc}")
            return
        if not assoc.is_established:
            if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
                # pynetdicom aborts when the peer answered but accepted none of the proposed
                # SOP classes: a refusal of these objects, counted towards giving up. It also
                # reports a refused connection, a timeout or the peer's abort as "aborted"
                # (then no context was answered): unreachable, retried without limit.
                names = ", ".join(sorted({UID(item.detail[0]).name for item in items}))
                for item in items:
                    self._refused(key, item, f"association aborted: {key} does not accept {names}?")
                return
            if assoc.is_rejected:
                reason = "association rejected (check our --calling-ae and its AE title)"
            else:
                reason = "no association (connection refused, timed out or aborted)"
            self._unreachable(key, items, reason)
            return
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        try:
            for n, item in enumerate(items):
                if self.stopping:
                    break
                sop_class, file = item.detail
                if sop_class not in accepted:
                    self._refused(key, item, f"{key} does not accept {UID(sop_class).name}")
                    continue
                ds = self._read_object(key, item, file)
                if ds is None:
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError, AttributeError) as exc:
                    status, error = None, f"{type(exc).__name__}: {exc}"
                else:
                    error = "no answer to C-STORE"
                code = getattr(status, "Status", None) if status else None
                if code in _STORED:
                    self._sent(key, item)
                    log.info("forwarded %s to %s", file, key, extra=_uids(ds, item.key))
                elif code is None:
                    if not assoc.is_established:
                        # The association is gone: this object and the rest wait for the next round.
                        self._unreachable(key, items[n:], f"association lost during C-STORE ({error})")
                        return
                    self._refused(key, item, error)
                else:
                    self._refused(key, item, f"C-STORE failed with status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _read_object(self, key: str, item: Due, file: str):
        """The result object to send, or None (refused with a retry soon: recorded a moment
        before its rename, or damaged)."""
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            return pydicom.dcmread(file)
        except (OSError, InvalidDicomError) as exc:
            self._refused(key, item, f"cannot read {file}: {exc}", retry_in=self.min_backoff)
            return None

    def _send_web(self, destination: WebDestination, items: list[Due]) -> None:
        """STOW-RS, one request per object: the answer to a request is about that object."""
        from ichscan.dicomweb import explain, make_client, stored_by_stow

        key = str(destination)
        client = make_client(destination.url, destination.token)
        for n, item in enumerate(items):
            if self.stopping:
                break
            file = item.detail[1]
            ds = self._read_object(key, item, file)
            if ds is None:
                continue
            try:
                answer = client.store_instances([ds], study_instance_uid=str(ds.StudyInstanceUID))
                refusal = stored_by_stow(answer, item.key)
            except Exception as exc:  # noqa: BLE001 - requests, dicomweb-client and parsing errors alike
                error = explain(exc, key, "STOW-RS")
                if error.retry:
                    # Unreachable, busy, or our token refused: this object and the rest wait.
                    self._unreachable(key, items[n:], str(error))
                    return
                self._refused(key, item, str(error))
                continue
            if refusal:
                self._refused(key, item, refusal)
                continue
            self._sent(key, item)
            log.info("forwarded %s to %s (STOW-RS)", file, key, extra=_uids(ds, item.key))
