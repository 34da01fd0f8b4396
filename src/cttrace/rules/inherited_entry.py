"""``inherited-entry``: a new ``connect()`` reuses the tuple of an unreplied entry another
socket created, and so inherits its old DNAT decision.

Conntrack matches packets by tuple, not by socket: a client that closes a timed-out
socket and connects again from the same source port (fixed ports, or the port
allocator handing it back) sends a SYN that matches the unreplied SYN_SENT entry and
goes where that entry's DNAT points. Only the bpf source sees sockets
(``tcp_connect``), so only it can tell that a different socket made the entry.
"""

from __future__ import annotations

import collections

from cttrace import addr
from cttrace.events import SockConnect
from cttrace.findings import Finding, Severity
from cttrace.rules._common import finding, names, sock_json, svc
from cttrace.rules._spec import (
    FIRST_REPLY_STATES,
    Checker,
    Context,
    Out,
    RuleSpec,
    Setting,
    TrackedEntry,
)

INHERIT_WINDOW = Setting(
    "inherit_window", 1.0,
    help="A connect() more than this many seconds after its tuple's entry was created did "
    "not create it.",
)
MAX_SOCKETS = Setting("max_sockets", 65_536, help="Bound on remembered connect() tuples.")


class InheritedEntry(Checker):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.identity = ctx.identity
        self.window = ctx.settings[INHERIT_WINDOW]
        self.max_sockets = int(ctx.settings[MAX_SOCKETS])
        self._sockets: collections.OrderedDict[tuple[str, int, str, int], SockConnect] = (
            collections.OrderedDict()  # Flow keys
        )
        self.on_connect = self._connect

    def _connect(self, ev: SockConnect, now: float, out: Out) -> None:
        sockets = self._sockets
        previous = sockets.get(ev.flow)
        sockets[ev.flow] = ev
        sockets.move_to_end(ev.flow)
        if len(sockets) > self.max_sockets:
            sockets.popitem(last=False)
        entry = self.ctx.entry_for_tuple(ev.flow)
        if entry is None or entry.replied is not None or entry.created is None:
            return
        creator = entry.creator
        if creator is None and previous is not None and (
            abs(previous.ts - entry.created) <= self.window
        ):
            # The connect before this one on the tuple, just before the entry's creation,
            # created it (looked up now rather than at every NEW: only connects pay).
            creator = entry.creator = previous
        if (creator is not None and creator.sock_id == ev.sock_id
                and ev.ts - creator.ts <= self.window):
            return  # the creator's own connect, seen twice
        # A struct sock address names a socket only while it lives: a client that closes
        # a timed-out socket and retries gets a new socket, which the slab allocator
        # (tcp_prot's sock cache, LIFO per CPU) often places at the very same address.
        if creator is None and ev.ts - entry.created <= self.window:
            entry.creator = ev  # this connect created the entry; its event came second
            return
        if RULE.id in entry.reported:
            return
        entry.mark_reported(RULE.id)
        out.append(self._finding(entry, creator, ev, now))

    def _finding(self, entry: TrackedEntry, creator: SockConnect | None, sock: SockConnect,
                 now: float) -> Finding:
        assert entry.created is not None
        client, service, owner = names(self.identity, entry, entry.created)
        age = sock.ts - entry.created
        by = f"pid {creator.pid} ({creator.comm})" if creator else "an earlier socket"
        summary = (
            f"pid {sock.pid} ({sock.comm}) connected "
            f"{addr.endpoint(entry.orig.src, entry.orig.sport)} -> "
            f"{svc(service, entry.orig)} and inherited an unreplied conntrack entry created "
            f"{age:.1f}s earlier by {by}: it reuses the old DNAT decision to "
            f"{addr.endpoint(entry.target_ip, entry.target_port)}"
        )
        sockets: dict[str, object] = {"new": sock_json(sock)}
        if creator is not None:
            sockets["old"] = sock_json(creator)
        return finding(
            entry, RULE.id, Severity.WARNING, now, summary,
            client=client,
            service=service,
            old_owner=owner,
            details={"sockets": sockets},
        )


RULE = RuleSpec(
    id="inherited-entry",
    alert="CttraceInheritedEntry",
    rank=5,
    fires_when="a new `connect()` reuses the tuple of an unreplied entry another socket created",
    needs="bpf source",
    advice=(
        "A new socket reused the 4-tuple of an unreplied conntrack entry and inherited its old "
        "DNAT decision, so it goes where that decision points, not where the Service points "
        "now. Delete the entry ({delete}) and avoid fixed client source ports; see "
        "`cttrace doctor` for nf_conntrack_tcp_timeout_syn_sent."
    ),
    # Only an unreplied entry can be inherited: the first reply ends the question.
    tcp_states=FIRST_REPLY_STATES,
    settings=(INHERIT_WINDOW, MAX_SOCKETS),
    checker=InheritedEntry,
)
