"""Python ``logging`` records as the agent's JSON log lines.

Why it exists: the agent's stdout is one JSON object per line, which is what a
cluster's log pipeline parses; records logged by its parts (an Alertmanager that
cannot be reached, an alert dropped from a full queue) must be lines of the same
stream, not plain text on stderr that the pipeline cannot tell apart. A record
logged with ``extra={"fields": {...}}`` carries those keys as well.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from cttrace.findings import rfc3339

Note = Callable[[dict[str, object]], None]


class JsonLogHandler(logging.Handler):
    """Writes each record as ``{"kind": "log", "ts", "level", "logger", "msg", ...}``."""

    def __init__(self, note: Note) -> None:
        super().__init__()
        self._note = note

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line: dict[str, object] = {
                "kind": "log", "ts": rfc3339(record.created),
                "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage(),
            }
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict):
                line.update(fields)
            self._note(line)
        except Exception:  # a log line must never take the agent down
            self.handleError(record)


@contextmanager
def logging_to(note: Note, level: int = logging.INFO) -> Iterator[None]:
    """Route the ``cttrace`` loggers' records at ``level`` and up to ``note`` meanwhile."""
    logger = logging.getLogger("cttrace")
    handler = JsonLogHandler(note)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # not also as plain text through the root logger
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
