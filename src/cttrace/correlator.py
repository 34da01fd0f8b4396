"""The correlator: events and a clock in, findings out. Pure: no kernel, no network.

Every rule of DESIGN.md lives here, against the one event model of
:mod:`cttrace.events` and the :class:`~cttrace.identity.model.IdentityView`
questions. The runtime calls :meth:`Correlator.feed` for each event and
:meth:`Correlator.tick` a few times a second; both return the findings decided
at that moment.

State is bounded: one :class:`Entry` per live NATed TCP conntrack entry (the
oldest is evicted past ``max_entries``), one record per recent ``connect()``
tuple, and the decisions still waiting for identity.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cttrace import addr
from cttrace.events import (
    CtEvent,
    CtKind,
    CtStatus,
    Event,
    Flow,
    Lost,
    ResyncDone,
    SockConnect,
    TcpReset,
    TcpState,
    state_name,
)
from cttrace.findings import Finding, Rule, Severity, rfc3339
from cttrace.identity.model import IdentityView, PodRef, ServiceRef

_SEEN_REPLY = int(CtStatus.SEEN_REPLY)
#: One int object per distinct status word and target port, kept by every entry that has
#: it: a node has a handful of each, and an int above 256 is a 32-byte object of its own.
_SHARED_INTS: dict[int, int] = {}
_shared = _SHARED_INTS.setdefault
# Read for every event: an Enum member as a module global costs ~10 ns, as a class
# attribute (CtKind.NEW) ~70 ns on Python 3.11.
_NEW, _DESTROY = CtKind.NEW, CtKind.DESTROY
#: States that mean the backend answered: SYN_SENT -> SYN_RECV is the SYN-ACK
#: (tcp_conntrack's sSR transition), after which SEEN_REPLY is set as well.
_REPLIED_STATES = frozenset({int(TcpState.SYN_RECV), int(TcpState.ESTABLISHED)})
#: Finished connections: an entry in these states points at a dead pod harmlessly.
_FINISHED_STATES = frozenset({int(TcpState.TIME_WAIT), int(TcpState.CLOSE)})


@dataclass(slots=True)
class Settings:
    """How the rules decide. Times in seconds."""

    late_after: float = 3.0
    """A first reply this long after the entry was created is ``late-establish``. Client
    connect timeouts and SYN retransmissions are 1-3 s; a healthy pod answers in ms."""

    identity_grace: float = 5.0
    """How long a decision waits for identity that lags the kernel (pod status and
    EndpointSlices reach the API seconds after the kernel acts)."""

    dead_after: float = 5.0
    """An entry still alive this long after its pod is gone is ``dead-endpoint``."""

    inherit_window: float = 1.0
    """A ``connect()`` more than this long after its tuple's entry was created did not create it."""

    max_entries: int = 262_144
    """Bound on tracked entries; the oldest is evicted (counted) beyond it."""

    max_sockets: int = 65_536
    """Bound on remembered ``connect()`` tuples."""


#: What an entry has been reported for, until its first finding: one object for all.
_NOTHING_REPORTED: frozenset[Rule] = frozenset()


@dataclass(slots=True)
class Entry:
    """What the correlator remembers of one NATed TCP conntrack entry.

    One per live entry, so kept small (bench/pipeline.py measures the bytes):
    the target as two fields rather than a tuple of its own, and the rules
    reported as a frozenset shared by every entry not reported yet.

    The original tuple is kept as a plain ``tuple`` (``orig`` makes the Flow
    when asked): CPython's cyclic GC stops tracking a plain tuple of strings
    and ints the first time it sees one, but never a tuple subclass such as a
    NamedTuple. A table of entries then costs every full collection one object
    per entry (the Entry) instead of two.
    """

    entry_id: int
    orig_tuple: tuple[str, int, str, int]  # == orig; also the key of Correlator._by_orig
    target_ip: str
    target_port: int
    created: float | None  # None: seen first in a dump, creation not observed
    state: int | None
    status: int
    source: str
    last_seen: float
    replied: float | None = None
    creator: SockConnect | None = None
    reported: frozenset[Rule] = _NOTHING_REPORTED

    @property
    def orig(self) -> Flow:
        """What the client asked for: its address and port to the Service VIP and port."""
        return Flow._make(self.orig_tuple)

    @property
    def key(self) -> Flow:
        return self.orig

    @property
    def target(self) -> tuple[str, int]:
        """The DNAT target (backend) as ``(ip, port)``."""
        return (self.target_ip, self.target_port)

    def mark_reported(self, rule: Rule) -> None:
        self.reported = self.reported | {rule}


