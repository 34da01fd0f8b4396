"""The lab's Service proxies: nftables rule shapes, reading the real kube-proxy's rules back,
and the --proxy choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cttrace.lab import control_plane
from cttrace.lab.addressing import IPV4, IPV6
from cttrace.lab.cli import ProxyChoice, app
from cttrace.lab.cluster import LabPod, LabService, Workload
from cttrace.lab.kubeproxy_nft import endpoint_chain, render_rules, service_chain
from cttrace.lab.preconditions import LabError
from cttrace.lab.proxies import PROXIES, make_proxy
from cttrace.lab.real_kubeproxy import iptables_jumps, ipvs_real_servers

CART = Workload("shop", "cart", "7d9f8", "cart:1")


def _service(*ips: str, namespace: str = "shop", name: str = "cart",
             port_name: str = "http", port: int = 80, target_port: int = 8080) -> LabService:
    pods = [LabPod(workload=CART, name=f"cart-{ip[-2:]}", uid="u", replicaset_uid="r", ip=ip,
                   node_name="n", host_ip="10.0.0.10", netns="x", slot=1, created_at=0.0)
            for ip in ips]
    return LabService(namespace=namespace, name=name, uid="s", vip="10.100.37.12", port=port,
                      target_port=target_port, port_name=port_name, app="cart",
                      slice_name="cart-x", slice_uid="e", created_at=0.0, endpoints=pods)


def test_nftables_chains_are_named_as_the_nftables_proxier_names_them() -> None:
    # The names in kube-proxy's own nftables proxier tests (pkg/proxy/nftables).
    svc = _service(namespace="ns1", name="svc1", port_name="p80", target_port=80)
    assert service_chain(svc) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert endpoint_chain(svc, "10.180.0.1", 80) == \
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"


def test_nftables_vip_port_maps_to_a_numgen_over_every_endpoint() -> None:
    svc = _service("10.0.1.11", "10.0.1.12", "10.0.1.13")
    text = render_rules([svc], tag="ctl-ab12")
    chain = service_chain(svc)
    assert (f"add element ip kube-proxy service-ips {{ 10.100.37.12 . tcp . 80 : goto {chain} }}"
            in text.splitlines())
    picks = " , ".join(f"{i} : goto {endpoint_chain(svc, ip, 8080)}"
                       for i, ip in enumerate(("10.0.1.11", "10.0.1.12", "10.0.1.13")))
    assert f"add rule ip kube-proxy {chain} numgen random mod 3 vmap {{ {picks} }}" in text
    assert (f"add rule ip kube-proxy {endpoint_chain(svc, '10.0.1.12', 8080)} "
            "meta l4proto tcp dnat to 10.0.1.12:8080") in text
    # Every chain a map or rule jumps to is created before it is named.
    lines = text.splitlines()
    assert lines.index(f"add chain ip kube-proxy {endpoint_chain(svc, '10.0.1.13', 8080)}") < \
        lines.index(f"add chain ip kube-proxy {chain}")


def test_nftables_service_without_endpoints_is_rejected_and_has_no_chain() -> None:
    text = render_rules([_service()], tag="ctl-ab12")
    assert "service-" not in text.replace("service-ips", "").replace("service-endpoints", "")
    assert ('add element ip kube-proxy no-endpoint-services { 10.100.37.12 . tcp . 80 comment '
            '"shop/cart:http" : goto reject-chain }') in text
    assert "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check" \
        in text


def test_nftables_sync_replaces_the_whole_table_in_one_file() -> None:
    lines = render_rules([_service("10.0.1.11")], tag="ctl-ab12").splitlines()
    assert lines[:3] == ["add table ip kube-proxy", "delete table ip kube-proxy",
                         'add table ip kube-proxy { comment "rules for kube-proxy (ctl-ab12)" ; }']
    assert sum(line.startswith("delete ") for line in lines) == 1


def test_the_real_kube_proxys_iptables_rules_are_read_back() -> None:
    nat = "\n".join([
        ":KUBE-SVC-N56AKJVD2CD4YXPK - [0:0]",
        '-A KUBE-SVC-N56AKJVD2CD4YXPK -m comment --comment "billing/ledger:http" -m statistic '
        "--mode random --probability 0.50000000000 -j KUBE-SEP-RI6QYDCH4LFYSMSQ",
        '-A KUBE-SVC-N56AKJVD2CD4YXPK -m comment --comment "billing/ledger:http" '
        "-j KUBE-SEP-NUYM5K3F2EXJNOK2",
        '-A KUBE-SEP-NUYM5K3F2EXJNOK2 -s 10.0.1.12/32 -j KUBE-MARK-MASQ',
    ])
    assert iptables_jumps(nat) == {
        "KUBE-SVC-N56AKJVD2CD4YXPK": {"KUBE-SEP-RI6QYDCH4LFYSMSQ", "KUBE-SEP-NUYM5K3F2EXJNOK2"}}


def test_ipvs_real_servers_leave_out_the_ones_kube_proxy_is_draining() -> None:
    listing = """IP Virtual Server version 1.2.1 (size=4096)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.1:443 rr
