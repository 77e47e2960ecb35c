"""Structured logs shared by every process (API, workers, managers).

``setup_logging("json")`` makes every record one JSON object on one line: time, level, logger,
message, process name, and the ids of what the process works on. Ids come from two places:

* ``extra=`` of a log call: ``log.info("moved", extra={"transfer_id": 7, "site": "cologne"})``;
* the current context (:func:`log_context`): every record written inside
  ``with log_context(task_id=..., package_id=...)`` carries those ids too (a context variable,
  so threads and asyncio tasks each keep their own).

The format is chosen with ``CCAT_LOG_FORMAT`` (``json`` or ``text``) and the level with
``CCAT_LOG_LEVEL``; services default to JSON, interactive commands to text.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TextIO

#: The id fields the pipeline logs carry (when known); any other ``extra`` key is kept too.
ID_FIELDS = (
    "task_id",
    "task_name",
    "kind",
    "record_id",
    "package_id",
    "raw_data_package_id",
    "data_transfer_package_id",
    "transfer_id",
    "file_id",
    "staging_job_id",
    "copy_id",
    "site",
    "location",
    "manager",
    "request_id",
)

#: Attributes every LogRecord has: everything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

_context: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "ccat_log_context", default=None
)


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Attach ``ids`` to every record logged inside the ``with`` block (None values dropped)."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in ids.items() if v is not None})
    token = _context.set(current)
    try:
        yield
    finally:
        _context.reset(token)


def push_context(**ids: Any) -> contextvars.Token[Mapping[str, Any] | None]:
    """Like :func:`log_context` without ``with`` (for ASGI middleware): pass the result to
    :func:`pop_context` when done."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in ids.items() if v is not None})
    return _context.set(current)


def pop_context(token: contextvars.Token[Mapping[str, Any] | None]) -> None:
    """Undo a :func:`push_context`."""
    _context.reset(token)


def bind(**ids: Any) -> None:
    """Attach ``ids`` to the records of the current context until it ends (no ``with``)."""
    current = dict(_context.get() or {})
    current.update({k: v for k, v in ids.items() if v is not None})
    _context.set(current)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, ``process`` and ids."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (exceptions as ``exc`` text)."""
        doc: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        if self.service:
            doc["service"] = self.service
        for key, value in (_context.get() or {}).items():
            doc.setdefault(key, _plain(value))
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in doc:
                doc[key] = _plain(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Human-readable lines; ids appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The classic line plus the record's ids."""
        line = super().format(record)
        ids = dict(_context.get() or {})
        ids.update(
            {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
        )
        if ids:
            line += " " + " ".join(f"{k}={v}" for k, v in ids.items())
        return line


def log_format(default: str = "json") -> str:
    """The format asked for by ``CCAT_LOG_FORMAT`` (``json`` or ``text``), else ``default``."""
    value = os.environ.get("CCAT_LOG_FORMAT", default).strip().lower()
    if value not in ("json", "text"):
        raise ValueError(f"CCAT_LOG_FORMAT must be 'json' or 'text', not {value!r}")
    return value


def setup_logging(
    fmt: str | None = None,
    level: str | int | None = None,
    service: str | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Route every logger's records to ``stream`` (stderr) in ``fmt``; returns the handler.

    ``fmt`` defaults to ``CCAT_LOG_FORMAT`` (else json), ``level`` to ``CCAT_LOG_LEVEL``
    (else INFO). Existing root handlers are replaced, so calling it twice is harmless.
    """
    fmt = fmt or log_format()
    if fmt not in ("json", "text"):
        raise ValueError(f"log format must be 'json' or 'text', not {fmt!r}")
    if level is None:
        level = os.environ.get("CCAT_LOG_LEVEL", "INFO")
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            raise ValueError("CCAT_LOG_LEVEL must be a level name such as INFO or DEBUG")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def uvicorn_log_config(fmt: str, level: str = "info", service: str = "api") -> dict[str, Any]:
    """A ``logging.config`` dict for uvicorn that writes its records through our formatter."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter, "service": service} if fmt == "json" else {"()": TextFormatter}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {
            "main": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["main"], "level": level.upper()},
        "loggers": {
            "uvicorn": {"level": level.upper()},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"level": level.upper()},
        },
    }


#: The log field naming the record id each kind of transfer task works on.
TASK_ID_FIELDS = {
    "raw_data_package": "raw_data_package_id",
    "data_transfer_package": "data_transfer_package_id",
    "data_transfer": "transfer_id",
    "unpack": "transfer_id",
    "long_term_archive_transfer": "archive_transfer_id",
    "staging_job": "staging_job_id",
    "deletion": "copy_ids",
    "fixity": "copy_id",
}


def task_log_ids(kind: str, payload: Any, task_id: str | None = None) -> dict[str, Any]:
    """The ids a transfer task's log records carry: kind, record id, Celery task id."""
    ids: dict[str, Any] = {"kind": kind, TASK_ID_FIELDS.get(kind, "record_id"): payload}
    if task_id:
        ids["task_id"] = task_id
    return ids
