"""kube-proxy's iptables mode, reduced to what the scenarios need, applied in the node netns.

Chain names and rule shapes follow pkg/proxy/iptables/proxier.go so that an
``iptables-save`` of the lab reads like one from a real node::

    PREROUTING/OUTPUT -> KUBE-SERVICES -> KUBE-SVC-<hash> -> KUBE-SEP-<hash> -> DNAT

Like kube-proxy, every sync rewrites the whole tables with one
``iptables-restore`` (atomic), from the lab's current view of Services and
endpoints. A Service without endpoints gets kube-proxy's REJECT rule in the
filter table. Only the nat/filter tables *of the lab's node namespace* are
touched; nothing here ever runs in the machine's root namespace.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

from cttrace import addr
from cttrace.lab.addressing import IPV4, AddressPlan, address_in
from cttrace.lab.cluster import LabService
from cttrace.lab.plumbing import in_netns, run

SERVICES_CHAIN = "KUBE-SERVICES"


def _port_proto_hash(text: str) -> str:
    # proxier.go portProtoHash: base32(sha256(...)) truncated to 16 characters.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_chain(port_key: str, protocol: str = "tcp") -> str:
    """``KUBE-SVC-<hash>`` of a ServicePortName (``ns/name:port``), as kube-proxy names it."""
    return "KUBE-SVC-" + _port_proto_hash(port_key + protocol)


def endpoint_chain(port_key: str, endpoint: str, protocol: str = "tcp") -> str:
    """``KUBE-SEP-<hash>`` of one endpoint (``ip:port``) of a ServicePortName."""
    return "KUBE-SEP-" + _port_proto_hash(port_key + protocol + endpoint)


def render_rules(services: Sequence[LabService], *, tag: str, plan: AddressPlan = IPV4) -> str:
    """The ``iptables-restore`` (``ip6tables-restore`` for an IPv6 ``plan``) input for the
    given Services' addresses of ``plan``'s family; ``tag`` prefixes every comment.

    kube-proxy runs one proxier per family on a dual-stack node, each with its own
    tables; an endpoint without an address of the family is not in that family's rules."""
    nat_chains = [SERVICES_CHAIN]
    nat_rules = [
        f'-A {hook} -m comment --comment "{tag} kubernetes service portals" -j {SERVICES_CHAIN}'
        for hook in ("PREROUTING", "OUTPUT")
    ]
    filter_rules = [
        f"-A {hook} -m conntrack --ctstate NEW"
        f' -m comment --comment "{tag} kubernetes service portals" -j {SERVICES_CHAIN}'
        for hook in ("INPUT", "FORWARD", "OUTPUT")
    ]
    for svc in services:
        key = svc.port_key
        vip = address_in(svc.vips, plan.version)
        if vip is None:
            continue
        endpoints = [ip for pod in svc.endpoints if (ip := address_in(pod.ips, plan.version))]
        match = f"-d {vip}/{plan.host_prefix} -p tcp"
        if not endpoints:
            filter_rules.append(
                f'-A {SERVICES_CHAIN} {match} -m comment --comment "{tag} {key} has no endpoints"'
                f" -m tcp --dport {svc.port} -j REJECT --reject-with {plan.reject_with}"
            )
            continue
        svc_chain = service_chain(key)
        nat_chains.append(svc_chain)
        nat_rules.append(
            f'-A {SERVICES_CHAIN} {match} -m comment --comment "{tag} {key} cluster IP"'
            f" -m tcp --dport {svc.port} -j {svc_chain}"
        )
        count = len(endpoints)
        for i, ip in enumerate(endpoints):
            # proxier.go writes it with net.JoinHostPort: [fd00::5]:8080 for IPv6, as DNAT's
            # --to-destination wants it too.
            endpoint = addr.endpoint(ip, svc.target_port)
            sep_chain = endpoint_chain(key, endpoint)
            nat_chains.append(sep_chain)
            # Endpoint i of n is taken with probability 1/(n-i) among those left, which
            # makes each one equally likely; the last rule takes whatever remains.
            pick = (
                f" -m statistic --mode random --probability {1.0 / (count - i):0.10f}"
                if i < count - 1 else ""
            )
            nat_rules.append(
                f'-A {svc_chain} -m comment --comment "{tag} {key} -> {endpoint}"{pick}'
                f" -j {sep_chain}"
            )
            nat_rules.append(
                f'-A {sep_chain} -p tcp -m comment --comment "{tag} {key}"'
                f" -m tcp -j DNAT --to-destination {endpoint}"
            )
    lines = ["*nat", *(f":{chain} - [0:0]" for chain in nat_chains), *nat_rules, "COMMIT",
             "*filter", f":{SERVICES_CHAIN} - [0:0]", *filter_rules, "COMMIT"]
    return "\n".join(lines) + "\n"


def apply_rules(netns: str, rules: str, plan: AddressPlan = IPV4) -> None:
    """Replace ``plan``'s family's nat and filter tables of ``netns`` with ``rules`` in one
    transaction.

    Without ``--noflush`` iptables-restore flushes each table it is given, as
    kube-proxy's full syncs do; built-in chains keep their ACCEPT policy.
    """
    run(in_netns(netns, [plan.iptables_restore, "-w"]), stdin=rules)
