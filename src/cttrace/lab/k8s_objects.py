"""The Pod, Service and EndpointSlice objects the Kubernetes API would serve for the lab.

They are shaped like the API's own JSON (camelCase keys, the same nesting, the
fields kubelet and the EndpointSlice controller fill in), so that whatever reads
the lab's identity file reads exactly what it would read from a real cluster's
watch stream. ``metadata.resourceVersion`` is left to
:class:`cttrace.lab.identity_log.IdentityLog`, which numbers events in order.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence
from typing import Any

from cttrace.addr import is_ipv6
from cttrace.lab.addressing import address_in
from cttrace.lab.cluster import LabPod, LabService

JsonObject = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
ENDPOINTSLICE_CONTROLLER = "endpointslice-controller.k8s.io"


def timestamp(ts: float) -> str:
    """RFC 3339 in whole seconds, UTC, as the API writes metadata times."""
    return _dt.datetime.fromtimestamp(int(ts), tz=_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_object(pod: LabPod, *, deleted_at: float | None = None) -> JsonObject:
    """A running pod of a ReplicaSet; with ``deleted_at``, the object a DELETED event carries."""
    workload = pod.workload
    metadata: JsonObject = {
        "name": pod.name,
        "generateName": f"{workload.replicaset}-",
        "namespace": pod.namespace,
        "uid": pod.uid,
        "creationTimestamp": timestamp(pod.created_at),
        "labels": {"app": workload.app, "pod-template-hash": workload.template_hash},
        "ownerReferences": [{
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "name": workload.replicaset,
            "uid": pod.replicaset_uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }],
    }
    if deleted_at is not None:
        metadata["deletionTimestamp"] = timestamp(deleted_at)
        metadata["deletionGracePeriodSeconds"] = 0
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "nodeName": pod.node_name,
            "containers": [{
                "name": workload.app,
                "image": workload.image,
                "ports": [{"containerPort": workload.container_port, "protocol": "TCP"}],
            }],
            "restartPolicy": "Always",
        },
        "status": {
            "phase": "Running",
            "hostIP": pod.host_ip,
            "hostIPs": [{"ip": pod.host_ip}],
            "podIP": pod.ips[0],
            "podIPs": [{"ip": ip} for ip in pod.ips],
            "startTime": timestamp(pod.created_at),
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def service_object(svc: LabService) -> JsonObject:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": svc.name,
            "namespace": svc.namespace,
            "uid": svc.uid,
            "creationTimestamp": timestamp(svc.created_at),
            "labels": {"app": svc.app},
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": svc.vips[0],
            "clusterIPs": list(svc.vips),
            "ipFamilies": [_family(ip) for ip in svc.vips],
            "ipFamilyPolicy": "RequireDualStack" if len(svc.vips) > 1 else "SingleStack",
            "ports": [{
                "name": svc.port_name,
                "port": svc.port,
                "targetPort": svc.target_port,
                "protocol": "TCP",
            }],
            "selector": {"app": svc.app},
            "sessionAffinity": "None",
        },
        "status": {"loadBalancer": {}},
    }


def endpoint_slice_objects(svc: LabService, *,
                           terminating: Sequence[LabPod] = ()) -> list[JsonObject]:
    """The Service's EndpointSlices, one per IP family (the EndpointSlice controller never
    mixes families in one slice), listing ``svc.endpoints`` as ready and ``terminating``
    as serving but not ready."""
    return [_endpoint_slice(svc, vip, terminating, first=i == 0)
            for i, vip in enumerate(svc.vips)]


def _endpoint_slice(svc: LabService, vip: str, terminating: Sequence[LabPod], *,
                    first: bool) -> JsonObject:
    family = _family(vip)
    # The first family's slice keeps the names the Service was created with; a dual-stack
    # Service's second slice gets its own (real ones are both "<service>-<random>").
    name = svc.slice_name if first else f"{svc.slice_name}-{family.lower()}"
    uid = svc.slice_uid if first else str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"{svc.slice_uid}/{family}"))
    ready = [_endpoint(pod, ip, ready=True) for pod in svc.endpoints
             if (ip := address_in(pod.ips, 6 if family == "IPv6" else 4))]
    draining = [_endpoint(pod, ip, ready=False) for pod in terminating
                if (ip := address_in(pod.ips, 6 if family == "IPv6" else 4))]
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "generateName": f"{svc.name}-",
            "namespace": svc.namespace,
            "uid": uid,
            "generation": svc.slice_generation,
            "creationTimestamp": timestamp(svc.created_at),
            "labels": {
                SERVICE_NAME_LABEL: svc.name,
                MANAGED_BY_LABEL: ENDPOINTSLICE_CONTROLLER,
            },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Service",
                "name": svc.name,
                "uid": svc.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "addressType": family,
        "endpoints": ready + draining,
        # An EndpointSlice port is the port on the pod (the Service's targetPort).
        "ports": [{"name": svc.port_name, "port": svc.target_port, "protocol": "TCP"}],
    }


def _family(ip: str) -> str:
    """spec.ipFamilies / addressType name of ``ip``'s family."""
    return "IPv6" if is_ipv6(ip) else "IPv4"


def _endpoint(pod: LabPod, ip: str, *, ready: bool) -> JsonObject:
    return {
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": True, "terminating": not ready},
        "nodeName": pod.node_name,
        "targetRef": {
            "kind": "Pod",
            "name": pod.name,
            "namespace": pod.namespace,
            "uid": pod.uid,
        },
    }
