"""The identity index: who held an IP, which Service a VIP was, who its endpoints were."""

from __future__ import annotations

from typing import Any

import pytest

from cttrace.errors import IdentityError
from cttrace.identity.index import EndpointStretch, IdentityIndex
from cttrace.identity.model import IdentityView, Ownership, PodRef, ServiceRef


def pod(uid: str, ip: str | None = "10.0.0.5", *, phase: str = "Running", name: str | None = None,
        ns: str = "shop", host_network: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip is not None:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"uid": uid, "name": name or f"pod-{uid}", "namespace": ns,
                     "ownerReferences": [{"kind": "ReplicaSet", "name": "rs-1", "controller": True,
                                          "apiVersion": "apps/v1", "uid": "u-rs"}]},
        "spec": {"containers": [{"name": "c"}], "nodeName": "node-a", "hostNetwork": host_network},
        "status": status,
    }


def service(uid: str = "u-svc", name: str = "checkout", vip: str = "10.96.0.10",
            ports: tuple[tuple[int, str], ...] = ((80, "TCP"),), **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"uid": uid, "name": name, "namespace": "shop"},
        "spec": {"clusterIP": vip, "clusterIPs": [vip],
                 "ports": [{"port": p, "protocol": proto} for p, proto in ports], **spec},
    }


def endpoint(ip: str, pod_uid: str | None, ready: bool | None = True,
             **conditions: bool) -> dict[str, Any]:
    ep: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": ready, **conditions}}
    if pod_uid is not None:
        ep["targetRef"] = {"kind": "Pod", "uid": pod_uid, "name": f"pod-{pod_uid}",
                           "namespace": "shop"}
    return ep


