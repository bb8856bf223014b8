"""Delivery rounds: what every sender of a durable outbox shares.

An outbox records what is to be sent with one delivery row per destination (``state``
pending/sent/failed, ``attempts``, ``next_try``, ``last_error``, ``sent_at``) before
anything is sent. A :class:`DeliveryRounds` thread sends the pending rows of its
destinations, round after round:

* a round sends what is due, grouped by destination, then sleeps until the next row is
  due (or until :attr:`~DeliveryRounds.wake` is set: something new was recorded);
* a destination that cannot be reached (no connection, timeout, busy) is retried with
  exponential back-off from ``min_backoff`` to ``max_backoff`` seconds, for as long as the
  process runs, and by the next run: it is never given up;
* a refusal of one item (the destination answered, and said no) counts towards
  ``max_refusals``, after which the delivery is marked failed (a later run tries it once
  more);
* :meth:`~DeliveryRounds.drain` waits, at the end of a run, for what is pending.

:class:`ichscan.state.forwarder.Forwarder` (DICOM results by C-STORE or STOW-RS) and
:class:`ichscan.state.messages.MessageSender` (webhooks, FHIR) are the two senders; each
only says how to read its rows and how to send one destination's items.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from ichscan.state.ledger import printable
from ichscan.state.store import StateStore

log = logging.getLogger(__name__)

PENDING = "pending"
SENT = "sent"
FAILED = "failed"

#: Refusals before a delivery is given up; an unreachable destination is retried without limit.
MAX_REFUSALS = 8
#: How long a round sleeps when nothing is pending (a new item sets ``wake``).
IDLE_S = 3600.0


class Due(NamedTuple):
    """One pending delivery, as a round sees it."""

    destination: str
    #: What is delivered: the row's key in the deliveries table (a SOP Instance UID, an event id).
    key: str
    attempts: int
    next_try: float
    #: What the sender needs to send it (its file, its SOP class; its body...).
    detail: tuple[Any, ...] = ()


class DeliveryRounds(threading.Thread):
    """Sends the pending deliveries of ``destinations`` until stopped (see the module docstring).

    Subclasses set :attr:`table` and :attr:`key_column`, and implement :meth:`_pending`
    (every pending row of this sender, due or not, oldest first) and :meth:`_deliver`
    (send one destination's due items; report each outcome with :meth:`_sent`,
    :meth:`_refused` or :meth:`_unreachable`).

    Parameters
    ----------
    store
        The open state file.
    destinations
        This run's destinations, by the name the deliveries table keys them by: one
        dropped from the command line gets nothing more (its rows wait).
    scope
        An extra SQL condition on the deliveries row ``d`` (with its parameters), for a
        sender that shares its table with others (messages of another kind).
    """

    #: The deliveries table and the column that names what is delivered.
    table = "deliveries"
    key_column = "sop_instance_uid"
    #: Log wording: "<activity> 3 <things> to X failed".
    activity = "sending"
    things = "items"

    def __init__(
        self,
        store: StateStore,
        destinations: Sequence[str],
        *,
        name: str,
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        max_refusals: int = MAX_REFUSALS,
        scope: tuple[str, Sequence[Any]] = ("", ()),
    ):
        super().__init__(name=name, daemon=True)
        self.store = store
        self.destinations = list(dict.fromkeys(destinations))
        marks = ", ".join("?" * len(self.destinations))
        self._where = f"d.state = ? AND d.destination IN ({marks})" + (f" AND ({scope[0]})" if scope[0] else "")
        self._where_params: tuple[Any, ...] = (PENDING, *self.destinations, *scope[1])
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_refusals = max_refusals
        self.wake = threading.Event()
        self._stop_event = threading.Event()
        self._failures: dict[str, int] = {}
        #: Unreachable destinations and until when: what is recorded for one meanwhile waits
        #: too, behind what failed (so it is neither hammered nor sent out of order).
        self._blocked_until: dict[str, float] = {}

    # -- control -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop_event.set()
        self.wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for every pending delivery to go out; return how many are left."""
        deadline = time.monotonic() + timeout
        while True:
            self.wake.set()
            left = self._pending_count()
            if left == 0 or time.monotonic() >= deadline or not self.is_alive():
                return left
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def _pending_count(self) -> int:
        row = self.store.query_one(f"SELECT COUNT(*) FROM {self.table} d WHERE {self._where}", self._where_params)
        return int(row[0]) if row else 0

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                delay = self._round()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one bad round
                log.error("%s round failed: %s: %s; trying again in %.0f s", self.activity, type(exc).__name__, exc, self.max_backoff)
                delay = self.max_backoff
            self.wake.wait(delay)
            self.wake.clear()

    def _round(self) -> float:
        """Send what is due; return how long to sleep before the next round."""
        rows = self._pending()
        if not rows:
            return IDLE_S
        now = time.time()
        due: dict[str, list[Due]] = {}
        for row in rows:
            if max(row.next_try, self._blocked_until.get(row.destination, 0.0)) <= now:
                due.setdefault(row.destination, []).append(row)
        for destination, items in due.items():
            if self._stop_event.is_set():
                break
            self._deliver(destination, items)
        left = self._pending()
        if not left:
            return IDLE_S
        next_due = min(max(row.next_try, self._blocked_until.get(row.destination, 0.0)) for row in left)
        return max(0.05, next_due - time.time())

    def _pending(self) -> list[Due]:
        raise NotImplementedError

    def _deliver(self, destination: str, items: list[Due]) -> None:
        raise NotImplementedError

    # -- outcomes ----------------------------------------------------------------------

    def _backoff(self, destination: str) -> float:
        n = self._failures.get(destination, 0) + 1
        self._failures[destination] = n
        return min(self.max_backoff, self.min_backoff * 2 ** (n - 1))

    def _sent(self, destination: str, item: Due) -> None:
        self._mark(destination, item.key, SENT, "")
        self._failures.pop(destination, None)
        self._blocked_until.pop(destination, None)

    def _unreachable(self, destination: str, items: Sequence[Due], reason: str) -> None:
        """The destination cannot be reached: retried for as long as we run, never given up."""
        wait = self._backoff(destination)
        # One instant for the items and the destination: the failed items are due no later
        # than what was recorded meanwhile, so they go first.
        until = self._blocked_until[destination] = time.time() + wait
        with self.store.transaction():
            self.store.executemany(
                f"UPDATE {self.table} SET next_try = ?, last_error = ? WHERE {self.key_column} = ? AND destination = ?",
                [(until, printable(reason), item.key, destination) for item in items],
            )
        log.warning("%s %d %s to %s failed (%s); retrying in %.0f s", self.activity, len(items), self.things, destination, reason, wait)

    def _refused(self, destination: str, item: Due, reason: str, retry_in: float | None = None) -> None:
        """This item was refused (or cannot be read): retried, then given up after
        ``max_refusals`` tries; a later run tries a given-up delivery once more."""
        attempts = item.attempts + 1
        if attempts >= self.max_refusals:
            self._mark(destination, item.key, FAILED, reason)
            log.error("giving up %s %s to %s after %d tries: %s", self.activity, item.key, destination, attempts, reason)
            return
        wait = retry_in if retry_in is not None else min(self.max_backoff, self.min_backoff * 2 ** (attempts - 1))
        with self.store.transaction():
            self.store.execute(
                f"UPDATE {self.table} SET attempts = ?, next_try = ?, last_error = ? WHERE {self.key_column} = ? AND destination = ?",
                (attempts, time.time() + wait, printable(reason), item.key, destination),
            )
        log.warning(
            "%s %s to %s failed (%s); try %d of %d in %.0f s", self.activity, item.key, destination, reason, attempts, self.max_refusals, wait
        )

    def _mark(self, destination: str, key: str, state: str, error: str) -> None:
        with self.store.transaction():
            self.store.execute(
                f"UPDATE {self.table} SET state = ?, last_error = ?, sent_at = ? WHERE {self.key_column} = ? AND destination = ?",
                (state, printable(error), time.time() if state == SENT else None, key, destination),
            )
