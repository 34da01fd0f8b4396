"""``unnated-reply``: replies bypass netfilter, so conntrack never reverse-NATs them.

With ``net.bridge.bridge-nf-call-iptables=0`` (or br_netfilter not loaded) a
bridged pod's SYN-ACK never reaches netfilter (br_netfilter's br_nf_pre_routing
is not called): the entry stays SYN_SENT although the pod is alive and answering
(the netlink evidence, a warning), and the reply reaches the client from the pod
IP instead of the VIP, so the client's stack resets it (the bpf evidence: an RST
sent to pod-ip:port on the entry's client tuple, critical).
"""

from __future__ import annotations

import collections

from cttrace import addr
from cttrace.events import TcpReset
from cttrace.findings import Finding, Severity
from cttrace.identity.model import PodRef, ServiceRef
from cttrace.rules._common import finding, names, owner_near, still_holds, svc, who
from cttrace.rules._spec import (
    FIRST_REPLY_STATES,
    IDENTITY_GRACE,
    Checker,
    Context,
    Out,
    RuleSpec,
    TrackedEntry,
)
from cttrace.rules.late_establish import LATE_AFTER


def _client_key(entry: TrackedEntry) -> tuple[str, int]:
    """(client ip, client port): the key of the reset index."""
    return (entry.orig_tuple[0], entry.orig_tuple[1])


class UnnatedReply(Checker):
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.identity = ctx.identity
        self.horizon = ctx.settings[LATE_AFTER] + ctx.settings[IDENTITY_GRACE]
        self.grace = ctx.settings[IDENTITY_GRACE]
        # Unreplied entries in creation order, for the age check.
        self._unreplied: collections.deque[TrackedEntry] = collections.deque()
        # (client ip, client port) -> entry: an RST names the client side and the pod, not
        # the VIP. Built at the first TcpReset (only the bpf source sends them), then kept
        # up: ~100 B per entry that a netlink-only correlator never pays.
        self._by_client: dict[tuple[str, int], TrackedEntry] | None = None
        self.on_reset = self._reset
        if ctx.identity is not None:
            self.on_created = self._created
            self.on_tick = self._tick

    # -- no reply from a live endpoint (any source) ----------------------------

    def _created(self, entry: TrackedEntry, now: float) -> None:
        self._unreplied.append(entry)

    def _tick(self, now: float, out: Out) -> None:
        identity = self.identity
        assert identity is not None
        unreplied = self._unreplied
        while unreplied:
            entry = unreplied[0]
            assert entry.created is not None
            if now - entry.created < self.horizon:
                break
            unreplied.popleft()
            if entry.replied is not None or not self.ctx.live(entry):
                continue
            if RULE.id in entry.reported:
                continue
            ip = entry.target_ip
            owner = owner_near(identity, ip, entry.created, self.grace)
            if owner is None or not still_holds(identity, ip, owner, now):
                continue  # a dead or unknown target is dead-endpoint's business
            client, service, _ = names(identity, entry, entry.created)
            if service is not None and identity.is_endpoint(
                service, ip, entry.created, now, owner.uid
            ) is False:
                continue
            entry.mark_reported(RULE.id)
            out.append(self._finding(entry, owner, client, service, now, evidence="no-reply"))

    # -- the client reset the pod IP (bpf) ----------------------------------------

    def _reset(self, ev: TcpReset, now: float, out: Out) -> None:
        """A local client RSTs pod-ip:port on a tuple whose entry expects the VIP to answer."""
        if not ev.sent:
            return
        rst = ev.flow
        by_client = self._by_client
        if by_client is None:
            # Later entries win a shared client ip:port, as when kept up from the start.
            by_client = self._by_client = {
                _client_key(e): e for e in self.ctx.entries.values()}
            self.ctx.follow_entries(self)
        entry = by_client.get((rst.src, rst.sport))
        if entry is None or entry.target != (rst.dst, rst.dport) or entry.replied is not None:
            return
        if RULE.id in entry.reported:
            return
        entry.mark_reported(RULE.id)
        client, service, _ = names(self.identity, entry, entry.created or ev.ts)
        owner = self.identity.owner_at(rst.dst, ev.ts) if self.identity else None
        out.append(self._finding(entry, owner, client, service, now, evidence="rst",
                                 pid=ev.pid, comm=ev.comm))

    def tracked(self, entry: TrackedEntry) -> None:
        assert self._by_client is not None
        self._by_client[_client_key(entry)] = entry

    def forgotten(self, entry: TrackedEntry) -> None:
        by_client = self._by_client
        assert by_client is not None
        key = _client_key(entry)
        if by_client.get(key) is entry:
            del by_client[key]

    def _finding(self, entry: TrackedEntry, owner: PodRef | None, client: PodRef | None,
                 service: ServiceRef | None, now: float, *, evidence: str,
                 pid: int = 0, comm: str = "") -> Finding:
        target = addr.endpoint(entry.target_ip, entry.target_port)
        if evidence == "rst":
            what = (f"the client reset {target}: the backend's reply arrived un-NATed "
                    "(from the pod IP instead of "
                    f"{addr.endpoint(entry.orig.dst, entry.orig.dport)})")
        else:
            what = (f"live endpoint {owner} at {target} never got a reply through conntrack "
                    f"in {self.horizon:.0f}s")
        summary = (
            f"{who(client, entry.orig.src)} -> {svc(service, entry.orig)}: {what}; replies are "
            "bypassing netfilter (is br_netfilter loaded and net.bridge.bridge-nf-call-iptables=1?)"
        )
        details: dict[str, object] = {"evidence": evidence}
        if pid:
            details["socket"] = {"pid": pid, "comm": comm}
        return finding(
            entry, RULE.id, severity_of(evidence), now, summary,
            client=client,
            service=service,
            new_owner=owner,
            details=details,
        )


def severity_of(evidence: str) -> Severity:
    """An RST is proof (critical); a missing reply from a live endpoint only suggests it."""
    return Severity.CRITICAL if evidence == "rst" else Severity.WARNING


RULE = RuleSpec(
    id="unnated-reply",
    alert="CttraceUnnatedReply",
    rank=4,
    fires_when="replies bypass netfilter: a live endpoint never answers through conntrack "
    "(netlink: warning) or the client RSTs the pod IP (bpf: critical) — "
    "`bridge-nf-call-iptables=0`",
    needs="identity / bpf",
    advice=(
        "The backend's reply reached the client from the pod IP instead of the Service IP "
        "(not reverse-NATed on the bridge), and the client reset it. Run `cttrace doctor` on "
        "this node to check br_netfilter and net.bridge.bridge-nf-call-iptables."
    ),
    # Any reply (SYN_RECV or ESTABLISHED) clears the suspicion.
    tcp_states=FIRST_REPLY_STATES,
    settings=(LATE_AFTER, IDENTITY_GRACE),
    checker=UnnatedReply,
)
