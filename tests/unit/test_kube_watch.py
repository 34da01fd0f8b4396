"""The Kubernetes identity source's own logic, without a server: retry backoff, shaping what the
API sends into watch events, and the list/watch/relist loop driven by a scripted transport.

(tests/kernel/test_kube_identity.py runs the same source against a real kube-apiserver.)
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest

from cttrace.identity.index import IdentityIndex
from cttrace.identity.kube import (
    PODS,
    Expired,
    KubeConfigError,
    KubeIdentitySource,
    Resource,
    WatchSettings,
    WatchStreamError,
    backoff_delay,
    endpoint_slices,
    list_page_events,
    load_configuration,
    parse_watch_line,
    watch_error,
)

# -- backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_from_base_and_stops_at_cap() -> None:
    lowest = [backoff_delay(n, base=0.8, cap=30, rand=lambda: 0.0) for n in range(1, 9)]
    highest = [backoff_delay(n, base=0.8, cap=30, rand=lambda: 1.0) for n in range(1, 9)]
    assert highest == pytest.approx([0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30, 30])
    assert lowest == pytest.approx([h / 2 for h in highest])
    assert backoff_delay(0, base=0.8, cap=30) == 0.0
    assert backoff_delay(10_000, base=0.8, cap=30, rand=lambda: 1.0) == 30


def test_backoff_jitter_spreads_within_the_upper_half() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(4, base=1, cap=60, rand=rng.random) for _ in range(200)]
    assert all(4 <= d <= 8 for d in delays)
    assert len({round(d, 3) for d in delays}) > 100  # spread out, not synchronized


# -- shaping -------------------------------------------------------------------------------------


def test_list_items_become_added_events_with_kind_and_api_version() -> None:
    body = {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1beta1",
            "metadata": {"resourceVersion": "42", "continue": "tok"},
            "items": [{"metadata": {"name": "a"}}, {"kind": "EndpointSlice", "metadata": {}}]}
    page = list_page_events(body, endpoint_slices("v1beta1"))
    assert page.resource_version == "42" and page.next == "tok"
    assert [e["type"] for e in page.events] == ["ADDED", "ADDED"]
    assert page.events[0]["object"] == {"metadata": {"name": "a"}, "kind": "EndpointSlice",
                                        "apiVersion": "discovery.k8s.io/v1beta1"}


def test_last_list_page_has_no_continue_token() -> None:
    page = list_page_events({"metadata": {"resourceVersion": "9", "continue": ""}, "items": []},
                            PODS)
    assert page.next is None and page.events == []


@pytest.mark.parametrize("body", [
    {"items": []},
    {"metadata": {"resourceVersion": "1"}},
    {"metadata": {}, "items": []},
    {"metadata": {"resourceVersion": "1"}, "items": ["pod"]},
])
def test_malformed_list_response_is_a_stream_error(body: dict[str, Any]) -> None:
    with pytest.raises(WatchStreamError):
        list_page_events(body, PODS)


def test_watch_line_parses_to_the_event_dict() -> None:
    line = '{"type":"MODIFIED","object":{"kind":"Pod","metadata":{"resourceVersion":"7"}}}'
    assert parse_watch_line(line) == {
        "type": "MODIFIED", "object": {"kind": "Pod", "metadata": {"resourceVersion": "7"}}}


@pytest.mark.parametrize("line", ["not json", "[1]", '{"type":"ADDED"}', '{"object":{}}',
                                  '{"type":"ADDED","object":"x"}'])
def test_watch_line_that_is_not_an_event_is_a_stream_error(line: str) -> None:
    with pytest.raises(WatchStreamError):
        parse_watch_line(line)


def test_error_event_410_means_relist_and_others_mean_reconnect() -> None:
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version: 5 (90)"}}
    assert isinstance(watch_error(gone), Expired)
    other = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "Internal"}}
    assert isinstance(watch_error(other), WatchStreamError)


# -- configuration -----------------------------------------------------------------------------


def test_no_kubeconfig_anywhere_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="pass --kubeconfig"):
        load_configuration(None, environ={"KUBECONFIG": str(tmp_path / "none")})


def test_missing_kubeconfig_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(KubeConfigError, match="does not exist"):
        load_configuration(str(tmp_path / "kubeconfig"), environ={})


def test_unusable_kubeconfig_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    with pytest.raises(KubeConfigError, match="is not usable"):
        load_configuration(str(path), environ={})


def test_in_pod_without_service_account_is_a_user_error() -> None:
    # KUBERNETES_SERVICE_HOST set but no token mounted at the well-known path.
    with pytest.raises(KubeConfigError, match="service account"):
        load_configuration(None, environ={"KUBERNETES_SERVICE_HOST": "10.96.0.1",
                                          "KUBERNETES_SERVICE_PORT": "443"})


def test_kubeconfig_gives_server_and_token(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(orjson.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "k", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "sekrit"}}],
        "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
    }).decode())
    cfg = load_configuration(str(path), environ={})
    assert cfg.host == "https://127.0.0.1:6443"
    assert "Bearer sekrit" in cfg.api_key.values()


# -- the loop, against a scripted transport ------------------------------------------------------


def pod(name: str, ip: str, rv: str, uid: str | None = None) -> dict[str, Any]:
    # As a list item: no kind/apiVersion (the source fills them in).
    return {"metadata": {"uid": uid or f"uid-{name}", "namespace": "shop", "name": name,
                         "resourceVersion": rv},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip}}


def event(etype: str, obj: Mapping[str, Any], kind: str = "Pod") -> str:
    return orjson.dumps({"type": etype, "object": {"kind": kind, "apiVersion": "v1", **obj}}
                        ).decode()


def listing(rv: str, items: list[dict[str, Any]], cont: str | None = None) -> dict[str, Any]:
    return {"metadata": {"resourceVersion": rv, "continue": cont or ""}, "items": items}


class FakeStream:
    """Yields its lines, then raises ``then`` or (``then`` None) ends; a stream made when the
    script has run out blocks until aborted, like a quiet watch."""

    def __init__(self, lines: list[str], then: BaseException | None = None,
                 block: bool = False) -> None:
        self.lines = lines
        self.then = then
        self.block = block
        self.aborted = threading.Event()

    def __iter__(self) -> Iterator[str]:
        yield from self.lines
        if self.then is not None:
            raise self.then
        if self.block:
            self.aborted.wait()

    def abort(self) -> None:
        self.aborted.set()

    def close(self) -> None:
        pass


class Held:
    """A step that waits for ``gate`` (the test's go-ahead), then is ``then``."""

    def __init__(self, gate: threading.Event, then: BaseException) -> None:
        self.gate = gate
        self.then = then


Step = dict[str, Any] | list[dict[str, Any]] | FakeStream | BaseException | Held


class FakeTransport:
    """Answers each kind's lists and watches from a script, in order."""

    def __init__(self, versions: list[str] | None = None) -> None:
        self.versions = versions if versions is not None else ["v1"]
        self.lists: dict[str, list[Step]] = {}
        self.watches: dict[str, list[Step]] = {}
        self.list_calls: list[tuple[str, str | None]] = []  # (path, continue)
        self.watch_calls: list[tuple[str, str]] = []  # (path, resourceVersion)
        self.closed = False

    def served_versions(self, group: str) -> list[str] | None:
        return self.versions

    def list_page(self, resource: Resource, *, limit: int, cont: str | None) -> Mapping[str, Any]:
        self.list_calls.append((resource.path, cont))
        step = self._next(self.lists, resource.kind)
        if step is None:
            return listing("1", [])
        assert isinstance(step, dict)
        return step

    def watch(self, resource: Resource, *, resource_version: str, timeout_s: int) -> FakeStream:
        self.watch_calls.append((resource.path, resource_version))
        step = self._next(self.watches, resource.kind)
        if step is None:
            return FakeStream([], block=True)
        assert isinstance(step, FakeStream)
        return step

    def close(self) -> None:
        self.closed = True

    @staticmethod
    def _next(script: dict[str, list[Step]], kind: str) -> Step | None:
        steps = script.get(kind)
        if not steps:
            return None
        step = steps.pop(0)
        if isinstance(step, Held):
            assert step.gate.wait(10), "the test never released a held step"
            step = step.then
        if isinstance(step, BaseException):
            raise step
        return step


QUICK = WatchSettings(backoff_base_s=0.001, backoff_cap_s=0.01, page_size=2)


def start(transport: FakeTransport, notes: list[str] | None = None) -> KubeIdentitySource:
    source = KubeIdentitySource(IdentityIndex(), kubeconfig=None, settings=QUICK,
                                transport=transport,
                                on_log=notes.append if notes is not None else None)
    source.open()
    return source


def until(source: KubeIdentitySource, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while True:
        source.poll()
        if check():
            return
        assert time.monotonic() < deadline, f"condition not met; stats {source.stats()}"
        time.sleep(0.005)


def test_paged_list_then_watch_from_the_lists_resource_version() -> None:
    t = FakeTransport()
    t.lists["Pod"] = [listing("10", [pod("a", "10.0.0.1", "8")], cont="page2"),
                      listing("10", [pod("b", "10.0.0.2", "9")])]
    source = start(t)
    try:
        until(source, lambda: source.in_sync)
        assert source.index.in_sync
        now = time.time()
        assert source.index.owner_at("10.0.0.1", now) is not None
        assert source.index.owner_at("10.0.0.2", now) is not None
        assert ("/api/v1/pods", "page2") in t.list_calls
        until(source, lambda: ("/api/v1/pods", "10") in t.watch_calls)
    finally:
        source.close()


def test_410_relists_and_ends_what_vanished_meanwhile() -> None:
    t = FakeTransport()
    t.lists["Pod"] = [listing("10", [pod("a", "10.0.0.1", "8"), pod("b", "10.0.0.2", "9")]),
                      listing("30", [pod("a", "10.0.0.1", "8"), pod("c", "10.0.0.3", "25")])]
    gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "code": 410,
                                        "reason": "Expired", "message": "too old"}}
    t.watches["Pod"] = [FakeStream([orjson.dumps(gone).decode()])]
    source = start(t)
    try:
        until(source, lambda: source.index.owner_at("10.0.0.3", time.time()) is not None)
        (b,) = source.index.ownerships("10.0.0.2")
        assert b.until is not None  # b was deleted while the watch could not say so
        assert source.index.owner_at("10.0.0.1", time.time()) is not None
        stats = source.stats()
        assert stats["relists_expired"] == 1 and stats["errors"] == 0
        until(source, lambda: ("/api/v1/pods", "30") in t.watch_calls)
    finally:
        source.close()


