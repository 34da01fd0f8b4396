"""The parts ``watch``, ``agent`` and ``demo`` share: identity and the correlator, built
from options. Kept out of the commands so each command only adds its own sinks.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cttrace.correlator import Correlator, Entry, Settings
from cttrace.errors import UserError
from cttrace.findings import Finding
from cttrace.identity.model import IdentityView
from cttrace.remediate import Mode
from cttrace.rules import MAX_ENTRIES, snat_collision
from cttrace.runtime import IdentityPoller, Periodic
from cttrace.sources import Source
from cttrace.sources.select import SourceKind

if TYPE_CHECKING:
    from cttrace.remediate import Remediation


def warn(msg: str) -> None:
    print(f"cttrace: {msg}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class TraceOptions:
    """What ``watch`` and ``agent`` share: where to trace, who is who, the rules' clocks."""

    source: str = SourceKind.AUTO
    netns: str | None = None
    identity_file: Path | None = None
    kubeconfig: str | None = None
    kube: bool = False  # follow the Kubernetes API (kubeconfig or in-cluster)
    rule_settings: dict[str, float] = field(default_factory=dict)
    """Values of the rules' settings by name (``late_after``); defaults for the rest."""
    ready_file: Path | None = None
    remediate: str = Mode.OFF
    max_entries: int | None = None  # None: sized from the traced namespace's nf_conntrack_max


def build_tracing(opts: TraceOptions) -> tuple[Correlator, list[IdentityPoller]]:
    """The correlator, its identity index (``correlator.identity``) and what feeds it."""
    index, pollers = build_identity(opts.identity_file, kubeconfig=opts.kubeconfig,
                                    kube=opts.kube)
    settings = Settings.of(opts.rule_settings,
                           max_entries=opts.max_entries or default_max_entries(opts.netns))
    return Correlator(settings, identity=index), pollers


def default_max_entries(netns: str | None) -> int:
    """The correlator's entry bound: the namespace's nf_conntrack_max (the most entries its
    conntrack table holds: nf_conntrack_alloc() checks each namespace's count against it),
    never below the built-in 262144. The built-in when it cannot be read."""
    from cttrace.metrics import read_conntrack_fill

    floor = MAX_ENTRIES
    try:
        return max(floor, read_conntrack_fill(netns)["max"])
    except (OSError, ValueError, UserError):
        return floor


def build_identity(
    identity_file: Path | None, *, kubeconfig: str | None = None, kube: bool = False
) -> tuple[IdentityView | None, list[IdentityPoller]]:
    """The identity index and what feeds it: a followed file and/or the Kubernetes API."""
    if identity_file is None and not kube:
        return None, []
    from cttrace.identity.index import IdentityIndex

    index = IdentityIndex()
    pollers: list[IdentityPoller] = []
    if identity_file is not None:
        from cttrace.identity.follow import IdentityFileFollower

        def on_error(lineno: int, message: str) -> None:
            warn(f"{identity_file}:{lineno}: skipped: {message}")

        if not identity_file.exists():  # followed like tail -F: it may be created later
            warn(f"identity file {identity_file} does not exist yet: waiting for it; until "
                 "then findings carry no names")
        pollers.append(IdentityFileFollower(identity_file, index, on_error=on_error))
    if kube:
        from cttrace.identity.kube import KubeIdentitySource

        source = KubeIdentitySource(index, kubeconfig=kubeconfig, on_log=warn)
        source.open()
        pollers.append(source)
    return index, pollers


def snat_check(netns: str | None, source: Source | None = None, *,
               interval: float = snat_collision.SAMPLE_INTERVAL) -> Periodic:
    """``snat-collision``: sample the traced namespace's insert_failed/drop counters on a timer.

    With the bpf source, also every other namespace's failed NATed TCP inserts, which its
    programs count by namespace: without ``--netns`` it traces every namespace (a kind
    node, a lab node), and the statistics file shows only the namespace it is read in.
    """
    from cttrace.ctstats import NamespaceCollisions, SnatCollisionSampler, read_conntrack_stats
    from cttrace.netns import netns_inode
    from cttrace.sources.bpf import BpfSource

    sampler = SnatCollisionSampler()
    failed = False
    try:
        own_ino: int | None = netns_inode(netns)
    except (OSError, UserError):
        own_ino = None
    own = {"netns": netns, "netns_ino": own_ino}  # which namespace's statistics
    others = None
    if isinstance(source, BpfSource):
        others = NamespaceCollisions(source.insert_failures, skip=own_ino, start=time.time())

    def check(now: float) -> list[Finding]:
        nonlocal failed
        out = others.sample(now) if others is not None else []
        try:
            stats = read_conntrack_stats(netns)
        except (OSError, UserError) as err:
            if not failed:  # say it once, keep running
                warn(f"{snat_collision.RULE.id}: cannot read conntrack statistics: {err}")
                failed = True
            return out
        finding = sampler.sample(stats, now)
        if finding is not None:
            out.insert(0, dataclasses.replace(finding, details={**finding.details, **own}))
        return out

    return Periodic(interval, check)


def build_remediator(mode: str, correlator: Correlator, netns: str | None,
                     log: Callable[[Remediation], None]) -> Periodic | None:
    """``--remediate``: None when off; refuses without identity (it decides by pod ownership)."""
    from cttrace.remediate import Remediator

    chosen = Mode(mode)
    if chosen is Mode.OFF:
        return None
    if correlator.identity is None:
        raise UserError("--remediate needs identity (--identity-file or --kubeconfig): it "
                        "deletes an entry only once its pod is known to be gone")
    delete = None
    if chosen is Mode.ON:
        from cttrace.sources.netlink import ConntrackDeleter

        deleter = ConntrackDeleter(netns)
        deleter.open()

        def delete(entry: Entry) -> int:
            return deleter.delete(entry.orig, entry_id=entry.entry_id)

    remediator = Remediator(chosen, correlator, delete, log)
    return Periodic(0.2, remediator.check)
