"""Memory per pod and lookup speed of the identity index at cluster scale.

Why it exists: cttrace runs as a DaemonSet on every node and keeps the whole
cluster's pods in memory (any pod IP can be a DNAT target), and the correlator
asks ``owner_at`` on every first reply. This measures both at 10k and 100k pods.

The cluster: each pod one IP, in one of 50 namespaces, 10 pods per ReplicaSet
and per Service (one ClusterIP, TCP port 80), each Service one EndpointSlice
listing its 10 pods. Then 10% of the IPs are recycled (pod deleted, a new uid
gets the IP), so that some timelines have two owners and lookups bisect.
Memory is what ``tracemalloc`` sees retained after the events were applied (the
event dicts themselves are freed as they go), divided by the pod count, so it
includes each pod's share of Services and slices.

    .venv/bin/python bench/bench_identity.py [--sizes 10000,100000] [--lookups 1000000]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cttrace.identity.index import IdentityIndex  # noqa: E402
from cttrace.identity.model import ServiceRef  # noqa: E402

PODS_PER_SERVICE = 10
NAMESPACES = 50


def pod_ip(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


def vip(s: int) -> str:
    return f"172.20.{(s >> 8) & 255}.{s & 255}"


def ns(s: int) -> str:
    return f"team-{s % NAMESPACES}"


def uid(kind: str, i: int, gen: int = 0) -> str:
    return f"{kind}{gen:07x}-0000-4000-8000-{i:012x}"


def pod_event(i: int, gen: int = 0, etype: str = "ADDED") -> dict[str, Any]:
    s = i // PODS_PER_SERVICE
    rs = f"svc-{s}-5d4f8b7c9"
    return {"type": etype, "object": {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"uid": uid("a", i, gen), "name": f"{rs}-{i:05x}{gen}", "namespace": ns(s),
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                          "name": rs, "uid": uid("b", s), "controller": True}]},
        "spec": {"containers": [{"name": "app"}], "nodeName": f"node-{i // 100}"},
        "status": {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]},
    }}


def service_event(s: int) -> dict[str, Any]:
    return {"type": "ADDED", "object": {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"uid": uid("c", s), "name": f"svc-{s}", "namespace": ns(s)},
        "spec": {"clusterIP": vip(s), "clusterIPs": [vip(s)],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
    }}


def slice_event(s: int, gens: dict[int, int]) -> dict[str, Any]:
    members = range(s * PODS_PER_SERVICE, (s + 1) * PODS_PER_SERVICE)
    return {"type": "MODIFIED", "object": {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"uid": uid("d", s), "name": f"svc-{s}-abcde", "namespace": ns(s),
                     "labels": {"kubernetes.io/service-name": f"svc-{s}"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [pod_ip(i)],
                       "conditions": {"ready": True, "serving": True, "terminating": False},
                       "nodeName": f"node-{i // 100}",
                       "targetRef": {"kind": "Pod", "namespace": ns(s),
                                     "name": f"svc-{s}-5d4f8b7c9-{i:05x}{gens.get(i, 0)}",
                                     "uid": uid("a", i, gens.get(i, 0))}}
                      for i in members],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }}


def cluster_events(pods: int, rng: random.Random) -> Iterator[tuple[dict[str, Any], float]]:
    """The initial picture at t=1000, then recycling of 10% of IPs over the next 100 s."""
    services = pods // PODS_PER_SERVICE
    for i in range(pods):
        yield pod_event(i), 1000.0
    for s in range(services):
        yield service_event(s), 1000.0
        yield slice_event(s, {}), 1000.0
    gens: dict[int, int] = {}
    t = 1000.0
    for i in rng.sample(range(pods), pods // 10):
        t += 100.0 / (pods // 10)
        yield pod_event(i, 0, "DELETED"), t
        gens[i] = 1
        yield pod_event(i, 1), t
        yield slice_event(i // PODS_PER_SERVICE, gens), t


def build(pods: int) -> tuple[IdentityIndex, float]:
    index = IdentityIndex()
    n = 0
    start = time.perf_counter()
    for event, ts in cluster_events(pods, random.Random(1)):
        index.apply(event, ts)
        n += 1
    return index, n / (time.perf_counter() - start)


def retained_bytes(pods: int) -> int:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index, _ = build(pods)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del index
    return used


def rate(fn: Any, args: list[tuple[Any, ...]]) -> float:
    start = time.perf_counter()
    for a in args:
        fn(*a)
    return len(args) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="pod counts, comma-separated")
    parser.add_argument("--lookups", type=int, default=1_000_000, help="lookups per measure")
    opts = parser.parse_args()

    print(f"python {sys.version.split()[0]}; {PODS_PER_SERVICE} pods per Service and slice, "
          f"10% of IPs recycled; times are one core")
    print()
    print("| pods | bytes/pod retained | apply events/s | owner_at/s | service_for/s "
          "| is_endpoint/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for pods in (int(x) for x in opts.sizes.split(",")):
        per_pod = retained_bytes(pods) / pods
        index, apply_rate = build(pods)
        rng = random.Random(2)
        services = pods // PODS_PER_SERVICE
        times = [1000.0 + rng.random() * 200.0 for _ in range(opts.lookups)]
        ips = [pod_ip(rng.randrange(pods)) for _ in range(opts.lookups)]
        svcs = [rng.randrange(services) for _ in range(opts.lookups)]
        owner_rate = rate(index.owner_at, list(zip(ips, times, strict=True)))
        svc_rate = rate(index.service_for,
                        [(vip(s), 80, t) for s, t in zip(svcs, times, strict=True)])
        refs = [ServiceRef(ns(s), f"svc-{s}") for s in svcs]
        ep_args = [(r, pod_ip(s * PODS_PER_SERVICE + 3), t - 1.0, t)
                   for r, s, t in zip(refs, svcs, times, strict=True)]
        ep_rate = rate(index.is_endpoint, ep_args)
        stats = index.stats()
        assert stats["pods"] == pods and stats["ownerships"] == pods + pods // 10, stats
        print(f"| {pods:,} | {per_pod:,.0f} | {apply_rate:,.0f} | {owner_rate:,.0f} "
              f"| {svc_rate:,.0f} | {ep_rate:,.0f} |")
        del index


if __name__ == "__main__":
    main()
