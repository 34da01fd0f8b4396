"""Scenario 1 end to end with a real Kubernetes API: the lab's kernel, a real kube-apiserver,
and ``cttrace watch --kubeconfig`` as a separate process, exactly as a user runs it.

The lab runs ``recycled-ip`` in its namespaces; :class:`cttrace.lab.api_mirror.KubeMirror`
makes every Pod, Service and EndpointSlice change the lab makes true in the API
as it happens (create, status, delete), and cttrace learns who is who only by
list+watch of that API. What a user relies on: the ``wrong-pod`` finding names
the client pod, the Service, the pod that held the IP when the SYN was sent and
the pod that answered, with the uids the API gave them; and ``cttrace explain``
retells that finding as a timeline. Run against EndpointSlices served as
``discovery.k8s.io/v1`` and as ``v1beta1``.

Order matters and is enforced, never slept on: the scenario creates its pods and
Services, then holds (its ``wait_ready`` gate) until the mirror has applied them,
cttrace is attached and its identity is in sync (its ready file); only then does
it kill the pod and send traffic.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from cttrace.identity.model import PodRef, ServiceRef
from cttrace.lab.api_mirror import KubeMirror
from cttrace.lab.background import BackgroundScenario
from cttrace.lab.results import ScenarioResult
from tests.fixtures.kube import KubeCluster, Variant
from tests.watch_process import Line, WatchProcess

pytestmark = pytest.mark.kernel

#: The lab's Service VIPs are 10.100.x.y (cttrace.lab.scenarios): the API must accept them
#: as ClusterIPs. kube-apiserver takes the last --service-cluster-ip-range given.
LAB_SERVICE_CIDR = "10.100.0.0/16"
DEADLINE_S = 60.0


@dataclass
class Run:
    """One traced run of recycled-ip against the API, shared by this module's tests."""

    variant: Variant
    result: ScenarioResult
    lines: list[Line]
    stderr: str
    uids: dict[str, str]  # lab uid -> the uid the API gave the object
    timings: dict[str, float] = field(default_factory=dict)

    def findings(self, rule: str) -> list[Line]:
        return [x for x in self.lines if x.get("kind") == "finding" and x.get("rule") == rule]

    def pod(self, pod: PodRef | None) -> dict[str, Any]:
        """What the finding must say of a lab pod, as the API knows it."""
        assert pod is not None
        return {"uid": self.uids[pod.uid], "namespace": pod.namespace, "name": pod.name,
                "workload": pod.workload, "node": pod.node}

    def service(self, svc: ServiceRef | None) -> dict[str, Any]:
        """A finding names a Service by namespace/name (ServiceRef.to_json)."""
        assert svc is not None
        return {"namespace": svc.namespace, "name": svc.name}


def _wait(what: str, check: Any, bg: BackgroundScenario) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if bg.done():
            bg.result(0)  # raises the scenario's error
            pytest.fail(f"the scenario ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE_S:.0f} s")
        time.sleep(0.05)


def _trace(cluster: KubeCluster, workdir: Path) -> Run:
    gate = threading.Event()  # the scenario's traffic waits on it
    set_up = threading.Event()  # the scenario's first step ("ready"): objects all published
    ready = workdir / "ready"
    slice_version = "v1" if cluster.variant == "v1" else "v1beta1"
    timings: dict[str, float] = {}
    api = cluster.api_client()
    try:
        with BackgroundScenario("recycled-ip", identity_path=workdir / "identity.jsonl",
                                wait_ready=gate.is_set,
                                on_step=lambda _note: set_up.set()) as bg, \
                KubeMirror(bg.identity_path, api, slice_version=slice_version) as mirror:
            _wait("the scenario set up its pods and Services", set_up.is_set, bg)
            mirror.wait_caught_up()
            began = time.monotonic()
            watch = WatchProcess(["--source", "netlink", "--netns", bg.node_netns,
                                  "--kubeconfig", cluster.kubeconfig, "--output", "json"], ready)
            try:
                # The ready file says the source is attached and the API's Pods,
                # Services and EndpointSlices are listed (identity in sync).
                watch.wait_ready(timeout=DEADLINE_S)
                timings["attach_and_sync_s"] = time.monotonic() - began
                gate.set()
                watch.wait_for(lambda x: x.get("rule") == "wrong-pod", timeout=DEADLINE_S)
                result = bg.result(timeout=DEADLINE_S)
                mirror.wait_caught_up()
                assert watch.stop() == 0, watch.stderr.decode()
            finally:
                watch.kill()
            lab_uids = [p.uid for p in (result.client, result.old_pod, result.new_pod) if p]
            assert result.service is not None
            uids = {uid: mirror.api_uid(uid) for uid in (*lab_uids, result.service.uid)}
            timings["mirror_max_apply_s"] = max(mirror.latencies)
    finally:
        api.close()
    return Run(cluster.variant, result, watch.lines, watch.stderr.decode(), uids, timings)


@pytest.fixture(scope="module", params=["v1", "v1beta1"])
def run(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    variant: Variant = request.param
    workdir = tmp_path_factory.mktemp(f"kube-e2e-{variant}")
    cluster = KubeCluster(workdir / "kube", variant,
                          apiserver_args=(f"--service-cluster-ip-range={LAB_SERVICE_CIDR}",))
    try:
        cluster.start()
        yield _trace(cluster, workdir)
    finally:
        cluster.stop()


def test_wrong_pod_names_client_service_old_and_new_pod_from_the_api(run: Run) -> None:
    result = run.result
    (wp,) = run.findings("wrong-pod")
    new = result.new_pod
    assert new is not None
    assert result.attempts[-1].answered_by == f"{new.namespace}/{new.name}"
    assert wp["severity"] == "critical"
    assert wp["orig"] == result.flow.to_json()
    assert wp["target"] == {"ip": result.target[0], "port": result.target[1]}
    for key, pod in (("client", result.client), ("old_owner", result.old_pod),
                     ("new_owner", result.new_pod)):
        assert {k: wp[key][k] for k in run.pod(pod)} == run.pod(pod), key
    assert wp["service"] == run.service(result.service)
    # The names came from the API, not from the lab: the API's uids are its own.
    assert wp["new_owner"]["uid"] != new.uid
    assert wp["new_owner_is_endpoint"] is False
    first, retry = result.attempts
    assert wp["unreplied_s"] == pytest.approx(retry.started - first.started, abs=0.5)
    assert run.lines[-1]["kind"] == "summary"
    assert "Traceback" not in run.stderr


def test_explain_retells_the_api_named_finding(run: Run, tmp_path: Path) -> None:
    findings = tmp_path / "findings.jsonl"
    findings.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in run.lines))
    res = subprocess.run([sys.executable, "-m", "cttrace", "explain", str(findings),
                          "--rule", "wrong-pod", "-o", "json"], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    story = orjson.loads(res.stdout)
    steps = story["steps"]
    what = [s["what"] for s in steps]
    assert what.index("created") < what.index("gone") < what.index("reply") < what.index("finding")
    old, new = run.result.old_pod, run.result.new_pod
    assert old is not None and new is not None
    assert f"{old.namespace}/{old.name}" in steps[what.index("gone")]["text"]
    owners = [s["text"] for s in steps if s["what"] == "owner"]
    assert any(f"{new.namespace}/{new.name}" in t for t in owners)
    assert story["entry_id"] == run.findings("wrong-pod")[0]["entry_id"]
