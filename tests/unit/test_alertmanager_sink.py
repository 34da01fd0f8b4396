"""The sink's delivery threads against a recording HTTP server on loopback.

The recorder stands in for Alertmanager's HTTP surface (status codes, headers,
bodies); Alertmanager's own behaviour is tested in tests/kernel/test_alertmanager_real.py.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cttrace.events import Flow
from cttrace.findings import Finding, Severity
from cttrace.json_log import logging_to
from cttrace.sinks.alertmanager import AlertmanagerConfigError, AlertmanagerSink

Post = tuple[dict[str, str], list[dict[str, object]]]


class Recorder:
    """Records every POST; answers ``status`` (settable while running)."""

    def __init__(self, port: int = 0) -> None:
        self.posts: list[Post] = []
        self.status = 200
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with recorder._lock:
                    status = recorder.status
                    if status == 200:
                        recorder.posts.append((dict(self.headers), json.loads(body)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def alerts(self) -> list[dict[str, object]]:
        with self._lock:
            return [alert for _, batch in self.posts for alert in batch]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    yield rec
    rec.close()


def wait_until(condition: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def finding(sport: int = 40000) -> Finding:
    return Finding(rule="wrong-pod", severity=Severity.CRITICAL, ts=time.time(),
                   orig=Flow("10.0.1.5", sport, "10.96.0.10", 80), target=("10.0.2.7", 80),
                   summary="wrong pod")


def sink(urls: list[str], **kwargs: object) -> AlertmanagerSink:
    options: dict[str, object] = {"node": "node-a", "generator_url": "http://node-a:19808/",
                                  "backoff_initial": 0.01, "backoff_max": 0.05}
    options.update(kwargs)
    return AlertmanagerSink(urls, **options)  # type: ignore[arg-type]


def test_every_alertmanager_of_a_cluster_gets_the_alert(recorder: Recorder) -> None:
    other = Recorder()
    try:
        s = sink([recorder.url, other.url])
        s.start()
        s.submit(finding())
        wait_until(lambda: bool(recorder.alerts() and other.alerts()), "both Alertmanagers")
        s.close(5)
        for rec in (recorder, other):
            (alert,) = rec.alerts()
            assert alert["labels"]["alertname"] == "CttraceWrongPod"  # type: ignore[index]
            assert "endsAt" not in alert
        headers = recorder.posts[0][0]
        assert headers["Content-Type"] == "application/json"
        assert s.stats()["sent"] == 2
    finally:
        other.close()


@pytest.mark.parametrize(("auth", "header"), [
    ({"basic_auth": ("cttrace", "s3cret")}, "Basic Y3R0cmFjZTpzM2NyZXQ="),
    ({"bearer_token": "tok"}, "Bearer tok"),
])
def test_credentials_are_sent(recorder: Recorder, auth: dict[str, object], header: str) -> None:
    s = sink([recorder.url], **auth)
    s.start()
    s.submit(finding())
    wait_until(lambda: bool(recorder.posts), "a POST")
    s.close(5)
    assert recorder.posts[0][0]["Authorization"] == header


def test_both_basic_auth_and_token_is_a_user_error() -> None:
    with pytest.raises(AlertmanagerConfigError, match="not both"):
        sink(["http://am:9093"], basic_auth=("a", "b"), bearer_token="t")


def test_unreadable_ca_file_is_a_user_error(tmp_path: object) -> None:
    with pytest.raises(AlertmanagerConfigError, match="CA file"):
        sink(["https://am:9093"], ca_file="/nonexistent/ca.pem")


def test_failing_alertmanager_is_retried_until_it_accepts(recorder: Recorder) -> None:
    recorder.status = 503
    s = sink([recorder.url])
    s.start()
    s.submit(finding())
    wait_until(lambda: s.stats()["retries"] >= 2, "retries")
    recorder.status = 200
    wait_until(lambda: bool(recorder.alerts()), "delivery after recovery")
    s.close(5)
    stats = s.stats()
    assert stats["failed"] >= 2 and stats["sent"] == 1 and stats["dropped"] == 0


def test_alertmanager_that_is_not_listening_yet_gets_the_alert_when_it_starts() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    s = sink([f"http://127.0.0.1:{port}"])
    s.start()
    s.submit(finding())
    wait_until(lambda: s.stats()["failed"] >= 1, "a refused connection")
    late = Recorder(port)
    try:
        wait_until(lambda: bool(late.alerts()), "delivery once it listens")
    finally:
        s.close(5)
        late.close()
    assert s.stats()["dropped"] == 0


def test_queue_bound_drops_only_what_exceeds_it(recorder: Recorder) -> None:
    recorder.status = 503
    s = sink([recorder.url], queue_max=3)
    s.start()
    for sport in range(5):
        s.submit(finding(sport))
    stats = s.stats()
    assert stats["dropped"] == 2 and stats["queue_depth"] == 3
    recorder.status = 200
    wait_until(lambda: len(recorder.alerts()) == 3, "the three queued alerts")
    s.close(5)
    ports = sorted(a["labels"]["tuple"] for a in recorder.alerts())  # type: ignore[index]
    assert ports == [f"10.0.1.5:{p}->10.96.0.10:80" for p in range(3)]


def test_a_full_queue_of_undelivered_alerts_drops_a_warning_for_a_critical_and_logs_it(
        recorder: Recorder) -> None:
    recorder.status = 503  # nothing is delivered: every held alert is undelivered
    s = sink([recorder.url], queue_max=1)
    lines: list[dict[str, object]] = []
    s.start()
    with logging_to(lines.append):
        s.submit(dataclasses.replace(finding(1), rule="late-establish",
                                     severity=Severity.WARNING))
        s.submit(finding(2))  # critical
    assert s.stats()["dropped"] == 1 and s.stats()["queue_depth"] == 1
    drops = [x for x in lines if str(x["msg"]).startswith("alert queue full")]
    assert len(drops) == 1
    dropped = drops[0]["dropped"]
    assert isinstance(dropped, dict) and dropped["alertname"] == "CttraceLateEstablish"
    recorder.status = 200
    wait_until(lambda: len(recorder.alerts()) >= 1, "the critical alert")
    s.close(5)
    assert {a["labels"]["alertname"] for a in recorder.alerts()} == {  # type: ignore[index]
        "CttraceWrongPod"}


def test_one_shot_alert_is_resolved_after_hold(recorder: Recorder) -> None:
    s = sink([recorder.url], hold=0.2)
    s.start()
    s.submit(finding())
    wait_until(lambda: any("endsAt" in a for a in recorder.alerts()), "the resolution")
    wait_until(lambda: s.stats()["queue_depth"] == 0, "the book to forget it")
    s.close(5)
    firing, resolved = recorder.alerts()[0], recorder.alerts()[-1]
    assert "endsAt" not in firing
    assert resolved["labels"] == firing["labels"]


def test_active_alert_is_resent_on_the_interval(recorder: Recorder) -> None:
    s = sink([recorder.url], resend_interval=0.05)
    s.start()
    s.submit(finding())
    wait_until(lambda: len(recorder.alerts()) >= 3, "re-sends")
    s.close(5)
    assert all("endsAt" not in a for a in recorder.alerts())


def test_invalid_alerts_are_not_retried_forever(recorder: Recorder) -> None:
    recorder.status = 400
    s = sink([recorder.url])
    s.start()
    s.submit(finding())
    wait_until(lambda: s.stats()["rejected"] == 1, "the rejection")
    s.close(5)
    assert s.stats()["retries"] == 0


def test_close_flushes_what_was_submitted(recorder: Recorder) -> None:
    s = sink([recorder.url])
    s.start()
    for sport in range(100):
        s.submit(finding(sport))
    s.close(10)
    assert len(recorder.alerts()) == 100
    s.submit(finding(999))  # after close: counted, never delivered
    assert s.stats()["dropped"] == 1


def test_close_gives_up_at_its_deadline_when_alertmanager_is_down(recorder: Recorder) -> None:
    recorder.status = 503
    s = sink([recorder.url])
    s.start()
    s.submit(finding())
    s.close(0.3)
    assert s.stats()["sent"] == 0 and s.stats()["queue_depth"] == 1
    s.close(0.3)  # idempotent
