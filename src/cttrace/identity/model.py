"""The names a finding carries, and the questions the correlator asks of identity.

The correlator depends only on :class:`IdentityView`; the index fed by an
identity file or by the Kubernetes API implements it, and tests can hand in a
small fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PodRef:
    """A pod as findings name it. ``workload`` is ``Kind/name`` of its controller, if any."""

    uid: str
    namespace: str
    name: str
    workload: str | None = None
    node: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"namespace": self.namespace, "name": self.name, "uid": self.uid}
        if self.workload:
            out["workload"] = self.workload
        if self.node:
            out["node"] = self.node
        return out

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServiceRef:
    namespace: str
    name: str
    uid: str = ""

    def to_json(self) -> dict[str, object]:
        return {"namespace": self.namespace, "name": self.name}

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Ownership:
    """A stretch of time ``[since, until)`` during which ``pod`` held an IP; until=None: still."""

    pod: PodRef
    since: float
    until: float | None


class IdentityView(Protocol):
    """What the correlator asks. Times are wall-clock seconds (the identity's read time)."""

    def owner_at(self, ip: str, t: float) -> PodRef | None:
        """The pod holding ``ip`` at ``t``, or None when nobody (known) did."""
        ...

    def ownerships(self, ip: str) -> list[Ownership]:
        """Every known stretch of ownership of ``ip``, oldest first."""
        ...

    def service_for(self, vip: str, port: int, t: float) -> ServiceRef | None:
        """The Service whose ClusterIP (or other VIP) and port is ``vip:port`` at ``t``."""
        ...

    def is_endpoint(self, service: ServiceRef, ip: str, t0: float, t1: float,
                    pod_uid: str | None = None) -> bool | None:
        """Was ``ip`` (held by ``pod_uid``, when given) an endpoint of ``service`` at any time in
        ``[t0, t1]``? None when no EndpointSlice of that Service is known at all."""
        ...

    def pod_by_uid(self, uid: str) -> PodRef | None:
        ...

    @property
    def in_sync(self) -> bool:
        """True once the source has delivered a full picture (a file: read to its end once)."""
        ...

    @property
    def generation(self) -> int:
        """Bumped on every applied change, so callers can tell cheaply that something changed."""
        ...
