"""``--namespace/--service/--ip/--rule``: which findings and flows a user asked to see."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cttrace.addr import canonical
from cttrace.findings import Finding
from cttrace.identity.model import PodRef, ServiceRef


@dataclass(frozen=True, slots=True)
class Filter:
    namespaces: frozenset[str] = frozenset()
    services: frozenset[str] = frozenset()  # "name" or "namespace/name"
    ips: frozenset[str] = frozenset()
    rules: frozenset[str] = frozenset()

    @classmethod
    def build(cls, *, namespaces: Iterable[str] = (), services: Iterable[str] = (),
              ips: Iterable[str] = (), rules: Iterable[str] = ()) -> Filter:
        from cttrace.rules import ids

        known = set(ids())
        bad = [r for r in rules if r not in known]
        if bad:
            from cttrace.errors import UserError

            raise UserError(f"unknown rule {bad[0]!r}: choose from {', '.join(sorted(known))}")
        try:
            # Events carry inet_ntop text: FD00:0::5 must match fd00::5.
            canonical_ips = frozenset(canonical(ip) for ip in ips)
        except ValueError as err:
            from cttrace.errors import UserError

            raise UserError(f"--ip: {err}") from None
        return cls(frozenset(namespaces), frozenset(services), canonical_ips, frozenset(rules))

    @property
    def empty(self) -> bool:
        return not (self.namespaces or self.services or self.ips or self.rules)

    def finding(self, f: Finding) -> bool:
        if self.rules and str(f.rule) not in self.rules:
            return False
        if self.ips and not self.ips & _ips_of(f):
            return False
        return self._names(f.client, f.service, f.old_owner, f.new_owner)

    def flow(self, ips: Iterable[str], client: PodRef | None, service: ServiceRef | None,
             backend: PodRef | None) -> bool:
        if self.rules:
            return False  # a rule filter asks for findings only
        if self.ips and not self.ips & set(ips):
            return False
        return self._names(client, service, backend)

    def _names(self, *refs: PodRef | ServiceRef | None) -> bool:
        if self.namespaces and not any(r is not None and r.namespace in self.namespaces
                                       for r in refs):
            return False
        if self.services:
            svc = [r for r in refs if isinstance(r, ServiceRef)]
            if not any(s.name in self.services or str(s) in self.services for s in svc):
                return False
        return True


def _ips_of(f: Finding) -> set[str]:
    """The client, VIP and backend a finding names (none for one decided from counters)."""
    ips = set()
    if f.orig is not None:
        ips |= {f.orig.src, f.orig.dst}
    if f.target is not None:
        ips.add(f.target[0])
    return ips
