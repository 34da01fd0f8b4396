"""The Kubernetes identity source against a real kube-apiserver and etcd (tests/fixtures/kube.py).

What a user relies on: after the source is in sync, the index names the pod that
holds an IP, the Service behind a VIP:port and whether an IP is that Service's
endpoint, for objects created before the source started (the list) and after
(the watch); a recycled IP shows both owners in order; an apiserver that dies
while pods change, or that answers 410 Gone after etcd compaction, costs no
ownership change; EndpointSlices are read as discovery.k8s.io/v1 and v1beta1;
credentials the API refuses are a one-line error at start.

Nothing here runs a kubelet or controller: pod IPs are set through the status
subresource, EndpointSlices are written by the test, pods are deleted with grace
period 0 (a pod bound to a node otherwise waits for that node's kubelet).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from cttrace.identity.index import IdentityIndex
from cttrace.identity.kube import KubeConfigError, KubeIdentitySource, WatchSettings
from cttrace.identity.model import PodRef, ServiceRef
from tests.fixtures.kube import (  # noqa: F401 (fixtures)
    KubeCluster,
    MakeCluster,
    kube_cluster,
    kube_cluster_v1beta1,
    make_kube_cluster,
)

pytestmark = pytest.mark.kernel

#: Quick reconnects, so a test waits on the API coming back rather than on backoff.
FAST = WatchSettings(backoff_base_s=0.2, backoff_cap_s=1.0, watch_timeout_s=60)
DEADLINE_S = 60.0


@dataclass
class Pod:
    ref: PodRef
    ip: str


class Kube:
    """Creates the objects a scenario needs through the API, as controllers would."""

    def __init__(self, api: Any, slice_version: str) -> None:
        # Any: the client's models are typed, the dict bodies written here are what the API takes.
        self.core: Any = client.CoreV1Api(api)
        self.groups: Any = client.CustomObjectsApi(api)
        self.slice_version = slice_version

    def namespace(self) -> str:
        name = f"ctl-{uuid.uuid4().hex[:8]}"
        self.core.create_namespace({"metadata": {"name": name}})
        return name

    def pod(self, ns: str, name: str, ip: str, *, node: str = "node-1",
            replicaset: str | None = None) -> Pod:
        meta: dict[str, Any] = {"name": name}
        if replicaset is not None:
            meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                        "name": replicaset, "uid": str(uuid.uuid4()),
                                        "controller": True}]
        created = self.core.create_namespaced_pod(ns, {
            "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app.invalid"}]},
        })
        # No kubelet: report the sandbox's IP the way the kubelet does.
        self.core.patch_namespaced_pod_status(name, ns, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
        workload = f"ReplicaSet/{replicaset}" if replicaset else None
        return Pod(PodRef(created.metadata.uid, ns, name, workload, node), ip)

    def delete_pod(self, pod: Pod) -> None:
        self.core.delete_namespaced_pod(pod.ref.name, pod.ref.namespace, grace_period_seconds=0)

    def delete_service(self, service: ServiceRef) -> None:
        # 1.20 answers a Service DELETE with a Status, which the client cannot read as a
        # Service: take the raw response.
        self.core.delete_namespaced_service(service.name, service.namespace,
                                            _preload_content=False)

    def service(self, ns: str, name: str, port: int) -> tuple[ServiceRef, str]:
        svc = self.core.create_namespaced_service(ns, {
            "metadata": {"name": name},
            "spec": {"selector": {"app": name},
                     "ports": [{"port": port, "targetPort": 8080, "protocol": "TCP"}]},
        })
        return ServiceRef(ns, name, svc.metadata.uid), svc.spec.cluster_ip

    def endpoint_slice(self, service: ServiceRef, name: str, pods: list[Pod]) -> None:
        body = {
            "apiVersion": f"discovery.k8s.io/{self.slice_version}",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service.name}},
            "addressType": "IPv4",
            "endpoints": [self._endpoint(p) for p in pods],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }
        self.groups.create_namespaced_custom_object(
            "discovery.k8s.io", self.slice_version, service.namespace, "endpointslices", body)

    def set_endpoints(self, service: ServiceRef, name: str, pods: list[Pod]) -> None:
        self.groups.patch_namespaced_custom_object(
            "discovery.k8s.io", self.slice_version, service.namespace, "endpointslices", name,
            {"endpoints": [self._endpoint(p) for p in pods]},
            _content_type="application/merge-patch+json")

    @staticmethod
    def _endpoint(pod: Pod) -> dict[str, Any]:
        return {"addresses": [pod.ip], "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", "namespace": pod.ref.namespace,
                              "name": pod.ref.name, "uid": pod.ref.uid}}


def kube_for(cluster: KubeCluster, server: Any = None) -> Kube:
    return Kube(cluster.api_client(server), "v1" if cluster.variant == "v1" else "v1beta1")


@contextmanager
def watching(kubeconfig: str,
             settings: WatchSettings = FAST) -> Iterator[tuple[KubeIdentitySource, IdentityIndex]]:
    index = IdentityIndex()
    notes: list[str] = []
    source = KubeIdentitySource(index, kubeconfig=kubeconfig, on_log=notes.append,
                                settings=settings)
    source.open()
    try:
        until(source, lambda: source.in_sync, "the source gets in sync")
        yield source, index
    finally:
        source.close()


def until(source: KubeIdentitySource, check: Callable[[], bool], what: str) -> None:
    """Poll the source (as the runtime's loop does) until ``check`` holds."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        source.poll()
        if check():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE_S:.0f} s (stats {source.stats()})")
        time.sleep(0.05)


