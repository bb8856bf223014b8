"""Watch a folder for files that land in it, and hand them over once complete.

Senders (modalities, PACS exports, network shares) write slowly and often under a
temporary name renamed at the end. A file is handed over only when it has *settled*:
its size and mtime unchanged for a settle interval. Names that look temporary
(``*.part``, ``*.tmp``, a leading dot...) are ignored until renamed. Events come from
watchdog (inotify on Linux, or its polling observer for network filesystems where
inotify sees nothing); a startup scan finds files already there and a periodic rescan
catches anything an event missed (a queue overflow, a watch limit, a folder removed
and recreated).

Only regular files are candidates: symbolic links and FIFOs, sockets or devices are
logged once and ignored (a FIFO would block a reader forever).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import queue
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from ichscan.state.ledger import FileIdentity
from ichscan.sources.base import Entry
from ichscan.sources.folder import Outputs

log = logging.getLogger(__name__)

#: Names ignored until renamed: partial downloads and editors' or copiers' temporaries.
TEMPORARY_PATTERNS: tuple[str, ...] = ("*.part", "*.partial", "*.filepart", "*.crdownload", "*.tmp", "*.temp", "*~")
#: Remember at most this many paths already logged as ignored (symlinks, FIFOs...).
_MAX_LOGGED = 10_000


def is_temporary(name: str, patterns: Iterable[str] = TEMPORARY_PATTERNS) -> bool:
    """True for names to leave alone until renamed: hidden (leading dot) or temporary-looking."""
    if name.startswith("."):
        return True
    lower = name.lower()
    return any(fnmatch.fnmatchcase(lower, pattern) for pattern in patterns)


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    changed_at: float  # monotonic time the size or mtime was last seen to change
    checked: bool = False  # seen unchanged at least once after the first look


class Settler:
    """Tracks candidate files until their size and mtime stay unchanged for ``settle`` seconds.

    Parameters
    ----------
    settle
        Seconds a file's size and mtime must stay the same before it is handed over.
    """

    def __init__(self, settle: float):
        self.settle = max(0.0, settle)
        self._candidates: dict[str, _Candidate] = {}

    def __len__(self) -> int:
        return len(self._candidates)

    def __contains__(self, path: str) -> bool:
        return path in self._candidates

    def observe(self, path: str, st: os.stat_result, now: float | None = None) -> None:
        """Note a (new or changed) candidate; a change restarts its settle interval."""
        now = time.monotonic() if now is None else now
        known = self._candidates.get(path)
        if known is None or (known.size, known.mtime_ns) != (st.st_size, st.st_mtime_ns):
            self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now)

    def discard(self, path: str) -> None:
        self._candidates.pop(path, None)

    def settled(self, now: float | None = None, hold: Callable[[str], bool] | None = None) -> list[FileIdentity]:
        """Stat every candidate; return (and forget) those that settled.

        A candidate that vanished is dropped (deleted before it settled: nothing was
        accepted); one that changed starts over; one that is no longer a regular file
        is dropped. ``hold(path)`` true keeps a settled file for a later call (it is
        still being screened under an older identity).
        """
        now = time.monotonic() if now is None else now
        ready: list[FileIdentity] = []
        for path, cand in list(self._candidates.items()):
            try:
                st = os.lstat(path)
            except OSError:
                log.debug("%s vanished before it settled", path)
                del self._candidates[path]
                continue
            if not stat.S_ISREG(st.st_mode):
                del self._candidates[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now)
                continue
            if not cand.checked:
                cand.checked = True
            if now - cand.changed_at >= self.settle and cand.checked:
                if hold is not None and hold(path):
                    continue
                del self._candidates[path]
                ready.append(FileIdentity(path, st.st_size, st.st_mtime_ns))
        return ready


class _EventHandler(FileSystemEventHandler):
    """Runs on the observer thread: only queues paths for the main loop."""

    def __init__(self, events: queue.SimpleQueue[tuple[str, str]], wakeup: threading.Event):
        self.events = events
        self.wakeup = wakeup

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return  # reads, ours included: nothing changed
        path = os.fsdecode(event.dest_path if kind == "moved" else event.src_path)
        if event.is_directory:
            # A folder created or moved in may hold files that arrived before its watch did.
            if kind in ("created", "moved"):
                self.events.put(("dir", path))
            elif kind == "deleted":
                self.events.put(("gone", path))
            else:
                return
        elif kind == "deleted":
            self.events.put(("gone", path))
        else:
            self.events.put(("file", path))
        self.wakeup.set()


class _OverflowDetector(logging.Handler):
    """watchdog only logs an inotify queue overflow: turn that log line into a rescan."""

    def __init__(self, flag: threading.Event, wakeup: threading.Event):
        super().__init__(logging.WARNING)
        self.flag = flag
        self.wakeup = wakeup

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.flag.set()
            self.wakeup.set()


class FolderWatcher:
    """A watchdog observer on ``root`` that queues event paths for the main loop.

    Parameters
    ----------
    root
        The folder to watch (recursively).
    poll
        Use watchdog's polling observer (network filesystems) instead of inotify.
    poll_interval
        Seconds between the polling observer's snapshots.

    Notes
    -----
    When the observer cannot start (inotify watch or instance limits) the watcher
    runs without events and the caller relies on rescans (:attr:`events_ok` false).
    """

    def __init__(self, root: str, *, poll: bool = False, poll_interval: float = 1.0):
        self.root = root
        self.poll = poll
        self.poll_interval = poll_interval
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.wakeup = threading.Event()
        self.overflowed = threading.Event()
        self.events_ok = False
        self._observer: BaseObserver | None = None
        self._root_id: tuple[int, int] | None = None
        self._overflow_handler = _OverflowDetector(self.overflowed, self.wakeup)

    def start(self) -> bool:
        """Start (or restart) the observer; ``False`` when events are unavailable."""
        self.stop()
        logging.getLogger("watchdog").addHandler(self._overflow_handler)
        observer: BaseObserver = PollingObserver(timeout=self.poll_interval) if self.poll else Observer()
        try:
            st = os.stat(self.root)
            self._root_id = (st.st_dev, st.st_ino)
            observer.schedule(_EventHandler(self.events, self.wakeup), self.root, recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("cannot watch %s for events (%s); relying on rescans", self.root, exc.strerror or exc)
            self.events_ok = False
            try:
                observer.stop()
            except Exception:  # noqa: BLE001 - it may not have started at all
                pass
            return False
        self._observer = observer
        self.events_ok = True
        return True

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        self.events_ok = False
        logging.getLogger("watchdog").removeHandler(self._overflow_handler)

    def healthy(self) -> bool:
        """True while the observer runs on the same folder it started on.

        False when the folder was removed (and maybe recreated: a new inode needs a new
        watch) or the observer thread died; the caller restarts and rescans.
        """
        try:
            st = os.stat(self.root)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != self._root_id:
            return False
        if self._observer is None:
            return False
        return self._observer.is_alive() and all(e.is_alive() for e in self._observer.emitters)

    def drain(self) -> list[tuple[str, str]]:
        """Every queued event, oldest first, without waiting."""
        out: list[tuple[str, str]] = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out


class IgnoredLog:
    """Logs each ignored path once (symlinks, FIFOs...), with a bounded memory."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def note(self, path: str, why: str) -> None:
        if path in self._seen:
            return
        if len(self._seen) >= _MAX_LOGGED:
            self._seen.clear()
        self._seen.add(path)
        log.warning("ignoring %s: %s", path, why)