@dataclass(slots=True)
class _Pending:
    """A wrong-pod decision waiting for identity of the new owner."""

    entry: Entry
    t1: float
    deadline: float


@dataclass(slots=True)
class CorrelatorStats:
    events: int = 0
    findings: int = 0
    evicted: int = 0
    lost: int = 0
    pending: int = 0


class Correlator:
    def __init__(self, settings: Settings | None = None, identity: IdentityView | None = None):
        self.settings = settings or Settings()
        self.identity = identity
        self.entries: dict[int, Entry] = {}
        self._by_orig: dict[tuple[str, int, str, int], Entry] = {}  # Flow or orig_tuple keys
        # (client ip, client port) -> entry: an RST names the client side and the pod, not the
        # VIP. Built at the first TcpReset (only the bpf source sends them), then kept up:
        # ~100 B per entry that a netlink-only correlator never pays.
        self._by_client: dict[tuple[str, int], Entry] | None = None
        self._sockets: collections.OrderedDict[tuple[str, int, str, int], SockConnect] = (
            collections.OrderedDict()  # Flow keys
        )
        self._pending: list[_Pending] = []
        # Unreplied entries in creation order, for the unnated-reply age check.
        self._unreplied: collections.deque[Entry] = collections.deque()
        # Entries whose chosen pod may be gone, re-evaluated on tick.
        self._dead_watch: dict[int, Entry] = {}
        self._identity_gen = -1
        self.stats = CorrelatorStats()
        #: Called with each first reply's unreplied seconds (the agent's histogram).
        self.on_first_reply: Callable[[float], None] | None = None

    # -- input -------------------------------------------------------------

    def feed(self, ev: Event, now: float) -> list[Finding]:
        self.stats.events += 1
        out: list[Finding] = []
        if isinstance(ev, CtEvent):
            self._on_ct(ev, now, out)
        elif isinstance(ev, SockConnect):
            self._on_connect(ev, now, out)
        elif isinstance(ev, TcpReset):
            self._on_reset(ev, now, out)
        elif isinstance(ev, ResyncDone):
            self._on_resync(ev)
        elif isinstance(ev, Lost):
            self.stats.lost += ev.missed
        self.stats.findings += len(out)
        return out

    def tick(self, now: float) -> list[Finding]:
        """Time-driven decisions: identity grace ends, dead endpoints, unreplied live endpoints."""
        out: list[Finding] = []
        identity = self.identity
        if identity is not None:
            changed = identity.generation != self._identity_gen
            if changed:
                self._identity_gen = identity.generation
                self._rescan_dead(now)
            if self._pending:
                self._decide_pending(now, out, changed)
            if self._dead_watch:
                self._check_dead(now, out)
            self._check_unreplied(now, out)
        self.stats.pending = len(self._pending)
        self.stats.findings += len(out)
        return out

    def feed_all(self, events: Iterable[Event], now: float) -> list[Finding]:
        out: list[Finding] = []
        for ev in events:
            out.extend(self.feed(ev, now))
        return out

    # -- conntrack ---------------------------------------------------------

    def _on_ct(self, ev: CtEvent, now: float, out: list[Finding]) -> None:
        entry = self.entries.get(ev.entry_id)
        if entry is not None and entry.orig_tuple != ev.orig:
            # The id was reused for another tuple (the old entry's destroy was lost).
            self._forget(entry)
            entry = None
        if ev.kind is _DESTROY:
            if entry is not None:
                self._forget(entry)
            return
        if entry is None:
            entry = self._track(ev)
            if entry.replied is None and entry.created is not None:
                self._on_created(entry, now)
            return
        entry.last_seen = ev.ts
        status = entry.status | ev.status
        if status != entry.status:
            entry.status = _shared(status, status)
        if ev.tcp_state is not None:
            entry.state = ev.tcp_state
        if entry.replied is None and _is_reply(ev):
            entry.replied = ev.ts
            self._on_first_reply(entry, ev, now, out)

    def _track(self, ev: CtEvent) -> Entry:
        # A NEW event (confirm) is the creation; a DUMP of an unknown entry is not.
        created = ev.ts if ev.kind is _NEW else None
        orig = ev.orig
        entry = Entry(
            entry_id=ev.entry_id,
            orig_tuple=(orig.src, orig.sport, orig.dst, orig.dport),
            target_ip=ev.reply.src,
            target_port=_shared(ev.reply.sport, ev.reply.sport),
            created=created,
            state=ev.tcp_state,
            status=_shared(ev.status, ev.status),
            source=ev.source,
            last_seen=ev.ts,
        )
        if _is_reply(ev):
            # Seen answered already (a dump): without a creation time no first-reply rule applies.
            entry.replied = ev.ts
        old = self._by_orig.get(ev.orig)
        if old is not None:
            self._forget(old)
        self.entries[ev.entry_id] = entry
        self._by_orig[entry.orig_tuple] = entry
        if self._by_client is not None:
            self._by_client[_client_key(entry)] = entry
        if len(self.entries) > self.settings.max_entries:
            oldest = next(iter(self.entries.values()))
            self._forget(oldest)
            self.stats.evicted += 1
        return entry

    def _forget(self, entry: Entry) -> None:
        if self.entries.get(entry.entry_id) is entry:
            del self.entries[entry.entry_id]
        if self._by_orig.get(entry.orig_tuple) is entry:
            del self._by_orig[entry.orig_tuple]
        by_client = self._by_client
        if by_client is not None:
            client_key = _client_key(entry)
            if by_client.get(client_key) is entry:
                del by_client[client_key]
        self._dead_watch.pop(entry.entry_id, None)

    def _on_created(self, entry: Entry, now: float) -> None:
        sock = self._sockets.get(entry.orig_tuple)
        if sock is not None and entry.created is not None and (
            abs(sock.ts - entry.created) <= self.settings.inherit_window
        ):
            entry.creator = sock
        if self.identity is not None:
            self._unreplied.append(entry)
            self._maybe_watch_dead(entry, now)

    def _on_resync(self, ev: ResyncDone) -> None:
        for entry in [e for e in self.entries.values() if e.entry_id not in ev.entry_ids]:
            self._forget(entry)

    # -- first reply: wrong-pod and late-establish --------------------------

    def _on_first_reply(self, entry: Entry, ev: CtEvent, now: float, out: list[Finding]) -> None:
        t0 = entry.created
        if t0 is None:
            return
        t1 = ev.ts
        unreplied = t1 - t0
        if self.on_first_reply is not None:
            self.on_first_reply(unreplied)
        if unreplied >= self.settings.late_after:
            out.append(self._late_establish(entry, t1, now))
        if self.identity is not None:
            finding = self._decide_wrong_pod(entry, t1, now, final=False)
            if finding is _WAIT:
                self._pending.append(
                    _Pending(entry=entry, t1=t1, deadline=t1 + self.settings.identity_grace)
                )
            elif isinstance(finding, Finding):
                out.append(finding)

    def _late_establish(self, entry: Entry, t1: float, now: float) -> Finding:
        assert entry.created is not None
        unreplied = t1 - entry.created
        client, service, old_owner = self._names(entry, entry.created)
        new_owner = self.identity.owner_at(entry.target_ip, t1) if self.identity else None
        summary = (
            f"{_who(client, entry.orig.src)} -> {_svc(service, entry.orig)}: entry stayed "
            f"unreplied {unreplied:.1f}s, then "
            f"{addr.endpoint(entry.target_ip, entry.target_port)} answered "
            "on the old DNAT decision (a retry from the same source port inherits it)"
        )
        return _finding(
            entry, Rule.LATE_ESTABLISH, Severity.WARNING, now, summary,
            replied_ts=t1,
            client=client,
            service=service,
            old_owner=old_owner,
            new_owner=new_owner,
        )

    def _decide_wrong_pod(
        self, entry: Entry, t1: float, now: float, *, final: bool
    ) -> Finding | _Wait | None:
        """owner(X, t1) != owner(X, t0) for the DNAT target X, decided as soon as identity allows.

        Identity lags the kernel (pod status and EndpointSlices reach the API seconds
        after the kernel acts), so an owner whose stretch starts within the grace after the
        reply counts as the one that answered, and conclusions that a late update could
        overturn wait until the grace ends (``final``).
        """
        identity = self.identity
        assert identity is not None and entry.created is not None
        t0 = entry.created
        ip = entry.target_ip
        old = identity.owner_at(ip, t0)
        new = identity.owner_at(ip, t1)
        if new is None:
            horizon = min(now, t1 + self.settings.identity_grace)
            for own in identity.ownerships(ip):
                if t1 < own.since <= horizon:
                    new = own.pod
                    break
        if new is None:
            if not final:
                return _WAIT
            if old is None or _still_holds(identity, ip, old, t1):
                return None  # nothing known, or the chosen pod still held the IP
            return self._wrong_pod(entry, t1, now, old, None, None)
        if old is not None and old.uid == new.uid:
            return None  # same pod (a restart keeps its uid): not a wrong pod
        orig = entry.orig
        service = identity.service_for(orig.dst, orig.dport, t0)
        endpoint: bool | None = None
        if service is not None:
            endpoint = identity.is_endpoint(service, ip, t1, max(now, t1), new.uid)
        if old is None:
            # Nobody known held X when the DNAT chose it: a fresh pod whose identity lags
            # looks the same. Only a reply from outside the VIP's Service is conclusive,
            # and only once the grace has let its EndpointSlice arrive.
            if endpoint is not False:
                return None
            if not final:
                return _WAIT
            old = _last_owner_before(identity, ip, t0)
        return self._wrong_pod(entry, t1, now, old, new, endpoint)

    def _wrong_pod(
        self,
        entry: Entry,
        t1: float,
        now: float,
        old: PodRef | None,
        new: PodRef | None,
        endpoint: bool | None,
    ) -> Finding:
        assert entry.created is not None
        identity = self.identity
        assert identity is not None
        client, service, _ = self._names(entry, entry.created)
        severity = Severity.CRITICAL if endpoint is False else Severity.WARNING
        where = addr.endpoint(entry.target_ip, entry.target_port)
        if new is None:
            reached = f"an unknown owner of {where} (no pod held it when it answered)"
        elif endpoint is False:
            reached = f"pod {new} at {where}, which is not an endpoint of that Service"
        elif endpoint is True:
            reached = f"pod {new} at {where} (another endpoint of the same Service)"
        else:
            reached = f"pod {new} at {where}"
        chosen = f"pod {old}" if old is not None else "a pod no longer known"
        summary = (
            f"{_who(client, entry.orig.src)} connected to {_svc(service, entry.orig)} and reached "
            f"{reached}: the conntrack entry kept the DNAT to {chosen} for "
            f"{t1 - entry.created:.1f}s while the IP changed hands"
        )
        return _finding(
            entry, Rule.WRONG_POD, severity, now, summary,
            replied_ts=t1,
            client=client,
            service=service,
            old_owner=old,
            new_owner=new,
            details={
                "new_owner_is_endpoint": endpoint,
                "identity": "known" if new is not None else "unknown",
                "target_history": _history(identity, entry.target_ip, entry.created, now),
            },
        )

    def _decide_pending(self, now: float, out: list[Finding], identity_changed: bool) -> None:
        still: list[_Pending] = []
        for p in self._pending:
            final = now >= p.deadline
            if not (final or identity_changed):
                still.append(p)
                continue
            finding = self._decide_wrong_pod(p.entry, p.t1, now, final=final)
            if finding is _WAIT:
                still.append(p)
            elif isinstance(finding, Finding):
                out.append(finding)
        self._pending = still

    # -- dead-endpoint ------------------------------------------------------

    def _maybe_watch_dead(self, entry: Entry, now: float) -> None:
        if entry.created is None or Rule.DEAD_ENDPOINT in entry.reported:
            return
        self._dead_watch[entry.entry_id] = entry

    def _rescan_dead(self, now: float) -> None:
        """Identity changed: any live entry may now point at a pod that is gone."""
        for entry in self.entries.values():
            if Rule.DEAD_ENDPOINT not in entry.reported:
                self._dead_watch[entry.entry_id] = entry

    def _check_dead(self, now: float, out: list[Finding]) -> None:
        identity = self.identity
        assert identity is not None
        done: list[int] = []
        for entry_id, entry in self._dead_watch.items():
            if entry.state in _FINISHED_STATES:
                done.append(entry_id)
                continue
            ip = entry.target_ip
            chosen_at = entry.created if entry.created is not None else entry.last_seen
            chosen = _owner_near(identity, ip, chosen_at, self.settings.identity_grace)
            if chosen is None:
                chosen = _last_owner_before(identity, ip, chosen_at)
            if chosen is None:
                done.append(entry_id)  # no identity for this target at all
                continue
            gone_at = _ownership_end(identity, ip, chosen,
                                     chosen_at + self.settings.identity_grace)
            if gone_at is None:
                done.append(entry_id)  # chosen pod still holds the IP
                continue
            holder = identity.owner_at(ip, now)
            if holder is not None and holder.uid == chosen.uid:
                continue  # its end is stamped after ``now``: look again next tick
            if holder is not None or (entry.replied is not None and entry.replied >= gone_at):
                done.append(entry_id)  # someone holds or answered on the IP: wrong-pod territory
                continue
            if now - gone_at < self.settings.dead_after:
                continue  # keep watching
            done.append(entry_id)
            entry.mark_reported(Rule.DEAD_ENDPOINT)
            out.append(self._dead_endpoint(entry, chosen, gone_at, now))
        for entry_id in done:
            self._dead_watch.pop(entry_id, None)

    def _dead_endpoint(self, entry: Entry, chosen: PodRef, gone_at: float, now: float) -> Finding:
        identity = self.identity
        assert identity is not None
        chosen_at = entry.created or entry.last_seen
        client, service, _ = self._names(entry, chosen_at)
        state = state_name(entry.state)
        summary = (
            f"{_who(client, entry.orig.src)} -> {_svc(service, entry.orig)}: the conntrack entry "
            f"({state}) still sends to {addr.endpoint(entry.target_ip, entry.target_port)}, "
            f"but pod {chosen} is "
            f"gone for {now - gone_at:.1f}s; its packets go into the void until the entry or "
            "the client's connection dies"
        )
        return _finding(
            entry, Rule.DEAD_ENDPOINT, Severity.WARNING, now, summary,
            replied_ts=entry.replied,
            client=client,
            service=service,
            old_owner=chosen,
            details={
                "state": state,
                "owner_gone_s": round(now - gone_at, 3),
                "target_history": _history(identity, entry.target_ip, chosen_at, now),
            },
        )

    # -- unnated-reply ------------------------------------------------------

    def _check_unreplied(self, now: float, out: list[Finding]) -> None:
        """Entries to a live endpoint that never saw a reply: replies bypass conntrack.

        With ``bridge-nf-call-iptables=0`` a bridged pod's SYN-ACK never reaches
        netfilter (br_netfilter's br_nf_pre_routing is not called), so the entry stays
        SYN_SENT although the pod is alive and answering.
        """
        identity = self.identity
        assert identity is not None
        horizon = self.settings.late_after + self.settings.identity_grace
        while self._unreplied:
            entry = self._unreplied[0]
            assert entry.created is not None
            if now - entry.created < horizon:
                break
            self._unreplied.popleft()
            if entry.replied is not None or self.entries.get(entry.entry_id) is not entry:
                continue
            if Rule.UNNATED_REPLY in entry.reported:
                continue
            ip = entry.target_ip
            owner = _owner_near(identity, ip, entry.created, self.settings.identity_grace)
            if owner is None or not _still_holds(identity, ip, owner, now):
                continue  # a dead or unknown target is dead-endpoint's business
            client, service, _ = self._names(entry, entry.created)
            if service is not None and identity.is_endpoint(
                service, ip, entry.created, now, owner.uid
            ) is False:
                continue
            entry.mark_reported(Rule.UNNATED_REPLY)
            out.append(self._unnated(entry, owner, client, service, now, evidence="no-reply"))

    def _on_reset(self, ev: TcpReset, now: float, out: list[Finding]) -> None:
        """A local client RSTs pod-ip:port on a tuple whose entry expects the VIP to answer."""
        if not ev.sent:
            return
        rst = ev.flow
        by_client = self._by_client
        if by_client is None:
            # Later entries win a shared client ip:port, as when kept up from the start.
            by_client = self._by_client = {_client_key(e): e for e in self.entries.values()}
        entry = by_client.get((rst.src, rst.sport))
        if entry is None or entry.target != (rst.dst, rst.dport) or entry.replied is not None:
            return
        if Rule.UNNATED_REPLY in entry.reported:
            return
        entry.mark_reported(Rule.UNNATED_REPLY)
        client, service, _ = self._names(entry, entry.created or ev.ts)
        owner = self.identity.owner_at(rst.dst, ev.ts) if self.identity else None
        out.append(self._unnated(entry, owner, client, service, now, evidence="rst",
                                 pid=ev.pid, comm=ev.comm))

    def _unnated(self, entry: Entry, owner: PodRef | None, client: PodRef | None,
                 service: ServiceRef | None, now: float, *, evidence: str,
                 pid: int = 0, comm: str = "") -> Finding:
        target = addr.endpoint(entry.target_ip, entry.target_port)
        if evidence == "rst":
            what = (f"the client reset {target}: the backend's reply arrived un-NATed "
                    "(from the pod IP instead of "
                    f"{addr.endpoint(entry.orig.dst, entry.orig.dport)})")
            severity = Severity.CRITICAL
        else:
            what = (f"live endpoint {owner} at {target} never got a reply through conntrack "
                    f"in {self.settings.late_after + self.settings.identity_grace:.0f}s")
            severity = Severity.WARNING
        summary = (
            f"{_who(client, entry.orig.src)} -> {_svc(service, entry.orig)}: {what}; replies are "
            "bypassing netfilter (is br_netfilter loaded and net.bridge.bridge-nf-call-iptables=1?)"
        )
        details: dict[str, object] = {"evidence": evidence}
        if pid:
            details["socket"] = {"pid": pid, "comm": comm}
        return _finding(
            entry, Rule.UNNATED_REPLY, severity, now, summary,
            client=client,
            service=service,
            new_owner=owner,
            details=details,
        )

    # -- inherited-entry (sockets) -----------------------------------------

    def _on_connect(self, ev: SockConnect, now: float, out: list[Finding]) -> None:
        sockets = self._sockets
        sockets[ev.flow] = ev
        sockets.move_to_end(ev.flow)
        if len(sockets) > self.settings.max_sockets:
            sockets.popitem(last=False)
        entry = self._by_orig.get(ev.flow)
        if entry is None or entry.replied is not None or entry.created is None:
            return
        creator = entry.creator
        if (creator is not None and creator.sock_id == ev.sock_id
                and ev.ts - creator.ts <= self.settings.inherit_window):
            return  # the creator's own connect, seen twice
        # A struct sock address names a socket only while it lives: a client that closes
        # a timed-out socket and retries gets a new socket, which the slab allocator
        # (tcp_prot's sock cache, LIFO per CPU) often places at the very same address.
        if creator is None and ev.ts - entry.created <= self.settings.inherit_window:
            entry.creator = ev  # this connect created the entry; its event came second
            return
        if Rule.INHERITED_ENTRY in entry.reported:
            return
        entry.mark_reported(Rule.INHERITED_ENTRY)
        out.append(self._inherited(entry, creator, ev, now))

    def _inherited(self, entry: Entry, creator: SockConnect | None, sock: SockConnect,
                   now: float) -> Finding:
        assert entry.created is not None
        client, service, owner = self._names(entry, entry.created)
        age = sock.ts - entry.created
        by = f"pid {creator.pid} ({creator.comm})" if creator else "an earlier socket"
        summary = (
            f"pid {sock.pid} ({sock.comm}) connected "
            f"{addr.endpoint(entry.orig.src, entry.orig.sport)} -> "
            f"{_svc(service, entry.orig)} and inherited an unreplied conntrack entry created "
            f"{age:.1f}s earlier by {by}: it reuses the old DNAT decision to "
            f"{addr.endpoint(entry.target_ip, entry.target_port)}"
        )
        sockets: dict[str, object] = {"new": _sock_json(sock)}
        if creator is not None:
            sockets["old"] = _sock_json(creator)
        return _finding(
            entry, Rule.INHERITED_ENTRY, Severity.WARNING, now, summary,
            client=client,
            service=service,
            old_owner=owner,
            details={"sockets": sockets},
        )

    # -- names ---------------------------------------------------------------

    def _names(
        self, entry: Entry, t: float
    ) -> tuple[PodRef | None, ServiceRef | None, PodRef | None]:
        """Client pod, the VIP's Service and the target's owner at ``t``."""
        identity = self.identity
        if identity is None:
            return None, None, None
        orig = entry.orig
        return (
            identity.owner_at(orig.src, t),
            identity.service_for(orig.dst, orig.dport, t),
            identity.owner_at(entry.target_ip, t),
        )