def eslice(uid: str, *endpoints: dict[str, Any], svc: str = "checkout",
           api_version: str = "discovery.k8s.io/v1") -> dict[str, Any]:
    return {
        "apiVersion": api_version, "kind": "EndpointSlice",
        "metadata": {"uid": uid, "name": f"{svc}-{uid}", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": list(endpoints),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def ev(etype: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": etype, "object": obj}


CHECKOUT = ServiceRef("shop", "checkout", "u-svc")


@pytest.fixture
def index() -> IdentityIndex:
    return IdentityIndex()


def owner_uid(index: IdentityIndex, ip: str, t: float) -> str | None:
    ref = index.owner_at(ip, t)
    return ref.uid if ref is not None else None


def test_index_is_an_identity_view(index: IdentityIndex) -> None:
    view: IdentityView = index
    assert view.owner_at("10.0.0.5", 0.0) is None
    assert not view.in_sync


def test_pod_holds_its_ip_from_the_event_that_shows_it_until_deleted(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a", ip=None, phase="Pending")), 100.0)
    index.apply(ev("MODIFIED", pod("a", phase="Pending")), 105.0)  # sandbox up: IP assigned
    index.apply(ev("MODIFIED", pod("a")), 107.0)
    index.apply(ev("DELETED", pod("a")), 200.0)

    assert owner_uid(index, "10.0.0.5", 104.9) is None
    assert index.owner_at("10.0.0.5", 105.0) == PodRef("a", "shop", "pod-a", "ReplicaSet/rs-1",
                                                        "node-a")
    assert owner_uid(index, "10.0.0.5", 199.9) == "a"
    assert owner_uid(index, "10.0.0.5", 200.0) is None
    assert [(o.pod.uid, o.since, o.until) for o in index.ownerships("10.0.0.5")] == [
        ("a", 105.0, 200.0)]
    # The deleted pod is still known by uid, for findings about its past.
    pod_a = index.pod_by_uid("a")
    assert pod_a is not None and pod_a.name == "pod-a"


def test_recycled_ip_goes_to_the_new_uid(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    index.apply(ev("DELETED", pod("a")), 150.0)
    index.apply(ev("ADDED", pod("b")), 180.0)  # the CNI hands 10.0.0.5 out again

    assert owner_uid(index, "10.0.0.5", 120.0) == "a"
    assert owner_uid(index, "10.0.0.5", 160.0) is None
    assert owner_uid(index, "10.0.0.5", 181.0) == "b"
    assert [(o.pod.uid, o.since, o.until) for o in index.ownerships("10.0.0.5")] == [
        ("a", 100.0, 150.0), ("b", 180.0, None)]


def test_ip_moving_to_another_uid_closes_the_previous_holder(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    index.apply(ev("ADDED", pod("b")), 130.0)  # a's DELETED has not arrived yet
    assert owner_uid(index, "10.0.0.5", 129.0) == "a"
    assert owner_uid(index, "10.0.0.5", 130.0) == "b"

    # A late status update of the old pod still lists the IP (the kubelet never clears
    # podIP): it must not take the address back, nor close b's stretch.
    index.apply(ev("MODIFIED", pod("a", phase="Running")), 140.0)
    index.apply(ev("DELETED", pod("a")), 150.0)
    assert owner_uid(index, "10.0.0.5", 160.0) == "b"
    pod_a, pod_b = index.pod_by_uid("a"), index.pod_by_uid("b")
    assert pod_a is not None and pod_b is not None
    assert index.ownerships("10.0.0.5") == [
        Ownership(pod_a, 100.0, 130.0), Ownership(pod_b, 130.0, None)]
    assert index.stats()["ip_moves"] == 1
    assert index.stats()["stale_ip_claims"] == 1


def test_same_uid_seen_again_keeps_its_stretch(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    index.apply(ev("MODIFIED", pod("a")), 120.0)  # container restarted, same sandbox IP
    index.apply(ev("ADDED", pod("a")), 130.0)  # relist replays it
    assert [(o.since, o.until) for o in index.ownerships("10.0.0.5")] == [(100.0, None)]


def test_terminal_phase_releases_the_ip(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("job", ip="10.0.0.9")), 100.0)
    index.apply(ev("MODIFIED", pod("job", ip="10.0.0.9", phase="Succeeded")), 110.0)
    index.apply(ev("MODIFIED", pod("job", ip="10.0.0.9", phase="Succeeded")), 120.0)
    assert owner_uid(index, "10.0.0.9", 109.0) == "job"
    assert owner_uid(index, "10.0.0.9", 110.0) is None
    assert owner_uid(index, "10.0.0.9", 125.0) is None
    assert index.pod_by_uid("job") is not None  # the object still exists
    # A new pod can take the released IP without a move.
    index.apply(ev("ADDED", pod("next", ip="10.0.0.9")), 130.0)
    assert owner_uid(index, "10.0.0.9", 130.0) == "next"
    assert index.stats()["ip_moves"] == 0


def test_a_pod_changing_ip_releases_the_old_one(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a", ip="10.0.0.5")), 100.0)
    index.apply(ev("MODIFIED", pod("a", ip="10.0.0.6")), 110.0)  # sandbox recreated
    assert owner_uid(index, "10.0.0.5", 109.0) == "a"
    assert owner_uid(index, "10.0.0.5", 110.0) is None
    assert owner_uid(index, "10.0.0.6", 110.0) == "a"


def test_host_network_pods_own_no_ip(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("kp1", ip="10.0.3.17", host_network=True)), 100.0)
    index.apply(ev("ADDED", pod("kp2", ip="10.0.3.17", host_network=True)), 101.0)
    assert index.owner_at("10.0.3.17", 102.0) is None
    assert index.stats()["ip_moves"] == 0


def test_node_assignment_later_updates_the_open_stretch(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    moved = pod("a")
    moved["spec"]["nodeName"] = "node-b"
    index.apply(ev("MODIFIED", moved), 110.0)
    ref = index.owner_at("10.0.0.5", 105.0)
    assert ref is not None and ref.node == "node-b"


def test_time_going_backwards_does_not_unsort_the_timeline(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    index.apply(ev("DELETED", pod("a")), 90.0)  # the wall clock stepped back
    index.apply(ev("ADDED", pod("b")), 95.0)
    assert [(o.pod.uid, o.since, o.until) for o in index.ownerships("10.0.0.5")] == [
        ("a", 100.0, 100.0), ("b", 100.0, None)]
    assert owner_uid(index, "10.0.0.5", 100.0) == "b"


def test_prune_drops_only_history_that_ended_before(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    index.apply(ev("DELETED", pod("a")), 150.0)
    index.apply(ev("ADDED", pod("b")), 160.0)
    index.apply(ev("ADDED", pod("c", ip="10.0.0.7")), 100.0)
    index.apply(ev("DELETED", pod("c", ip="10.0.0.7")), 300.0)

    assert index.prune(200.0) == 1
    assert [o.pod.uid for o in index.ownerships("10.0.0.5")] == ["b"]
    assert index.pod_by_uid("a") is None
    assert owner_uid(index, "10.0.0.7", 250.0) == "c"  # ended after the cut: kept
    assert index.pod_by_uid("c") is not None
    assert index.prune(400.0) == 1
    assert index.ownerships("10.0.0.7") == []
    assert owner_uid(index, "10.0.0.5", 500.0) == "b"  # open stretches are never pruned


def test_relist_deletes_what_it_did_not_show(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    index.apply(ev("ADDED", pod("b", ip="10.0.0.6")), 100.0)
    index.apply(ev("ADDED", service()), 100.0)
    index.begin_relist(["Pod"])
    index.apply(ev("ADDED", pod("b", ip="10.0.0.6")), 200.0)
    assert index.end_relist(201.0, ["Pod"]) == 1
    assert owner_uid(index, "10.0.0.5", 200.0) == "a"
    assert owner_uid(index, "10.0.0.5", 201.0) is None
    assert owner_uid(index, "10.0.0.6", 201.0) == "b"
    assert index.service_for("10.96.0.10", 80, 300.0) == CHECKOUT  # not relisted: untouched
    # A replay of the pod the relist found gone does not bring it back.
    index.apply(ev("MODIFIED", pod("a")), 210.0)
    assert owner_uid(index, "10.0.0.5", 211.0) is None


def test_service_for_vip_and_port_over_time(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", service(ports=((80, "TCP"), (53, "UDP")),
                                    externalIPs=["198.51.100.7"],
                                    type="LoadBalancer")), 100.0)
    lb = service(ports=((80, "TCP"), (53, "UDP")), externalIPs=["198.51.100.7"])
    lb["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.40"}]}}
    index.apply(ev("MODIFIED", lb), 120.0)
    index.apply(ev("DELETED", lb), 200.0)

    assert index.service_for("10.96.0.10", 80, 99.0) is None
    assert index.service_for("10.96.0.10", 80, 100.0) == CHECKOUT
    assert index.service_for("198.51.100.7", 80, 150.0) == CHECKOUT
    assert index.service_for("203.0.113.40", 80, 119.0) is None
    assert index.service_for("203.0.113.40", 80, 120.0) == CHECKOUT
    assert index.service_for("10.96.0.10", 53, 150.0) is None  # UDP: not a TCP VIP
    assert index.service_for("10.96.0.10", 8080, 150.0) is None
    assert index.service_for("10.96.0.10", 80, 199.0) == CHECKOUT
    assert index.service_for("10.96.0.10", 80, 200.0) is None


def test_a_reused_cluster_ip_names_the_new_service(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", service("u-old", "old")), 100.0)
    index.apply(ev("DELETED", service("u-old", "old")), 150.0)
    index.apply(ev("ADDED", service("u-new", "new")), 160.0)
    old = index.service_for("10.96.0.10", 80, 120.0)
    new = index.service_for("10.96.0.10", 80, 170.0)
    assert (old and old.name, new and new.name) == ("old", "new")


def test_is_endpoint_is_unknown_without_any_slice(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", service()), 100.0)
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 0.0, 1e9) is None
    index.apply(ev("ADDED", eslice("s1")), 110.0)  # a Service with no endpoints yet
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 0.0, 1e9) is False


def test_is_endpoint_windows(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", eslice("s1", endpoint("10.0.0.5", "a"))), 100.0)
    index.apply(ev("MODIFIED", eslice("s1", endpoint("10.0.0.5", "a", ready=False,
                                                     terminating=True))), 150.0)
    index.apply(ev("MODIFIED", eslice("s1")), 160.0)
    index.apply(ev("MODIFIED", eslice("s1", endpoint("10.0.0.5", "b"))), 170.0)

    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 90.0, 99.0) is False
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 90.0, 100.0) is True  # inclusive end
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 120.0, 120.0) is True
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 150.0, 169.0) is False  # not ready, then gone
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 151.0, 170.0) is True  # b from 170
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 151.0, 175.0, pod_uid="a") is False
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 151.0, 175.0, pod_uid="b") is True
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 100.0, 120.0, pod_uid="b") is False
    assert index.is_endpoint(ServiceRef("shop", "other"), "10.0.0.5", 0.0, 1e9) is None
    assert index.endpoint_stretches(CHECKOUT, "10.0.0.5") == [
        EndpointStretch("10.0.0.5", "a", 100.0, 150.0, ready=True, serving=True,
                        terminating=False),
        EndpointStretch("10.0.0.5", "a", 150.0, 160.0, ready=False, serving=False,
                        terminating=True),
        EndpointStretch("10.0.0.5", "b", 170.0, None, ready=True, serving=True,
                        terminating=False),
    ]


