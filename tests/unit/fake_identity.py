"""A hand-fed IdentityView for correlator tests: explicit ownership stretches, no parsing."""

from __future__ import annotations

from cttrace.identity.model import Ownership, PodRef, ServiceRef


class FakeIdentity:
    def __init__(self) -> None:
        self._owns: dict[str, list[Ownership]] = {}
        self._services: dict[tuple[str, int], ServiceRef] = {}
        self._endpoints: dict[ServiceRef, list[tuple[str, str, float, float | None]]] = {}
        self.generation = 0
        self.in_sync = True

    # feeding
    def hold(self, ip: str, pod: PodRef, since: float, until: float | None = None) -> None:
        self._owns.setdefault(ip, []).append(Ownership(pod, since, until))
        self._owns[ip].sort(key=lambda o: o.since)
        self.generation += 1

    def release(self, ip: str, pod: PodRef, at: float) -> None:
        self._owns[ip] = [
            Ownership(o.pod, o.since, at) if o.pod.uid == pod.uid and o.until is None else o
            for o in self._owns[ip]
        ]
        self.generation += 1

    def service(self, vip: str, port: int, svc: ServiceRef) -> None:
        self._services[(vip, port)] = svc
        self.generation += 1

    def endpoint(self, svc: ServiceRef, ip: str, uid: str, since: float,
                 until: float | None = None) -> None:
        self._endpoints.setdefault(svc, []).append((ip, uid, since, until))
        self.generation += 1

    # IdentityView
    def owner_at(self, ip: str, t: float) -> PodRef | None:
        for o in self._owns.get(ip, []):
            if o.since <= t and (o.until is None or t < o.until):
                return o.pod
        return None

    def ownerships(self, ip: str) -> list[Ownership]:
        return list(self._owns.get(ip, []))

    def service_for(self, vip: str, port: int, t: float) -> ServiceRef | None:
        return self._services.get((vip, port))

    def is_endpoint(self, service: ServiceRef, ip: str, t0: float, t1: float,
                    pod_uid: str | None = None) -> bool | None:
        if service not in self._endpoints:
            return None
        for eip, uid, since, until in self._endpoints[service]:
            if eip != ip or (pod_uid is not None and uid != pod_uid):
                continue
            if since <= t1 and (until is None or until > t0):
                return True
        return False

    def pod_by_uid(self, uid: str) -> PodRef | None:
        for owns in self._owns.values():
            for o in owns:
                if o.pod.uid == uid:
                    return o.pod
        return None
