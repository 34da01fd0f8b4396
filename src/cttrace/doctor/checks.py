"""The node-level invariants behind cttrace's detection rules, one function per check.

Every check reads facts through a :class:`~cttrace.doctor.readers.NodeReader`
and returns a :class:`~cttrace.doctor.model.CheckResult` with a stable id, a
verdict, the values it saw, and the command lines that fix it. A fact that
cannot be read becomes an ``error`` verdict for that check only.

Fix commands are written for the namespace that was audited: with ``--netns``
they are prefixed with ``ip netns exec NAME``, except where the setting is
global (``nf_conntrack_max``, loading a module).
"""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from cttrace.ctstats import counter_deltas
from cttrace.doctor.bpfsource import CHECK_ID as BPF_SOURCE
from cttrace.doctor.bpfsource import BpfReadiness, check_bpf_source
from cttrace.doctor.cooldown import COOLDOWN_ENV, IpCooldown
from cttrace.doctor.model import CheckResult, Verdict
from cttrace.doctor.natrules import (
    IPTABLES_DUMPS,
    NFT_DUMP,
    NatRule,
    parse_iptables_save,
    parse_nft_ruleset,
)
from cttrace.doctor.readers import NodeReader, ReadError, parse_ipv6_links

SYN_SENT = "net.netfilter.nf_conntrack_tcp_timeout_syn_sent"
BRNF_IPTABLES = "net.bridge.bridge-nf-call-iptables"
BRNF_IP6TABLES = "net.bridge.bridge-nf-call-ip6tables"
CT_COUNT = "net.netfilter.nf_conntrack_count"
CT_MAX = "net.netfilter.nf_conntrack_max"

#: Seconds the SYN_SENT timeout should stay below the IP cooldown. The cooldown
#: starts when the CNI gets the IP back, which can be before the last client
#: SYN to the dead pod, and each SYN restarts the SYN_SENT timer
#: (``nf_conntrack_tcp_packet()`` -> ``nf_ct_refresh_acct()``).
SYN_SENT_MARGIN_S = 10
#: Shortest SYN_SENT timeout the doctor recommends; below this, raise the cooldown instead.
MIN_SYN_SENT_S = 5
FILL_WARN = 0.80
FILL_FAIL = 0.95
STAT_COUNTERS = ("insert_failed", "drop", "early_drop")
#: How iptables-save and nft report a missing CAP_NET_ADMIN (EACCES, EPERM).
_PERMISSION_WORDS = ("permission denied", "operation not permitted")


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    cooldown: IpCooldown
    sample_seconds: float = 2.0  # how long insert-failed watches the counters grow
    # Looks at the node for the bpf-source check (cttrace.doctor.bpfsource); None: not run.
    bpf_readiness: Callable[[], BpfReadiness] | None = None


