"""What a rule declares about itself, and what the correlator hands each rule.

A rule module holds one :class:`RuleSpec` named ``RULE`` (its id, alert name,
advice, the kernel states it reads, its settings with their defaults) and, when
it decides from conntrack events, a :class:`Checker` that owns the rule's state.
The correlator keeps the entry table and calls a checker only for the event
kinds whose handler the checker set; everything users see about a rule (the
``--rule`` choices, alert names, metric series, the README's table, the kernel
state filters) is derived from the specs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from cttrace.events import Flow, SockConnect, TcpReset, TcpState
from cttrace.findings import Finding
from cttrace.identity.model import IdentityView


@dataclass(frozen=True, slots=True)
class Setting:
    """One knob of a rule: its name in :class:`Settings`, default, and command-line flag."""

    name: str
    """Keyword of :class:`Settings` (``late_after``)."""
    default: float
    """Seconds unless the help says otherwise; the reason for the value is in the help."""
    help: str
    """What a user reads in ``--help``."""
    flag: str = ""
    """The command-line option (``--late-after``); empty: not a command-line option."""


#: The correlator's entry bound when the node's nf_conntrack_max is not known (or lower).
MAX_ENTRIES = 262_144


class Settings:
    """How the rules decide: a value for every :class:`Setting` given, the default for the rest.

    ``Settings(late_after=2.0)``; the correlator refuses a name no rule declares.
    """

    __slots__ = ("max_entries", "values")

    def __init__(self, *, max_entries: int = MAX_ENTRIES, **values: float) -> None:
        self.max_entries: int = max_entries
        """Bound on tracked entries; beyond it the oldest that no rule needs is evicted
        (counted by reason); an unreplied entry goes only when nothing else is left."""
        self.values = values

    @classmethod
    def of(cls, values: Mapping[str, float], *, max_entries: int = MAX_ENTRIES) -> Settings:
        """The settings a command line gave, by name."""
        settings = cls(max_entries=max_entries)
        settings.values = dict(values)
        return settings

    def __getitem__(self, setting: Setting) -> float:
        return self.values.get(setting.name, setting.default)


IDENTITY_GRACE = Setting(
    "identity_grace", 5.0, flag="--identity-grace",
    help="Seconds a decision waits for identity that lags the kernel (pod status and "
    "EndpointSlices reach the API seconds after the kernel acts).",
)
"""Shared by every rule that names pods: identity is not any one rule's."""


#: States that mean the backend answered: SYN_SENT -> SYN_RECV is the SYN-ACK
#: (tcp_conntrack's sSR transition), after which SEEN_REPLY is set as well; a
#: simultaneous open or a picked-up connection may go straight to ESTABLISHED.
FIRST_REPLY_STATES = frozenset({int(TcpState.SYN_RECV), int(TcpState.ESTABLISHED)})
#: Finished connections: no first reply can come any more, and an entry in these
#: states points at a dead pod harmlessly.
FINISHED_STATES = frozenset({int(TcpState.TIME_WAIT), int(TcpState.CLOSE)})


class TrackedEntry(Protocol):
    """What a rule reads and writes of one entry of the correlator's table."""

    entry_id: int
    orig_tuple: tuple[str, int, str, int]
    target_ip: str
    target_port: int
    created: float | None
    state: int | None
    source: str
    last_seen: float
    replied: float | None
    creator: SockConnect | None  # inherited-entry's: a slot costs less than a map
    reported: frozenset[str]

    @property
    def orig(self) -> Flow: ...

    @property
    def target(self) -> tuple[str, int]: ...

    def mark_reported(self, rule: str) -> None: ...


Out = list[Finding]


class EntryView(Protocol):
    """The correlator's table as the rules read it (an :class:`~cttrace.entry_table.EntryTable`)."""

    def get(self, key: tuple[str, int, str, int], /) -> TrackedEntry | None: ...

    def values(self) -> Iterable[TrackedEntry]: ...


@dataclass(frozen=True, slots=True)
class Context:
    """What the correlator gives a checker: settings, identity and a read view of its table."""

    settings: Settings
    identity: IdentityView | None
    entries: EntryView
    """Live entries by original tuple (conntrack ids are not unique: see entry_table)."""
    entry_for_tuple: Callable[[tuple[str, int, str, int]], TrackedEntry | None]
    """The live entry of an original tuple."""
    follow_entries: Callable[[Checker], None]
    """From now on, call the checker's ``tracked``/``forgotten`` for every entry added/removed."""

    def live(self, entry: TrackedEntry) -> bool:
        return self.entries.get(entry.orig_tuple) is entry


class Checker:
    """One rule's state and handlers. A handler left None is an event kind the rule does
    not want: the correlator never calls it (a rule costs the hot path nothing it skips)."""

    on_created: Callable[[TrackedEntry, float], None] | None = None
    """A NEW entry whose creation was seen, not replied yet."""
    on_first_reply: Callable[[TrackedEntry, float, float, Out], None] | None = None
    """(entry, reply time, now, out): the entry's first reply."""
    on_connect: Callable[[SockConnect, float, Out], None] | None = None
    on_reset: Callable[[TcpReset, float, Out], None] | None = None
    on_tick: Callable[[float, Out], None] | None = None
    """Time-driven decisions, a few times a second."""

    def tracked(self, entry: TrackedEntry) -> None:
        """An entry was added to the table (only after ``Context.follow_entries``)."""

    def forgotten(self, entry: TrackedEntry) -> None:
        """An entry left the table (only after ``Context.follow_entries``)."""

    @property
    def waiting(self) -> int:
        """Decisions waiting for identity (reported as ``pending``)."""
        return 0


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """Everything the rest of cttrace knows about a rule."""

    id: str
    """What ``--rule`` and the JSON ``rule`` key say (``wrong-pod``)."""
    alert: str
    """The Alertmanager ``alertname`` (``CttraceWrongPod``)."""
    rank: int
    """Position in lists a person reads (the README table, ``--rule`` help)."""
    fires_when: str
    """The README's "fires when" cell (markdown): the rule and its severities."""
    needs: str
    """The README's "needs" cell: identity, a source, counters."""
    advice: str
    """What the operator should do, after the finding's sentence; ``{delete}`` is the
    ``conntrack -D`` command of the finding's entry."""
    tcp_states: frozenset[int] = frozenset()
    """TCP conntrack states (``enum tcp_conntrack``) whose UPDATE the rule reads; the
    kernel-side filters pass only UPDATEs into the union of these (and out of no reply)."""
    settings: tuple[Setting, ...] = ()
    checker: Callable[[Context], Checker] | None = None
    """Builds the rule's state for one correlator; None: not decided from conntrack events."""
