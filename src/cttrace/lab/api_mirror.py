"""Replay the lab's identity file into a real Kubernetes API server, as the cluster would live.

The lab writes, the moment it changes something, the watch event an API server
would send (:mod:`cttrace.lab.identity_log`). :class:`KubeMirror` follows that
file as it grows and makes each event true in a real kube-apiserver (the lab's
own control plane for ``--proxy kube-proxy``, or a test's), doing what the
controllers and the kubelet would have done:

* Pod ADDED: create the Pod (a real API takes no status on create), then report
  its status (phase, hostIP, podIP) through the status subresource, as the
  kubelet does once the sandbox has an IP. MODIFIED: labels and status again.
  DELETED: delete with grace period 0 (there is no kubelet to confirm a graceful
  delete).
* Service ADDED: create it with the lab's ClusterIP (the cluster's service CIDR
  must hold the lab's VIPs). MODIFIED: merge-patch labels and spec. DELETED: delete.
* EndpointSlice (``discovery.k8s.io/v1``, or ``v1beta1`` on a cluster that serves only
  that): create / merge-patch labels, endpoints and ports / delete, as the
  EndpointSlice controller does.
* Namespaces are created the first time an object needs one.

The API assigns its own uids, so the mirror keeps the lab uid -> API uid map
(:meth:`KubeMirror.api_uid`), rewrites references (EndpointSlice ``targetRef``,
``ownerReferences`` to objects it created) with it, and a test compares a
finding's uids with the API's. What the API fills in itself (``uid``,
``resourceVersion``, ``creationTimestamp``, ``generation``, ``deletionTimestamp``) is
dropped from the lab's objects before they are sent.

Events are applied in file order by one thread; the first failure stops the
mirror and is raised by :meth:`wait_caught_up` and :meth:`close`.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cttrace.netns import entered_netns

#: Metadata the API server sets itself; the lab's values for them cannot be sent.
SERVER_SET_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation",
                       "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields",
                       "selfLink")

Obj = dict[str, Any]


class MirrorError(Exception):
    """The API refused an event of the lab's identity file."""


