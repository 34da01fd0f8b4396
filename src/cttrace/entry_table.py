"""The correlator's bounded table of live conntrack entries, and which entry goes when full.

Why it exists: a node's conntrack table can hold more entries than the correlator
may remember (``nf_conntrack_max`` is sized per core), and the entries a rule
still needs are the *old* unreplied ones: a client's SYN_SENT entry that stays
in the kernel while its pod dies is exactly the one that later turns into
``late-establish`` or ``wrong-pod``. Evicting the oldest entry would drop those
first. This table evicts, oldest first, the entries no first-reply rule can fire
for any more (answered, finished, or seen only in a dump), and an unreplied entry
whose creation was observed only when nothing else is left; each eviction is
counted by :data:`REASONS`.

Keys: an entry is keyed by its original tuple, and the kernel's 32-bit
conntrack id is checked against it by the caller. The id alone is not unique:
it is a hash of the entry's address and tuple (``nf_ct_get_id()`` in
net/netfilter/nf_conntrack_core.c, siphash truncated to 32 bits), so two live
entries collide now and then on a big table; keyed by id, one would overwrite
the other. Two live entries never share an original tuple within a zone
(``__nf_conntrack_confirm()`` refuses a clash), so the tuple keeps them apart,
and the id tells a new entry from an old one at the same tuple.

Every operation is O(1) (amortised): one append per entry to a creation-order
queue; eviction pops from its front, moving still-unreplied entries to a second
queue that is used only when the first is empty; both queues drop references
to forgotten entries when they grow past twice the live count.
"""

from __future__ import annotations

import collections
from collections.abc import ItemsView, Iterator, ValuesView
from typing import Generic, Protocol, TypeVar

Key = tuple[str, int, str, int]

#: Eviction reasons, exported as ``cttrace_evicted_entries_total{reason=...}``: what the
#: evicted entry was. Only ``unreplied`` loses a finding a rule could still make.
FINISHED, ANSWERED, UNOBSERVED, UNREPLIED = "finished", "answered", "unobserved", "unreplied"
REASONS = (FINISHED, ANSWERED, UNOBSERVED, UNREPLIED)

#: Queue slack before a compaction, so that a small table does not compact on every add.
_SLACK = 4096


class Tracked(Protocol):
    """What the table reads of an entry (:class:`cttrace.correlator.Entry` has it)."""

    @property
    def orig_tuple(self) -> Key: ...

    @property
    def created(self) -> float | None: ...

    @property
    def replied(self) -> float | None: ...

    @property
    def state(self) -> int | None: ...


E = TypeVar("E", bound=Tracked)


class EntryTable(Generic[E]):
    """Live entries by original tuple, at most ``limit``; see the module docstring.

    ``finished_states`` are the TCP states in which an entry is finished (it can
    no longer be answered for the first time).
    """

    def __init__(self, limit: int, finished_states: frozenset[int]) -> None:
        if limit < 1:
            raise ValueError("the entry limit must be at least 1")
        self.limit = limit
        self._finished_states = finished_states
        self._live: dict[Key, E] = {}
        self._by_age: collections.deque[E] = collections.deque()
        self._waiting: collections.deque[E] = collections.deque()  # unreplied when last seen
        #: Entries evicted, by reason (:data:`REASONS`).
        self.evicted: dict[str, int] = dict.fromkeys(REASONS, 0)
        # The read path is the dict's own C methods (one lookup per event).
        self.get = self._live.get

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Key]:
        return iter(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def values(self) -> ValuesView[E]:
        return self._live.values()

    def items(self) -> ItemsView[Key, E]:
        return self._live.items()

    def newest_first(self) -> Iterator[E]:
        return reversed(self._live.values())

    def add(self, entry: E) -> E | None:
        """Track ``entry`` (no live entry may have its tuple); returns the one evicted, if any."""
        live = self._live
        live[entry.orig_tuple] = entry
        self._by_age.append(entry)
        if len(live) > self.limit:
            return self._evict()
        if len(self._by_age) + len(self._waiting) > 2 * len(live) + _SLACK:
            self._compact()
        return None

    def remove(self, entry: E) -> None:
        """Forget ``entry`` (a no-op unless it is the live entry at its tuple)."""
        key = entry.orig_tuple
        if self._live.get(key) is entry:
            del self._live[key]

    def reason(self, entry: E) -> str:
        """Which of :data:`REASONS` an eviction of ``entry`` now counts under."""
        if entry.state in self._finished_states:
            return FINISHED
        if entry.replied is not None:
            return ANSWERED
        if entry.created is None:
            return UNOBSERVED
        return UNREPLIED

    def _evict(self) -> E:
        live = self._live
        by_age = self._by_age
        while by_age:
            entry = by_age.popleft()
            if live.get(entry.orig_tuple) is not entry:
                continue  # forgotten already
            reason = self.reason(entry)
            if reason == UNREPLIED:
                self._waiting.append(entry)  # a rule may still fire: last to go
                continue
            return self._drop(entry, reason)
        waiting = self._waiting
        while True:  # the table is over its limit, so a live entry is queued here
            entry = waiting.popleft()
            if live.get(entry.orig_tuple) is entry:
                return self._drop(entry, self.reason(entry))

    def _drop(self, entry: E, reason: str) -> E:
        del self._live[entry.orig_tuple]
        self.evicted[reason] += 1
        return entry

    def _compact(self) -> None:
        live = self._live

        def alive(queue: collections.deque[E]) -> collections.deque[E]:
            return collections.deque(e for e in queue if live.get(e.orig_tuple) is e)

        self._by_age = alive(self._by_age)
        self._waiting = alive(self._waiting)