TCP  10.100.37.12:80 rr
  -> 10.0.1.11:8080               Masq    0      1          0
  -> 10.0.1.12:8080               Masq    1      0          0
"""
    assert ipvs_real_servers(listing) == {"10.96.0.1:443": set(),
                                          "10.100.37.12:80": {"10.0.1.12:8080"}}


def test_proxy_choices_are_the_labs_proxies() -> None:
    assert tuple(choice.value for choice in ProxyChoice) == PROXIES
    assert all(make_proxy(name).name == name for name in PROXIES)
    with pytest.raises(LabError, match="unknown proxy 'cilium'"):
        make_proxy("cilium")
    listed = CliRunner().invoke(app, ["list"]).output
    assert all(f"  {name} " in listed for name in PROXIES)


def test_an_unbuilt_kube_proxy_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(control_plane, "KUBE_CACHE", tmp_path)
    monkeypatch.delenv("CTTRACE_KUBE_PROXY", raising=False)
    with pytest.raises(LabError, match=r"no kube-proxy is built on this machine: run "
                                       r"`scripts/build-kube.sh kube-apiserver kube-proxy`"):
        control_plane.cached_binary("kube-proxy")
    (tmp_path / "kube-proxy-1.20").mkdir()
    (tmp_path / "kube-proxy-1.20" / "kube-proxy").write_text("")
    (tmp_path / "kube-proxy-1.20" / "kube-proxy").chmod(0o755)
    assert control_plane.cached_binary("kube-proxy") == str(tmp_path / "kube-proxy-1.20" /
                                                             "kube-proxy")


def _dual_service() -> LabService:
    svc = _service("10.0.1.11")
    svc.other_vips = ("fd00:100::37:12",)
    svc.endpoints[0].other_ips = ("fd00:10:1::b",)
    return svc


def test_nftables_on_an_ipv6_node_is_an_ip6_table_of_the_ipv6_addresses() -> None:
    svc = _dual_service()
    text = render_rules([svc], tag="ctl-ab12", plan=IPV6)
    assert "table ip " not in text and "10.0.1.11" not in text
    assert (f"add element ip6 kube-proxy service-ips {{ fd00:100::37:12 . tcp . 80 : goto "
            f"{service_chain(svc)} }}") in text
    assert "ip6 daddr . meta l4proto . th dport vmap @service-ips" in text
    target = endpoint_chain(svc, "fd00:10:1::b", 8080)
    assert target.endswith("__fd00.10.1..b/8080")  # no colon in a chain name
    assert f"add rule ip6 kube-proxy {target} meta l4proto tcp dnat to [fd00:10:1::b]:8080" \
        in text
    # The IPv4 table of the same node has only the IPv4 addresses.
    assert "fd00" not in render_rules([svc], tag="ctl-ab12", plan=IPV4)


def test_the_real_kube_proxy_is_refused_on_an_ipv6_or_dual_stack_node() -> None:
    for family in ("6", "dual"):
        for name in ("kube-proxy", "kube-proxy-ipvs"):
            with pytest.raises(LabError, match=f"--proxy {name} runs on an IPv4 node only"):
                make_proxy(name, family)
    assert make_proxy("nftables", "6").name == "nftables"
    result = CliRunner().invoke(app, ["run", "recycled-ip", "--proxy", "kube-proxy",
                                      "--family", "dual"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "cttrace lab: error: --proxy kube-proxy runs on an IPv4 node only (the kube-proxy 1.20 "
        "built here is single-stack IPv4): use --family 4, or --proxy iptables or nftables for "
        "IPv6 and dual-stack"]
