"""Which DNAT targets the bpf source watches, fed from the identity index.

The bpf source keeps every NATed TCP entry in the kernel and sends one to
userspace only when a rule may need it. A healthy entry becomes interesting
when its target changes: the pod behind it dies, the IP moves to another pod,
or the Service stops listing it. Then

- dead-endpoint needs the live entries already toward that IP, and
- wrong-pod needs any entry toward it that is answered from now on.

The identity index calls :meth:`WatchedTargets.ip_changed` for each such change
(``IdentityIndex.on_ip_change``); this puts the IP into the kernel's watched map
(:meth:`~cttrace.sources.bpf.BpfSource.watch_target`, which also replays the
entries the kernel kept toward it) for as long as an entry created before the
change can still be answered: conntrack forgets an unanswered entry after
``nf_conntrack_tcp_timeout_syn_sent`` seconds, read from the traced namespace.
:meth:`WatchedTargets.expire` (a periodic check) takes it out again.
"""

from __future__ import annotations

from typing import Protocol

from cttrace.errors import UserError
from cttrace.findings import Finding
from cttrace.netns import entered_netns

#: Per network namespace; the kernel's default (nf_conntrack_proto_tcp.c: 2 MINS).
SYN_SENT_TIMEOUT_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_syn_sent"
DEFAULT_SYN_SENT_TIMEOUT_S = 120.0


class TargetWatcher(Protocol):
    """What the feed needs of a source (the bpf source has it)."""

    def watch_target(self, ip: str) -> None: ...

    def unwatch_target(self, ip: str) -> None: ...


def syn_sent_timeout(netns: str | None) -> float:
    """``nf_conntrack_tcp_timeout_syn_sent`` of the traced namespace, or the kernel default
    when it cannot be read (nf_conntrack not loaded yet)."""
    try:
        with entered_netns(netns), open(SYN_SENT_TIMEOUT_SYSCTL) as f:
            return float(f.read().strip())
    except (OSError, ValueError, UserError):
        return DEFAULT_SYN_SENT_TIMEOUT_S


class WatchedTargets:
    """IPs whose owner or listing changed, watched in the kernel for ``window`` seconds."""

    def __init__(self, source: TargetWatcher, window: float) -> None:
        self._source = source
        self.window = window
        self._until: dict[str, float] = {}

    def ip_changed(self, ip: str, t: float) -> None:
        """``ip``'s owner died or changed, or a Service stopped listing it, at ``t``."""
        until = t + self.window
        if until > self._until.get(ip, float("-inf")):
            self._until[ip] = until
        self._source.watch_target(ip)

    def expire(self, now: float) -> list[Finding]:
        """Stop watching the IPs whose window has passed (a :class:`Periodic` check)."""
        for ip in [ip for ip, until in self._until.items() if until <= now]:
            del self._until[ip]
            self._source.unwatch_target(ip)
        return []

    def __len__(self) -> int:
        return len(self._until)


def follow_targets(identity: object, source: object, netns: str | None) -> WatchedTargets | None:
    """Wire the identity index's IP changes to the source's watched targets; None when
    either side has no such interface (no identity, or a source that streams everything)."""
    if identity is None or not hasattr(identity, "on_ip_change"):
        return None
    if not (hasattr(source, "watch_target") and hasattr(source, "unwatch_target")):
        return None
    feed = WatchedTargets(source, syn_sent_timeout(netns))
    identity.on_ip_change = feed.ip_changed
    return feed