class _Wait:
    """Sentinel: the decision needs identity that has not arrived yet."""


_WAIT = _Wait()


def _client_key(entry: Entry) -> tuple[str, int]:
    """(client ip, client port): the key of Correlator._by_client."""
    return (entry.orig_tuple[0], entry.orig_tuple[1])


def _is_reply(ev: CtEvent) -> bool:
    return bool(ev.status & _SEEN_REPLY) or ev.tcp_state in _REPLIED_STATES


def _still_holds(identity: IdentityView, ip: str, pod: PodRef, t: float) -> bool:
    holder = identity.owner_at(ip, t)
    return holder is not None and holder.uid == pod.uid


def _owner_near(identity: IdentityView, ip: str, t: float, grace: float) -> PodRef | None:
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


def _last_owner_before(identity: IdentityView, ip: str, t: float) -> PodRef | None:
    last: PodRef | None = None
    for own in identity.ownerships(ip):
        if own.since <= t:
            last = own.pod
    return last


def _ownership_end(identity: IdentityView, ip: str, pod: PodRef, t: float) -> float | None:
    """When ``pod`` stopped holding ``ip`` (latest stretch begun by ``t``); None: it holds it."""
    ends = [o.until for o in identity.ownerships(ip) if o.pod.uid == pod.uid and o.since <= t]
    return ends[-1] if ends else None


def _finding(
    entry: Entry,
    rule: Rule,
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


def _history(identity: IdentityView, ip: str, t0: float, t1: float) -> list[dict[str, object]]:
    """Who held ``ip`` around ``[t0, t1]``: the story ``cttrace explain`` tells."""
    return [
        {"pod": o.pod.to_json(), "since": rfc3339(o.since),
         "until": rfc3339(o.until) if o.until is not None else None}
        for o in identity.ownerships(ip)
        if o.since <= t1 and (o.until is None or o.until >= t0)
    ]


def _who(client: PodRef | None, ip: str) -> str:
    return f"pod {client}" if client is not None else f"client {ip}"


def _svc(service: ServiceRef | None, orig: Flow) -> str:
    vip = addr.endpoint(orig.dst, orig.dport)
    return f"Service {service} ({vip})" if service is not None else vip


def _sock_json(sock: SockConnect) -> dict[str, object]:
    return {
        "pid": sock.pid,
        "comm": sock.comm,
        "cgroup_id": sock.cgroup_id,
        "netns_ino": sock.netns_ino,
    }