@pytest.fixture(params=["v1", "v1beta1"])
def cluster(request: pytest.FixtureRequest) -> KubeCluster:
    name = "kube_cluster" if request.param == "v1" else "kube_cluster_v1beta1"
    found: KubeCluster = request.getfixturevalue(name)
    return found


def test_index_answers_from_list_and_watch(cluster: KubeCluster) -> None:
    kube = kube_for(cluster)
    ns = kube.namespace()
    web = kube.pod(ns, "web-1", "10.244.1.5", replicaset="web-5d4f")
    svc, vip = kube.service(ns, "web", 80)
    kube.endpoint_slice(svc, "web-abc12", [web])

    with watching(cluster.kubeconfig) as (source, index):
        # Listed: created before the source started.
        now = time.time()
        assert index.owner_at(web.ip, now) == web.ref
        assert index.service_for(vip, 80, now) == svc
        assert index.is_endpoint(svc, web.ip, now, now, web.ref.uid) is True

        # Watched: a second replica joins the Service after the source is in sync.
        before = time.time()
        web2 = kube.pod(ns, "web-2", "10.244.1.6", replicaset="web-5d4f")
        kube.set_endpoints(svc, "web-abc12", [web, web2])
        until(source, lambda: index.is_endpoint(svc, web2.ip, before, time.time()) is True,
              "web-2 becomes an endpoint of web")
        assert index.owner_at(web2.ip, time.time()) == web2.ref
        assert index.is_endpoint(svc, web2.ip, before - 60, before - 30) is False
        assert index.service_for(vip, 443, time.time()) is None
        assert source.stats()["events"] >= 2


def test_recycled_ip_shows_both_owners_in_order(
        kube_cluster: KubeCluster,  # noqa: F811 (fixture)
) -> None:
    kube = kube_for(kube_cluster)
    shop, billing = kube.namespace(), kube.namespace()
    ip = "10.244.2.7"
    cart = kube.pod(shop, "cart-0", ip)
    with watching(kube_cluster.kubeconfig) as (source, index):
        held = time.time()
        kube.delete_pod(cart)
        api = kube.pod(billing, "api-0", ip)
        until(source, lambda: index.owner_at(ip, time.time()) == api.ref,
              "api-0 owns the recycled IP")
        first, second = index.ownerships(ip)
        assert first.pod == cart.ref and first.until is not None
        assert second.pod == api.ref and second.until is None
        assert first.until <= second.since
        assert index.owner_at(ip, held) == cart.ref


