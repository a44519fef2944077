"""Structured logs: one JSON object per line on stderr, so a log shipper reads them as they are.

Call sites name an event and give its fields (``log_event(log, "tunnel_refused", caller=...,
reason=...)``); secrets are never passed as fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "teemesh_fields"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, {}))
        if record.exc_info and record.exc_info[1] is not None:
            doc["error"] = repr(record.exc_info[1])
        return json.dumps(doc, separators=(",", ":"), default=str)


def log_event(log: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    if log.isEnabledFor(level):
        log.log(level, event, extra={_FIELDS: fields})


def setup_json_logging(level: int = logging.INFO) -> None:
    """Route the ``teemesh`` loggers to stderr as JSON lines (once per process)."""
    root = logging.getLogger("teemesh")
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    logging.Formatter.converter = time.gmtime
