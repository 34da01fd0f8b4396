"""The lab's identity: API-shaped objects, written as a watch stream cttrace's identity reads."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from cttrace.identity.index import IdentityIndex
from cttrace.identity.model import ServiceRef
from cttrace.identity.watch_events import EndpointSliceInfo, PodInfo, ServiceInfo, parse_event
from cttrace.lab.cluster import LabPod, LabService, Workload
from cttrace.lab.identity_log import IdentityLog
from cttrace.lab.k8s_objects import endpoint_slice_objects, pod_object, service_object

CART = Workload("shop", "cart", "7d9f8", "registry.example/shop/cart:1.9.3")
LEDGER = Workload("billing", "ledger", "5c8f9", "registry.example/billing/ledger:3.2.1")
T0 = 1_795_000_000.0


def _pod(workload: Workload, suffix: str, ip: str, uid: str) -> LabPod:
    return LabPod(workload=workload, name=workload.pod_name(suffix), uid=uid,
                  replicaset_uid=f"rs-{workload.app}", ip=ip,
                  node_name="ip-10-0-0-10.ec2.internal", host_ip="10.0.0.10",
                  netns=f"ctl-ab12-{workload.pod_name(suffix)}", slot=1, created_at=T0)


def _service(endpoints: list[LabPod]) -> LabService:
    return LabService(namespace="shop", name="cart", uid="svc-uid", vip="10.100.37.12", port=80,
                      target_port=8080, port_name="http", app="cart", slice_name="cart-z7r82",
                      slice_uid="slice-uid", created_at=T0, endpoints=endpoints)


POD_A = _pod(CART, "w5n4t", "10.0.1.11", "uid-a")
POD_B = _pod(LEDGER, "x2x7q", "10.0.1.11", "uid-b")


def test_a_pod_object_reads_as_a_running_replicaset_pod() -> None:
    obj = pod_object(POD_A)
    assert obj["metadata"]["ownerReferences"] == [{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "cart-7d9f8", "uid": "rs-cart",
        "controller": True, "blockOwnerDeletion": True,
    }]
    assert obj["status"]["podIPs"] == [{"ip": "10.0.1.11"}]
    assert obj["metadata"]["creationTimestamp"].endswith("Z")
    info = parse_event({"type": "ADDED", "object": obj}).record
    assert info == PodInfo(uid="uid-a", namespace="shop", name="cart-7d9f8-w5n4t",
                           ips=("10.0.1.11",), phase="Running",
                           node="ip-10-0-0-10.ec2.internal", workload="ReplicaSet/cart-7d9f8",
                           deleting=False, host_network=False)


def test_a_deleted_pod_carries_its_deletion_timestamp() -> None:
    info = parse_event({"type": "DELETED", "object": pod_object(POD_A, deleted_at=T0 + 5)}).record
    assert isinstance(info, PodInfo) and info.deleting


def test_a_service_object_reads_as_a_clusterip_service() -> None:
    info = parse_event({"type": "ADDED", "object": service_object(_service([]))}).record
    assert isinstance(info, ServiceInfo)
    assert info.cluster_ips == ("10.100.37.12",)
    assert [(p.port, p.protocol, p.name) for p in info.ports] == [(80, "TCP", "http")]


def test_an_endpoint_slice_lists_pods_by_target_port_and_targetref() -> None:
    (obj,) = endpoint_slice_objects(_service([POD_A]))
    assert obj["apiVersion"] == "discovery.k8s.io/v1"
    assert obj["metadata"]["labels"]["kubernetes.io/service-name"] == "cart"
    info = parse_event({"type": "ADDED", "object": obj}).record
    assert isinstance(info, EndpointSliceInfo)
    assert info.service == "cart" and info.address_type == "IPv4"
    (endpoint,) = info.endpoints
    assert endpoint.addresses == ("10.0.1.11",)
    assert (endpoint.ready, endpoint.serving, endpoint.terminating) == (True, True, False)
    assert endpoint.target is not None and endpoint.target.uid == "uid-a"
    assert [(p.port, p.name) for p in info.ports] == [(8080, "http")]


def test_the_log_numbers_events_and_each_line_is_readable_at_once(tmp_path: Path) -> None:
    path = tmp_path / "identity.jsonl"
    path.write_text("stale line from an earlier lab\n")
    log = IdentityLog(path)
    try:
        log.emit("ADDED", pod_object(POD_A))
        first = path.read_bytes()  # a follower reads before the writer closes anything
        log.emit("DELETED", pod_object(POD_A, deleted_at=T0 + 1))
    finally:
        log.close()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert first.count(b"\n") == 1 and b"stale" not in first
    assert [e["type"] for e in lines] == ["ADDED", "DELETED"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in lines]
    assert versions[0] < versions[1]


#: (traffic address, the other family's address on a dual-stack node) of the recycled IP,
#: and the Service's VIPs the same way.
FAMILIES = {
    "ipv4": (("10.0.1.11", ()), ("10.100.37.12", ())),
    "ipv6": (("fd00:10:1::b", ()), ("fd00:100::37:12", ())),
    "dual": (("fd00:10:1::b", ("10.0.1.11",)), ("fd00:100::37:12", ("10.100.37.12",))),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_cttrace_identity_answers_the_recycled_ip_story_from_lab_objects(family: str) -> None:
    """The lab's events, fed to the identity index the tracer uses, tell who held the recycled
    IP when; on a dual-stack node the IPv6 address is each object's second one."""
    (ip, other_ips), (vip, other_vips) = FAMILIES[family]
    pod_a = replace(POD_A, ip=ip, other_ips=other_ips)
    pod_b = replace(POD_B, ip=ip, other_ips=other_ips)

    def service(endpoints: list[LabPod]) -> LabService:
        return replace(_service(endpoints), vip=vip, other_vips=other_vips)

    index = IdentityIndex()
    cart = service([pod_a])
    events = [
        (T0, {"type": "ADDED", "object": pod_object(pod_a)}),
        (T0, {"type": "ADDED", "object": service_object(cart)}),
        *((T0, {"type": "ADDED", "object": obj}) for obj in endpoint_slice_objects(cart)),
        (T0 + 4, {"type": "DELETED", "object": pod_object(pod_a, deleted_at=T0 + 4)}),
        *((T0 + 4, {"type": "MODIFIED", "object": obj})
          for obj in endpoint_slice_objects(service([]))),
        (T0 + 5, {"type": "ADDED", "object": pod_object(pod_b)}),
    ]
    assert len(events) == 6 + len(other_ips) * 2  # one slice per family
    for ts, event in events:
        index.apply(event, ts)
    for addr in (ip, *other_ips):
        owner_then, owner_now = index.owner_at(addr, T0 + 1), index.owner_at(addr, T0 + 6)
        assert owner_then is not None and owner_then.uid == "uid-a"
        assert owner_now is not None and (owner_now.namespace, owner_now.name) == \
            ("billing", "ledger-5c8f9-x2x7q")
    svc = ServiceRef("shop", "cart", "svc-uid")
    for addr in (vip, *other_vips):
        assert index.service_for(addr, 80, T0 + 1) == svc
    assert index.is_endpoint(svc, ip, T0 + 1, T0 + 2, pod_uid="uid-a") is True
    assert index.is_endpoint(svc, ip, T0 + 5, T0 + 6, pod_uid="uid-b") is False


