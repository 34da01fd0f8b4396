"""What several rules share: the names a finding carries, ownership questions, the sentence parts.

Identity lags the kernel (pod status and EndpointSlices reach the API seconds
after the kernel acts), so the ownership helpers here take a grace where a rule
must name the pod an entry was created for.
"""

from __future__ import annotations

from cttrace import addr
from cttrace.events import Flow, SockConnect
from cttrace.findings import Finding, Severity, rfc3339
from cttrace.identity.model import IdentityView, PodRef, ServiceRef
from cttrace.rules._spec import TrackedEntry


def names(
    identity: IdentityView | None, entry: TrackedEntry, t: float
) -> tuple[PodRef | None, ServiceRef | None, PodRef | None]:
    """Client pod, the VIP's Service and the target's owner at ``t``."""
    if identity is None:
        return None, None, None
    orig = entry.orig
    return (
        identity.owner_at(orig.src, t),
        identity.service_for(orig.dst, orig.dport, t),
        identity.owner_at(entry.target_ip, t),
    )


def still_holds(identity: IdentityView, ip: str, pod: PodRef, t: float) -> bool:
    holder = identity.owner_at(ip, t)
    return holder is not None and holder.uid == pod.uid


def owner_near(identity: IdentityView, ip: str, t: float, grace: float) -> PodRef | None:
    """The owner at ``t``, or, identity lagging the kernel, the first one known within
    ``grace`` after it. Only for the pod an entry was created for: a wrong-pod decision
    must not take a later owner for the chosen one."""
    owner = identity.owner_at(ip, t)
    if owner is not None:
        return owner
    for own in identity.ownerships(ip):
        if t < own.since <= t + grace:
            return own.pod
    return None


def last_owner_before(identity: IdentityView, ip: str, t: float) -> PodRef | None:
    last: PodRef | None = None
    for own in identity.ownerships(ip):
        if own.since <= t:
            last = own.pod
    return last


def finding(
    entry: TrackedEntry,
    rule: str,
    severity: Severity,
    now: float,
    summary: str,
    *,
    client: PodRef | None,
    service: ServiceRef | None,
    replied_ts: float | None = None,
    old_owner: PodRef | None = None,
    new_owner: PodRef | None = None,
    details: dict[str, object] | None = None,
) -> Finding:
    """A finding about ``entry``: its tuple, target, id, creation time and source filled in."""
    return Finding(
        rule=rule,
        severity=severity,
        ts=now,
        orig=entry.orig,
        target=entry.target,
        summary=summary,
        entry_id=entry.entry_id,
        created_ts=entry.created,
        replied_ts=replied_ts,
        client=client,
        service=service,
        old_owner=old_owner,
        new_owner=new_owner,
        details={"source": entry.source, **(details or {})},
    )


def history(identity: IdentityView, ip: str, t0: float, t1: float) -> list[dict[str, object]]:
    """Who held ``ip`` around ``[t0, t1]``: the story ``cttrace explain`` tells."""
    return [
        {"pod": o.pod.to_json(), "since": rfc3339(o.since),
         "until": rfc3339(o.until) if o.until is not None else None}
        for o in identity.ownerships(ip)
        if o.since <= t1 and (o.until is None or o.until >= t0)
    ]


def who(client: PodRef | None, ip: str) -> str:
    return f"pod {client}" if client is not None else f"client {ip}"


def svc(service: ServiceRef | None, orig: Flow) -> str:
    vip = addr.endpoint(orig.dst, orig.dport)
    return f"Service {service} ({vip})" if service is not None else vip


def sock_json(sock: SockConnect) -> dict[str, object]:
    return {
        "pid": sock.pid,
        "comm": sock.comm,
        "cgroup_id": sock.cgroup_id,
        "netns_ino": sock.netns_ino,
    }
