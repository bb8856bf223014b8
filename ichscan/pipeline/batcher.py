"""Batches for the model: full ones, or a partial one once its oldest slice waited long enough."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

from ichscan.pipeline.series import ContextSlice
from ichscan.records import Status


class MicroBatcher:
    """Collects decoded slices until a batch is full or its oldest slice waited too long.

    Parameters
    ----------
    batch_size
        A batch goes to the model as soon as it holds this many ``ok`` slices.
    max_latency
        ...or once its first slice has waited this many seconds, so a trickle of single
        files is screened promptly while a burst still runs full batches. ``math.inf``
        (a finite run): only full batches, and what is left when ``take`` is forced.
    """

    def __init__(self, batch_size: int, max_latency: float):
        self.batch_size = max(1, batch_size)
        self.max_latency = max(0.0, max_latency)
        self._ok: list[ContextSlice] = []
        self._other: list[ContextSlice] = []
        self._since: float | None = None

    def __len__(self) -> int:
        return len(self._ok) + len(self._other)

    def add(self, decoded: Iterable[ContextSlice], now: float | None = None) -> None:
        for item in decoded:
            if self._since is None:
                self._since = time.monotonic() if now is None else now
            (self._ok if item.status == Status.OK else self._other).append(item)

    def series(self) -> set[str]:
        """The series (:attr:`ichscan.records.Instance.series_key`) of the slices held."""
        return {item.slice.instance.series_key for item in self._ok}

    def due_in(self, now: float) -> float | None:
        """Seconds until the latency bound forces a batch; ``None`` when empty, 0 when due."""
        if self._since is None:
            return None
        if len(self._ok) >= self.batch_size or len(self._other) >= self.batch_size:
            return 0.0
        if math.isinf(self.max_latency):
            return math.inf
        return max(0.0, self._since + self.max_latency - now)

    def take(self, now: float | None = None, force: bool = False) -> list[ContextSlice]:
        """The next batch when it is due (or ``force``); ``[]`` otherwise.

        At most ``batch_size`` ``ok`` slices; slices that need no model (``skipped``,
        ``error``) ride along with them.
        """
        now = time.monotonic() if now is None else now
        due = self.due_in(now)
        if due is None or (due > 0 and not force):
            return []
        batch = self._ok[: self.batch_size] + self._other
        self._ok = self._ok[self.batch_size :]
        self._other = []
        # What stays behind already waited: it goes with the next batch without a new wait
        # (without a latency bound it waits to fill up, as before).
        if not self._ok:
            self._since = None
        elif not math.isinf(self.max_latency):
            self._since = now - self.max_latency
        return batch