class _Fixes:
    """Builds fix command lines for the audited namespace."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def here(self, command: str) -> str:
        """A command that must run inside the audited namespace."""
        if self.netns is None or command.startswith("#"):
            return command
        return f"ip netns exec {shlex.quote(self.netns)} {command}"

    def sysctl(self, name: str, value: object) -> str:
        return self.here(f"sysctl -w {name}={value}")


def _int_sysctl(reader: NodeReader, name: str) -> int | None:
    raw = reader.sysctl(name)
    if raw is None:
        return None
    try:
        return int(raw.split()[0])
    except (ValueError, IndexError):
        raise ReadError(f"{name} = {raw!r} is not a number") from None


def _missing(check_id: str, name: str, why: str) -> CheckResult:
    return CheckResult(check_id, Verdict.ERROR, f"{name} does not exist: {why}", {name: None})


def check_syn_sent_vs_ip_cooldown(reader: NodeReader, cooldown: IpCooldown) -> CheckResult:
    """A pod IP must not be reusable while an unreplied SYN's DNAT entry to it can still live."""
    cid = "syn-sent-vs-ip-cooldown"
    syn_sent = _int_sysctl(reader, SYN_SENT)
    if syn_sent is None:
        return _missing(cid, SYN_SENT, "nf_conntrack is not loaded")
    observed: dict[str, object] = {
        "nf_conntrack_tcp_timeout_syn_sent": syn_sent,
        "ip_cooldown_s": cooldown.seconds,
        "ip_cooldown_source": cooldown.source,
    }
    if cooldown.error is not None:
        return CheckResult(cid, Verdict.ERROR, cooldown.error, observed)
    if cooldown.seconds is None:
        return CheckResult(
            cid,
            Verdict.WARN,
            f"IP reuse cooldown unknown ({cooldown.source}); SYN_SENT entries live {syn_sent} s",
            observed,
        )
    cool = cooldown.seconds
    if cool - syn_sent >= SYN_SENT_MARGIN_S:
        return CheckResult(
            cid,
            Verdict.PASS,
            f"SYN_SENT timeout {syn_sent} s is below the IP cooldown {cool:g} s",
            observed,
        )
    fixes = _Fixes(reader.netns)
    recommended = math.floor(cool - SYN_SENT_MARGIN_S)
    if recommended >= MIN_SYN_SENT_S:
        fix = fixes.sysctl(SYN_SENT, recommended)
        instead = f"lower it to {recommended} s"
    else:
        cooldown_needed = syn_sent + SYN_SENT_MARGIN_S
        fix = f"kubectl -n kube-system set env daemonset/aws-node {COOLDOWN_ENV}={cooldown_needed}"
        instead = f"raise the cooldown to {cooldown_needed} s"
    observed["recommended_syn_sent"] = recommended if recommended >= MIN_SYN_SENT_S else None
    if syn_sent >= cool:
        return CheckResult(
            cid,
            Verdict.FAIL,
            f"an unreplied SYN's DNAT entry lives {syn_sent} s but a freed pod IP is reused after "
            f"{cool:g} s: a client retrying from the same source port can reach the pod that got "
            f"the IP (wrong-pod); {instead}",
            observed,
            fix,
        )
    return CheckResult(
        cid,
        Verdict.WARN,
        f"SYN_SENT timeout {syn_sent} s is below the IP cooldown {cool:g} s by less than "
        f"{SYN_SENT_MARGIN_S} s, and each retransmitted SYN restarts it; {instead}",
        observed,
        fix,
    )


def _ipv6_bridges(reader: NodeReader, bridges: dict[str, list[str]]) -> list[str] | None:
    """The bridges (of ``bridges``) that carry a global IPv6 address, the pods' IPv6
    gateway; None when the addresses cannot be read."""
    out = reader.run(("ip", "-j", "-6", "addr", "show", "scope", "global"))
    if out is None or out.returncode != 0:
        return None
    try:
        return sorted(parse_ipv6_links(out.stdout) & bridges.keys())
    except (ValueError, KeyError, AttributeError):
        return None


def check_br_netfilter(reader: NodeReader) -> CheckResult:
    """Traffic bridged between pod ports must go through iptables (and ip6tables where the
    bridge carries IPv6), or replies are not un-DNATed."""
    cid = "br-netfilter"
    bridges = {name: ports for name, ports in reader.bridge_ports().items() if ports}
    if not bridges:
        return CheckResult(cid, Verdict.PASS, "no bridge has ports here", {"bridges": {}})
    call_iptables = reader.sysctl(BRNF_IPTABLES)
    call_ip6tables = reader.sysctl(BRNF_IP6TABLES)
    ipv6_bridges = _ipv6_bridges(reader, bridges)
    observed: dict[str, object] = {
        "bridges": bridges,
        "bridge-nf-call-iptables": call_iptables,
        "bridge-nf-call-ip6tables": call_ip6tables,
        "ipv6_bridges": ipv6_bridges,
    }
    names = ", ".join(sorted(bridges))
    # A bridged frame reaches the IPv4 (IPv6) netfilter hooks only through br_netfilter
    # (br_nf_pre_routing, br_nf_pre_routing_ipv6), gated per namespace by these sysctls.
    consequence = (
        "a pod's reply to a same-node client is not reverse-NATed and the client resets it "
        "(unnated-reply)"
    )
    fixes = _Fixes(reader.netns)
    # IPv6 matters where a bridge with ports carries IPv6 (dual-stack or IPv6 pods).
    wanted = [(BRNF_IPTABLES, call_iptables, "iptables", names)]
    if ipv6_bridges:
        wanted.append((BRNF_IP6TABLES, call_ip6tables, "ip6tables", ", ".join(ipv6_bridges)))
    if call_iptables is None:
        lines = ["modprobe br_netfilter", *(fixes.sysctl(name, 1) for name, *_ in wanted)]
        return CheckResult(
            cid,
            Verdict.FAIL,
            f"br_netfilter is not loaded: packets bridged between ports of {names} bypass "
            f"{' and '.join(tables for _, _, tables, _ in wanted)}, so {consequence}",
            observed,
            "\n".join(lines),
        )
    off = [(name, value, tables, on) for name, value, tables, on in wanted if value != "1"]
    if off:
        return CheckResult(
            cid,
            Verdict.FAIL,
            "; ".join(f"bridge-nf-call-{tables} is {value}: packets bridged between ports "
                      f"of {on} bypass {tables}" for _, value, tables, on in off)
            + f", so {consequence}",
            observed,
            "\n".join(fixes.sysctl(name, 1) for name, *_ in off),
        )
    tables = " and ".join(tables for _, _, tables, _ in wanted)
    return CheckResult(
        cid, Verdict.PASS, f"bridged traffic on {names} goes through {tables}", observed
    )


