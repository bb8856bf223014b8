"""What the fuzz harnesses share: a scratch folder, and the checks that make a finding.

A harness raises :class:`Finding` (an AssertionError, so libFuzzer reports it as a crash
with the input saved) when the code under test breaks its contract without raising
anything itself: a row without a reason, a reason over several lines, two rows for one file.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import warnings

# pydicom warns about every odd value it meets; a fuzzer meets thousands a second, and
# printing them costs more than the run. A harness judges results, not warnings.
warnings.simplefilter("ignore")


class Finding(AssertionError):
    """The code under test returned, but not what its contract promises."""


def scratch(name: str) -> str:
    """A fresh folder for this process's temporary files, in memory where Linux has one
    (the store's fsyncs and the temp files then cost no disk I/O)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix=f"ichscan-fuzz-{name}-", dir=base)


def empty_folder(path: str) -> None:
    """Remove what is in ``path`` (a store that filled up with mutated UIDs), keep the folder."""
    for name in os.listdir(path):
        full = os.path.join(path, name)
        shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.unlink(full)


class _FormatEveryRecord(logging.Handler):
    """Formats every log record and drops it: a log call that cannot be formatted (``%d`` of a
    string, a ``repr`` that raises) is a finding, which logging would only print and carry on."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        raise Finding(f"log record {record.msg!r} cannot be formatted with {record.args!r}")


def check_log_calls() -> None:
    """Route every log record through :class:`_FormatEveryRecord` instead of stderr."""
    root = logging.getLogger()
    root.handlers[:] = [_FormatEveryRecord()]
    root.setLevel(logging.DEBUG)


def check_reason(reason: object, what: str, limit: int = 300) -> None:
    """A reason is one non-empty line of at most ``limit`` characters."""
    if not isinstance(reason, str) or not reason.strip():
        raise Finding(f"{what}: no reason ({reason!r})")
    if "\n" in reason or "\r" in reason:
        raise Finding(f"{what}: the reason is not one line: {reason[:200]!r}")
    if len(reason) > limit:
        raise Finding(f"{what}: the reason is {len(reason)} characters, over {limit}")


# -- input layouts (the harnesses read them, seeds.py writes them) ---------------------------

#: stow: the first byte's bits, defined with the request they describe in tests/helpers.py
#: (the regression tests replay the inputs through the same function).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tests"))
from helpers import STOW_CHUNKED as CHUNKED, STOW_CONTENT_TYPE as CONTENT_TYPE, STOW_STUDY_URL as STUDY_URL  # noqa: E402,F401


def accepted_syntaxes() -> list[str]:
    """cstore: the transfer syntaxes the C-STORE receiver accepts, as the first byte indexes them."""
    from ichscan.sources.scp import decodable_transfer_syntaxes

    return [str(uid) for uid in decodable_transfer_syntaxes()]