def test_apiserver_restart_loses_no_ownership_change(
        make_kube_cluster: MakeCluster,  # noqa: F811 (fixture)
) -> None:
    cluster = make_kube_cluster("v1")
    other = cluster.add_apiserver()  # an HA peer: the API stays writable while ours is down
    kube = kube_for(cluster, other)
    shop, billing = kube.namespace(), kube.namespace()
    recycled, freed = "10.244.3.7", "10.244.3.8"
    cart = kube.pod(shop, "cart-0", recycled)
    batch = kube.pod(shop, "batch-0", freed)

    with watching(cluster.kubeconfig) as (source, index):
        restarts = source.stats()["watch_restarts"]
        cluster.api.kill()
        down = time.time()
        kube.delete_pod(cart)
        kube.delete_pod(batch)
        api = kube.pod(billing, "api-0", recycled)
        source.poll()
        # The source's apiserver is dead: nothing can have told it yet.
        assert index.owner_at(recycled, time.time()) == cart.ref

        cluster.api.start()
        until(source, lambda: (index.owner_at(recycled, time.time()) == api.ref
                               and index.owner_at(freed, time.time()) is None),
              "the index reflects what changed while the apiserver was down")
        assert [o.pod for o in index.ownerships(recycled)] == [cart.ref, api.ref]
        (gone,) = index.ownerships(freed)
        assert gone.pod == batch.ref and gone.until is not None and gone.until >= down
        assert source.stats()["watch_restarts"] > restarts


def test_compaction_410_relists_and_stays_correct(
        make_kube_cluster: MakeCluster,  # noqa: F811 (fixture)
) -> None:
    # Without the watch cache, watches are served by etcd itself: a watch from a revision
    # etcd has compacted away is answered 410 Gone ("required revision has been compacted").
    cluster = make_kube_cluster("v1", ("--watch-cache=false",))
    other = cluster.add_apiserver()
    kube = kube_for(cluster, other)
    ns = kube.namespace()
    ip = "10.244.4.7"
    old = kube.pod(ns, "old-0", ip)
    svc, vip = kube.service(ns, "web", 80)

    with watching(cluster.kubeconfig) as (source, index):
        assert source.stats()["relists_expired"] == 0
        synced = time.time()
        cluster.api.kill()
        kube.delete_pod(old)
        new = kube.pod(ns, "new-0", ip)
        kube.delete_service(svc)
        cluster.etcd.compact()
        cluster.api.start()
        until(source, lambda: source.stats()["relists_expired"] >= 1,
              "a watch resuming from a compacted revision gets 410 and relists")
        until(source, lambda: (index.owner_at(ip, time.time()) == new.ref
                               and index.service_for(vip, 80, time.time()) is None),
              "the relist reconciles the pod and the Service deleted meanwhile")
        assert [o.pod for o in index.ownerships(ip)] == [old.ref, new.ref]
        assert index.service_for(vip, 80, synced) == svc  # its history stays


def test_credentials_the_api_refuses_are_a_clear_error(
        kube_cluster: KubeCluster, tmp_path: Path,  # noqa: F811 (fixture)
) -> None:
    config = json.loads(kube_cluster.api.kubeconfig.read_text())
    config["users"][0]["user"]["token"] = "not-the-token"
    bad = tmp_path / "kubeconfig"
    bad.write_text(json.dumps(config))
    source = KubeIdentitySource(IdentityIndex(), kubeconfig=str(bad))
    with pytest.raises(KubeConfigError, match="401"):
        source.open()
    source.close()


def test_untrusted_server_certificate_is_a_clear_error(
        kube_cluster: KubeCluster, tmp_path: Path,  # noqa: F811 (fixture)
) -> None:
    config = json.loads(kube_cluster.api.kubeconfig.read_text())
    # Any CA but the one that signed the apiserver's certificate.
    config["clusters"][0]["cluster"]["certificate-authority"] = "/etc/ssl/certs/ca-certificates.crt"
    bad = tmp_path / "kubeconfig"
    bad.write_text(json.dumps(config))
    source = KubeIdentitySource(IdentityIndex(), kubeconfig=str(bad))
    with pytest.raises(KubeConfigError, match="TLS"):
        source.open()
    source.close()