def check_masquerade_random_fully(reader: NodeReader) -> CheckResult:
    """Every MASQUERADE/SNAT rule must pick source ports at random (--random-fully)."""
    cid = "masquerade-random-fully"
    rules: list[NatRule] = []
    backends: dict[str, str] = {}
    errors: list[str] = []
    dumps = [(backend, (prog,)) for backend, prog in IPTABLES_DUMPS] + [("nft", NFT_DUMP)]
    for backend, argv in dumps:
        out = reader.run(argv)
        if out is None:
            backends[backend] = "not installed"
            continue
        if out.returncode != 0:
            backends[backend] = f"error: {out.error_line}"
            errors.append(f"`{' '.join(argv)}`: {out.error_line}")
            continue
        try:
            found = (
                parse_nft_ruleset(out.stdout)
                if backend == "nft"
                else parse_iptables_save(out.stdout, backend)
            )
        except (ValueError, KeyError, IndexError) as exc:
            backends[backend] = f"error: unexpected output ({exc})"
            errors.append(f"`{' '.join(argv)}`: unexpected output ({exc})")
            continue
        backends[backend] = f"{len(found)} MASQUERADE/SNAT rules"
        rules.extend(found)
    bad = [r for r in rules if not r.random_fully]
    observed: dict[str, object] = {
        "backends": backends,
        "rules_checked": len(rules),
        "rules_without_random_fully": [r.to_json() for r in bad],
    }
    if bad:
        fixes = _Fixes(reader.netns)
        return CheckResult(
            cid,
            Verdict.FAIL,
            f"{len(bad)} of {len(rules)} MASQUERADE/SNAT rules lack --random-fully: connections "
            "set up at the same moment can get the same source port and one is dropped "
            "(insert_failed); the rules' owner (kube-proxy, CNI) may rewrite them, so fix its "
            "configuration too",
            observed,
            "\n".join(fixes.here(r.fix) for r in bad),
        )
    if errors:
        if all(any(w in e.lower() for w in _PERMISSION_WORDS) for e in errors):
            summary = "listing NAT rules needs root (CAP_NET_ADMIN): run the doctor as root"
        else:
            summary = "could not list rules: " + "; ".join(errors)
        return CheckResult(cid, Verdict.ERROR, summary, observed)
    if all(state == "not installed" for state in backends.values()):
        return CheckResult(cid, Verdict.ERROR, "neither iptables nor nft is installed", observed)
    summary = (
        f"all {len(rules)} MASQUERADE/SNAT rules use --random-fully"
        if rules
        else "no MASQUERADE/SNAT rules"
    )
    return CheckResult(cid, Verdict.PASS, summary, observed)


def check_conntrack_fill(reader: NodeReader) -> CheckResult:
    """The table must not be near full: a full table drops new connections."""
    cid = "conntrack-fill"
    count = _int_sysctl(reader, CT_COUNT)
    limit = _int_sysctl(reader, CT_MAX)
    if count is None or limit is None:
        return _missing(cid, CT_COUNT if count is None else CT_MAX, "nf_conntrack is not loaded")
    observed: dict[str, object] = {"nf_conntrack_count": count, "nf_conntrack_max": limit}
    if limit == 0:
        # __nf_conntrack_alloc() skips the limit when nf_conntrack_max is 0.
        return CheckResult(
            cid, Verdict.PASS, f"{count} entries, no limit (nf_conntrack_max=0)", observed
        )
    fill = count / limit
    observed["fill"] = round(fill, 4)
    summary = f"{count} of {limit} entries ({fill:.0%})"
    if fill <= FILL_WARN:
        return CheckResult(cid, Verdict.PASS, summary, observed)
    # nf_conntrack_max is global (read-only inside other namespaces) while the
    # count it is compared with in __nf_conntrack_alloc() is per namespace: the
    # fix runs on the host.
    fix = f"sysctl -w {CT_MAX}={limit * 2}"
    verdict = Verdict.FAIL if fill > FILL_FAIL else Verdict.WARN
    return CheckResult(
        cid, verdict, f"{summary}: when full, new connections are dropped", observed, fix
    )