def test_disconnect_resumes_the_watch_where_it_broke_without_relisting() -> None:
    t = FakeTransport()
    t.lists["Pod"] = [listing("10", [])]
    t.watches["Pod"] = [
        FakeStream([event("ADDED", pod("a", "10.0.0.1", "12"))], then=ConnectionResetError()),
        ConnectionRefusedError(),  # still down at the first retry
    ]
    notes: list[str] = []
    source = start(t, notes)
    try:
        until(source, lambda: t.watch_calls.count(("/api/v1/pods", "12")) == 2)
        until(source, lambda: any("reconnected" in n for n in notes))
        stats = source.stats()
        # Two failures (the broken stream, the refused retry), one watch reopened.
        assert stats["errors"] == 2 and stats["watch_restarts"] == 1
        assert stats["lists"] == 3  # one per kind: no relist
        assert source.index.owner_at("10.0.0.1", time.time()) is not None
        assert any("Pod watch failed" in n for n in notes)
    finally:
        source.close()


def test_bookmark_moves_the_resume_point_and_is_not_applied() -> None:
    t = FakeTransport()
    t.lists["Pod"] = [listing("10", [])]
    bookmark = event("BOOKMARK", {"metadata": {"resourceVersion": "77"}})
    t.watches["Pod"] = [FakeStream([bookmark])]  # then the server's timeout ends the watch
    source = start(t)
    try:
        until(source, lambda: ("/api/v1/pods", "77") in t.watch_calls)
        assert source.stats()["bookmarks"] == 1
        assert source.index.stats()["events"] == 0
    finally:
        source.close()