def test_a_dual_stack_service_has_both_cluster_ips_and_one_slice_per_family() -> None:
    pod = replace(POD_A, ip="fd00:10:1::b", other_ips=("10.0.1.11",))
    svc = replace(_service([pod]), vip="fd00:100::37:12", other_vips=("10.100.37.12",))
    spec = service_object(svc)["spec"]
    assert spec["clusterIPs"] == ["10.100.37.12", "fd00:100::37:12"]  # IPv4 first
    assert (spec["ipFamilies"], spec["ipFamilyPolicy"]) == (["IPv4", "IPv6"], "RequireDualStack")
    assert pod_object(pod)["status"]["podIPs"] == [{"ip": "10.0.1.11"}, {"ip": "fd00:10:1::b"}]
    slices = endpoint_slice_objects(svc)
    assert [(s["addressType"], s["endpoints"][0]["addresses"]) for s in slices] == \
        [("IPv4", ["10.0.1.11"]), ("IPv6", ["fd00:10:1::b"])]
    assert len({s["metadata"]["uid"] for s in slices}) == 2


def test_objects_leave_resource_version_to_the_log() -> None:
    for obj in (pod_object(POD_A), service_object(_service([])),
                *endpoint_slice_objects(_service([POD_A]))):
        assert "resourceVersion" not in obj["metadata"]
