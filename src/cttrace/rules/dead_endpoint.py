"""``dead-endpoint``: a live entry still points at a pod that is gone, and nobody holds its IP.

A conntrack entry outlives the pod its DNAT chose: an established entry lives for
``nf_conntrack_tcp_timeout_established`` (5 days by default) and a client that never
hears a RST keeps sending into the void. Entries in TIME_WAIT or CLOSE finished
their connection and are harmless. When someone else holds (or answered on) the
IP, it is ``wrong-pod``'s business instead.
"""

from __future__ import annotations

from cttrace import addr
from cttrace.events import TcpState, state_name
from cttrace.findings import Finding, Severity
from cttrace.identity.model import IdentityView, PodRef
from cttrace.rules._common import finding, history, last_owner_before, names, owner_near, svc, who
from cttrace.rules._spec import (
    FINISHED_STATES,
    IDENTITY_GRACE,
    Checker,
    Context,
    Out,
    RuleSpec,
    Setting,
    TrackedEntry,
)

DEAD_AFTER = Setting(
    "dead_after", 5.0, flag="--dead-after",
    help="Seconds an entry may outlive its pod before dead-endpoint fires.",
)



class DeadEndpoint(Checker):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.identity = ctx.identity
        self.grace = ctx.settings[IDENTITY_GRACE]
        self.dead_after = ctx.settings[DEAD_AFTER]
        # Entries whose chosen pod may be gone, re-evaluated on tick; an entry that left
        # the table is dropped there, so a DESTROY costs this rule nothing.
        self._watch: dict[tuple[str, int, str, int], TrackedEntry] = {}  # by orig_tuple
        self._identity_gen = -1
        if ctx.identity is not None:
            self.on_created = self._created
            self.on_tick = self._tick

    def _created(self, entry: TrackedEntry, now: float) -> None:
        self._watch[entry.orig_tuple] = entry

    def _tick(self, now: float, out: Out) -> None:
        identity = self.identity
        assert identity is not None
        if identity.generation != self._identity_gen:
            self._identity_gen = identity.generation
            # Identity changed: any live entry may now point at a pod that is gone.
            for entry in self.ctx.entries.values():
                if RULE.id not in entry.reported:
                    self._watch[entry.orig_tuple] = entry
        if self._watch:
            self._check(identity, now, out)

    def _check(self, identity: IdentityView, now: float, out: Out) -> None:
        done: list[tuple[str, int, str, int]] = []
        live = self.ctx.live
        for key, entry in self._watch.items():
            if entry.state in FINISHED_STATES or not live(entry) or RULE.id in entry.reported:
                done.append(key)
                continue
            ip = entry.target_ip
            chosen_at = entry.created if entry.created is not None else entry.last_seen
            chosen = owner_near(identity, ip, chosen_at, self.grace)
            if chosen is None:
                chosen = last_owner_before(identity, ip, chosen_at)
            if chosen is None:
                done.append(key)  # no identity for this target at all
                continue
            gone_at = _ownership_end(identity, ip, chosen, chosen_at + self.grace)
            if gone_at is None:
                done.append(key)  # chosen pod still holds the IP
                continue
            holder = identity.owner_at(ip, now)
            if holder is not None and holder.uid == chosen.uid:
                continue  # its end is stamped after ``now``: look again next tick
            if holder is not None or (entry.replied is not None and entry.replied >= gone_at):
                done.append(key)  # someone holds or answered on the IP: wrong-pod territory
                continue
            if now - gone_at < self.dead_after:
                continue  # keep watching
            done.append(key)
            entry.mark_reported(RULE.id)
            out.append(self._finding(identity, entry, chosen, gone_at, now))
        for key in done:
            self._watch.pop(key, None)

    def _finding(self, identity: IdentityView, entry: TrackedEntry, chosen: PodRef,
                 gone_at: float, now: float) -> Finding:
        chosen_at = entry.created or entry.last_seen
        client, service, _ = names(identity, entry, chosen_at)
        state = state_name(entry.state)
        summary = (
            f"{who(client, entry.orig.src)} -> {svc(service, entry.orig)}: the conntrack entry "
            f"({state}) still sends to {addr.endpoint(entry.target_ip, entry.target_port)}, "
            f"but pod {chosen} is "
            f"gone for {now - gone_at:.1f}s; its packets go into the void until the entry or "
            "the client's connection dies"
        )
        return finding(
            entry, RULE.id, Severity.WARNING, now, summary,
            replied_ts=entry.replied,
            client=client,
            service=service,
            old_owner=chosen,
            details={
                "state": state,
                "owner_gone_s": round(now - gone_at, 3),
                "target_history": history(identity, entry.target_ip, chosen_at, now),
            },
        )


def _ownership_end(identity: IdentityView, ip: str, pod: PodRef, t: float) -> float | None:
    """When ``pod`` stopped holding ``ip`` (latest stretch begun by ``t``); None: it holds it."""
    ends = [o.until for o in identity.ownerships(ip) if o.pod.uid == pod.uid and o.since <= t]
    return ends[-1] if ends else None


RULE = RuleSpec(
    id="dead-endpoint",
    alert="CttraceDeadEndpoint",
    rank=3,
    fires_when="a live entry still points at a pod that is gone (for `--dead-after`) and "
    "nobody else holds its IP",
    needs="identity",
    advice=(
        "Packets keep going to a backend that no longer exists and are lost until the entry "
        "expires. Delete the entry ({delete}) and find out why the pod went away without "
        "closing its connections."
    ),
    # A finished connection (TIME_WAIT, CLOSE) is harmless; its state is in the finding.
    tcp_states=frozenset({int(TcpState.ESTABLISHED), *FINISHED_STATES}),
    settings=(DEAD_AFTER, IDENTITY_GRACE),
    checker=DeadEndpoint,
)
