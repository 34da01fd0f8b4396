"""The agent's log records are JSON lines of its stdout stream, with their extra fields."""

from __future__ import annotations

import logging

from cttrace.json_log import logging_to


def test_records_become_json_lines_with_their_fields_and_nothing_else_while_routed() -> None:
    lines: list[dict[str, object]] = []
    log = logging.getLogger("cttrace.sinks.alertmanager")
    with logging_to(lines.append):
        log.warning("cannot deliver alerts to %s", "http://am:9093", extra={
            "fields": {"url": "http://am:9093"}})
        log.debug("not at INFO")
    log.warning("after: not routed")
    assert len(lines) == 1
    line = lines[0]
    assert line["kind"] == "log" and line["level"] == "warning"
    assert line["logger"] == "cttrace.sinks.alertmanager"
    assert line["msg"] == "cannot deliver alerts to http://am:9093"
    assert line["url"] == "http://am:9093"
    assert isinstance(line["ts"], str) and line["ts"].endswith("Z")
