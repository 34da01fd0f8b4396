"""Kubernetes watch events turned into the few typed facts the identity index keeps.

A watch event is ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": {...}}``,
exactly what the API's watch stream sends (and what the official Python client
hands out as ``raw_object``, or produces with ``ApiClient().sanitize_for_serialization``:
the same camelCase keys, but list items lack ``kind``). A Pod object is kilobytes
of JSON; the index needs a dozen fields of it, so parsing keeps only those and
drops the rest at once.

Errors: anything malformed in a field this module reads raises
:class:`cttrace.errors.IdentityError` naming the field (``object.metadata.uid``);
fields it does not read are never looked at, so unknown or new API fields are
harmless. Objects of other kinds parse to :class:`UnknownObject` (the index
counts and skips them).

IP addresses are returned in canonical text form (what ``inet_ntop`` prints, as
the kernel sources do), so that an IPv6 address written differently by a CNI
still matches the address a kernel event carries.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, overload

from cttrace.addr import canonical
from cttrace.errors import IdentityError

EventType: TypeAlias = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]
EVENT_TYPES: Final[tuple[EventType, ...]] = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")

POD: Final = "Pod"
SERVICE: Final = "Service"
ENDPOINT_SLICE: Final = "EndpointSlice"
KINDS: Final[tuple[str, ...]] = (POD, SERVICE, ENDPOINT_SLICE)

#: apiVersions whose schema this module reads. discovery.k8s.io/v1beta1 (Kubernetes
#: 1.17-1.24) differs from v1 only in fields not read here: its endpoints carry a
#: ``topology`` map where v1 has ``nodeName``/``zone``/``deprecatedTopology``.
#: ``conditions`` (ready, and serving/terminating since 1.20), ``targetRef``,
#: ``addresses``, ``addressType``, ``ports`` and the service-name label are the same.
API_VERSIONS: Final[dict[str, frozenset[str]]] = {
    POD: frozenset({"v1"}),
    SERVICE: frozenset({"v1"}),
    ENDPOINT_SLICE: frozenset({"discovery.k8s.io/v1", "discovery.k8s.io/v1beta1"}),
}

#: Label the EndpointSlice controller sets to the owning Service's name.
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
#: Annotation on the BOOKMARK that ends a watch's initial events (``sendInitialEvents``).
INITIAL_EVENTS_END: Final = "k8s.io/initial-events-end"

#: Pod phases after which no container runs again; the kubelet has torn the sandbox
#: down (or will), and the CNI may hand the IP to another pod.
TERMINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})

_Obj: TypeAlias = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    ips: tuple[str, ...]  # status.podIPs (falling back to status.podIP), canonical text
    phase: str | None
    node: str | None  # spec.nodeName
    workload: str | None  # "Kind/name" of the controller ownerReference
    deleting: bool  # metadata.deletionTimestamp is set (graceful termination running)
    host_network: bool  # spec.hostNetwork: its "IP" is the node's, shared with other pods

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    protocol: str  # TCP (the API's default), UDP or SCTP
    name: str | None


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    uid: str
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]  # spec.clusterIPs + spec.clusterIP, without "None" (headless)
    external_ips: tuple[str, ...]  # spec.externalIPs
    lb_ips: tuple[str, ...]  # status.loadBalancer.ingress[].ip
    ports: tuple[ServicePort, ...]

    @property
    def vips(self) -> tuple[str, ...]:
        """Every address kube-proxy DNATs for this Service, deduplicated, in order."""
        return tuple(dict.fromkeys(self.cluster_ips + self.external_ips + self.lb_ips))


@dataclass(frozen=True, slots=True)
class TargetPod:
    uid: str | None
    namespace: str | None
    name: str | None


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    addresses: tuple[str, ...]
    ready: bool | None  # None: unknown, which the API says consumers treat as ready
    serving: bool | None
    terminating: bool | None
    target: TargetPod | None  # targetRef, when it names a Pod

    @property
    def counts_as_ready(self) -> bool:
        return self.ready is not False


@dataclass(frozen=True, slots=True)
class SlicePort:
    port: int | None  # None: all ports
    protocol: str
    name: str | None


@dataclass(frozen=True, slots=True)
class EndpointSliceInfo:
    uid: str
    namespace: str
    name: str
    service: str | None  # label kubernetes.io/service-name; None for unlabelled slices
    address_type: str  # IPv4, IPv6 or FQDN
    endpoints: tuple[SliceEndpoint, ...]
    ports: tuple[SlicePort, ...]


@dataclass(frozen=True, slots=True)
class Bookmark:
    kind: str | None
    resource_version: str
    initial_events_end: bool  # the end of a sendInitialEvents watch's synthetic ADDEDs


@dataclass(frozen=True, slots=True)
class WatchError:
    """An ERROR event's Status object (410 Expired: the watch must relist)."""

    code: int | None
    reason: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class UnknownObject:
    kind: str | None
    api_version: str | None