def test_in_sync_waits_for_every_kind() -> None:
    t = FakeTransport()
    gate = threading.Event()
    t.lists["Service"] = [ConnectionRefusedError(), Held(gate, ConnectionRefusedError())]
    source = start(t)
    try:
        # Pods and EndpointSlices are listed; Services are still failing.
        until(source, lambda: source.stats()["lists"] == 2)
        assert not source.in_sync and not source.index.in_sync
        gate.set()
        until(source, lambda: source.in_sync)
        assert source.stats()["errors"] == 2
    finally:
        source.close()


def test_v1beta1_endpoint_slices_when_v1_is_not_served() -> None:
    t = FakeTransport(versions=["v1beta1"])
    t.lists["EndpointSlice"] = [listing("5", [{
        "metadata": {"uid": "s1", "namespace": "shop", "name": "web-x",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": True},
                       "topology": {"kubernetes.io/hostname": "node-1"}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }])]
    source = start(t)
    try:
        until(source, lambda: source.in_sync)
        assert ("/apis/discovery.k8s.io/v1beta1/endpointslices", None) in t.list_calls
        stretches = source.index.endpoint_stretches(_svc("shop", "web"), "10.0.0.1")
        assert len(stretches) == 1 and stretches[0].ready
    finally:
        source.close()


def test_no_endpoint_slices_served_is_noted_and_still_in_sync() -> None:
    t = FakeTransport(versions=[])
    notes: list[str] = []
    source = start(t, notes)
    try:
        until(source, lambda: source.in_sync)
        assert any("serves no EndpointSlice" in n for n in notes)
    finally:
        source.close()


def test_objects_the_index_rejects_are_counted_and_skipped() -> None:
    t = FakeTransport()
    broken = pod("x", "10.0.0.9", "3")
    del broken["metadata"]["uid"]
    t.lists["Pod"] = [listing("10", [broken, pod("a", "10.0.0.1", "4")])]
    notes: list[str] = []
    source = start(t, notes)
    try:
        until(source, lambda: source.in_sync)
        assert source.stats()["bad_events"] == 1
        assert any("metadata.uid" in n for n in notes)
        assert source.index.owner_at("10.0.0.1", time.time()) is not None
    finally:
        source.close()


def test_notes_reach_on_log_on_the_polling_thread() -> None:
    t = FakeTransport()
    t.lists["Pod"] = [ConnectionRefusedError()]
    threads: list[threading.Thread] = []
    source = KubeIdentitySource(IdentityIndex(), kubeconfig=None, settings=QUICK, transport=t,
                                on_log=lambda _msg: threads.append(threading.current_thread()))
    source.open()
    try:
        until(source, lambda: bool(threads))
        assert threads == [threading.main_thread()] * len(threads)
    finally:
        source.close()


def test_close_stops_watchers_blocked_in_a_quiet_watch() -> None:
    t = FakeTransport()
    source = start(t)
    until(source, lambda: len(t.watch_calls) == 3)
    source.close()
    assert t.closed
    assert not any(w.thread.is_alive() for w in source._watchers)
    source.close()  # idempotent


def test_wake_fd_is_readable_while_changes_wait() -> None:
    import select

    t = FakeTransport()
    source = start(t)
    try:
        readable, _, _ = select.select([source.fileno()], [], [], 10)
        assert readable
        until(source, lambda: source.in_sync)
        until(source, lambda: len(t.watch_calls) == 3)
        source.poll()
        readable, _, _ = select.select([source.fileno()], [], [], 0)
        assert not readable
    finally:
        source.close()


def _svc(ns: str, name: str) -> Any:
    from cttrace.identity.model import ServiceRef

    return ServiceRef(ns, name)
