"""Series context: each slice with its neighbours along the slice normal, in position order.

A model with ``slice_context = k`` screens slice *s* together with the slices at
*s - k ... s + k* of the same series (SeriesInstanceUID), lowest position first. A
neighbour is the instance at the expected position ``s ± j·spacing`` (within half a
spacing); the spacing is SpacingBetweenSlices, else SliceThickness, else the smallest gap
between positions seen in the series. A neighbour that does not exist (the series' edge,
a gap, an instance that never came) repeats the nearest slice towards *s* that is there,
so an edge slice repeats itself.

A slice is released once every neighbour it can have is there:

* with a known index of the series (``batch`` reads the headers first, :meth:`expect`),
  a neighbour that is not in the index is missing for good, and one that is waits until
  it has been decoded (or failed);
* live (``watch``, ``serve-scp``), a missing neighbour waits until the series has been
  quiet for ``timeout`` seconds, then the slice goes with what is there;
* at the end of a finite run (``flush``) everything goes.

Arrival order never matters; each slice is released exactly once. Slices without a series
UID or without any position (no geometry, no InstanceNumber), and ``skipped``/``error``
ones, pass straight through and stand for all of their neighbours.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ichscan.records import DecodedSlice, Instance, ReadThrough, SliceResult, Status


_T = TypeVar("_T")


def repeat_nearest(slots: Sequence[_T | None]) -> tuple[_T, ...]:
    """The missing-neighbour rule: each ``None`` in ``2k + 1`` slots (lowest position first,
    the slice itself in the middle, never ``None``) becomes the nearest slot towards the
    middle that holds a slice, so an edge slice repeats itself.

    The one place the rule lives: the assembler applies it to what has arrived, training
    (:mod:`ichscan.train.dataset`) to neighbours that fail to decode.
    """
    k = len(slots) // 2
    if len(slots) % 2 != 1 or slots[k] is None:
        raise ValueError("slots must be 2k + 1 long with the slice itself in the middle")
    filled = list(slots)
    for side in (-1, 1):
        for j in range(1, k + 1):
            if filled[k + side * j] is None:
                filled[k + side * j] = filled[k + side * (j - 1)]
    return tuple(filled)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ContextSlice:
    """A slice ready for the model, with its ``2k + 1`` neighbours (itself in the middle);
    ``neighbours`` is empty for a slice that passes through alone."""

    slice: DecodedSlice
    neighbours: tuple[DecodedSlice, ...] = ()

    status = ReadThrough[Status]("slice")
    path = ReadThrough[str]("slice")


@dataclass
class _Member:
    decoded: DecodedSlice
    position: float
    released: bool = False


def _position(member: _Member) -> float:
    return member.position


@dataclass
class _Series:
    members: list[_Member] = field(default_factory=list)  # in position order
    #: From the headers (batch): path -> position of every instance still to arrive.
    expected: dict[str, float] = field(default_factory=dict)
    header_spacing: float | None = None
    last_arrival: float = -math.inf
    known: bool = False  # an index of the whole series was given (expect)

    def spacing(self) -> float | None:
        if self.header_spacing:
            return self.header_spacing
        positions = sorted({m.position for m in self.members} | set(self.expected.values()))
        gaps = [b - a for a, b in zip(positions, positions[1:], strict=False) if b - a > 1e-3]
        return min(gaps) if gaps else None


class SeriesAssembler:
    """Holds decoded slices until their neighbours are there (see the module docstring).

    Parameters
    ----------
    context
        Neighbours per side (the model's ``slice_context``); 0 passes every slice through.
    timeout
        Seconds a series must be quiet before slices with missing neighbours are released
        (live sources); ``math.inf`` to wait for :meth:`take` with ``flush``.
    """

    def __init__(self, context: int, timeout: float = math.inf):
        self.context = max(0, int(context))
        self.timeout = timeout
        self._series: dict[str, _Series] = {}
        self._expected_in: dict[str, str] = {}  # path -> series key, for indexed instances
        self._through: list[ContextSlice] = []
        #: Series announced from their headers (:meth:`expect`), kept after they are done.
        self.indexed: set[str] = set()

    # -- input -----------------------------------------------------------------------

    def expect(self, series_uid: str, path: str, position: float, spacing: float | None = None) -> None:
        """Announce an instance of a series before it is decoded (from its header)."""
        series = self._series.setdefault(series_uid, _Series())
        series.known = True
        self.indexed.add(series_uid)
        series.expected[path] = position
        if spacing and not series.header_spacing:
            series.header_spacing = spacing
        self._expected_in[path] = series_uid

    def add(self, decoded: Iterable[DecodedSlice], now: float) -> None:
        for item in decoded:
            key = self._expected_in.pop(item.path, None)
            if key is not None:
                self._series[key].expected.pop(item.path, None)
            instance = item.instance
            if (
                self.context == 0
                or item.status != Status.OK
                or not instance.series_instance_uid
                or instance.position is None
            ):
                self._through.append(ContextSlice(item))
                continue
            series = self._series.setdefault(instance.series_instance_uid, _Series())
            bisect.insort(series.members, _Member(item, instance.position), key=_position)
            series.last_arrival = now
            if instance.spacing and not series.header_spacing:
                series.header_spacing = instance.spacing

    # -- output ----------------------------------------------------------------------

    def __len__(self) -> int:
        """Slices held, not yet released."""
        return len(self._through) + sum(not m.released for s in self._series.values() for m in s.members)

    def waiting_series(self) -> int:
        """Series with a slice waiting for its neighbours."""
        return sum(any(not m.released for m in s.members) for s in self._series.values())

    def busy(self) -> set[str]:
        """Series with a slice still to come here or not released yet."""
        return {key for key, s in self._series.items() if s.expected or any(not m.released for m in s.members)}

    def due_in(self, now: float) -> float | None:
        """Seconds until a quiet series releases its waiting slices; ``None`` when none waits."""
        waits = [
            s.last_arrival + self.timeout - now for s in self._series.values() if any(not m.released for m in s.members)
        ]
        if self._through:
            return 0.0
        return max(0.0, min(waits)) if waits and math.isfinite(min(waits)) else None

    def take(self, now: float, flush: bool = False) -> list[ContextSlice]:
        """Every slice that is ready now (all with ``flush``), each exactly once."""
        ready, self._through = self._through, []
        for key in list(self._series):
            series = self._series[key]
            quiet = flush or now - series.last_arrival >= self.timeout
            spacing = series.spacing()
            for member in series.members:
                if member.released:
                    continue
                around = self._neighbours(series, member, spacing, quiet)
                if around is not None:
                    member.released = True
                    ready.append(ContextSlice(member.decoded, around))
            self._forget(key, series, spacing, quiet)
        return ready

    def _neighbours(self, series: _Series, member: _Member, spacing: float | None, quiet: bool) -> tuple[DecodedSlice, ...] | None:
        """The ``2k + 1`` slices around ``member``, or ``None`` while one may still come."""
        k = self.context
        slots: list[DecodedSlice | None] = [None] * (2 * k + 1)
        slots[k] = member.decoded
        for side in (-1, 1):
            for j in range(1, k + 1):
                found = self._at(series, member.position + side * j * spacing, spacing) if spacing else None
                if found is None and not quiet:
                    if not spacing or not series.known or self._expected_near(series, member.position + side * j * spacing, spacing):
                        return None  # it may still come
                if found is not None:
                    slots[k + side * j] = found.decoded
        return repeat_nearest(slots)  # the rest are missing for good

    @staticmethod
    def _at(series: _Series, target: float, spacing: float) -> _Member | None:
        """The member closest to ``target``, if within half a spacing (the first of equals)."""
        members, best = series.members, None
        i = bisect.bisect_left(members, target - spacing / 2, key=_position)
        while i < len(members) and members[i].position <= target + spacing / 2:
            if best is None or abs(members[i].position - target) < abs(best.position - target):
                best = members[i]
            i += 1
        return best

    @staticmethod
    def _expected_near(series: _Series, target: float, spacing: float) -> bool:
        return any(abs(p - target) <= spacing / 2 for p in series.expected.values())

    def _forget(self, key: str, series: _Series, spacing: float | None, quiet: bool) -> None:
        """Drop the pixels no waiting slice can need any more (bounded memory)."""
        if all(m.released for m in series.members) and not series.expected and (series.known or quiet):
            del self._series[key]
            return
        if not series.known or not spacing:
            return  # live: kept until the series is quiet and done
        reach = self.context * spacing + spacing / 2
        waiting = [m.position for m in series.members if not m.released] + list(series.expected.values())
        series.members = [
            m for m in series.members if not m.released or any(abs(m.position - p) <= reach for p in waiting)
        ]


def neighbour_indexes(instances: Sequence[Instance], context: int) -> list[tuple[int, ...]]:
    """For a complete set of slices (every one that will ever be there), the ``2k + 1``
    neighbours of each as indexes into ``instances``: exactly what the pipeline hands the
    model for the same files, because it is the same :class:`SeriesAssembler` that finds them.

    A slice without a series or a position stands for all of its neighbours, as in the
    pipeline. Used by training, which knows its slices from their headers.
    """
    group = 2 * max(0, int(context)) + 1
    stand_ins = [DecodedSlice(instance, Status.OK) for instance in instances]
    where = {id(s): i for i, s in enumerate(stand_ins)}
    result = [(i,) * group for i in range(len(instances))]
    assembler = SeriesAssembler(context)
    assembler.add(stand_ins, now=0.0)
    for ready in assembler.take(0.0, flush=True):
        if ready.neighbours:
            result[where[id(ready.slice)]] = tuple(where[id(n)] for n in ready.neighbours)
    return result


class WholeSeries:
    """Holds a series-head model's screened slices until their series is whole, then hands
    the series over (in position order) to be refined together.

    A series is whole

    * in a finite run whose source indexed the series from its headers (``batch``), once
      nothing of it is still on its way: every indexed instance decoded and through series
      context and batching (``busy`` says which series still have something there);
    * live (``watch``, ``serve-scp``), once no slice of it has come for ``timeout``
      seconds and nothing of it is on its way;
    * at the end of a finite run (``flush``), whatever is held.

    So ``batch`` and the live sources refine the same slices together for the same
    files. A slice that comes after its series was refined (live, later than the
    timeout) is refined with the others that come late. Slices that are not ``ok`` (and
    any without an embedding) are not held. A slice without a series or a position is a
    series of its own (:attr:`ichscan.records.Instance.series_key`).
    """

    def __init__(self, timeout: float = math.inf):
        self.timeout = timeout
        self._held: dict[str, list[SliceResult]] = {}
        self._last: dict[str, float] = {}
        self._through: list[SliceResult] = []

    def __len__(self) -> int:
        return len(self._through) + sum(len(members) for members in self._held.values())

    def add(self, results: Iterable[SliceResult], now: float) -> None:
        for result in results:
            if result.status != Status.OK or result.embedding is None:
                self._through.append(result)
                continue
            key = result.instance.series_key
            self._held.setdefault(key, []).append(result)
            self._last[key] = now

    def due_in(self, now: float) -> float | None:
        """Seconds until a held series goes quiet (live); ``None`` when none is held."""
        if self._through:
            return 0.0
        if not self._held or math.isinf(self.timeout):
            return None
        return max(0.0, min(self._last.values()) + self.timeout - now)

    def take(self, now: float, busy: set[str], indexed: set[str], flush: bool = False) -> list[list[SliceResult]]:
        """The series that are whole now, each in position order; results that are not
        held come as groups of one.

        ``busy``: series keys with slices still on their way (decode, context, batching);
        ``indexed``: series keys the source announced from their headers.
        """
        ready = [[result] for result in self._through]
        self._through = []
        for key in list(self._held):
            if not flush:
                if key in busy:
                    continue
                quiet = now - self._last[key] >= self.timeout
                if not quiet and key not in indexed:
                    continue
            members = self._held.pop(key)
            del self._last[key]
            ready.append(sorted(members, key=_series_order))
        return ready


def _series_order(result: SliceResult) -> tuple[float, str]:
    position = result.instance.position
    return (-math.inf if position is None else position, result.path)
