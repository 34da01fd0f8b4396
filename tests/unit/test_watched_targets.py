"""The identity index's IP changes become the bpf source's watched DNAT targets, for the
window in which an entry created before the change can still be answered."""

from __future__ import annotations

from pathlib import Path

from cttrace.identity.index import IdentityIndex
from cttrace.sources.watched import (
    DEFAULT_SYN_SENT_TIMEOUT_S,
    WatchedTargets,
    follow_targets,
    syn_sent_timeout,
)


class FakeSource:
    def __init__(self) -> None:
        self.watched: set[str] = set()

    def watch_target(self, ip: str) -> None:
        self.watched.add(ip)

    def unwatch_target(self, ip: str) -> None:
        self.watched.discard(ip)


def pod(uid: str, ip: str, *, deleted: bool = False) -> dict[str, object]:
    return {
        "type": "DELETED" if deleted else "ADDED",
        "object": {"kind": "Pod", "metadata": {"uid": uid, "namespace": "default", "name": uid},
                   "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
    }


def test_a_dead_pods_ip_is_watched_for_the_window_then_dropped() -> None:
    index, source = IdentityIndex(), FakeSource()
    feed = follow_targets(index, source, None)
    assert feed is not None
    feed.window = 120.0
    index.apply(pod("a", "10.244.0.7"), 100.0)
    assert source.watched == set()  # a pod coming up changes nothing
    index.apply(pod("a", "10.244.0.7", deleted=True), 200.0)
    assert source.watched == {"10.244.0.7"}
    feed.expire(319.0)
    assert source.watched == {"10.244.0.7"}
    feed.expire(320.0)
    assert source.watched == set() and len(feed) == 0


def test_an_ip_taken_over_by_another_pod_is_watched() -> None:
    index, source = IdentityIndex(), FakeSource()
    follow_targets(index, source, None)
    index.apply(pod("a", "10.244.0.7"), 100.0)
    index.apply(pod("b", "10.244.0.7"), 150.0)  # recycled before a's delete arrived
    assert source.watched == {"10.244.0.7"}


def test_a_later_change_extends_the_window() -> None:
    source = FakeSource()
    feed = WatchedTargets(source, 10.0)
    feed.ip_changed("10.244.0.7", 100.0)
    feed.ip_changed("10.244.0.7", 105.0)
    feed.expire(111.0)
    assert source.watched == {"10.244.0.7"}
    feed.expire(115.0)
    assert source.watched == set()


def test_nothing_to_feed_without_identity_or_a_watching_source() -> None:
    assert follow_targets(None, FakeSource(), None) is None
    assert follow_targets(IdentityIndex(), object(), None) is None


def test_the_window_is_the_nodes_syn_sent_timeout(tmp_path: Path) -> None:
    # Read from /proc in the traced namespace; the kernel default when unreadable.
    assert syn_sent_timeout("ctl-no-such-namespace") == DEFAULT_SYN_SENT_TIMEOUT_S
    assert syn_sent_timeout(None) > 0
