"""A DICOM C-STORE receiver that writes every instance durably before it answers Success.

The handler only stores and hands the path on; screening never runs inside it. Each
instance goes to ``STORE/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
through a hidden temporary file in the same folder: write, fsync, atomic rename, fsync
of the folder, and only then Success (0x0000). Any failure on the way answers 0xA700
and leaves no file behind, with one exception: when the folder's fsync fails after the
rename, the complete file stays (not screened, not answered Success) until a re-send
syncs the folder; that re-send gets Success and the file is screened.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from ichscan.dicom import is_valid_uid
from ichscan.sources.base import Entry, stored_entry
from ichscan.durable import fsync_dir, write_durably
from ichscan.logs import uid_fields

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"

# C-STORE status codes (PS3.4 B.2.3 and the ranges it leaves to implementations).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # the instance could not be stored (disk full, write/fsync/rename error)
DATASET_MISMATCH = 0xA900  # the data set's SOP class or instance UID disagrees with the request
CANNOT_UNDERSTAND = 0xC210  # the data set cannot be decoded
INVALID_UID = 0xC211  # a Study/Series/SOP Instance UID that is not a dotted-decimal UID of <= 64 chars

UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)


def decodable_transfer_syntaxes() -> list[UID]:
    """Uncompressed syntaxes plus every compressed one an installed decoder can read."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    accepted = list(UNCOMPRESSED)
    for uid in map(UID, AllTransferSyntaxes):
        if uid in accepted or not uid.is_compressed:
            continue
        try:
            if get_decoder(uid).is_available:
                accepted.append(uid)
        except (NotImplementedError, ValueError):
            continue
    return accepted


class UnreadableElement(ValueError):
    """An element of a received data set that cannot be decoded; the message is one line."""


def read_uids(ds, *keywords: str) -> list[str]:
    """The text of these (UID) elements of ``ds``, ``""`` for an absent one.

    pydicom decodes an element only when it is read, so a malformed one (an unknown VR, a
    value that is not text) raises there, not when the data set is parsed.

    Raises
    ------
    UnreadableElement
        Naming the first element that cannot be decoded (one line).
    """
    values = []
    for keyword in keywords:
        try:
            values.append(str(ds.get(keyword, "") or ""))
        except Exception as exc:  # noqa: BLE001 - whatever pydicom raises for a malformed element
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise UnreadableElement(f"{keyword} cannot be decoded ({text})") from None
    return values


#: The receivers, as ``StoreStats`` (and the ``protocol`` label of the metrics) name them.
DIMSE, STOW = "c-store", "stow-rs"
#: StoreStats' counters, by the ``outcome`` label of the metrics.
OUTCOMES = {"stored": "stored", "duplicates": "duplicate", "refused": "refused", "failed": "failed"}


