"""Who owned which IP when: the identity index behind :class:`~cttrace.identity.model.IdentityView`.

Kubernetes only tells the present (a Pod's current IPs, a Service's current VIPs,
a slice's current endpoints). conntrack entries outlive that present by minutes,
so the correlator asks about the past: who held IP X when this SYN left, and who
holds it now that the reply came. This index turns watch events into timelines:

* **pod IPs**: per IP, stretches ``[since, until)`` of one pod uid each. A pod
  holds an IP from the first event that shows it with a non-terminal phase until
  it is DELETED, reaches Succeeded/Failed (the kubelet tears the sandbox down and
  the CNI may hand the IP out again), or shows other IPs. When a different uid
  shows up with an IP someone still holds, the previous holder's stretch closes
  then: the API is saying the IP moved, even if the old pod's DELETED has not
  arrived yet. The old pod never takes that IP back (a late update of it still
  lists the IP, as the kubelet does not clear ``podIP`` on termination). The
  same uid seen again keeps its stretch: a container restart is the same owner.
  ``hostNetwork`` pods report the node's IP, shared by many pods, and own nothing.
* **Service VIPs**: per ``(vip, port)`` over TCP, stretches of one Service each
  (ClusterIPs, externalIPs, load-balancer ingress IPs: all DNATed by kube-proxy).
* **Endpoints**: per Service (``namespace``, name from the slice's
  ``kubernetes.io/service-name`` label) and IP, stretches of one (ip, pod uid)
  being listed by any of the Service's EndpointSlices (the controller moves
  endpoints between slices; membership is the union), with the union of their
  conditions. An endpoint counts as an endpoint while ``ready`` is not false: the
  API documents a null ``ready`` as "unknown, interpret as ready".

Times are the caller's ``ts`` (when cttrace learned the fact), made monotonic
here: a wall clock stepping back must not unsort a timeline, so a ``ts`` older
than one already applied counts as that newer time. Lookups are a dict hit and,
for IPs with several owners, a bisect on ``since``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, Protocol, TypeAlias, TypeVar

from cttrace.identity.model import Ownership, PodRef, ServiceRef
from cttrace.identity.watch_events import (
    ENDPOINT_SLICE,
    KINDS,
    POD,
    SERVICE,
    Bookmark,
    EndpointSliceInfo,
    PodInfo,
    ServiceInfo,
    UnknownObject,
    WatchError,
    WatchEvent,
    parse_event,
)

_ACTIVE: Final = 0
_TERMINAL: Final = 1  # Succeeded/Failed: IPs released, the object still exists
_DELETED: Final = 2

# Endpoint condition bits kept per membership stretch.
_READY: Final = 1
_SERVING: Final = 2
_TERMINATING: Final = 4

_SINCE = attrgetter("since")


@dataclass(frozen=True, slots=True)
class EndpointStretch:
    """``[since, until)`` during which ``ip`` (``pod_uid``, if its slice named one) was listed
    in a Service's EndpointSlices, with the union of its conditions across them."""

    ip: str
    pod_uid: str | None
    since: float
    until: float | None
    ready: bool
    serving: bool
    terminating: bool


class _Held:
    """One pod's stretch on one IP; ``until`` is set once, when the stretch closes."""

    __slots__ = ("pod", "since", "until")

    def __init__(self, since: float, pod: PodRef) -> None:
        self.since = since
        self.until: float | None = None
        self.pod = pod


class _PodState:
    __slots__ = ("ended", "held", "lost", "ref", "state")

    def __init__(self, ref: PodRef) -> None:
        self.ref = ref
        self.held: tuple[str, ...] = ()  # IPs whose open (last) stretch is this pod's
        self.lost: frozenset[str] | None = None  # IPs taken over by another uid
        self.state = _ACTIVE
        self.ended = 0.0  # when it was DELETED


class _VipHeld:
    __slots__ = ("ref", "since", "until")

    def __init__(self, since: float, ref: ServiceRef) -> None:
        self.since = since
        self.until: float | None = None
        self.ref = ref


class _ServiceState:
    __slots__ = ("keys", "ref")

    def __init__(self, ref: ServiceRef, keys: tuple[tuple[str, int], ...]) -> None:
        self.ref = ref
        self.keys = keys


_SvcKey = tuple[str, str]  # (namespace, service name)
_MemberKey = tuple[str, str | None]  # (ip, pod uid or None without targetRef)


class _SliceState:
    __slots__ = ("members", "service")

    def __init__(self, service: _SvcKey | None, members: dict[_MemberKey, int]) -> None:
        self.service = service
        self.members = members


