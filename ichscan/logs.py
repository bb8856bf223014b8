"""Log set-up: text for people, JSON lines for log collectors (``ichscan --log-format``).

A JSON line holds ``timestamp`` (UTC, ISO 8601), ``level``, ``logger``, ``message`` and,
where the log call names an instance, series or study (``extra=uid_fields(...)``), the
fields ``study_instance_uid``, ``series_instance_uid`` and ``sop_instance_uid``; an
exception adds ``exception`` (the traceback as text). Nothing else a record carries is
written: a library's or plugin's ``extra`` cannot put patient data into the log. ichscan's
own messages name files and UIDs, never patients.
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOG_FORMATS = ("text", "json")

#: The record attributes a JSON line may carry besides the fixed ones, in this order.
UID_FIELDS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid")


def uid_fields(study: str | None = None, series: str | None = None, sop: str | None = None) -> dict[str, str]:
    """``extra=`` for a log call about a study, series or instance (empty values left out)."""
    values = {"study_instance_uid": study, "series_instance_uid": series, "sop_instance_uid": sop}
    return {name: str(value) for name, value in values.items() if value}


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, str] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in UID_FIELDS:
            value = getattr(record, name, None)
            if value:
                event[name] = str(value)
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return json.dumps(event, ensure_ascii=False)


def setup_logging(verbose: int = 0, quiet: bool = False, log_format: str = "text") -> None:
    """ichscan logs at INFO by default (what it did, where the results went); ``-v`` adds
    its debug messages, ``-vv`` also the libraries' (pydicom, pynetdicom...), which log
    chatter at INFO; ``-q`` keeps warnings and errors only. ``log_format`` ``json``
    writes :class:`JsonFormatter` lines to stderr instead of text."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("ichscan %(levelname)s %(name)s: %(message)s" if verbose > 1 else "ichscan %(levelname)s: %(message)s")
        )
    logging.basicConfig(level=logging.DEBUG if verbose > 1 else logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("ichscan").setLevel(level)