Record: TypeAlias = (
    PodInfo | ServiceInfo | EndpointSliceInfo | Bookmark | WatchError | UnknownObject
)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: EventType
    record: Record


def parse_event(event: object, *, kind: str | None = None) -> WatchEvent:
    """Parse one watch event dict.

    ``kind`` names the resource when the caller knows it (a watcher of one
    resource); it is needed only for objects without a ``kind`` key, such as list
    items serialized by the Python client. Without either, the kind is inferred
    from fields only that kind has (see :func:`infer_kind`).
    """
    if not isinstance(event, Mapping):
        raise IdentityError(
            f"watch event is a JSON {_json_type(event)}, not an object: expected "
            '{"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}'
        )
    etype = event.get("type")
    if etype is None:
        raise IdentityError('watch event has no "type" (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR)')
    if etype not in EVENT_TYPES:
        raise IdentityError(
            f"watch event type {etype!r} is not one of {', '.join(EVENT_TYPES)}"
        )
    obj = event.get("object")
    if obj is None:
        raise IdentityError(f'{etype} watch event has no "object"')
    if not isinstance(obj, Mapping):
        raise IdentityError(
            f"{etype} watch event: object is a JSON {_json_type(obj)}, not an object"
        )
    if etype == "ERROR":
        return WatchEvent("ERROR", _parse_status(obj))
    if etype == "BOOKMARK":
        return WatchEvent("BOOKMARK", _parse_bookmark(obj, kind))
    return WatchEvent(etype, parse_object(obj, kind=kind, where=f"{etype} event"))


def parse_object(obj: _Obj, *, kind: str | None = None, where: str = "object") -> Record:
    """Parse a Pod, Service or EndpointSlice object; anything else is :class:`UnknownObject`."""
    okind = _opt_str(obj, "kind", where, "object")
    api_version = _opt_str(obj, "apiVersion", where, "object")
    resolved = okind or kind or infer_kind(obj)
    if resolved not in API_VERSIONS or (
        api_version is not None and api_version not in API_VERSIONS[resolved]
    ):
        return UnknownObject(resolved, api_version)
    where = f"{where} ({resolved})"
    if resolved == POD:
        return parse_pod(obj, where)
    if resolved == SERVICE:
        return parse_service(obj, where)
    return parse_endpoint_slice(obj, where)


def infer_kind(obj: _Obj) -> str | None:
    """The kind of an object without ``kind``, from a field no other kind has at that place.

    ``addressType`` at the top is the EndpointSlice's; ``spec.containers`` the Pod's;
    ``spec.clusterIP``/``clusterIPs``/``type`` with no ``containers`` the Service's.
    """
    if "addressType" in obj:
        return ENDPOINT_SLICE
    spec = obj.get("spec")
    if isinstance(spec, Mapping):
        if "containers" in spec:
            return POD
        if "clusterIP" in spec or "clusterIPs" in spec or "type" in spec:
            return SERVICE
    return None


def parse_pod(obj: _Obj, where: str = "Pod") -> PodInfo:
    uid, namespace, name = _identity(obj, where)
    spec = _opt_map(obj, "spec", where, "object")
    status = _opt_map(obj, "status", where, "object")
    ips: list[str] = []
    if status is not None:
        # podIPs (dual-stack, 1.16+) holds podIP as its first entry; older objects have podIP only.
        for i, item in enumerate(_opt_list(status, "podIPs", where, "object.status") or ()):
            path = f"object.status.podIPs[{i}]"
            ips.append(_ip(_req_str(_item_map(item, where, path), "ip", where, path), where,
                           f"{path}.ip"))
        pod_ip = _opt_str(status, "podIP", where, "object.status")
        if not ips and pod_ip:
            ips.append(_ip(pod_ip, where, "object.status.podIP"))
    phase = _opt_str(status, "phase", where, "object.status") if status is not None else None
    node = _opt_str(spec, "nodeName", where, "object.spec") if spec is not None else None
    host_network = spec is not None and spec.get("hostNetwork") is True
    meta = obj["metadata"]
    return PodInfo(
        uid=uid,
        namespace=namespace,
        name=name,
        ips=tuple(dict.fromkeys(ips)),
        phase=_intern(phase),
        node=_intern(node),
        workload=_intern(_controller(meta, where)),
        deleting=meta.get("deletionTimestamp") is not None,
        host_network=host_network,
    )