class KubeMirror:
    """Follows ``identity_path`` and applies each event through ``api`` (a
    ``kubernetes.client.ApiClient``) in a thread of its own; use as a context manager.

    ``netns``: the thread runs inside this network namespace, so the API's
    connections are opened there (an API server that only listens inside the lab).
    """

    def __init__(self, identity_path: Path, api: Any, *, slice_version: str = "v1",
                 poll_s: float = 0.02, netns: str | None = None) -> None:
        self.identity_path = identity_path
        self.slice_version = slice_version
        self.poll_s = poll_s
        self.netns = netns
        # Any: the client's models are typed; dict bodies are what the API itself takes.
        self._api: Any = api
        self._core: Any = client.CoreV1Api(api)
        self._groups: Any = client.CustomObjectsApi(api)
        self._uids: dict[str, str] = {}
        self._namespaces: set[str] = set()
        self._applied = 0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self.latencies: list[float] = []  # seconds from reading a line to the API having it
        self._thread = threading.Thread(target=self._run, name="cttrace-kube-mirror",
                                        daemon=True)

    # -- the caller's side ------------------------------------------------------------------------

    def start(self) -> KubeMirror:
        self._thread.start()
        return self

    def __enter__(self) -> KubeMirror:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(raise_error=exc is None)

    @property
    def applied(self) -> int:
        """Events applied so far."""
        with self._cond:
            return self._applied

    def api_uid(self, lab_uid: str) -> str:
        """The uid the API gave the object the lab calls ``lab_uid``."""
        with self._cond:
            return self._uids[lab_uid]

    def wait_caught_up(self, timeout: float = 60.0) -> int:
        """Wait until every event written to the file so far is applied; returns their count."""
        written = self.identity_path.read_bytes().count(b"\n")
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._applied < written and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise MirrorError(f"applied {self._applied} of {written} identity events "
                                      f"within {timeout:.0f} s")
                self._cond.wait(min(left, 0.5))
            if self._error is not None:
                raise MirrorError(f"mirroring {self.identity_path} failed: "
                                  f"{self._error}") from self._error
        return written

    def close(self, *, raise_error: bool = True) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(30)
        if raise_error and self._error is not None:
            raise MirrorError(f"mirroring {self.identity_path} failed: "
                              f"{self._error}") from self._error

    # -- the mirror's thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with entered_netns(self.netns):
                self._follow()
        except BaseException as err:  # handed to the caller by wait_caught_up() / close()
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def _follow(self) -> None:
        offset = 0
        partial = b""
        while not self._stop.is_set():
            with self.identity_path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *lines, partial = (partial + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    read_at = time.monotonic()
                    self._apply(orjson.loads(line))
                    self.latencies.append(time.monotonic() - read_at)
                with self._cond:
                    self._applied += 1
                    self._cond.notify_all()
            if not lines:
                self._stop.wait(self.poll_s)

    def _apply(self, event: Obj) -> None:
        etype, obj = event["type"], event["object"]
        kind = obj["kind"]
        handler = {"Pod": self._pod, "Service": self._service,
                   "EndpointSlice": self._endpoint_slice}.get(kind)
        if handler is None:
            raise MirrorError(f"the lab wrote a {kind}, which the mirror does not know")
        try:
            handler(etype, obj)
        except ApiException as err:
            meta = obj["metadata"]
            raise MirrorError(f"{etype} {kind} {meta.get('namespace')}/{meta.get('name')}: "
                              f"HTTP {err.status} {err.reason}: {err.body}") from None

    def _ensure_namespace(self, name: str) -> None:
        if name in self._namespaces:
            return
        try:
            self._core.create_namespace({"metadata": {"name": name}})
        except ApiException as err:
            if err.status != 409:  # it exists already: fine
                raise
        self._namespaces.add(name)

    def _for_create(self, obj: Obj) -> Obj:
        """A copy the API accepts on create: server-set metadata dropped, references mapped."""
        body = copy.deepcopy(obj)
        meta = body["metadata"]
        for key in SERVER_SET_METADATA:
            meta.pop(key, None)
        for owner in meta.get("ownerReferences", ()):
            # Objects the mirror created have API uids; others (the lab's ReplicaSets) do
            # not exist in this cluster and keep the lab's uid.
            owner["uid"] = self._uids.get(owner["uid"], owner["uid"])
        return body

    def _remember(self, lab_uid: str, created: Any) -> None:
        with self._cond:
            self._uids[lab_uid] = created.metadata.uid

    # Pods: as the scheduler bound them (spec.nodeName) and the kubelet reported them.

    def _pod(self, etype: str, obj: Obj) -> None:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if etype == "ADDED":
            self._ensure_namespace(ns)
            body = self._for_create(obj)
            status = body.pop("status", None)
            self._remember(meta["uid"], self._core.create_namespaced_pod(ns, body))
            if status:
                self._core.patch_namespaced_pod_status(name, ns, {"status": status})
        elif etype == "MODIFIED":
            self._core.patch_namespaced_pod(name, ns, {"metadata": {
                "labels": meta.get("labels") or {}}})
            if obj.get("status"):
                self._core.patch_namespaced_pod_status(name, ns, {"status": obj["status"]})
        elif etype == "DELETED":
            # Grace period 0: with no kubelet, a graceful delete would wait forever.
            self._core.delete_namespaced_pod(name, ns, grace_period_seconds=0)
        else:
            raise MirrorError(f"unknown event type {etype!r}")

    def _service(self, etype: str, obj: Obj) -> None:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        if etype == "ADDED":
            self._ensure_namespace(ns)
            body = self._for_create(obj)
            body.pop("status", None)
            self._remember(meta["uid"], self._core.create_namespaced_service(ns, body))
        elif etype == "MODIFIED":
            spec = {k: v for k, v in obj["spec"].items() if k in ("ports", "selector", "type")}
            self._core.patch_namespaced_service(name, ns, {
                "metadata": {"labels": meta.get("labels") or {}}, "spec": spec})
        elif etype == "DELETED":
            # 1.20 answers a Service DELETE with a Status the client cannot read as a Service.
            self._core.delete_namespaced_service(name, ns, _preload_content=False)
        else:
            raise MirrorError(f"unknown event type {etype!r}")

    def _endpoint_slice(self, etype: str, obj: Obj) -> None:
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        where = ("discovery.k8s.io", self.slice_version, ns, "endpointslices")
        if etype == "ADDED":
            self._ensure_namespace(ns)
            body = self._for_create(obj)
            body["apiVersion"] = f"discovery.k8s.io/{self.slice_version}"
            body["endpoints"] = self._endpoints(obj)
            created = self._groups.create_namespaced_custom_object(*where, body)
            with self._cond:
                self._uids[meta["uid"]] = created["metadata"]["uid"]
        elif etype == "MODIFIED":
            self._groups.patch_namespaced_custom_object(
                *where, name,
                {"metadata": {"labels": meta.get("labels") or {}},
                 "endpoints": self._endpoints(obj), "ports": obj.get("ports") or []},
                _content_type="application/merge-patch+json")
        elif etype == "DELETED":
            self._groups.delete_namespaced_custom_object(*where, name)
        else:
            raise MirrorError(f"unknown event type {etype!r}")

    def _endpoints(self, obj: Obj) -> list[Obj]:
        """The slice's endpoints with each ``targetRef`` naming the API's pod uid."""
        endpoints: list[Obj] = copy.deepcopy(obj.get("endpoints") or [])
        for endpoint in endpoints:
            ref = endpoint.get("targetRef")
            if ref and ref.get("uid"):
                uid = self._uids.get(ref["uid"])
                if uid is None:
                    raise MirrorError(f"EndpointSlice {obj['metadata']['name']} names pod "
                                      f"{ref.get('name')} (uid {ref['uid']}) that the lab "
                                      "never added")
                ref["uid"] = uid
        return endpoints