def test_ready_null_counts_as_ready(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", eslice("s1", endpoint("10.0.0.5", "a", ready=None))), 100.0)
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 100.0, 100.0, pod_uid="a") is True


def test_endpoint_without_target_ref_matches_any_pod(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", eslice("s1", endpoint("10.0.0.5", None))), 100.0)
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 100.0, 100.0) is True
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 100.0, 100.0, pod_uid="anyone") is True


def test_membership_is_the_union_of_the_services_slices(index: IdentityIndex) -> None:
    # The controller moves an endpoint from one slice to another: no gap in membership.
    index.apply(ev("ADDED", eslice("s1", endpoint("10.0.0.5", "a"))), 100.0)
    index.apply(ev("ADDED", eslice("s2", endpoint("10.0.0.5", "a"),
                                   api_version="discovery.k8s.io/v1beta1")), 110.0)
    index.apply(ev("MODIFIED", eslice("s1")), 111.0)
    assert [(s.since, s.until) for s in index.endpoint_stretches(CHECKOUT, "10.0.0.5")] == [
        (100.0, None)]
    index.apply(ev("DELETED", eslice("s2", endpoint("10.0.0.5", "a"))), 120.0)
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 120.0, 130.0) is False
    assert index.is_endpoint(CHECKOUT, "10.0.0.5", 115.0, 130.0) is True


