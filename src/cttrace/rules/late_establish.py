"""``late-establish``: an entry stayed unreplied past ``--late-after``, then was answered.

The node-local shadow of ``wrong-pod``: tcp_conntrack keeps an unreplied entry in
SYN_SENT for ``nf_conntrack_tcp_timeout_syn_sent`` (120 s by default), and a client
retrying from the same source port within that time matches the entry and takes its
old DNAT decision. A reply seconds after the first SYN means a retry was answered on
that decision, whoever holds the target IP now. Needs no identity.
"""

from __future__ import annotations

from cttrace import addr
from cttrace.findings import Severity
from cttrace.rules._common import finding, names, svc, who
from cttrace.rules._spec import (
    FIRST_REPLY_STATES,
    Checker,
    Context,
    Out,
    RuleSpec,
    Setting,
    TrackedEntry,
)

LATE_AFTER = Setting(
    "late_after", 3.0, flag="--late-after",
    help="Seconds an entry may stay unreplied before its first reply counts as "
    "late-establish (client connect timeouts and SYN retransmissions are 1-3 s; a healthy "
    "pod answers in milliseconds).",
)


class LateEstablish(Checker):
    def __init__(self, ctx: Context) -> None:
        self.identity = ctx.identity
        self.late_after = ctx.settings[LATE_AFTER]
        self.on_first_reply = self._first_reply

    def _first_reply(self, entry: TrackedEntry, t1: float, now: float, out: Out) -> None:
        assert entry.created is not None
        unreplied = t1 - entry.created
        if unreplied < self.late_after:
            return
        client, service, old_owner = names(self.identity, entry, entry.created)
        new_owner = self.identity.owner_at(entry.target_ip, t1) if self.identity else None
        summary = (
            f"{who(client, entry.orig.src)} -> {svc(service, entry.orig)}: entry stayed "
            f"unreplied {unreplied:.1f}s, then "
            f"{addr.endpoint(entry.target_ip, entry.target_port)} answered "
            "on the old DNAT decision (a retry from the same source port inherits it)"
        )
        out.append(finding(
            entry, RULE.id, Severity.WARNING, now, summary,
            replied_ts=t1,
            client=client,
            service=service,
            old_owner=old_owner,
            new_owner=new_owner,
        ))


RULE = RuleSpec(
    id="late-establish",
    alert="CttraceLateEstablish",
    rank=2,
    fires_when="an entry stayed unreplied longer than `--late-after`, then was answered "
    "(the node-local shadow of `wrong-pod`)",
    needs="any source",
    advice=(
        "The entry went unanswered and then established on its old DNAT target, so the backend "
        "that answered may not be the one that was chosen. Check which pod the client is "
        "talking to, delete the entry if it is wrong ({delete}), and keep "
        "nf_conntrack_tcp_timeout_syn_sent below the CNI's IP cooldown (see `cttrace doctor`)."
    ),
    # The first reply.
    tcp_states=FIRST_REPLY_STATES,
    settings=(LATE_AFTER,),
    checker=LateEstablish,
)
