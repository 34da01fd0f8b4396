"""Parsing Kubernetes watch events into the identity records the index keeps."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cttrace.errors import IdentityError
from cttrace.identity.watch_events import (
    Bookmark,
    EndpointSliceInfo,
    PodInfo,
    ServiceInfo,
    ServicePort,
    SliceEndpoint,
    SlicePort,
    TargetPod,
    UnknownObject,
    WatchError,
    parse_event,
)

# A Deployment's pod as `kubectl get pod -o json` / the watch stream shows it (trimmed of
# fields nobody reads, but with their shapes where they are nested in read ones).
POD: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "creationTimestamp": "2026-11-20T09:14:02Z",
        "generateName": "checkout-7d9c5b8f6d-",
        "labels": {"app": "checkout", "pod-template-hash": "7d9c5b8f6d"},
        "name": "checkout-7d9c5b8f6d-x2x9q",
        "namespace": "shop",
        "ownerReferences": [
            {"apiVersion": "v1", "kind": "Secret", "name": "not-a-controller",
             "uid": "0e0e0e0e-0000-0000-0000-000000000000"},
            {"apiVersion": "apps/v1", "blockOwnerDeletion": True, "controller": True,
             "kind": "ReplicaSet", "name": "checkout-7d9c5b8f6d",
             "uid": "5b1f7a52-8f41-4c3e-9f0e-3a1c2b7d9e10"},
        ],
        "resourceVersion": "48213377",
        "uid": "9d3c2f4e-61aa-4c1b-8a57-0f2f6e1d2b33",
    },
    "spec": {
        "containers": [{"image": "shop/checkout:1.4.2", "name": "checkout",
                        "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
        "nodeName": "ip-10-0-3-17.eu-west-1.compute.internal",
        "restartPolicy": "Always",
    },
    "status": {
        "conditions": [{"type": "Ready", "status": "True"}],
        "hostIP": "10.0.3.17",
        "phase": "Running",
        "podIP": "10.0.3.201",
        "podIPs": [{"ip": "10.0.3.201"}, {"ip": "2a05:d018:0:0::c9"}],
        "startTime": "2026-11-20T09:14:03Z",
    },
}

SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "checkout", "namespace": "shop", "resourceVersion": "48100001",
                 "uid": "c0ffee00-1111-2222-3333-444455556666"},
    "spec": {
        "clusterIP": "172.20.14.9",
        "clusterIPs": ["172.20.14.9", "fd00:20::e09"],
        "externalIPs": ["198.51.100.7"],
        "ipFamilies": ["IPv4", "IPv6"],
        "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 31080},
            {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53, "nodePort": 31053},
            {"port": 9090, "targetPort": "metrics", "nodePort": 31090},
        ],
        "selector": {"app": "checkout"},
        "type": "LoadBalancer",
    },
    "status": {"loadBalancer": {"ingress": [
        {"ip": "203.0.113.40", "ipMode": "VIP"},
        {"hostname": "a1b2c3.elb.eu-west-1.amazonaws.com"},
    ]}},
}

SLICE_V1: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "generateName": "checkout-",
        "labels": {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                   "kubernetes.io/service-name": "checkout"},
        "name": "checkout-8fj2k",
        "namespace": "shop",
        "uid": "e5e5e5e5-aaaa-bbbb-cccc-000000000001",
    },
    "addressType": "IPv4",
    "endpoints": [
        {"addresses": ["10.0.3.201"],
         "conditions": {"ready": True, "serving": True, "terminating": False},
         "nodeName": "ip-10-0-3-17.eu-west-1.compute.internal",
         "targetRef": {"kind": "Pod", "name": "checkout-7d9c5b8f6d-x2x9q", "namespace": "shop",
                       "uid": "9d3c2f4e-61aa-4c1b-8a57-0f2f6e1d2b33"},
         "zone": "eu-west-1a"},
        {"addresses": ["10.0.4.12"],
         "conditions": {"ready": False, "serving": True, "terminating": True},
         "targetRef": {"kind": "Pod", "name": "checkout-7d9c5b8f6d-abcde", "namespace": "shop",
                       "uid": "11111111-2222-3333-4444-555555555555"}},
        {"addresses": ["10.0.5.3"], "conditions": {}},
    ],
    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
}

# discovery.k8s.io/v1beta1 (Kubernetes 1.17-1.24): `topology` instead of nodeName/zone.
SLICE_V1BETA1: dict[str, Any] = {
    "apiVersion": "discovery.k8s.io/v1beta1",
    "kind": "EndpointSlice",
    "metadata": {"labels": {"kubernetes.io/service-name": "checkout"}, "name": "checkout-x7w2p",
                 "namespace": "shop", "uid": "e5e5e5e5-aaaa-bbbb-cccc-000000000002"},
    "addressType": "IPv4",
    "endpoints": [
        {"addresses": ["10.0.3.201"], "conditions": {"ready": True},
         "targetRef": {"kind": "Pod", "name": "checkout-7d9c5b8f6d-x2x9q", "namespace": "shop",
                       "uid": "9d3c2f4e-61aa-4c1b-8a57-0f2f6e1d2b33"},
         "topology": {"kubernetes.io/hostname": "ip-10-0-3-17.eu-west-1.compute.internal",
                      "topology.kubernetes.io/zone": "eu-west-1a"}},
    ],
    "ports": [{"name": "", "port": None, "protocol": "TCP"}],
}


def event(etype: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": etype, "object": obj}


def test_pod_keeps_the_names_and_addresses_findings_need() -> None:
    ev = parse_event(event("MODIFIED", POD))
    assert ev.type == "MODIFIED"
    assert ev.record == PodInfo(
        uid="9d3c2f4e-61aa-4c1b-8a57-0f2f6e1d2b33",
        namespace="shop",
        name="checkout-7d9c5b8f6d-x2x9q",
        ips=("10.0.3.201", "2a05:d018::c9"),  # IPv6 in canonical (inet_ntop) form
        phase="Running",
        node="ip-10-0-3-17.eu-west-1.compute.internal",
        workload="ReplicaSet/checkout-7d9c5b8f6d",
        deleting=False,
        host_network=False,
    )


def test_pod_from_an_api_server_without_podIPs_uses_podIP() -> None:
    pod = copy.deepcopy(POD)
    del pod["status"]["podIPs"]
    pod["metadata"]["deletionTimestamp"] = "2026-11-20T10:00:00Z"
    rec = parse_event(event("MODIFIED", pod)).record
    assert isinstance(rec, PodInfo)
    assert rec.ips == ("10.0.3.201",)
    assert rec.deleting


def test_pending_pod_has_no_ip_yet_and_terminal_phases_are_flagged() -> None:
    pod = copy.deepcopy(POD)
    pod["status"] = {"phase": "Pending"}
    rec = parse_event(event("ADDED", pod)).record
    assert isinstance(rec, PodInfo)
    assert (rec.ips, rec.terminal) == ((), False)
    pod["status"] = {"phase": "Succeeded", "podIP": "10.0.3.201"}
    rec = parse_event(event("MODIFIED", pod)).record
    assert isinstance(rec, PodInfo)
    assert rec.terminal


def test_service_vips_cover_cluster_external_and_load_balancer_ips() -> None:
    rec = parse_event(event("ADDED", SERVICE)).record
    assert isinstance(rec, ServiceInfo)
    assert rec.cluster_ips == ("172.20.14.9", "fd00:20::e09")  # clusterIP not repeated
    assert rec.external_ips == ("198.51.100.7",)
    assert rec.lb_ips == ("203.0.113.40",)  # the hostname-only ingress has no address
    assert rec.vips == ("172.20.14.9", "fd00:20::e09", "198.51.100.7", "203.0.113.40")
    assert rec.ports == (
        ServicePort(80, "TCP", "http"),
        ServicePort(53, "UDP", "dns"),
        ServicePort(9090, "TCP", None),  # protocol defaults to TCP, as in the API
    )


def test_headless_service_has_no_vip() -> None:
    svc = copy.deepcopy(SERVICE)
    svc["spec"] = {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]}
    del svc["status"]
    rec = parse_event(event("ADDED", svc)).record
    assert isinstance(rec, ServiceInfo)
    assert rec.vips == ()


def test_endpointslice_v1_keeps_conditions_and_target_pod() -> None:
    rec = parse_event(event("ADDED", SLICE_V1)).record
    assert rec == EndpointSliceInfo(
        uid="e5e5e5e5-aaaa-bbbb-cccc-000000000001",
        namespace="shop",
        name="checkout-8fj2k",
        service="checkout",
        address_type="IPv4",
        endpoints=(
            SliceEndpoint(("10.0.3.201",), True, True, False,
                          TargetPod("9d3c2f4e-61aa-4c1b-8a57-0f2f6e1d2b33", "shop",
                                    "checkout-7d9c5b8f6d-x2x9q")),
            SliceEndpoint(("10.0.4.12",), False, True, True,
                          TargetPod("11111111-2222-3333-4444-555555555555", "shop",
                                    "checkout-7d9c5b8f6d-abcde")),
            SliceEndpoint(("10.0.5.3",), None, None, None, None),
        ),
        ports=(SlicePort(8080, "TCP", "http"),),
    )
    assert isinstance(rec, EndpointSliceInfo)
    # ready: null is "unknown", which the API tells consumers to take as ready.
    assert [ep.counts_as_ready for ep in rec.endpoints] == [True, False, True]


def test_endpointslice_v1beta1_parses_like_v1() -> None:
    rec = parse_event(event("MODIFIED", SLICE_V1BETA1)).record
    assert isinstance(rec, EndpointSliceInfo)
    assert rec.service == "checkout"
    assert rec.endpoints == (
        SliceEndpoint(("10.0.3.201",), True, None, None,
                      TargetPod("9d3c2f4e-61aa-4c1b-8a57-0f2f6e1d2b33", "shop",
                                "checkout-7d9c5b8f6d-x2x9q")),
    )
    assert rec.ports == (SlicePort(None, "TCP", None),)  # port null: all ports


def test_client_sanitized_objects_parse_like_the_api_without_kind() -> None:
    """ApiClient().sanitize_for_serialization of list items: camelCase, but no kind/apiVersion."""
    from kubernetes import client

    api = client.ApiClient()

    def sanitize(model: object) -> dict[str, Any]:
        out: dict[str, Any] = api.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
        return out

    pod = sanitize(client.V1Pod(
        metadata=client.V1ObjectMeta(name="web-0", namespace="default", uid="u-web-0",
                                     owner_references=[client.V1OwnerReference(
                                         api_version="apps/v1", kind="StatefulSet", name="web",
                                         uid="u-sts", controller=True)]),
        spec=client.V1PodSpec(containers=[client.V1Container(name="web")], node_name="n1"),
        status=client.V1PodStatus(phase="Running", pod_ip="10.1.0.5",
                                  pod_ips=[client.V1PodIP(ip="10.1.0.5")]),
    ))
    svc = sanitize(client.V1Service(
        metadata=client.V1ObjectMeta(name="web", namespace="default", uid="u-svc"),
        spec=client.V1ServiceSpec(cluster_ip="10.96.0.20", cluster_ips=["10.96.0.20"],
                                  ports=[client.V1ServicePort(port=80, protocol="TCP")]),
    ))
    eps = sanitize(client.V1EndpointSlice(
        metadata=client.V1ObjectMeta(name="web-abc", namespace="default", uid="u-es",
                                     labels={"kubernetes.io/service-name": "web"}),
        address_type="IPv4",
        endpoints=[client.V1Endpoint(
            addresses=["10.1.0.5"], conditions=client.V1EndpointConditions(ready=True),
            target_ref=client.V1ObjectReference(kind="Pod", name="web-0", namespace="default",
                                                uid="u-web-0"))],
    ))
    assert "kind" not in pod and "podIPs" in pod["status"]

    prec = parse_event(event("ADDED", pod)).record
    assert isinstance(prec, PodInfo)
    assert (prec.uid, prec.ips, prec.workload, prec.node) == (
        "u-web-0", ("10.1.0.5",), "StatefulSet/web", "n1")
    srec = parse_event(event("ADDED", svc)).record
    assert isinstance(srec, ServiceInfo)
    assert (srec.vips, srec.ports) == (("10.96.0.20",), (ServicePort(80, "TCP", None),))
    erec = parse_event(event("ADDED", eps)).record
    assert isinstance(erec, EndpointSliceInfo)
    assert erec.endpoints[0].target == TargetPod("u-web-0", "default", "web-0")


def test_caller_named_kind_is_used_when_the_object_has_none() -> None:
    pod = copy.deepcopy(POD)
    del pod["kind"], pod["apiVersion"], pod["spec"]["containers"]
    assert isinstance(parse_event(event("ADDED", pod)).record, UnknownObject)
    assert isinstance(parse_event(event("ADDED", pod), kind="Pod").record, PodInfo)


def test_other_kinds_and_versions_are_skipped_not_errors() -> None:
    node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "uid": "u-n1"}}
    rec = parse_event(event("ADDED", node)).record
    assert rec == UnknownObject("Node", "v1")
    future = copy.deepcopy(SLICE_V1)
    future["apiVersion"] = "discovery.k8s.io/v2"
    assert parse_event(event("ADDED", future)).record == UnknownObject(
        "EndpointSlice", "discovery.k8s.io/v2")


def test_bookmark_carries_only_the_resource_version() -> None:
    ev = parse_event({"type": "BOOKMARK", "object": {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"resourceVersion": "48213400",
                     "annotations": {"k8s.io/initial-events-end": "true"}}}})
    assert ev.record == Bookmark("Pod", "48213400", initial_events_end=True)


def test_error_event_carries_the_status() -> None:
    ev = parse_event({"type": "ERROR", "object": {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "too old resource version: 48100000 (48213377)", "reason": "Expired",
        "code": 410}})
    assert ev.record == WatchError(410, "Expired", "too old resource version: 48100000 (48213377)")


def _without(obj: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    node = out
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return out


def _with(obj: dict[str, Any], value: object, *path: str | int) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    node: Any = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize(("raw", "message"), [
    ([1, 2], "watch event is a JSON array, not an object"),
    ({"object": POD}, 'watch event has no "type"'),
    ({"type": "UPDATED", "object": POD}, "watch event type 'UPDATED' is not one of ADDED"),
    ({"type": "ADDED"}, 'ADDED watch event has no "object"'),
    ({"type": "ADDED", "object": "pod"}, "object is a JSON string, not an object"),
    (event("ADDED", _without(POD, "metadata")), "object.metadata is missing"),
    (event("ADDED", _without(POD, "metadata", "uid")), "(Pod): object.metadata.uid is missing"),
    (event("DELETED", _without(POD, "metadata", "name")),
     "DELETED event (Pod): object.metadata.name is missing"),
    (event("ADDED", _with(POD, 7, "metadata", "namespace")),
     "object.metadata.namespace is a JSON number, not a string"),
    (event("ADDED", _with(POD, {"ip": "10.0.0.1"}, "status", "podIPs")),
     "object.status.podIPs is a JSON object, not an array"),
    (event("ADDED", _with(POD, "10.0.3.300", "status", "podIPs", 0, "ip")),
     "object.status.podIPs[0].ip is '10.0.3.300', not an IP address"),
    (event("ADDED", _with(SERVICE, "80", "spec", "ports", 0, "port")),
     "(Service): object.spec.ports[0].port is '80', not an integer"),
    (event("ADDED", _without(SLICE_V1, "addressType")),
     "(EndpointSlice): object.addressType is missing"),
    (event("ADDED", _with(SLICE_V1, "yes", "endpoints", 1, "conditions", "ready")),
     "object.endpoints[1].conditions.ready is 'yes', not true, false or null"),
    ({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {}}},
     "BOOKMARK event: object.metadata.resourceVersion is missing"),
])
def test_malformed_events_name_the_field(raw: object, message: str) -> None:
    with pytest.raises(IdentityError) as err:
        parse_event(raw)
    assert message in str(err.value)
