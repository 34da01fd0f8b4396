"""``wrong-pod``: owner(X, t1) != owner(X, t0) for the DNAT target X of an entry created
in SYN_SENT at t0 and first answered at t1.

Kubernetes Services are DNAT rules, and conntrack keeps each decision per tuple: an
unreplied entry stays in SYN_SENT for ``nf_conntrack_tcp_timeout_syn_sent`` (120 s by
default), and a client retrying from the same source port matches it and skips
kube-proxy's rules. When X's pod died meanwhile and its IP went to another pod, the
retry reaches that pod: no error, no RST. Decided at the first reply; identity lags
the kernel, so a decision waits up to ``--identity-grace`` for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cttrace import addr
from cttrace.findings import Finding, Severity
from cttrace.identity.model import PodRef
from cttrace.rules._common import (
    finding,
    history,
    last_owner_before,
    names,
    still_holds,
    svc,
    who,
)
from cttrace.rules._spec import (
    FIRST_REPLY_STATES,
    IDENTITY_GRACE,
    Checker,
    Context,
    Out,
    RuleSpec,
    TrackedEntry,
)


@dataclass(slots=True)
class _Pending:
    """A decision waiting for identity of the new owner."""

    entry: TrackedEntry
    t1: float
    deadline: float


class _Wait:
    """Sentinel: the decision needs identity that has not arrived yet."""


_WAIT = _Wait()


class WrongPod(Checker):
    def __init__(self, ctx: Context) -> None:
        self.identity = ctx.identity
        self.grace = ctx.settings[IDENTITY_GRACE]
        self._pending: list[_Pending] = []
        self._identity_gen = -1
        if ctx.identity is not None:
            self.on_first_reply = self._first_reply
            self.on_tick = self._tick

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def _first_reply(self, entry: TrackedEntry, t1: float, now: float, out: Out) -> None:
        decided = self._decide(entry, t1, now, final=False)
        if decided is _WAIT:
            self._pending.append(_Pending(entry=entry, t1=t1, deadline=t1 + self.grace))
        elif isinstance(decided, Finding):
            out.append(decided)

    def _tick(self, now: float, out: Out) -> None:
        identity = self.identity
        assert identity is not None
        changed = identity.generation != self._identity_gen
        self._identity_gen = identity.generation
        if not self._pending:
            return
        still: list[_Pending] = []
        for p in self._pending:
            final = now >= p.deadline
            if not (final or changed):
                still.append(p)
                continue
            decided = self._decide(p.entry, p.t1, now, final=final)
            if decided is _WAIT:
                still.append(p)
            elif isinstance(decided, Finding):
                out.append(decided)
        self._pending = still

    def _decide(
        self, entry: TrackedEntry, t1: float, now: float, *, final: bool
    ) -> Finding | _Wait | None:
        """Decided as soon as identity allows.

        An owner whose stretch starts within the grace after the reply counts as the one
        that answered, and conclusions that a late update could overturn wait until the
        grace ends (``final``).
        """
        identity = self.identity
        assert identity is not None and entry.created is not None
        t0 = entry.created
        ip = entry.target_ip
        old = identity.owner_at(ip, t0)
        new = identity.owner_at(ip, t1)
        if new is None:
            horizon = min(now, t1 + self.grace)
            for own in identity.ownerships(ip):
                if t1 < own.since <= horizon:
                    new = own.pod
                    break
        if new is None:
            if not final:
                return _WAIT
            if old is None or still_holds(identity, ip, old, t1):
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
            old = last_owner_before(identity, ip, t0)
        return self._wrong_pod(entry, t1, now, old, new, endpoint)

    def _wrong_pod(
        self,
        entry: TrackedEntry,
        t1: float,
        now: float,
        old: PodRef | None,
        new: PodRef | None,
        endpoint: bool | None,
    ) -> Finding:
        assert entry.created is not None
        identity = self.identity
        assert identity is not None
        client, service, _ = names(identity, entry, entry.created)
        severity = severity_of(endpoint)
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
            f"{who(client, entry.orig.src)} connected to {svc(service, entry.orig)} and reached "
            f"{reached}: the conntrack entry kept the DNAT to {chosen} for "
            f"{t1 - entry.created:.1f}s while the IP changed hands"
        )
        return finding(
            entry, RULE.id, severity, now, summary,
            replied_ts=t1,
            client=client,
            service=service,
            old_owner=old,
            new_owner=new,
            details={
                "new_owner_is_endpoint": endpoint,
                "identity": "known" if new is not None else "unknown",
                "target_history": history(identity, entry.target_ip, entry.created, now),
            },
        )


def severity_of(new_owner_is_endpoint: bool | None) -> Severity:
    """Critical when the pod reached is not an endpoint of the VIP's Service (another
    Service's pod got the IP); a warning when it is one (or nobody can tell)."""
    return Severity.CRITICAL if new_owner_is_endpoint is False else Severity.WARNING


RULE = RuleSpec(
    id="wrong-pod",
    alert="CttraceWrongPod",
    rank=1,
    fires_when="an entry created in SYN_SENT with DNAT target X first replies after X changed "
    "owner. **critical** when the new owner is not an endpoint of the VIP's Service, "
    "**warning** when it is. Decided at the first reply; waits up to `--identity-grace` for "
    "identity that lags the kernel",
    needs="identity",
    advice=(
        "The client is talking to a pod it never chose, and a pooled keep-alive client will "
        "keep reusing this connection. Restart the client's connections or delete the entry "
        "({delete}); keep nf_conntrack_tcp_timeout_syn_sent below the CNI's IP cooldown "
        "(see `cttrace doctor`)."
    ),
    # The first reply.
    tcp_states=FIRST_REPLY_STATES,
    settings=(IDENTITY_GRACE,),
    checker=WrongPod,
)
