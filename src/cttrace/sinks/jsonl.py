"""One JSON object per line (orjson): what ``watch --output json`` and pipes get.

Findings are written and flushed as they are decided (a pipe reader must not
wait for a buffer to fill); status lines are throttled.
"""

from __future__ import annotations

import dataclasses
from typing import BinaryIO

import orjson

from cttrace.events import CtEvent, Event, state_name, status_names
from cttrace.filters import Filter
from cttrace.findings import Finding, rfc3339
from cttrace.runtime import Status


class JsonLinesSink:
    def __init__(self, out: BinaryIO, flt: Filter | None = None, *, flows: bool = False,
                 status_every: float = 10.0) -> None:
        self.out = out
        self.filter = flt or Filter()
        self.flows = flows
        self.status_every = status_every
        self._last_status = float("-inf")
        self._last_events: tuple[float, int] | None = None  # (ts, events) of the last line

    def _write(self, obj: dict[str, object]) -> None:
        self.out.write(orjson.dumps(obj) + b"\n")
        self.out.flush()

    def finding(self, finding: Finding) -> None:
        if self.filter.finding(finding):
            self._write(finding.to_json())

    def event(self, event: Event) -> None:
        if not self.flows or not isinstance(event, CtEvent):
            return
        if not self.filter.flow((event.orig.src, event.orig.dst, event.reply.src), None, None,
                                None):
            return
        self._write({
            "kind": "flow",
            "ts": rfc3339(event.ts),
            "event": event.kind.name.lower(),
            "entry_id": event.entry_id,
            "orig": event.orig.to_json(),
            "target": {"ip": event.reply.src, "port": event.reply.sport},
            "state": state_name(event.tcp_state),
            "old_state": state_name(event.old_tcp_state) if event.old_tcp_state is not None
            else None,
            "status": status_names(event.status),
            "status_raw": event.status,
            "source": event.source,
        })

    def status(self, status: Status) -> None:
        if status.ts - self._last_status >= self.status_every:
            self._last_status = status.ts
            # events_per_s over the interval this line covers (since the previous line),
            # not over the pipeline's last second: lines are status_every apart.
            mark = self._last_events
            if mark is not None and status.ts > mark[0]:
                rate = (status.events - mark[1]) / (status.ts - mark[0])
                status = dataclasses.replace(status, events_per_s=rate)
            self._last_events = (status.ts, status.events)
            self._write(status.to_json())

    def note(self, obj: dict[str, object]) -> None:
        """Write a line of another kind (``summary``, ``source``)."""
        self._write(obj)

    def close(self) -> None:
        self.out.flush()