def check_insert_failed(
    reader: NodeReader, sample_seconds: float, sleep: Callable[[float], None] = time.sleep
) -> CheckResult:
    """insert_failed / drop / early_drop must not grow (SNAT port clashes, full table)."""
    cid = "insert-failed"
    before = reader.conntrack_stats()
    after = before
    if sample_seconds > 0:
        sleep(sample_seconds)
        after = reader.conntrack_stats()
    totals = {name: after.get(name, 0) for name in STAT_COUNTERS}
    deltas = counter_deltas(before, after, STAT_COUNTERS) if sample_seconds > 0 else None
    observed: dict[str, object] = {
        "counters": totals,
        "growth": deltas,
        "sample_seconds": sample_seconds,
    }
    if deltas is not None and any(deltas.values()):
        grew = ", ".join(f"{n} +{d}" for n, d in deltas.items() if d)
        fix_lines = []
        if deltas["insert_failed"] or deltas["drop"]:
            fix_lines.append(
                "# add --random-fully to MASQUERADE/SNAT rules: see masquerade-random-fully"
            )
        if deltas["early_drop"]:
            limit = _int_sysctl(reader, CT_MAX)
            if limit:
                fix_lines.append(f"sysctl -w {CT_MAX}={limit * 2}")
        return CheckResult(
            cid,
            Verdict.FAIL,
            f"conntrack is dropping packets now ({grew} in {sample_seconds:g} s)",
            observed,
            "\n".join(fix_lines) or None,
        )
    if any(totals.values()):
        seen = ", ".join(f"{n}={v}" for n, v in totals.items() if v)
        span = (
            f"did not grow in {sample_seconds:g} s" if deltas is not None else "growth not sampled"
        )
        return CheckResult(
            cid, Verdict.WARN, f"{seen} since the namespace started; {span}", observed
        )
    return CheckResult(cid, Verdict.PASS, "no insert failures or drops", observed)


def syn_gaps(syn_retries: int, linear_timeouts: int) -> list[int]:
    """Seconds between a connect()'s SYN transmissions with the default 1 s initial RTO.

    ``tcp_syn_linear_timeouts`` (6.x; absent means 0) retransmissions keep the
    first RTO, then it doubles, for ``tcp_syn_retries + tcp_syn_linear_timeouts``
    retransmissions in all (measured on this project's 6.18 kernel: SYNs at
    0,1,2,3,4,5,7,11,19,35,67 s with 6 and 4).
    """
    gaps = [1] * min(linear_timeouts + 1, syn_retries + linear_timeouts)
    while len(gaps) < syn_retries + linear_timeouts:
        gaps.append(2 ** (len(gaps) - linear_timeouts))
    return gaps


def unreplied_entry_lifetime(syn_sent: int, gaps: list[int]) -> int:
    """How long an unanswered connect()'s entry lives.

    Each SYN arriving before the entry expired restarts the SYN_SENT timer
    (``nf_conntrack_tcp_packet()`` -> ``nf_ct_refresh_acct()``).
    """
    last = 0
    for gap in gaps:
        if gap >= syn_sent:
            break
        last += gap
    return last + syn_sent


