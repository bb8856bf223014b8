"""The outbox of HTTP messages about studies (webhook notifications; FHIR results), and their sender.

The same promise as the DICOM outbox (:mod:`ichscan.state.outbox`): a message is recorded
with one pending delivery per destination, in one transaction, before anything is sent;
:class:`MessageSender` POSTs the pending deliveries and marks one sent only after a 2xx
answer. So a message is delivered at least once, across crashes and restarts, always with
the same bytes and the same event id (which the receiver de-duplicates by).

Tables (``messages``, ``message_deliveries``; see :mod:`ichscan.state.schema`): a message
is one distinct result of one study for one ``kind`` of consumer (``"webhook"``,
``"fhir"``...), with its ``revision`` (1, 2, ... per kind and study), the ``content_key``
that makes results equal, the exact ``body`` bytes and ``content_type``, and extra
``headers``. A result whose content key equals the study's latest message of that kind
is not recorded again: a study completed again after a restart sends nothing new.

Use (a FHIR writer would do the same with ``kind="fhir"``)::

    outbox = MessageOutbox(store)
    event_id = outbox.enqueue("fhir", study_uid, key, body, "application/fhir+json", [destination])
    sender = MessageSender(store, [destination], kinds=("fhir",))
    sender.start(); ...; sender.drain(30); sender.stop()
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ichscan.reporting import Reporter, RunConfig, RunSummary, StudyTable
from ichscan.state.ledger import printable
from ichscan.state.rounds import FAILED, PENDING, DeliveryRounds, Due
from ichscan.state.store import StateStore

log = logging.getLogger(__name__)

#: Header with the HMAC-SHA256 of the body (``sha256=<hex>``), when the destination has a secret.
SIGNATURE_HEADER = "X-Ichscan-Signature"
#: Header with the message's event id (also sent as ``Idempotency-Key``).
EVENT_ID_HEADER = "X-Ichscan-Event-Id"
#: Seconds to wait for a connection, and for the answer.
HTTP_TIMEOUT = 10.0
#: HTTP statuses that mean "try again later" (besides 5xx): timeout, too many requests.
_RETRY_STATUSES = {408, 429}


@dataclass(frozen=True)
class HttpDestination:
    """Where messages are POSTed: an ``http(s)://`` URL (``str()`` is the URL, by which the
    state file keys deliveries). The bearer token and the signing secret are not part of its
    identity, never printed and never stored."""

    url: str
    token: str | None = field(default=None, compare=False, repr=False)
    secret: bytes | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.url

    @classmethod
    def parse(cls, text: str, token: str | None = None, secret: bytes | None = None) -> HttpDestination:
        """Check an ``http(s)://host[:port]/path[?query]`` URL; raises ValueError with a one-line reason.

        Refused: other schemes, no host, credentials in it (``user:password@``: use a token
        file), a fragment, white space.
        """
        if not text.lower().startswith(("http://", "https://")):
            raise ValueError(f"{text!r} is not an http:// or https:// URL (e.g. https://alerts.example.org/ichscan)")
        if any(ch.isspace() or ord(ch) < 0x20 for ch in text):
            raise ValueError(f"{text!r} contains white space or control characters")
        parts = urllib.parse.urlsplit(text)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise ValueError("a webhook or FHIR server URL must not carry credentials (user:password@); give a bearer token file instead")
        if parts.fragment or text.endswith("#"):
            raise ValueError(f"a webhook or FHIR server URL has no fragment: {text!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"the port in {text!r} is not a number in 1-65535") from None
        if not parts.hostname or port == 0:
            raise ValueError(f"{text!r} has no host")
        url = urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, parts.path or "/", parts.query, ""))
        return cls(url, token, secret)


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the HMAC-SHA256 of ``body`` in hex."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class Envelope(NamedTuple):
    """What :meth:`MessageOutbox.enqueue` decides for a new message, for its body."""

    event_id: str
    revision: int
    #: The study's previous message of this kind that had deliveries (was sent), if any.
    previous_event_id: str | None
    created_at: float


@dataclass(frozen=True)
class Message:
    """A recorded message (without its body)."""

    event_id: str
    kind: str
    study_instance_uid: str
    revision: int
    content_key: str
    positive: bool | None
    created_at: float


class MessageOutbox:
    """Records messages with their deliveries in the state file (see the module docstring)."""

    def __init__(self, store: StateStore):
        self.store = store

    def latest(self, kind: str, study_uid: str) -> Message | None:
        """The study's newest message of ``kind``."""
        row = self.store.query_one(
            "SELECT event_id, kind, study_instance_uid, revision, content_key, positive, created_at FROM messages "
            "WHERE kind = ? AND study_instance_uid = ? ORDER BY revision DESC LIMIT 1",
            (kind, study_uid),
        )
        if row is None:
            return None
        return Message(row[0], row[1], row[2], int(row[3]), row[4], None if row[5] is None else bool(row[5]), float(row[6]))

    def enqueue(
        self,
        kind: str,
        study_uid: str,
        content_key: str,
        body: bytes | Callable[[Envelope], bytes],
        content_type: str,
        destinations: Sequence[Any],
        headers: dict[str, str] | None = None,
        *,
        positive: bool | None = None,
    ) -> str | None:
        """Record a message and a pending delivery per destination, in one transaction.

        Parameters
        ----------
        kind
            Who the message is for (``"webhook"``, ``"fhir"``): each kind has its own
            revisions and content keys per study.
        content_key
            Equal keys mean equal results: when the study's latest message of ``kind``
            has this key, nothing is recorded.
        body
            The exact bytes to POST, or a function of the :class:`Envelope` (event id,
            revision, previous event id, time) that returns them.
        destinations
            Where to send it (``str()`` of each is its URL); none: recorded, not sent
            (what the study's result was, for deciding about the next one).
        headers
            Extra HTTP headers sent with it (stored with the message).
        positive
            The result's positivity, kept for deciding about the next one.

        Returns
        -------
        The new event id (a UUID), or ``None`` when the content equals the latest message's.
        """
        with self.store.transaction():
            latest = self.latest(kind, study_uid)
            if latest is not None and latest.content_key == content_key:
                return None
            previous = self.store.query_one(
                "SELECT event_id FROM messages m WHERE kind = ? AND study_instance_uid = ? "
                "AND EXISTS (SELECT 1 FROM message_deliveries d WHERE d.event_id = m.event_id) ORDER BY revision DESC LIMIT 1",
                (kind, study_uid),
            )
            envelope = Envelope(
                event_id=str(uuid.uuid4()),
                revision=(latest.revision + 1) if latest is not None else 1,
                previous_event_id=previous[0] if previous else None,
                created_at=time.time(),
            )
            data = body(envelope) if callable(body) else bytes(body)
            self.store.execute(
                "INSERT INTO messages (event_id, kind, study_instance_uid, revision, content_key, positive, body, content_type, "
                "headers, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    envelope.event_id,
                    kind,
                    study_uid,
                    envelope.revision,
                    content_key,
                    None if positive is None else int(positive),
                    data,
                    content_type,
                    json.dumps(headers or {}, sort_keys=True),
                    envelope.created_at,
                ),
            )
            self.store.executemany(
                "INSERT OR IGNORE INTO message_deliveries (event_id, destination, state) VALUES (?, ?, ?)",
                [(envelope.event_id, str(d), PENDING) for d in dict.fromkeys(str(d) for d in destinations)],
            )
        return envelope.event_id

    def resume(self, kinds: Sequence[str], destinations: Sequence[Any]) -> int:
        """At start: pending deliveries of an earlier run to these destinations are due now,
        and given-up ones get one more round of tries. Returns how many are pending."""
        names = [str(d) for d in destinations]
        if not names or not kinds:
            return 0
        where = (
            f"destination IN ({', '.join('?' * len(names))}) AND event_id IN "
            f"(SELECT event_id FROM messages WHERE kind IN ({', '.join('?' * len(kinds))}))"
        )
        with self.store.transaction():
            self.store.execute(
                f"UPDATE message_deliveries SET state = ?, attempts = 0, next_try = 0 WHERE state = ? AND {where}",
                (PENDING, FAILED, *names, *kinds),
            )
            self.store.execute(f"UPDATE message_deliveries SET next_try = 0 WHERE state = ? AND {where}", (PENDING, *names, *kinds))
            (count,) = self.store.query_one(f"SELECT COUNT(*) FROM message_deliveries WHERE state = ? AND {where}", (PENDING, *names, *kinds)) or (0,)
        return int(count)


