"""What a scenario run leaves behind: the facts a test or a tracer's checker asserts on.

A :class:`ScenarioResult` names the client, the Service, the exact flow
(client IP, source port, VIP, port), where the DNAT sent it, the pods that
owned the target before and after, what each client attempt saw, when each
step happened, and the conntrack entries of the flow as ``conntrack -L``
printed them in the node namespace at the interesting moments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cttrace.events import Flow
from cttrace.identity.model import PodRef, ServiceRef

#: Narration callback: one human sentence per step.
StepCallback = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Step:
    name: str  # short id a test looks up ("pod-killed")
    ts: float  # wall clock, time.time()
    note: str  # the sentence the narration printed


@dataclass(frozen=True, slots=True)
class Attempt:
    """One client connect() through the VIP, as the client process saw it."""

    sport: int
    outcome: str  # answered, timeout, silent, closed, reset, refused, unreachable, error
    started: float  # just before connect(): the first SYN leaves now
    ended: float
    line: str | None  # the first line the server sent (the pod's identity), if answered
    error: str | None = None
    pid: int = 0  # the client process
    local: str | None = None  # the socket's own address (``::ffff:a.b.c.d``: v4-mapped)

    @property
    def answered_by(self) -> str | None:
        """``namespace/name`` from the identity line (``pod=billing/ledger-...``)."""
        if not self.line:
            return None
        for part in self.line.split():
            if part.startswith("pod="):
                return part[len("pod="):]
        return None

    @classmethod
    def from_report(cls, sport: int, pid: int, report: dict[str, Any]) -> Attempt:
        return cls(sport=sport, outcome=str(report["outcome"]), started=float(report["started"]),
                   ended=float(report["ended"]), line=report.get("line"),
                   error=report.get("error"), pid=pid, local=report.get("local"))


@dataclass(frozen=True, slots=True)
class Exchange:
    """One line a long-lived client sent, and whether it came back."""

    text: str
    sent_at: float
    outcome: str  # echoed, timeout, reset, closed
    echo: str | None


@dataclass(frozen=True, slots=True)
class ScenarioResult:
    scenario: str
    instance: str
    node_netns: str
    identity_path: str
    client: PodRef
    client_ip: str
    service: ServiceRef
    flow: Flow  # client_ip:sport -> VIP:port, the conntrack original direction
    target: tuple[str, int]  # where the DNAT sends the flow (pod IP, targetPort)
    old_pod: PodRef | None  # who owned the target when the flow's entry was created
    new_pod: PodRef | None  # who owns it when the flow is answered (recycled-ip)
    attempts: tuple[Attempt, ...]
    exchanges: tuple[Exchange, ...] = ()
    steps: tuple[Step, ...] = ()
    conntrack: dict[str, tuple[str, ...]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)  # kernel MIB counters read at the end
    options: dict[str, object] = field(default_factory=dict)
    proxy: str = ""  # who wrote the Service rules (cttrace.lab.proxies), set by Scenario.play

    def step(self, name: str) -> Step:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(f"no step {name!r} in {[s.name for s in self.steps]}")

    def to_json(self) -> dict[str, object]:
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
        }
        out["client"] = self.client.to_json()
        out["service"] = self.service.to_json()
        out["flow"] = self.flow.to_json()
        out["target"] = {"ip": self.target[0], "port": self.target[1]}
        out["old_pod"] = self.old_pod.to_json() if self.old_pod else None
        out["new_pod"] = self.new_pod.to_json() if self.new_pod else None
        out["attempts"] = [dataclasses.asdict(a) for a in self.attempts]
        out["exchanges"] = [dataclasses.asdict(e) for e in self.exchanges]
        out["steps"] = [dataclasses.asdict(s) for s in self.steps]
        out["conntrack"] = {k: list(v) for k, v in self.conntrack.items()}
        return out
