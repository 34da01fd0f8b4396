"""The correlator: events and a clock in, findings out. Pure: no kernel, no network.

It keeps the table of live NATed TCP conntrack entries (one :class:`Entry` each, in
an :class:`~cttrace.entry_table.EntryTable`: past ``max_entries`` it evicts entries no
rule needs any more before unreplied ones) and hands each event kind to the rules of
:mod:`cttrace.rules` that asked for it; each rule keeps its own state. The runtime
calls :meth:`Correlator.feed` for each event and :meth:`Correlator.tick` a few
times a second; both return the findings decided at that moment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cttrace.entry_table import EntryTable
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
)
from cttrace.findings import Finding
from cttrace.identity.model import IdentityView
from cttrace.rules import (
    FINISHED_STATES,
    FIRST_REPLY_STATES,
    RULES,
    Checker,
    Context,
    Settings,
    unknown_settings,
)

__all__ = ["Correlator", "CorrelatorStats", "Entry", "Settings"]

_SEEN_REPLY = int(CtStatus.SEEN_REPLY)
#: One int object per distinct status word and target port, kept by every entry that has
#: it: a node has a handful of each, and an int above 256 is a 32-byte object of its own.
_SHARED_INTS: dict[int, int] = {}
_shared = _SHARED_INTS.setdefault
# Read for every event: an Enum member as a module global costs ~10 ns, as a class
# attribute (CtKind.NEW) ~70 ns on Python 3.11.
_NEW, _DESTROY = CtKind.NEW, CtKind.DESTROY

#: What an entry has been reported for, until its first finding: one object for all.
_NOTHING_REPORTED: frozenset[str] = frozenset()


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
    orig_tuple: tuple[str, int, str, int]  # == orig; the key of Correlator.entries
    target_ip: str
    target_port: int
    created: float | None  # None: seen first in a dump, creation not observed
    state: int | None
    status: int
    source: str
    last_seen: float
    replied: float | None = None
    creator: SockConnect | None = None  # inherited-entry's: which socket created the entry
    reported: frozenset[str] = _NOTHING_REPORTED  # ids of the rules that reported it

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

    def mark_reported(self, rule: str) -> None:
        self.reported = self.reported | {rule}


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
        unknown = unknown_settings(self.settings)
        if unknown:
            raise ValueError(f"no rule has a setting named {', '.join(unknown)}")
        self.identity = identity
        # Keyed by original tuple (Flow or orig_tuple), the conntrack id checked against it.
        self.entries: EntryTable[Entry] = EntryTable(self.settings.max_entries,
                                                     FINISHED_STATES)
        # Rules that keep an index of their own over the table (see Context.follow_entries).
        self._followers: tuple[Checker, ...] = ()
        context = Context(
            settings=self.settings,
            identity=identity,
            entries=self.entries,
            entry_for_tuple=self.entries.get,
            follow_entries=self._follow,
        )
        checkers = [spec.checker(context) for spec in RULES if spec.checker is not None]
        self._checkers = tuple(checkers)
        # Each event kind goes only to the rules that set a handler for it, in rule order.
        self._on_created = tuple(c.on_created for c in checkers if c.on_created)
        self._on_first_reply = tuple(c.on_first_reply for c in checkers if c.on_first_reply)
        self._on_connect = tuple(c.on_connect for c in checkers if c.on_connect)
        self._on_reset = tuple(c.on_reset for c in checkers if c.on_reset)
        self._on_tick = tuple(c.on_tick for c in checkers if c.on_tick)
        self.stats = CorrelatorStats()
        #: Called with each first reply's unreplied seconds (the agent's histogram).
        self.on_first_reply: Callable[[float], None] | None = None

    def _follow(self, checker: Checker) -> None:
        if checker not in self._followers:
            self._followers = (*self._followers, checker)

    # -- input -------------------------------------------------------------

    def feed(self, ev: Event, now: float) -> list[Finding]:
        self.stats.events += 1
        out: list[Finding] = []
        if isinstance(ev, CtEvent):
            self._on_ct(ev, now, out)
        elif isinstance(ev, SockConnect):
            for on_connect in self._on_connect:
                on_connect(ev, now, out)
        elif isinstance(ev, TcpReset):
            for on_reset in self._on_reset:
                on_reset(ev, now, out)
        elif isinstance(ev, ResyncDone):
            self._on_resync(ev)
        elif isinstance(ev, Lost):
            self.stats.lost += ev.missed
        self.stats.findings += len(out)
        return out

    def tick(self, now: float) -> list[Finding]:
        """Time-driven decisions of every rule that asked for them, in rule order."""
        out: list[Finding] = []
        for on_tick in self._on_tick:
            on_tick(now, out)
        self.stats.pending = sum(c.waiting for c in self._checkers)
        self.stats.findings += len(out)
        return out

    def feed_all(self, events: Iterable[Event], now: float) -> list[Finding]:
        out: list[Finding] = []
        for ev in events:
            out.extend(self.feed(ev, now))
        return out

    # -- conntrack ---------------------------------------------------------

    def _on_ct(self, ev: CtEvent, now: float, out: list[Finding]) -> None:
        entry = self.entries.get(ev.orig)
        if entry is not None and entry.entry_id != ev.entry_id:
            if ev.kind is _DESTROY:
                return  # another entry's destroy: the one tracked at this tuple lives on
            # A new entry at this tuple (the old entry's destroy was lost).
            self._forget(entry)
            entry = None
        if ev.kind is _DESTROY:
            if entry is not None:
                self._forget(entry)
            return
        if entry is None:
            entry = self._track(ev)
            if entry.replied is None and entry.created is not None:
                for on_created in self._on_created:
                    on_created(entry, now)
            return
        entry.last_seen = ev.ts
        status = entry.status | ev.status
        if status != entry.status:
            entry.status = _shared(status, status)
        if ev.tcp_state is not None:
            entry.state = ev.tcp_state
        if entry.replied is None and _is_reply(ev):
            entry.replied = ev.ts
            self._on_first_reply_of(entry, ev.ts, now, out)

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
        evicted = self.entries.add(entry)
        for follower in self._followers:
            follower.tracked(entry)
        if evicted is not None:
            self._forget(evicted)
            self.stats.evicted += 1
        return entry

    def _forget(self, entry: Entry) -> None:
        self.entries.remove(entry)
        for follower in self._followers:
            follower.forgotten(entry)

    def _on_resync(self, ev: ResyncDone) -> None:
        for entry in [e for e in self.entries.values() if e.entry_id not in ev.entry_ids]:
            self._forget(entry)

    def _on_first_reply_of(self, entry: Entry, t1: float, now: float, out: list[Finding]) -> None:
        if entry.created is None:
            return  # creation not observed: no first-reply rule applies
        if self.on_first_reply is not None:
            self.on_first_reply(t1 - entry.created)
        for on_first_reply in self._on_first_reply:
            on_first_reply(entry, t1, now, out)


def _is_reply(ev: CtEvent) -> bool:
    return bool(ev.status & _SEEN_REPLY) or ev.tcp_state in FIRST_REPLY_STATES