class _Member:
    __slots__ = ("flags", "pod_uid", "since", "until")

    def __init__(self, since: float, pod_uid: str | None, flags: int) -> None:
        self.since = since
        self.until: float | None = None
        self.pod_uid = pod_uid
        self.flags = flags


class _Stretch(Protocol):
    @property
    def since(self) -> float: ...
    @property
    def until(self) -> float | None: ...


_K = TypeVar("_K")
_S = TypeVar("_S", bound=_Stretch)


# Most IPs only ever have one stretch: a timeline is that stretch itself until a second one
# comes, saving a list per IP and per endpoint (~170 bytes a pod: bench/bench_identity.py).
_Timeline: TypeAlias = _S | list[_S]


def _stretches(timeline: _Timeline[_S] | None) -> list[_S]:
    if timeline is None:
        return []
    return timeline if isinstance(timeline, list) else [timeline]


def _last(timeline: _Timeline[_S]) -> _S:
    return timeline[-1] if isinstance(timeline, list) else timeline


def _appended(timeline: _Timeline[_S] | None, stretch: _S) -> _Timeline[_S]:
    if timeline is None:
        return stretch
    if isinstance(timeline, list):
        timeline.append(stretch)
        return timeline
    return [timeline, stretch]


def _covering(timeline: _Timeline[_S], t: float) -> _S | None:
    """The stretch of ``timeline`` that covers ``t``: a bisect on ``since``, as stretches of
    one timeline never overlap and are appended in time order."""
    if isinstance(timeline, list):
        i = bisect_right(timeline, t, key=_SINCE) - 1
        if i < 0:
            return None
        stretch = timeline[i]
    else:
        stretch = timeline
    if stretch.since <= t and (stretch.until is None or t < stretch.until):
        return stretch
    return None


def _prune_table(table: dict[_K, _Timeline[_S]], before: float) -> int:
    """Drop stretches that ended before ``before`` (and keys left with none); count them."""
    dropped = 0
    for key in list(table):
        stretches = _stretches(table[key])
        kept = [s for s in stretches if s.until is None or s.until >= before]
        dropped += len(stretches) - len(kept)
        if not kept:
            del table[key]
        elif len(kept) != len(stretches):
            table[key] = kept if len(kept) > 1 else kept[0]
    return dropped