class MessageSender(DeliveryRounds):
    """POSTs pending messages of ``kinds`` to ``destinations`` until stopped.

    Each request carries the stored body and headers, ``Content-Type``,
    ``X-Ichscan-Event-Id`` and ``Idempotency-Key`` (the event id), with a destination's
    secret ``X-Ichscan-Signature: sha256=<HMAC-SHA256 of the body>`` and with its token
    ``Authorization: Bearer``. A 2xx answer is "sent"; no connection, a timeout, 5xx, 408
    and 429 are "unreachable" (retried with back-off for as long as the process runs);
    any other answer (4xx, a redirect) is a refusal, given up after
    :data:`~ichscan.state.rounds.MAX_REFUSALS` tries. Redirects are not followed.
    """

    table = "message_deliveries"
    key_column = "event_id"
    activity = "sending"
    things = "messages"

    def __init__(
        self,
        store: StateStore,
        destinations: Sequence[HttpDestination],
        kinds: Sequence[str] = ("webhook",),
        *,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        timeout: float = HTTP_TIMEOUT,
        user_agent: str = "ichscan",
    ):
        self.targets = {str(d): d for d in destinations}
        self.kinds = tuple(kinds)
        scope = (f"d.event_id IN (SELECT event_id FROM messages WHERE kind IN ({', '.join('?' * len(self.kinds))}))", self.kinds)
        super().__init__(
            store, list(self.targets), name="ichscan-messages", min_backoff=min_backoff, max_backoff=max_backoff, scope=scope
        )
        self.timeout = timeout
        self.user_agent = user_agent
        self._session: Any = None

    def _pending(self) -> list[Due]:
        rows = self.store.query(
            "SELECT d.destination, d.event_id, d.attempts, d.next_try FROM message_deliveries d "
            f"JOIN messages m USING (event_id) WHERE {self._where} ORDER BY m.created_at, m.event_id",
            self._where_params,
        )
        return [Due(dest, event_id, int(attempts), float(next_try)) for dest, event_id, attempts, next_try in rows]

    def _deliver(self, destination: str, items: list[Due]) -> None:
        import requests

        if self._session is None:
            self._session = requests.Session()
        target = self.targets[destination]
        for n, item in enumerate(items):
            if self.stopping:
                break
            row = self.store.query_one("SELECT kind, body, content_type, headers FROM messages WHERE event_id = ?", (item.key,))
            if row is None:  # cannot happen: deliveries are recorded with their message
                self._refused(destination, item, "the message is missing from the state file")
                continue
            kind, body, content_type, stored_headers = row
            body = bytes(body)
            headers = {**json.loads(stored_headers or "{}"), "Content-Type": content_type, "User-Agent": self.user_agent}
            headers[EVENT_ID_HEADER] = headers["Idempotency-Key"] = item.key
            if target.secret is not None:
                headers[SIGNATURE_HEADER] = sign(target.secret, body)
            if target.token:
                headers["Authorization"] = f"Bearer {target.token}"
            try:
                answer = self._session.post(
                    target.url, data=body, headers=headers, timeout=(min(self.timeout, 10.0), self.timeout), allow_redirects=False
                )
                answer.close()
            except requests.Timeout:
                self._unreachable(destination, items[n:], f"no answer within {self.timeout:g} s")
                return
            except requests.RequestException as exc:
                self._unreachable(destination, items[n:], f"cannot reach it: {_first_line(exc)}")
                return
            status = answer.status_code
            if 200 <= status < 300:
                self._sent(destination, item)
                log.info("sent %s message %s to %s (HTTP %d)", kind, item.key, destination, status)
            elif status >= 500 or status in _RETRY_STATUSES:
                # Busy or broken for now: this message and the rest wait.
                self._unreachable(destination, items[n:], f"HTTP {status} {answer.reason or ''}".rstrip())
                return
            else:
                where = f" to {answer.headers.get('Location')}" if 300 <= status < 400 and answer.headers.get("Location") else ""
                self._refused(destination, item, f"refused with HTTP {status} {answer.reason or ''}".rstrip() + where)

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self._session is not None:
                self._session.close()