def test_generation_and_in_sync(index: IdentityIndex) -> None:
    g0 = index.generation
    index.apply(ev("ADDED", pod("a")), 100.0)
    assert index.generation > g0
    g1 = index.generation
    index.apply({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {
        "resourceVersion": "7"}}}, 101.0)
    assert index.generation == g1  # nothing changed
    index.mark_in_sync()
    assert index.in_sync and index.generation > g1


def test_unknown_kinds_are_counted_and_skipped(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", {"apiVersion": "v1", "kind": "ConfigMap",
                             "metadata": {"uid": "u", "name": "c", "namespace": "shop"}}), 1.0)
    index.apply({"type": "ERROR", "object": {"kind": "Status", "code": 410}}, 2.0)
    stats = index.stats()
    assert (stats["skipped_kinds"], stats["watch_errors"], stats["pods"]) == (1, 1, 0)


def test_malformed_event_leaves_the_index_unchanged(index: IdentityIndex) -> None:
    bad = pod("a")
    bad["status"]["podIPs"] = [{"ip": "not-an-ip"}]
    with pytest.raises(IdentityError, match=r"object\.status\.podIPs\[0\]\.ip"):
        index.apply(ev("ADDED", bad), 100.0)
    assert index.pod_by_uid("a") is None and index.generation == 0


def test_stats_count_the_tables(index: IdentityIndex) -> None:
    index.apply(ev("ADDED", pod("a")), 100.0)
    index.apply(ev("ADDED", pod("b", ip="10.0.0.6")), 100.0)
    index.apply(ev("DELETED", pod("b", ip="10.0.0.6")), 110.0)
    index.apply(ev("ADDED", service()), 100.0)
    index.apply(ev("ADDED", eslice("s1", endpoint("10.0.0.5", "a"))), 100.0)
    stats = index.stats()
    assert {k: stats[k] for k in ("pods", "pods_deleted", "ips", "ownerships", "services",
                                  "vip_ports", "endpoint_slices", "endpoint_stretches",
                                  "events")} == {
        "pods": 1, "pods_deleted": 1, "ips": 2, "ownerships": 2, "services": 1, "vip_ports": 1,
        "endpoint_slices": 1, "endpoint_stretches": 1, "events": 5}