class IdentityIndex:
    """Timelines of pod IPs, Service VIPs and Service endpoints, fed by watch events."""

    def __init__(self) -> None:
        self._pods: dict[str, _PodState] = {}
        self._owners: dict[str, _Timeline[_Held]] = {}
        self._services: dict[str, _ServiceState] = {}
        self._vips: dict[tuple[str, int], _Timeline[_VipHeld]] = {}
        self._slices: dict[str, _SliceState] = {}
        self._service_slices: dict[_SvcKey, set[str]] = {}
        self._members: dict[_SvcKey, dict[str, _Timeline[_Member]]] = {}
        self._gone: dict[str, float] = {}  # deleted Service/slice uids: ignore stale replays
        self._relisting: dict[str, set[str]] = {}
        self._counts: Counter[str] = Counter()
        self._now = float("-inf")
        self._generation = 0
        self._in_sync = False
        #: Called with (ip, t) when ip's owner lets go of it (died, IP moved) or a Service's
        #: listing of it ends or changes: the bpf source then watches entries toward ip.
        self.on_ip_change: Callable[[str, float], None] | None = None

    # -- IdentityView --------------------------------------------------------------------------

    def owner_at(self, ip: str, t: float) -> PodRef | None:
        timeline = self._owners.get(ip)
        held = _covering(timeline, t) if timeline is not None else None
        return held.pod if held is not None else None

    def ownerships(self, ip: str) -> list[Ownership]:
        return [Ownership(h.pod, h.since, h.until) for h in _stretches(self._owners.get(ip))]

    def service_for(self, vip: str, port: int, t: float) -> ServiceRef | None:
        timeline = self._vips.get((vip, port))
        held = _covering(timeline, t) if timeline is not None else None
        return held.ref if held is not None else None

    def is_endpoint(self, service: ServiceRef, ip: str, t0: float, t1: float,
                    pod_uid: str | None = None) -> bool | None:
        """Was ``ip`` a ready endpoint of ``service`` at any time in ``[t0, t1]``?

        With ``pod_uid``, only listings naming that pod count, plus listings without a
        ``targetRef`` (they name an address, not a pod, so any holder matches).
        """
        per_ip = self._members.get((service.namespace, service.name))
        if per_ip is None:
            return None
        for m in _stretches(per_ip.get(ip)):
            if (m.flags & _READY and m.since <= t1 and (m.until is None or m.until > t0)
                    and (pod_uid is None or m.pod_uid is None or m.pod_uid == pod_uid)):
                return True
        return False

    def pod_by_uid(self, uid: str) -> PodRef | None:
        state = self._pods.get(uid)
        return state.ref if state is not None else None

    @property
    def in_sync(self) -> bool:
        return self._in_sync

    @property
    def generation(self) -> int:
        return self._generation

    # -- more questions ------------------------------------------------------------------------

    def endpoint_stretches(self, service: ServiceRef, ip: str) -> list[EndpointStretch]:
        """Every known listing of ``ip`` in ``service``'s slices, oldest first, with conditions."""
        per_ip = self._members.get((service.namespace, service.name), {})
        return [
            EndpointStretch(ip, m.pod_uid, m.since, m.until, bool(m.flags & _READY),
                            bool(m.flags & _SERVING), bool(m.flags & _TERMINATING))
            for m in _stretches(per_ip.get(ip))
        ]

    # -- feeding -------------------------------------------------------------------------------

    def apply(self, event: Mapping[str, Any], ts: float, *, kind: str | None = None) -> None:
        """Parse one raw watch event and apply it as learned at ``ts``.

        Raises :class:`cttrace.errors.IdentityError` (index unchanged) when it is malformed.
        """
        self.apply_record(parse_event(event, kind=kind), ts)

    def apply_record(self, event: WatchEvent, ts: float) -> None:
        t = self._advance(ts)
        rec = event.record
        self._counts["events"] += 1
        if isinstance(rec, PodInfo):
            if event.type == "DELETED":
                self._delete_pod(rec.uid, t, rec)
            else:
                self._seen(POD, rec.uid)
                self._upsert_pod(rec, t)
        elif isinstance(rec, ServiceInfo):
            if event.type == "DELETED":
                self._delete_service(rec.uid, t)
            else:
                self._seen(SERVICE, rec.uid)
                self._upsert_service(rec, t)
        elif isinstance(rec, EndpointSliceInfo):
            if event.type == "DELETED":
                self._delete_slice(rec.uid, t)
            else:
                self._seen(ENDPOINT_SLICE, rec.uid)
                self._upsert_slice(rec, t)
        elif isinstance(rec, Bookmark):
            self._counts["bookmarks"] += 1
            return
        elif isinstance(rec, WatchError):
            self._counts["watch_errors"] += 1
            return
        elif isinstance(rec, UnknownObject):
            self._counts["skipped_kinds"] += 1
            return
        self._generation += 1

    def mark_in_sync(self) -> None:
        """The source has delivered its full picture once (a file read to its end)."""
        if not self._in_sync:
            self._in_sync = True
            self._generation += 1

    def begin_relist(self, kinds: Iterable[str] = KINDS) -> None:
        """Start a relist of ``kinds``: remember which objects the list shows."""
        for kind in kinds:
            self._relisting[kind] = set()

    def end_relist(self, ts: float, kinds: Iterable[str] = KINDS) -> int:
        """End a relist: objects of ``kinds`` it did not show were deleted meanwhile (at ``ts``).

        Returns how many objects were deleted.
        """
        t = self._advance(ts)
        deleted = 0
        for kind in kinds:
            seen = self._relisting.pop(kind, None)
            if seen is None:
                continue
            if kind == POD:
                gone = [u for u, s in self._pods.items() if s.state != _DELETED and u not in seen]
                for uid in gone:
                    self._delete_pod(uid, t, None)
            elif kind == SERVICE:
                gone = [u for u in self._services if u not in seen]
                for uid in gone:
                    self._delete_service(uid, t)
            else:
                gone = [u for u in self._slices if u not in seen]
                for uid in gone:
                    self._delete_slice(uid, t)
            deleted += len(gone)
        if deleted:
            self._counts["relist_deletions"] += deleted
            self._generation += 1
        return deleted

    def prune(self, before: float) -> int:
        """Forget history that ended before ``before``; returns how many stretches went."""
        dropped = _prune_table(self._owners, before) + _prune_table(self._vips, before)
        for svc in list(self._members):
            dropped += _prune_table(self._members[svc], before)
            if not self._members[svc] and not self._service_slices.get(svc):
                del self._members[svc]
                self._service_slices.pop(svc, None)
        for uid in [u for u, s in self._pods.items() if s.state == _DELETED and s.ended < before]:
            del self._pods[uid]
        for uid in [u for u, ended in self._gone.items() if ended < before]:
            del self._gone[uid]
        if dropped:
            self._generation += 1
        return dropped

    def stats(self) -> dict[str, int]:
        """Sizes and counters, for metrics and the benchmark. Walks the tables: O(size)."""
        pods = Counter(s.state for s in self._pods.values())
        out = {
            "pods": pods[_ACTIVE],
            "pods_terminal": pods[_TERMINAL],
            "pods_deleted": pods[_DELETED],
            "ips": len(self._owners),
            "ownerships": sum(len(_stretches(t)) for t in self._owners.values()),
            "services": len(self._services),
            "vip_ports": len(self._vips),
            "endpoint_slices": len(self._slices),
            "endpoint_stretches": sum(
                len(_stretches(ms)) for per_ip in self._members.values() for ms in per_ip.values()
            ),
        }
        for name in ("events", "bookmarks", "watch_errors", "skipped_kinds", "stale_events",
                     "stale_ip_claims", "ip_moves", "vip_moves", "relist_deletions",
                     "host_network_pods", "fqdn_slices", "unlabelled_slices"):
            out[name] = self._counts[name]
        return out

    # -- pods ----------------------------------------------------------------------------------

    def _upsert_pod(self, info: PodInfo, t: float) -> None:
        state = self._pods.get(info.uid)
        if state is not None and state.state == _DELETED:
            self._counts["stale_events"] += 1  # a replay of a pod already gone: uids never return
            return
        ref = PodRef(info.uid, info.namespace, info.name, info.workload, info.node)
        if state is None:
            state = self._pods[info.uid] = _PodState(ref)
            if info.host_network:
                self._counts["host_network_pods"] += 1
        elif ref != state.ref:
            state.ref = ref
            for ip in state.held:
                _last(self._owners[ip]).pod = ref
        if state.state == _TERMINAL:
            return
        if info.terminal:
            self._release(state, t)
            state.state = _TERMINAL
            return
        # A hostNetwork pod's podIP is its node's address, shared with every such pod there.
        self._hold(state, () if info.host_network else info.ips, t)

    def _hold(self, state: _PodState, ips: tuple[str, ...], t: float) -> None:
        if state.held == ips:
            return
        kept = []
        for ip in state.held:
            if ip in ips:
                kept.append(ip)
            else:
                _last(self._owners[ip]).until = t
                self._ip_changed(ip, t)
        for ip in ips:
            if ip in state.held:
                continue
            if state.lost is not None and ip in state.lost:
                self._counts["stale_ip_claims"] += 1
                continue
            timeline = self._owners.get(ip)
            if timeline is not None and _last(timeline).until is None:
                self._take_over(ip, _last(timeline), t)
            self._owners[ip] = _appended(timeline, _Held(t, state.ref))
            kept.append(ip)
        state.held = tuple(kept)

    def _take_over(self, ip: str, previous: _Held, t: float) -> None:
        """Another uid shows ``ip`` while ``previous`` still holds it: the IP moved at ``t``."""
        previous.until = t
        self._ip_changed(ip, t)
        self._counts["ip_moves"] += 1
        old = self._pods.get(previous.pod.uid)
        if old is not None:
            old.held = tuple(x for x in old.held if x != ip)
            old.lost = (old.lost or frozenset()) | {ip}

    def _release(self, state: _PodState, t: float) -> None:
        for ip in state.held:
            _last(self._owners[ip]).until = t
            self._ip_changed(ip, t)
        state.held = ()

    def _delete_pod(self, uid: str, t: float, info: PodInfo | None) -> None:
        state = self._pods.get(uid)
        if state is None:
            if info is None:
                return
            # Never seen alive (a file starting mid-stream): keep its name for pod_by_uid.
            state = self._pods[uid] = _PodState(
                PodRef(info.uid, info.namespace, info.name, info.workload, info.node))
        elif state.state == _DELETED:
            self._counts["stale_events"] += 1
            return
        self._release(state, t)
        state.state = _DELETED
        state.ended = t

    # -- services ------------------------------------------------------------------------------

    def _upsert_service(self, info: ServiceInfo, t: float) -> None:
        if info.uid in self._gone:
            self._counts["stale_events"] += 1
            return
        # Only TCP: conntrack entries cttrace correlates are TCP (sources filter the rest).
        keys = tuple(dict.fromkeys(
            (vip, p.port) for vip in info.vips for p in info.ports if p.protocol == "TCP"))
        state = self._services.get(info.uid)
        ref = ServiceRef(info.namespace, info.name, info.uid)
        if state is None:
            state = self._services[info.uid] = _ServiceState(ref, ())
        old = state.keys
        if old == keys:
            return
        for key in old:
            if key not in keys:
                _last(self._vips[key]).until = t
        for key in keys:
            if key in old:
                continue
            timeline = self._vips.get(key)
            if timeline is not None and _last(timeline).until is None:
                previous = _last(timeline)
                previous.until = t
                self._counts["vip_moves"] += 1
                other = self._services.get(previous.ref.uid)
                if other is not None:
                    other.keys = tuple(k for k in other.keys if k != key)
            self._vips[key] = _appended(timeline, _VipHeld(t, state.ref))
        state.keys = keys

    def _delete_service(self, uid: str, t: float) -> None:
        state = self._services.pop(uid, None)
        self._gone[uid] = t
        if state is None:
            return
        for key in state.keys:
            _last(self._vips[key]).until = t

    # -- endpoint slices -----------------------------------------------------------------------

    def _upsert_slice(self, info: EndpointSliceInfo, t: float) -> None:
        if info.uid in self._gone:
            self._counts["stale_events"] += 1
            return
        members: dict[_MemberKey, int] = {}
        if info.address_type in ("IPv4", "IPv6"):
            for ep in info.endpoints:
                ready = ep.ready is not False
                # serving (1.20+) is ready regardless of termination; absent, ready stands in.
                serving = ep.serving if ep.serving is not None else ready
                flags = ((_READY if ready else 0) | (_SERVING if serving else 0)
                         | (_TERMINATING if ep.terminating else 0))
                uid = ep.target.uid if ep.target is not None else None
                if uid is not None and uid in self._pods:
                    uid = self._pods[uid].ref.uid  # share the pod's string
                for ip in ep.addresses:
                    members[(ip, uid)] = members.get((ip, uid), 0) | flags
        elif info.uid not in self._slices:
            self._counts["fqdn_slices"] += 1
        svc = (info.namespace, info.service) if info.service else None
        if svc is None and info.uid not in self._slices:
            self._counts["unlabelled_slices"] += 1
        old = self._slices.get(info.uid)
        if old is not None and old.service != svc:
            self._delete_slice(info.uid, t)  # relabelled: leave the old Service first
            old = None
        self._slices[info.uid] = _SliceState(svc, members)
        if svc is None:
            return
        self._service_slices.setdefault(svc, set()).add(info.uid)
        self._members.setdefault(svc, {})
        changed = members.keys() | (old.members.keys() if old is not None else set())
        for key in changed:
            if old is None or old.members.get(key) != members.get(key):
                self._update_member(svc, key, t)

    def _delete_slice(self, uid: str, t: float) -> None:
        state = self._slices.pop(uid, None)
        self._gone[uid] = t
        if state is None or state.service is None:
            return
        self._service_slices[state.service].discard(uid)
        for key in state.members:
            self._update_member(state.service, key, t)

    def _update_member(self, svc: _SvcKey, key: _MemberKey, t: float) -> None:
        """Recompute (ip, pod uid)'s listing as the union over the Service's live slices."""
        present = False
        flags = 0
        for slice_uid in self._service_slices.get(svc, ()):
            f = self._slices[slice_uid].members.get(key)
            if f is not None:
                present = True
                flags |= f
        ip, pod_uid = key
        per_ip = self._members[svc]
        timeline = per_ip.get(ip)
        current = None
        for m in reversed(_stretches(timeline)):
            if m.until is None and m.pod_uid == pod_uid:
                current = m
                break
        if current is not None:
            if present and current.flags == flags:
                return
            if present and current.since == t:
                current.flags = flags  # changed again within the same instant
                return
            current.until = t
            self._ip_changed(ip, t)
        if present:
            per_ip[ip] = _appended(timeline, _Member(t, pod_uid, flags))

    # -- bookkeeping ---------------------------------------------------------------------------

    def _ip_changed(self, ip: str, t: float) -> None:
        if self.on_ip_change is not None:
            self.on_ip_change(ip, t)

    def _advance(self, ts: float) -> float:
        if ts > self._now:
            self._now = ts
        return self._now

    def _seen(self, kind: str, uid: str) -> None:
        seen = self._relisting.get(kind)
        if seen is not None:
            seen.add(uid)