def classify(st: os.stat_result) -> str | None:
    """``None`` for a regular file, else why it is ignored."""
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISLNK(st.st_mode):
        return "symbolic link (not followed in a watched folder)"
    if stat.S_ISFIFO(st.st_mode):
        return "named pipe (FIFO), not a file"
    if stat.S_ISDIR(st.st_mode):
        return "folder"
    return "not a regular file"


def scan_tree(root: str, skip_dir: Callable[[str], bool] = lambda path: False) -> Iterator[str]:
    """Every path under ``root`` worth a look: non-hidden, non-temporary names, sorted.

    Folder links are not followed; what a path is (file, link, FIFO) is for the caller
    to check with ``lstat``. Unreadable folders are logged and skipped.
    """

    def on_error(exc: OSError) -> None:
        log.warning("cannot scan %s: %s", exc.filename, exc.strerror or exc)

    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not skip_dir(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            if not is_temporary(name):
                yield os.path.join(dirpath, name)


#: How often the watched folder itself is checked (removed, recreated, observer dead).
_HEALTH_S = 1.0
#: Rescan interval while events are unavailable (watch limits, folder gone).
_FALLBACK_RESCAN_S = 5.0


class WatchSource:
    """A watched folder as a live source (``ichscan watch``; ``serve-scp`` for its store).

    1. events, the startup scan and periodic rescans make *candidates*; a candidate the
       ledger has screened under the same identity (path, size, mtime) is dropped;
    2. a candidate whose size and mtime stay unchanged for ``settle`` seconds is handed
       over (the pipeline records it as queued in the ledger before a worker sees it);
    3. with a quarantine folder, files that got an ``error`` row are moved there.
    """

    live = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        settle: float = 2.0,
        poll: bool = False,
        poll_interval: float = 1.0,
        rescan_interval: float = 60.0,
        quarantine: str | os.PathLike[str] | None = None,
    ):
        self.root = os.path.abspath(root)
        self.poll_events = poll
        self.rescan_interval = rescan_interval
        self.quarantine = os.path.abspath(quarantine) if quarantine is not None else None
        self.quarantined = 0
        self.watcher = FolderWatcher(self.root, poll=poll, poll_interval=poll_interval)
        self.settler = Settler(settle)
        self.ignored = IgnoredLog()
        # Settled, not yet handed over; by path, so a file settling twice is queued once.
        self.backlog: OrderedDict[str, FileIdentity] = OrderedDict()
        self._stopped = False
        self._root_present = True
        self._next_health = 0.0
        self._next_rescan = 0.0

    # -- Source ------------------------------------------------------------------------

    def open(self, pipeline) -> None:
        self.pipeline = pipeline
        self.exclusions = pipeline.exclusions or Outputs()
        # Events first, then the scan: a file landing in between is seen by one or both.
        self.watcher.start()
        self.scan("startup scan")
        now = time.monotonic()
        self._next_health = now + _HEALTH_S
        self._next_rescan = now + self._rescan_interval()

    def poll(self, now: float, limit: int) -> list[Entry]:
        if self._stopped:
            return []
        self._handle_events()
        if now >= self._next_health:
            self._next_health = now + _HEALTH_S
            self._root_present = self._check_root(self._root_present)
        if self.watcher.overflowed.is_set():
            self.watcher.overflowed.clear()
            log.warning("events were lost (queue overflow); rescanning %s", self.root)
            self.scan("rescan after overflow")
        if self._root_present and now >= self._next_rescan:
            self.scan("periodic rescan")
            self._next_rescan = time.monotonic() + self._rescan_interval()
        ledger = self.pipeline.ledger
        for ident in self.settler.settled(now, hold=self.pipeline.in_flight.__contains__):
            if ledger is None or ledger.is_done(ident) is None:
                self.backlog.pop(ident.path, None)
                self.backlog[ident.path] = ident
        out: list[Entry] = []
        while self.backlog and len(out) < limit:
            _, ident = self.backlog.popitem(last=False)
            out.append(Entry(ident.path, "", ident.size, ident.mtime_ns))
        return out

    def wait(self, timeout: float) -> None:
        self.watcher.wakeup.wait(timeout)
        self.watcher.wakeup.clear()

    def stop(self) -> None:
        self._stopped = True

    @property
    def finished(self) -> bool:
        return self._stopped

    def on_results(self, results) -> None:
        errors = [r.path for r in results if r.status == "error"]
        if errors and self.quarantine is not None:
            self._quarantine(errors)

    def close(self) -> None:
        self.watcher.stop()

    # -- candidates --------------------------------------------------------------------

    def consider(self, path: str) -> None:
        """A path seen by an event or a scan: settle it unless ignored or already screened."""
        if is_temporary(os.path.basename(path)) or self._hidden_below_root(path, False) or path in self.exclusions:
            return
        try:
            st = os.lstat(path)
        except OSError:
            self.settler.discard(path)
            return
        why = classify(st)
        if why is not None:
            if why != "folder":
                self.ignored.note(path, why)
            return
        ident = FileIdentity(path, st.st_size, st.st_mtime_ns)
        ledger = self.pipeline.ledger
        done = ledger.is_done(ident) if ledger is not None else None
        if done is not None:
            self.settler.discard(path)
            if done.status == "error" and self.quarantine is not None:
                self._quarantine([path])  # screened before its move: finish the job
            return
        self.settler.observe(path, st)

    def _hidden_below_root(self, path: str, is_dir: bool) -> bool:
        """True outside the root or inside a hidden folder (as :func:`scan_tree` skips them)."""
        rel = os.path.relpath(path, self.root)
        if rel == ".":
            return False
        folders = rel.split(os.sep) if is_dir else rel.split(os.sep)[:-1]
        return rel.startswith("..") or any(part.startswith(".") for part in folders)

    def scan(self, why: str) -> None:
        start = time.monotonic()
        before = len(self.settler)
        n = 0
        for path in scan_tree(self.root, skip_dir=lambda d: d in self.exclusions):
            n += 1
            self.consider(path)
        log.debug("%s: %d files looked at, %d new candidates, %.2f s", why, n, len(self.settler) - before, time.monotonic() - start)

    def _handle_events(self) -> None:
        for kind, path in self.watcher.drain():
            if kind == "file":
                self.consider(path)
            elif kind == "dir":
                if not self._hidden_below_root(path, True) and path not in self.exclusions:
                    for sub in scan_tree(path, skip_dir=lambda d: d in self.exclusions):
                        self.consider(sub)
            elif kind == "gone":
                self.settler.discard(path)

    def _quarantine(self, paths: list[str]) -> None:
        assert self.quarantine is not None
        for path in paths:
            if not os.path.lexists(path):
                continue
            rel = os.path.relpath(path, self.root)
            dest = os.path.join(self.quarantine, rel)
            n = 1
            while os.path.lexists(dest):
                dest = os.path.join(self.quarantine, f"{rel}.{n}")
                n += 1
            try:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.move(path, dest)
            except OSError as exc:
                log.error("cannot move %s to quarantine: %s", path, exc.strerror or exc)
                continue
            self.quarantined += 1
            log.warning("moved %s to %s", path, dest)

    # -- health ------------------------------------------------------------------------

    def _rescan_interval(self) -> float:
        interval = self.rescan_interval if self.rescan_interval > 0 else float("inf")
        return interval if self.watcher.events_ok else min(interval, _FALLBACK_RESCAN_S)

    def _check_root(self, was_present: bool) -> bool:
        if self.watcher.healthy():
            return True
        if not os.path.isdir(self.root):
            if was_present:
                log.warning("watched folder %s is gone; waiting for it to come back", self.root)
                self.watcher.stop()
            return False
        if not was_present:
            log.warning("watched folder %s is back", self.root)
        elif self.watcher.events_ok:
            log.warning("restarting the watch on %s (folder replaced or observer stopped)", self.root)
        else:
            return True  # running on rescans alone already
        self.watcher.start()
        self.scan("rescan after restart")
        return True