def parse_service(obj: _Obj, where: str = "Service") -> ServiceInfo:
    uid, namespace, name = _identity(obj, where)
    spec = _opt_map(obj, "spec", where, "object") or {}
    status = _opt_map(obj, "status", where, "object") or {}

    cluster = list(_str_list(spec, "clusterIPs", where, "object.spec"))
    single = _opt_str(spec, "clusterIP", where, "object.spec")
    if single:
        cluster.append(single)
    # "None" is how a headless Service says it has no VIP; kube-proxy ignores it.
    cluster_ips = _ips([ip for ip in cluster if ip != "None"], where, "object.spec.clusterIPs")
    external_ips = _ips(_str_list(spec, "externalIPs", where, "object.spec"), where,
                        "object.spec.externalIPs")
    lb_ips: list[str] = []
    lb = _opt_map(status, "loadBalancer", where, "object.status")
    ingress = _opt_list(lb, "ingress", where, "object.status.loadBalancer") if lb else None
    for i, item in enumerate(ingress or ()):
        path = f"object.status.loadBalancer.ingress[{i}]"
        ip = _opt_str(_item_map(item, where, path), "ip", where, path)
        if ip:  # hostname-only ingress (AWS ELB) has no address kube-proxy could DNAT
            lb_ips.append(ip)

    ports = []
    for i, item in enumerate(_opt_list(spec, "ports", where, "object.spec") or ()):
        path = f"object.spec.ports[{i}]"
        port = _item_map(item, where, path)
        ports.append(ServicePort(
            port=_req_int(port, "port", where, path),
            protocol=_intern(_opt_str(port, "protocol", where, path) or "TCP"),
            name=_opt_str(port, "name", where, path) or None,
        ))
    return ServiceInfo(
        uid=uid,
        namespace=namespace,
        name=name,
        cluster_ips=cluster_ips,
        external_ips=external_ips,
        lb_ips=_ips(lb_ips, where, "object.status.loadBalancer.ingress"),
        ports=tuple(ports),
    )


def parse_endpoint_slice(obj: _Obj, where: str = "EndpointSlice") -> EndpointSliceInfo:
    uid, namespace, name = _identity(obj, where)
    labels = _opt_map(obj["metadata"], "labels", where, "object.metadata") or {}
    service = _opt_str(labels, SERVICE_NAME_LABEL, where, "object.metadata.labels")
    address_type = _req_str(obj, "addressType", where, "object")
    is_ip = address_type in ("IPv4", "IPv6")

    endpoints = []
    for i, item in enumerate(_opt_list(obj, "endpoints", where, "object") or ()):
        path = f"object.endpoints[{i}]"
        ep = _item_map(item, where, path)
        addresses = tuple(_str_list(ep, "addresses", where, path))
        if is_ip:
            addresses = _ips(list(addresses), where, f"{path}.addresses")
        cond = _opt_map(ep, "conditions", where, path) or {}
        endpoints.append(SliceEndpoint(
            addresses=addresses,
            ready=_opt_bool(cond, "ready", where, f"{path}.conditions"),
            serving=_opt_bool(cond, "serving", where, f"{path}.conditions"),
            terminating=_opt_bool(cond, "terminating", where, f"{path}.conditions"),
            target=_target_pod(ep, where, path),
        ))

    ports = []
    for i, item in enumerate(_opt_list(obj, "ports", where, "object") or ()):
        path = f"object.ports[{i}]"
        port = _item_map(item, where, path)
        number = port.get("port")
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            raise IdentityError(f"{where}: {path}.port is {number!r}, not an integer")
        ports.append(SlicePort(
            port=number,
            protocol=_intern(_opt_str(port, "protocol", where, path) or "TCP"),
            name=_opt_str(port, "name", where, path) or None,
        ))
    return EndpointSliceInfo(
        uid=uid,
        namespace=namespace,
        name=name,
        service=service or None,
        address_type=address_type,
        endpoints=tuple(endpoints),
        ports=tuple(ports),
    )


# -- pieces ------------------------------------------------------------------------------------


def _identity(obj: _Obj, where: str) -> tuple[str, str, str]:
    meta = obj.get("metadata")
    if meta is None:
        raise IdentityError(f"{where}: object.metadata is missing")
    if not isinstance(meta, Mapping):
        raise IdentityError(f"{where}: object.metadata is a JSON {_json_type(meta)}, not an object")
    return (
        _req_str(meta, "uid", where, "object.metadata"),
        _intern(_req_str(meta, "namespace", where, "object.metadata")),
        _req_str(meta, "name", where, "object.metadata"),
    )


def _controller(meta: _Obj, where: str) -> str | None:
    refs = _opt_list(meta, "ownerReferences", where, "object.metadata")
    for i, item in enumerate(refs or ()):
        path = f"object.metadata.ownerReferences[{i}]"
        ref = _item_map(item, where, path)
        if ref.get("controller") is True:
            return f"{_req_str(ref, 'kind', where, path)}/{_req_str(ref, 'name', where, path)}"
    return None


