"""The lab's identity: API-shaped objects, written as a watch stream cttrace's identity reads."""

from __future__ import annotations

from pathlib import Path

import orjson

from cttrace.identity.index import IdentityIndex
from cttrace.identity.model import ServiceRef
from cttrace.identity.watch_events import EndpointSliceInfo, PodInfo, ServiceInfo, parse_event
from cttrace.lab.cluster import LabPod, LabService, Workload
from cttrace.lab.identity_log import IdentityLog
from cttrace.lab.k8s_objects import endpoint_slice_object, pod_object, service_object

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
    obj = endpoint_slice_object(_service([POD_A]))
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


def test_cttrace_identity_answers_the_recycled_ip_story_from_lab_objects() -> None:
    """The lab's events, fed to the identity index the tracer uses, tell who held 10.0.1.11 when."""
    index = IdentityIndex()
    cart = _service([POD_A])
    for ts, event in [
        (T0, {"type": "ADDED", "object": pod_object(POD_A)}),
        (T0, {"type": "ADDED", "object": service_object(cart)}),
        (T0, {"type": "ADDED", "object": endpoint_slice_object(cart)}),
        (T0 + 4, {"type": "DELETED", "object": pod_object(POD_A, deleted_at=T0 + 4)}),
        (T0 + 4, {"type": "MODIFIED", "object": endpoint_slice_object(_service([]))}),
        (T0 + 5, {"type": "ADDED", "object": pod_object(POD_B)}),
    ]:
        index.apply(event, ts)
    owner_then, owner_now = index.owner_at("10.0.1.11", T0 + 1), index.owner_at("10.0.1.11", T0 + 6)
    assert owner_then is not None and owner_then.uid == "uid-a"
    assert owner_now is not None and (owner_now.namespace, owner_now.name) == \
        ("billing", "ledger-5c8f9-x2x7q")
    assert index.service_for("10.100.37.12", 80, T0 + 1) == ServiceRef("shop", "cart", "svc-uid")
    svc = ServiceRef("shop", "cart", "svc-uid")
    assert index.is_endpoint(svc, "10.0.1.11", T0 + 1, T0 + 2, pod_uid="uid-a") is True
    assert index.is_endpoint(svc, "10.0.1.11", T0 + 5, T0 + 6, pod_uid="uid-b") is False


def test_objects_leave_resource_version_to_the_log() -> None:
    for obj in (pod_object(POD_A), service_object(_service([])),
                endpoint_slice_object(_service([POD_A]))):
        assert "resourceVersion" not in obj["metadata"]
