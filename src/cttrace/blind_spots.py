"""Conditions that make tracing blind without any event saying so, checked on a timer.

Why it exists: two things silently end what cttrace can see, and a counter alone
does not tell an operator:

* the traced network namespace is deleted (or replaced by a new one of the same
  name): the source's socket keeps the old namespace alive, so it stays
  "attached" and reads nothing, forever. :class:`TracedNamespace` notices that
  the name no longer leads to the namespace the source attached to; the agent's
  ``/healthz`` and ``/readyz`` then fail and ``watch`` stops.
* the namespace's conntrack table is full: the kernel evicts entries that never
  saw a reply to make room (``early_drop()`` in net/netfilter/nf_conntrack_core.c
  picks only non-ASSURED entries, i.e. exactly connections still being set up)
  and counts them in the ``early_drop`` statistic. :class:`TableFullCheck` turns
  its growth into a ``warning`` line naming the count and the limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from cttrace.errors import UserError
from cttrace.findings import Finding, rfc3339
from cttrace.netns import netns_inode
from cttrace.runtime import Periodic

Note = Callable[[dict[str, object]], None]


class TracedNamespace:
    """The namespace a source attached to (``netns``: a name or path; None: our own)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._inode = netns_inode(netns) if netns else None

    def gone(self) -> str | None:
        """Why the traced namespace is no longer there, or None while it is."""
        if self.netns is None:
            return None  # our own namespace lives as long as we do
        try:
            inode = netns_inode(self.netns)
        except (OSError, UserError):
            return f"traced network namespace {self.netns!r} was deleted"
        if inode != self._inode:
            return (f"traced network namespace {self.netns!r} was replaced by another one "
                    "of the same name")
        return None


class TableFullCheck:
    """Warns when the traced namespace's conntrack table evicted entries early (full)."""

    def __init__(self, read_stats: Callable[[], Mapping[str, int]],
                 read_fill: Callable[[], Mapping[str, int]], note: Note) -> None:
        self._read_stats = read_stats
        self._read_fill = read_fill
        self._note = note
        self._last: int | None = None

    def check(self, now: float) -> None:
        try:
            early = self._read_stats().get("early_drop", 0)
        except (OSError, ValueError, UserError):
            return  # the snat-collision check says once that the statistics are unreadable
        last, self._last = self._last, early
        if last is None or early <= last:
            return  # a baseline, no growth, or a counter that wrapped or was reset
        try:
            limit: object = self._read_fill().get("max", "?")
        except (OSError, ValueError, UserError):
            limit = "?"
        self._note({
            "kind": "warning", "ts": rfc3339(now), "reason": "conntrack-table-full",
            "early_drop": early - last, "nf_conntrack_max": limit,
            "msg": f"the conntrack table is full (nf_conntrack_max {limit}): the kernel "
                   f"evicted {early - last} unreplied entries early to make room; "
                   "connections being set up were dropped and no rule saw them end. "
                   "Raise net.netfilter.nf_conntrack_max",
        })


def blind_spot_checks(traced: TracedNamespace, note: Note, *,
                      on_gone: Callable[[], None] | None = None) -> list[Periodic]:
    """The pipeline's timed checks: the namespace every second, its table every 5 s.

    ``note`` gets each ``warning`` line; ``on_gone`` is called once the namespace is gone.
    """
    from cttrace.ctstats import read_conntrack_stats
    from cttrace.metrics import read_conntrack_fill

    netns = traced.netns
    table = TableFullCheck(lambda: read_conntrack_stats(netns),
                           lambda: read_conntrack_fill(netns), note)
    said = False

    def namespace(now: float) -> list[Finding]:
        nonlocal said
        why = traced.gone()
        if why is not None and not said:
            said = True
            note({"kind": "warning", "ts": rfc3339(now), "reason": "netns-gone",
                  "netns": netns, "msg": f"{why}: the source can see nothing any more"})
            if on_gone is not None:
                on_gone()
        return []

    def table_full(now: float) -> list[Finding]:
        table.check(now)
        return []

    return [Periodic(1.0, namespace), Periodic(5.0, table_full)]