def check_window_sysctls(reader: NodeReader) -> list[CheckResult]:
    """Settings that make the recycled-IP window wider or harder to see (information only).

    ``net.ipv4.*`` settings act on sockets of this namespace: for pod clients,
    the pod's own namespace is what counts.
    """
    fixes = _Fixes(reader.netns)
    out: list[CheckResult] = []

    tw_reuse = _int_sysctl(reader, "net.ipv4.tcp_tw_reuse")
    if tw_reuse is not None:
        meaning = {
            0: "off: a source port in TIME_WAIT is not reused",
            1: "on: connect() reuses 4-tuples still in TIME_WAIT, so source ports, and the "
            "conntrack entries keyed on them, come back sooner",
            2: "loopback only (the default)",
        }.get(tw_reuse, "unknown value")
        out.append(
            CheckResult(
                "tcp-tw-reuse",
                Verdict.INFO,
                f"tcp_tw_reuse={tw_reuse}: {meaning}",
                {"net.ipv4.tcp_tw_reuse": tw_reuse},
                fixes.sysctl("net.ipv4.tcp_tw_reuse", 2) if tw_reuse == 1 else None,
            )
        )

    port_range = reader.sysctl("net.ipv4.ip_local_port_range")
    if port_range is not None:
        low, high = (int(v) for v in port_range.split())
        size = high - low + 1
        out.append(
            CheckResult(
                "local-port-range",
                Verdict.INFO,
                f"{size} ephemeral ports ({low}-{high}): the fewer there are, the sooner a client "
                "reuses a source port that an old unreplied entry still holds",
                {"net.ipv4.ip_local_port_range": [low, high], "ports": size},
            )
        )

    syn_retries = _int_sysctl(reader, "net.ipv4.tcp_syn_retries")
    linear = _int_sysctl(reader, "net.ipv4.tcp_syn_linear_timeouts") or 0
    syn_sent = _int_sysctl(reader, SYN_SENT)
    if syn_retries is not None and syn_sent is not None:
        gaps = syn_gaps(syn_retries, linear)
        lifetime = unreplied_entry_lifetime(syn_sent, gaps)
        out.append(
            CheckResult(
                "tcp-syn-retries",
                Verdict.INFO,
                f"a connect() here sends {len(gaps) + 1} SYNs over {sum(gaps)} s and each SYN "
                f"restarts the SYN_SENT timer: an unanswered connection's entry lives up to "
                f"{lifetime} s, not {syn_sent} s",
                {
                    "net.ipv4.tcp_syn_retries": syn_retries,
                    "net.ipv4.tcp_syn_linear_timeouts": linear,
                    "nf_conntrack_tcp_timeout_syn_sent": syn_sent,
                    "unreplied_entry_lifetime_s": lifetime,
                },
            )
        )

    loose = _int_sysctl(reader, "net.netfilter.nf_conntrack_tcp_loose")
    if loose is not None:
        out.append(
            CheckResult(
                "tcp-loose",
                Verdict.INFO,
                (
                    "nf_conntrack_tcp_loose=1: a mid-stream packet with no entry creates an "
                    "ESTABLISHED one (tcp_new), so a connection whose entry was deleted gets a "
                    "fresh DNAT decision, possibly to another pod"
                )
                if loose
                else "nf_conntrack_tcp_loose=0: only a SYN creates a TCP entry",
                {"net.netfilter.nf_conntrack_tcp_loose": loose},
            )
        )

    liberal = _int_sysctl(reader, "net.netfilter.nf_conntrack_tcp_be_liberal")
    if liberal is not None:
        out.append(
            CheckResult(
                "tcp-be-liberal",
                Verdict.INFO,
                (
                    "nf_conntrack_tcp_be_liberal=1: out-of-window packets are not marked INVALID "
                    "(tcp_in_window), which hides window tracking problems"
                )
                if liberal
                else "nf_conntrack_tcp_be_liberal=0: out-of-window packets are marked INVALID",
                {"net.netfilter.nf_conntrack_tcp_be_liberal": liberal},
            )
        )
    return out


def _guarded(check_id: str, fn: Callable[[], CheckResult]) -> CheckResult:
    try:
        return fn()
    except ReadError as exc:
        return CheckResult(check_id, Verdict.ERROR, str(exc))


def run_checks(
    reader: NodeReader, options: DoctorOptions, sleep: Callable[[float], None] = time.sleep
) -> tuple[CheckResult, ...]:
    """All checks, in report order."""
    results = [
        _guarded(
            "syn-sent-vs-ip-cooldown",
            lambda: check_syn_sent_vs_ip_cooldown(reader, options.cooldown),
        ),
        _guarded("br-netfilter", lambda: check_br_netfilter(reader)),
        _guarded("masquerade-random-fully", lambda: check_masquerade_random_fully(reader)),
        _guarded("conntrack-fill", lambda: check_conntrack_fill(reader)),
        _guarded(
            "insert-failed", lambda: check_insert_failed(reader, options.sample_seconds, sleep)
        ),
    ]
    try:
        results.extend(check_window_sysctls(reader))
    except (ReadError, ValueError) as exc:
        results.append(CheckResult("window-sysctls", Verdict.ERROR, str(exc)))
    if options.bpf_readiness is not None:
        probe = options.bpf_readiness
        results.append(_guarded(BPF_SOURCE, lambda: check_bpf_source(probe())))
    return tuple(results)