def _target_pod(ep: _Obj, where: str, path: str) -> TargetPod | None:
    ref = _opt_map(ep, "targetRef", where, path)
    if ref is None:
        return None
    rpath = f"{path}.targetRef"
    kind = _opt_str(ref, "kind", where, rpath)
    if kind not in (None, POD):
        return None
    return TargetPod(
        uid=_opt_str(ref, "uid", where, rpath) or None,
        namespace=_intern(_opt_str(ref, "namespace", where, rpath)),
        name=_opt_str(ref, "name", where, rpath),
    )


def _parse_bookmark(obj: _Obj, kind: str | None) -> Bookmark:
    meta = _opt_map(obj, "metadata", "BOOKMARK event", "object")
    if meta is None:
        raise IdentityError("BOOKMARK event: object.metadata is missing")
    annotations = _opt_map(meta, "annotations", "BOOKMARK event", "object.metadata") or {}
    return Bookmark(
        kind=_opt_str(obj, "kind", "BOOKMARK event", "object") or kind,
        resource_version=_req_str(meta, "resourceVersion", "BOOKMARK event", "object.metadata"),
        initial_events_end=annotations.get(INITIAL_EVENTS_END) == "true",
    )


def _parse_status(obj: _Obj) -> WatchError:
    code = obj.get("code")
    return WatchError(
        code=code if isinstance(code, int) and not isinstance(code, bool) else None,
        reason=_opt_str(obj, "reason", "ERROR event", "object"),
        message=_opt_str(obj, "message", "ERROR event", "object"),
    )


@overload
def _intern(value: str) -> str: ...


@overload
def _intern(value: str | None) -> str | None: ...


def _intern(value: str | None) -> str | None:
    # Namespaces, node names, phases and workloads repeat across thousands of pods;
    # sharing one string object each keeps the index's memory per pod small.
    return sys.intern(value) if value is not None else None


def _ip(text: str, where: str, path: str) -> str:
    # inet_pton validates, inet_ntop prints the text the sources print for kernel addresses
    # (they use inet_ntop too), so the index's keys match theirs byte for byte. Interned
    # like the names above: a pod's IP also appears in its Services' slices.
    try:
        return sys.intern(canonical(text))
    except ValueError:
        raise IdentityError(f"{where}: {path} is {text!r}, not an IP address") from None


def _ips(texts: list[str], where: str, path: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_ip(t, where, path) for t in texts))


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _opt_str(obj: _Obj | None, key: str, where: str, path: str) -> str | None:
    if obj is None:
        return None
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise IdentityError(f"{where}: {path}.{key} is a JSON {_json_type(value)}, not a string")


def _req_str(obj: _Obj, key: str, where: str, path: str) -> str:
    value = obj.get(key)
    if value is None or value == "":
        raise IdentityError(f"{where}: {path}.{key} is missing")
    if not isinstance(value, str):
        raise IdentityError(f"{where}: {path}.{key} is a JSON {_json_type(value)}, not a string")
    return value


def _req_int(obj: _Obj, key: str, where: str, path: str) -> int:
    value = obj.get(key)
    if value is None:
        raise IdentityError(f"{where}: {path}.{key} is missing")
    if not isinstance(value, int) or isinstance(value, bool):
        raise IdentityError(f"{where}: {path}.{key} is {value!r}, not an integer")
    return value


def _opt_bool(obj: _Obj, key: str, where: str, path: str) -> bool | None:
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise IdentityError(f"{where}: {path}.{key} is {value!r}, not true, false or null")


def _opt_map(obj: _Obj, key: str, where: str, path: str) -> _Obj | None:
    value = obj.get(key)
    if value is None or isinstance(value, Mapping):
        return value
    raise IdentityError(f"{where}: {path}.{key} is a JSON {_json_type(value)}, not an object")


def _opt_list(obj: _Obj, key: str, where: str, path: str) -> list[Any] | None:
    value = obj.get(key)
    if value is None or isinstance(value, list):
        return value
    raise IdentityError(f"{where}: {path}.{key} is a JSON {_json_type(value)}, not an array")


def _str_list(obj: _Obj, key: str, where: str, path: str) -> list[str]:
    items = _opt_list(obj, key, where, path) or []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise IdentityError(
                f"{where}: {path}.{key}[{i}] is a JSON {_json_type(item)}, not a string"
            )
    return items


def _item_map(item: object, where: str, path: str) -> _Obj:
    if not isinstance(item, Mapping):
        raise IdentityError(f"{where}: {path} is a JSON {_json_type(item)}, not an object")
    return item
