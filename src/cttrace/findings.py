"""Findings: what the correlator concluded, with the names a person acts on.

The JSON form is a contract with users (they pipe it into jq): the keys below
stay; new keys may be added.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from enum import StrEnum

from cttrace.events import Flow
from cttrace.identity.model import PodRef, ServiceRef


class Severity(StrEnum):
    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"


def rfc3339(ts: float) -> str:
    """``2026-11-22T15:04:05.123456Z`` for a wall-clock timestamp."""
    return (
        _dt.datetime.fromtimestamp(ts, tz=_dt.UTC).isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )


def _ref(ref: PodRef | ServiceRef | None) -> dict[str, object] | None:
    return None if ref is None else ref.to_json()


#: How a finding without a tuple (one decided from counters) writes ``orig`` and
#: ``target``: the keys stay, as the JSON contract says, with empty values.
_NO_ORIG = {"src": "", "sport": 0, "dst": "", "dport": 0}
_NO_TARGET = {"ip": "", "port": 0}


@dataclass(frozen=True, slots=True)
class Finding:
    rule: str  # the id of a rule of cttrace.rules (``wrong-pod``)
    severity: Severity
    ts: float  # when the finding was decided
    orig: Flow | None  # the client's view: src:sport -> VIP:port; None: about no tuple
    target: tuple[str, int] | None  # DNAT target ip, port; None: about no tuple
    summary: str  # one sentence a person reads first
    entry_id: int = 0
    created_ts: float | None = None  # when the conntrack entry was created
    replied_ts: float | None = None  # first reply (SYN_SENT -> SYN_RECV/ESTABLISHED)
    client: PodRef | None = None
    service: ServiceRef | None = None
    old_owner: PodRef | None = None  # owner of the target when the entry was created
    new_owner: PodRef | None = None  # owner of the target when it replied
    details: dict[str, object] = field(default_factory=dict)

    @property
    def unreplied_s(self) -> float | None:
        if self.created_ts is None:
            return None
        end = self.replied_ts if self.replied_ts is not None else self.ts
        return round(max(0.0, end - self.created_ts), 6)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": "finding",
            "rule": str(self.rule),
            "severity": str(self.severity),
            "ts": rfc3339(self.ts),
            "summary": self.summary,
            "orig": self.orig.to_json() if self.orig is not None else dict(_NO_ORIG),
            "target": ({"ip": self.target[0], "port": self.target[1]}
                       if self.target is not None else dict(_NO_TARGET)),
            "unreplied_s": self.unreplied_s,
            "entry_id": self.entry_id,
            "created": rfc3339(self.created_ts) if self.created_ts is not None else None,
            "replied": rfc3339(self.replied_ts) if self.replied_ts is not None else None,
            "client": _ref(self.client),
            "service": _ref(self.service),
            "old_owner": _ref(self.old_owner),
            "new_owner": _ref(self.new_owner),
        }
        out.update(self.details)
        return out