#: The running sender of each open state file and kind, woken when a message is recorded.
_running: dict[tuple[int, str], MessageSender] = {}


def wake_sender(store: StateStore, kind: str) -> None:
    """A message of ``kind`` was recorded: the run's sender of that kind sends it now."""
    sender = _running.get((id(store), kind))
    if sender is not None:
        sender.wake.set()


class SenderReporter(Reporter):
    """Runs a :class:`MessageSender` for one ``kind`` of messages for the length of a run:
    earlier runs' pending deliveries to these destinations go first, and at the end it
    waits up to ``--forward-wait`` seconds for what is pending (the rest goes with the next
    run). The built-in webhook notifier and FHIR forwarding each register one."""

    def __init__(self, config: RunConfig, kind: str, destinations: Sequence[HttpDestination], what: str, *, name: str):
        if config.store is None:
            raise ValueError(f"{what} need the open state file (RunConfig.store)")
        self.name, self.kind, self.what, self.config = name, kind, what, config
        left = MessageOutbox(config.store).resume([kind], destinations)
        self.sender = MessageSender(config.store, destinations, kinds=(kind,))
        self.sender.start()
        _running[(id(config.store), kind)] = self.sender
        if left:
            log.info("%d %s pending from an earlier run; sending them", left, what)

    def on_finish(self, summary: RunSummary, studies: StudyTable) -> None:
        left = self.sender.drain(self.config.forward_wait)
        self.sender.stop()
        self.sender.join(timeout=self.sender.timeout + 5)
        _running.pop((id(self.config.store), self.kind), None)
        if left:
            log.warning(
                "%d %s not yet delivered to %s; they are kept in %s and sent by the next run",
                left,
                self.what,
                ", ".join(self.sender.destinations),
                self.config.store.path if self.config.store is not None else "the state file",
            )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return printable(lines[0] if lines else type(exc).__name__)[:300]


__all__ = [
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "Envelope",
    "HttpDestination",
    "Message",
    "SenderReporter",
    "wake_sender",
    "MessageOutbox",
    "MessageSender",
    "sign",
]
