"""The lab's kube-proxy rules: real kube-proxy chain names, and the rule shapes it writes."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from cttrace.lab.addressing import IPV4, IPV6
from cttrace.lab.cluster import LabPod, LabService, Workload
from cttrace.lab.kubeproxy import endpoint_chain, render_rules, service_chain

CART = Workload("shop", "cart", "7d9f8", "cart:1")


def _pod(ip: str) -> LabPod:
    return LabPod(workload=CART, name=f"cart-7d9f8-{ip[-2:]}", uid="u", replicaset_uid="r", ip=ip,
                  node_name="n", host_ip="10.0.0.10", netns="x", slot=1, created_at=0.0)


def _service(*ips: str) -> LabService:
    return LabService(namespace="shop", name="cart", uid="s", vip="10.100.37.12", port=80,
                      target_port=8080, port_name="http", app="cart", slice_name="cart-x",
                      slice_uid="e", created_at=0.0, endpoints=[_pod(ip) for ip in ips])


@pytest.mark.parametrize(("port_key", "protocol", "chain"), [
    # As seen in `iptables-save` of real clusters (kube-proxy's portProtoHash).
    ("default/kubernetes:https", "tcp", "KUBE-SVC-NPX46M4PTMTKRN6Y"),
    ("kube-system/kube-dns:dns", "udp", "KUBE-SVC-TCOU7JCQXEZGVUNU"),
    ("kube-system/kube-dns:dns-tcp", "tcp", "KUBE-SVC-ERIFXISQEP7F7OF4"),
])
def test_service_chains_are_named_as_kube_proxy_names_them(
        port_key: str, protocol: str, chain: str) -> None:
    assert service_chain(port_key, protocol) == chain


def test_endpoint_chains_differ_per_endpoint_and_fit_iptables() -> None:
    a = endpoint_chain("shop/cart:http", "10.0.1.11:8080")
    b = endpoint_chain("shop/cart:http", "10.0.1.12:8080")
    assert a != b
    assert a.startswith("KUBE-SEP-") and len(a) <= 28  # XT_EXTENSION_MAXNAMELEN - 1


def _rules(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"-A {chain} ")]


def test_three_endpoints_are_picked_evenly_like_kube_proxy() -> None:
    text = render_rules([_service("10.0.1.11", "10.0.1.12", "10.0.1.13")], tag="ctl-ab12")
    svc_rules = _rules(text, service_chain("shop/cart:http"))
    probabilities = [re.search(r"--probability (\S+)", r) for r in svc_rules]
    assert [m.group(1) if m else None for m in probabilities] == \
        ["0.3333333333", "0.5000000000", None]
    for ip, rule in zip(("10.0.1.11", "10.0.1.12", "10.0.1.13"), svc_rules, strict=True):
        sep = endpoint_chain("shop/cart:http", f"{ip}:8080")
        assert rule.endswith(f"-j {sep}")
        assert _rules(text, sep) == [
            f'-A {sep} -p tcp -m comment --comment "ctl-ab12 shop/cart:http"'
            f" -m tcp -j DNAT --to-destination {ip}:8080"
        ]


def test_the_vip_and_port_jump_to_the_service_chain_from_prerouting_and_output() -> None:
    text = render_rules([_service("10.0.1.11")], tag="ctl-ab12")
    assert _rules(text, "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -d 10.100.37.12/32 -p tcp -m comment --comment '
        '"ctl-ab12 shop/cart:http cluster IP" -m tcp --dport 80 '
        f"-j {service_chain('shop/cart:http')}"
    ]
    nat = text.split("*filter")[0]
    assert len(_rules(nat, "PREROUTING")) == len(_rules(nat, "OUTPUT")) == 1


def test_a_service_without_endpoints_is_rejected_in_filter_and_has_no_nat_chain() -> None:
    text = render_rules([_service()], tag="ctl-ab12")
    nat, filter_table = text.split("*filter")
    assert "KUBE-SVC-" not in nat
    assert _rules(filter_table, "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -d 10.100.37.12/32 -p tcp -m comment --comment '
        '"ctl-ab12 shop/cart:http has no endpoints" -m tcp --dport 80 '
        "-j REJECT --reject-with icmp-port-unreachable"
    ]
    # kube-proxy only checks new connections against "has no endpoints".
    assert all("--ctstate NEW" in rule for rule in
               _rules(filter_table, "FORWARD") + _rules(filter_table, "INPUT"))


def test_every_rule_carries_the_lab_tag_and_each_table_commits() -> None:
    text = render_rules([_service("10.0.1.11", "10.0.1.12"), _service()], tag="ctl-ab12")
    rules = [line for line in text.splitlines() if line.startswith("-A ")]
    assert rules and all('--comment "ctl-ab12 ' in rule for rule in rules)
    assert text.count("COMMIT") == 2


def test_ipv6_rules_bracket_endpoints_and_use_ipv6_matches() -> None:
    svc = replace(_service("fd00:10:1::b", "fd00:10:1::c"), vip="fd00:100::37:12")
    text = render_rules([svc, replace(svc, name="empty", endpoints=[])], tag="ctl-ab12", plan=IPV6)
    sep = endpoint_chain("shop/cart:http", "[fd00:10:1::b]:8080")  # net.JoinHostPort's text
    assert _rules(text, sep) == [
        f'-A {sep} -p tcp -m comment --comment "ctl-ab12 shop/cart:http"'
        " -m tcp -j DNAT --to-destination [fd00:10:1::b]:8080"
    ]
    assert "-A KUBE-SERVICES -d fd00:100::37:12/128 -p tcp" in text
    assert "--reject-with icmp6-port-unreachable" in text


def test_a_dual_stack_node_gets_each_familys_addresses_in_that_familys_rules() -> None:
    pod = replace(_pod("10.0.1.11"), other_ips=("fd00:10:1::b",))
    svc = replace(_service(), vip="10.100.37.12", other_vips=("fd00:100::37:12",),
                  endpoints=[pod])
    v4, v6 = (render_rules([svc], tag="t", plan=plan) for plan in (IPV4, IPV6))
    assert "10.0.1.11:8080" in v4 and "fd00" not in v4
    assert "[fd00:10:1::b]:8080" in v6 and "10.0.1.11" not in v6