@dataclass
class StoreStats:
    """What the receivers did with each instance, in all and by protocol (metrics)."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _by_protocol: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def add(self, what: str, protocol: str = DIMSE) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)
            key = (protocol, OUTCOMES[what])
            self._by_protocol[key] = self._by_protocol.get(key, 0) + 1

    def by_protocol(self, protocols: tuple[str, ...] = (DIMSE, STOW)) -> dict[tuple[str, str], int]:
        """``(protocol, outcome) -> count``, zeros included for ``protocols``."""
        with self.lock:
            counts = {(p, o): 0 for p in protocols for o in OUTCOMES.values()}
            counts.update(self._by_protocol)
            return counts


class StoreHandler:
    """The C-STORE handler: validate, store durably, hand the path on.

    :meth:`store_instance` is the part every receiver shares (the STOW-RS one in
    :mod:`ichscan.sources.stow` too): UID checks, the durable write, the hand-over.

    Parameters
    ----------
    store
        Root folder for received instances.
    on_stored
        Called with the path of each newly stored instance (after the durable write,
        before Success is returned). Must be quick: it only enqueues.
    """

    def __init__(self, store: Path, on_stored: Callable[[str], None]):
        self.store = Path(store)
        self.on_stored = on_stored
        self.stats = StoreStats()
        self._dirs_made: set[Path] = set()
        # Files renamed into place whose folder fsync then failed (answered 0xA700): the
        # complete file stays, as removing it could remove a concurrent writer's copy; a
        # re-send syncs the folder and hands it on, instead of taking it for a duplicate.
        self._unsynced: set[Path] = set()
        self._lock = threading.Lock()

    def __call__(self, event) -> int:
        peer = f"{event.assoc.requestor.ae_title}@{event.assoc.requestor.address}"
        request = event.request
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            sop_class, sop_instance = read_uids(ds, "SOPClassUID", "SOPInstanceUID")
        except Exception as exc:  # noqa: BLE001
            self.stats.add("refused")
            log.warning("C-STORE from %s refused: data set cannot be decoded: %s", peer, exc)
            return CANNOT_UNDERSTAND
        if sop_class != str(request.AffectedSOPClassUID) or sop_instance != str(request.AffectedSOPInstanceUID):
            self.stats.add("refused")
            log.warning(
                "C-STORE from %s refused: data set (%s, %s) does not match the request (%s, %s)",
                peer,
                sop_class[:70],
                sop_instance[:70],
                request.AffectedSOPClassUID,
                request.AffectedSOPInstanceUID,
            )
            return DATASET_MISMATCH
        return self.store_instance(ds, lambda: event.encoded_dataset(include_meta=True), f"C-STORE from {peer}")

    def store_instance(self, ds, encoded: Callable[[], bytes], sender: str, protocol: str = DIMSE) -> int:
        """Check the UIDs, write the instance durably, hand its path on; the one store path
        of every receiver (C-STORE and STOW-RS).

        Parameters
        ----------
        ds
            The instance's data set (read for its Study, Series and SOP Instance UIDs).
        encoded
            Returns the instance as a DICOM file (file meta included), as received;
            called only once the instance is to be written.
        sender
            Who sent it, for log lines (``"C-STORE from AE@host"``).
        protocol
            How it came (:data:`DIMSE` or :data:`STOW`), for the counts by protocol.

        Returns
        -------
        int
            A C-STORE status: ``SUCCESS`` once the file is durably on disk (or was already
            stored), ``INVALID_UID`` or ``CANNOT_UNDERSTAND`` (a UID element that cannot be
            decoded; nothing written either way) or ``OUT_OF_RESOURCES`` (no file left, but
            for a failed folder fsync: see the module's docstring).
        """
        try:
            uids = read_uids(ds, "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        except UnreadableElement as exc:
            self.stats.add("refused", protocol)
            log.warning("%s refused: %s (nothing written)", sender, exc)
            return CANNOT_UNDERSTAND
        bad = [u for u in uids if not is_valid_uid(u)]
        if bad:
            self.stats.add("refused", protocol)
            log.warning("%s refused: invalid UID %r (nothing written)", sender, bad[0][:80])
            return INVALID_UID
        study, series, sop = uids
        target = self.store / study / series / f"{sop}.dcm"
        if target.exists():
            with self._lock:
                unsynced = target in self._unsynced
                self._unsynced.discard(target)
            if not unsynced:
                # Keep the first copy: a re-send after a lost response is answered as stored
                # and screened once (the ledger knows the file).
                self.stats.add("duplicates", protocol)
                log.info("%s: %s already stored; kept the first copy", sender, sop, extra=uid_fields(study, series, sop))
                return SUCCESS
            try:
                fsync_dir(target.parent)
            except OSError as exc:
                with self._lock:
                    self._unsynced.add(target)
                return self._failed(exc, sender, uids, protocol)
        else:
            try:
                folder = target.parent
                if folder not in self._dirs_made:
                    folder.mkdir(parents=True, exist_ok=True)
                    fsync_dir(folder.parent)
                    fsync_dir(folder.parent.parent)
                    self._dirs_made.add(folder)
                write_durably(target, encoded())
            except OSError as exc:
                if target.exists():  # renamed into place, then the folder's fsync failed
                    with self._lock:
                        self._unsynced.add(target)
                return self._failed(exc, sender, uids, protocol)
        self.stats.add("stored", protocol)
        log.debug("%s: stored %s", sender, sop, extra=uid_fields(study, series, sop))
        self.on_stored(str(target))
        return SUCCESS

    def _failed(self, exc: OSError, sender: str, uids: list[str], protocol: str) -> int:
        self.stats.add("failed", protocol)
        log.error("%s: cannot store %s: %s (answered as out of resources)", sender, uids[2], exc.strerror or exc, extra=uid_fields(*uids))
        return OUT_OF_RESOURCES


@dataclass
class ScpOptions:
    port: int = 11112
    ae_title: str = "ICHSCAN"
    bind: str = "127.0.0.1"
    store: Path = Path("ichscan-store")
    allow_calling: tuple[str, ...] = ()
    accept_all_storage: bool = False
    max_associations: int = 10
    max_pdu: int = 65536
    idle_timeout: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None


def tls_context(opts: ScpOptions) -> ssl.SSLContext | None:
    if opts.tls_cert is None and opts.tls_key is None:
        return None
    if opts.tls_cert is None or opts.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=opts.tls_cert, keyfile=opts.tls_key)
    if opts.tls_ca is not None:
        # Mutual TLS: peers must present a certificate signed by this CA.
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=opts.tls_ca)
    return ctx


def build_ae(opts: ScpOptions):
    """A pynetdicom AE configured with the access rules, limits and contexts."""
    from pynetdicom import AE, StoragePresentationContexts

    ae = AE(ae_title=opts.ae_title)
    ae.require_called_aet = True
    if opts.allow_calling:
        ae.require_calling_aet = list(opts.allow_calling)
    ae.maximum_associations = opts.max_associations
    ae.maximum_pdu_size = opts.max_pdu
    # A slow or silent peer is dropped instead of holding a slot.
    ae.network_timeout = opts.idle_timeout
    ae.acse_timeout = min(30.0, opts.idle_timeout)
    ae.dimse_timeout = opts.idle_timeout
    syntaxes = decodable_transfer_syntaxes()
    ae.add_supported_context(VERIFICATION)
    if opts.accept_all_storage:
        for context in StoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, syntaxes)
    else:
        ae.add_supported_context(CT_IMAGE_STORAGE, syntaxes)
    return ae


#: The most a PDU other than P-DATA-TF may announce (P-DATA-TF: our maximum PDU size, which
#: the peer was told): an A-ASSOCIATE-RQ proposing every storage class, with a user identity,
#: is far smaller.
MAX_CONTROL_PDU = 1 << 20
#: Besides the timeout, a PDU gets one second for every this many bytes it announces.
MIN_PDU_RATE = 64 * 1024
#: A-ABORT reasons (PS3.8 9.3.8): reason not specified; invalid PDU parameter value.
ABORT_UNSPECIFIED, ABORT_INVALID_PARAMETER = 0x00, 0x06
_PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ", 6: "A-RELEASE-RP", 7: "A-ABORT"}


class _DroppedPeer(logging.Filter):
    """Keeps pynetdicom's "PDU shorter than expected" error off the log when it follows a
    peer dropped by ``GuardedSocket`` in the same thread: that peer already had its one
    warning."""

    dropped = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(self.dropped, "flag", False) and record.getMessage().startswith("The received PDU is shorter than expected"):
            self.dropped.flag = False
            return False
        return True


_DROPPED_PEER = _DroppedPeer()


def _guarded_socket_class():
    from pynetdicom.transport import AssociationSocket

    class GuardedSocket(AssociationSocket):
        """pynetdicom's socket with bounds on what one PDU from the peer may cost.

        pynetdicom reads a PDU as its 6-byte header, then as many bytes as the header
        announces, into memory, with nothing but the socket timeout between two bytes: a
        header announcing 4 GB made the receiver buffer whatever came (4 GB if sent), and a
        peer sending a byte a second held its association slot forever, before and after
        negotiation (the timers are checked only between PDUs). Here a PDU may announce at
        most our maximum PDU size (P-DATA-TF) or :data:`MAX_CONTROL_PDU` (the others), and
        must arrive whole within the timeout (the ACSE timeout until the association is
        established, then the network one, i.e. ``--idle-timeout``) plus one second per
        :data:`MIN_PDU_RATE` bytes. A peer breaking either is sent an A-ABORT and dropped
        with one warning; pynetdicom sees a short read (a closed connection).

        The DUL reader calls :meth:`recv` for a header, then for the body it announced,
        strictly in turn, which is how the two calls are told apart.
        """

        _body_next = False
        _deadline: float | None = None
        _allowed: float | None = None
        _kind = ""

        def recv(self, nr_bytes: int) -> bytearray:
            assoc = self.assoc
            timeout = assoc.network_timeout if assoc.is_established else assoc.acse_timeout
            now = time.monotonic()
            if not self._body_next:  # a PDU header
                data, late = self._recv_by(nr_bytes, None if timeout is None else now + timeout)
                if late:
                    return self._drop(data, f"sent {len(data)} of the 6 bytes of a PDU header in {timeout:.0f} s", ABORT_UNSPECIFIED)
                if len(data) == 6:
                    kind, length = data[0], struct.unpack(">I", data[2:6])[0]
                    most = (assoc.acceptor.maximum_length or 0xFFFFFFFF) if kind == 0x04 else MAX_CONTROL_PDU
                    if length > most:
                        name = _PDU_NAMES.get(kind, f"0x{kind:02X}")
                        return self._drop(data[:5], f"announced {length} bytes for its {name}, more than {most}", ABORT_INVALID_PARAMETER)
                    self._allowed = None if timeout is None else timeout + length / MIN_PDU_RATE
                    self._deadline = None if timeout is None else now + self._allowed
                    self._kind = _PDU_NAMES.get(kind, f"0x{kind:02X}")
                    self._body_next = True
                return data
            self._body_next = False
            data, late = self._recv_by(nr_bytes, self._deadline)
            if late:
                what = f"sent {len(data)} of the {nr_bytes} bytes of its {self._kind} in {self._allowed:.0f} s"
                return self._drop(data, what, ABORT_UNSPECIFIED)
            return data

        def _recv_by(self, nr_bytes: int, deadline: float | None) -> tuple[bytearray, bool]:
            """Up to ``nr_bytes`` (fewer: the peer closed); True once ``deadline`` passed."""
            sock = self.socket
            data = bytearray()
            if sock is None:
                return data, False
            saved = sock.gettimeout()
            try:
                while len(data) < nr_bytes:
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            return data, True
                        sock.settimeout(left if saved is None else min(left, saved))
                    chunk = sock.recv(min(65536, nr_bytes - len(data)))
                    if not chunk:
                        break
                    data.extend(chunk)
            except TimeoutError:
                return data, deadline is not None and time.monotonic() >= deadline
            except OSError as exc:  # reset by the peer: a closed connection, for pynetdicom too
                log.debug("connection from %s lost: %s", self._peer(), exc)
            finally:
                try:
                    sock.settimeout(saved)
                except OSError:
                    pass
            return data, False

        def _peer(self) -> str:
            requestor = self.assoc.requestor
            return f"{requestor.ae_title or '?'}@{requestor.address}:{requestor.port}"

        def _drop(self, data: bytearray, what: str, reason: int) -> bytearray:
            # An established association's own network timeout may have aborted it already
            # (pynetdicom logs that, once): then this is no news.
            aborted = self.assoc.is_aborted or getattr(self.assoc, "_sent_abort", False)
            log.log(logging.DEBUG if aborted else logging.WARNING, "association from %s dropped: it %s", self._peer(), what)
            _DroppedPeer.dropped.flag = True
            try:  # best effort: the peer may be gone or not reading
                self.socket.settimeout(1.0)
                self.socket.sendall(struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, 0x02, reason))
            except OSError:
                pass
            try:
                self.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return data

    return GuardedSocket


def start_server(ae, address: tuple[str, int], evt_handlers, ssl_context: ssl.SSLContext | None = None):
    """``ae.start_server(address, block=False, ...)``, with each association's socket a
    guarded one (see ``GuardedSocket`` in :func:`_guarded_socket_class`)."""
    from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

    guarded = _guarded_socket_class()
    dul_log = logging.getLogger("pynetdicom.dul")
    if _DROPPED_PEER not in dul_log.filters:
        dul_log.addFilter(_DROPPED_PEER)

    class GuardedRequestHandler(RequestHandler):
        def _create_association(self):
            assoc = super()._create_association()
            # pynetdicom builds the socket (and queues its connection event) itself; only
            # its reading changes, so the instance keeps its state and gets the subclass.
            assoc.dul.socket.__class__ = guarded
            return assoc

    server = ae.make_server(address, evt_handlers=evt_handlers, ssl_context=ssl_context, server_class=ThreadedAssociationServer, request_handler=GuardedRequestHandler)
    threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{address[1]}", daemon=True).start()
    ae._servers.append(server)  # as AE.start_server does: AE.shutdown() stops it too
    return server


class ScpSource:
    """The C-STORE receiver, and the STOW-RS one beside it, as a live source (``ichscan serve-scp``).

    The :class:`StoreHandler` (shared by both) hands each durably stored instance straight over
    (:meth:`received`, from the association's thread); a scan of the store at start
    finds what was stored but not screened before a crash. On :meth:`stop` no new
    associations are accepted and open ones get ``drain_timeout`` seconds to finish;
    what they store is still screened; so do STOW-RS requests being stored.
    """

    live = True

    def __init__(self, store: Path, drain_timeout: float = 30.0):
        self.store = Path(store)
        self.drain_timeout = drain_timeout
        self.server = None  # set by the caller once it listens
        self.web = None  # the STOW-RS server (ichscan.sources.stow.StowServer), when there is one
        self._received: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._backlog: dict[str, None] = {}
        self._drained = threading.Event()
        self._stopping = False

    def received(self, path: str) -> None:
        """Called by the handler for each newly stored instance (before Success)."""
        self._received.put(path)
        self._wakeup.set()

    def open(self, pipeline) -> None:
        from ichscan.sources.watch import scan_tree

        self.pipeline = pipeline
        ledger = pipeline.ledger
        for path in scan_tree(str(self.store)):
            entry = stored_entry(path)
            if entry is not None and (ledger is None or ledger.is_done(_identity(entry)) is None):
                self._backlog[path] = None

    def poll(self, now: float, limit: int) -> list[Entry]:
        while True:
            try:
                self._backlog[self._received.get_nowait()] = None
            except queue.Empty:
                break
        ledger = self.pipeline.ledger
        out: list[Entry] = []
        for path in list(self._backlog):
            if len(out) >= limit:
                break
            del self._backlog[path]
            entry = stored_entry(path)
            if entry is None or path in self.pipeline.in_flight:
                continue
            if ledger is not None and ledger.is_done(_identity(entry)) is not None:
                continue
            out.append(entry)
        return out

    def wait(self, timeout: float) -> None:
        self._wakeup.wait(timeout)
        self._wakeup.clear()

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        threading.Thread(target=self._drain, name="ichscan-drain", daemon=True).start()

    def _drain(self) -> None:
        server, web = self.server, self.web
        deadline = time.monotonic() + self.drain_timeout
        if web is not None:
            # Stop accepting connections; requests being stored finish (below).
            web.shutdown()
            web.server_close()
        if server is not None:
            log.warning("stopping: no new associations; waiting up to %.0f s for open ones", self.drain_timeout)
            server.shutdown()
            # Only established associations are waited for: a connection that never
            # sent an association request (a port check, a stalled peer) is not work.
            while any(a.is_established for a in server.active_associations) and time.monotonic() < deadline:
                time.sleep(0.05)
            for assoc in server.active_associations:
                if assoc.is_established:
                    log.warning("aborting association with %s after the drain timeout", assoc.requestor.ae_title)
                assoc.abort()
        while web is not None and web.busy and time.monotonic() < deadline:
            time.sleep(0.05)
        if web is not None and web.busy:
            log.warning("%d STOW-RS requests still storing after the drain timeout; what they store is screened at the next start", web.busy)
        self._drained.set()
        self._wakeup.set()

    @property
    def finished(self) -> bool:
        return self._drained.is_set() and self._received.empty() and not self._backlog

    def on_results(self, results) -> None:
        pass

    def close(self) -> None:
        if self._drained.is_set():
            return
        if self.server is not None:
            self.server.shutdown()
        if self.web is not None:
            self.web.shutdown()
            self.web.server_close()



def _identity(entry: Entry):
    from ichscan.state.ledger import FileIdentity

    return FileIdentity(entry.path, entry.size, entry.mtime_ns)
