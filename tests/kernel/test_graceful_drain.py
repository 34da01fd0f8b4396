"""``--remediate`` never breaks a graceful drain.

The ``graceful-drain`` lab scenario on this kernel: an ESTABLISHED connection
through a Service to a pod that starts terminating (Pod deletionTimestamp,
EndpointSlice endpoint ready=false/serving=true/terminating=true, the endpoint
gone from kube-proxy's chains) keeps exchanging lines and then closes with
FINs, while ``cttrace watch --remediate`` runs as a separate process on the
lab's node. What a user relies on: every line comes back, nobody resets, the
entry ends in TIME_WAIT under the same conntrack id, and no deletion is
logged. The control shows the test would notice: deleting that very entry
mid-drain (what a naive "flush entries of removed endpoints" does) breaks it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cttrace.lab.background import BackgroundScenario
from cttrace.lab.results import ScenarioResult
from tests.watch_process import Line, WatchProcess

pytestmark = pytest.mark.kernel

SPORT = 40226  # the control's client port


@contextmanager
def remediating(tmp_path: Path, **options: Any) -> Iterator[tuple[BackgroundScenario,
                                                                  WatchProcess]]:
    """graceful-drain in a thread; ``cttrace watch --remediate`` in its own process, attached
    before the scenario's first packet."""
    ready = tmp_path / "ready"
    with BackgroundScenario("graceful-drain", identity_path=tmp_path / "identity.jsonl",
                            wait_ready=ready.exists, **options) as bg:
        watch = WatchProcess(["--source", "netlink", "--netns", bg.node_netns, "--output", "json",
                              "--identity-file", str(bg.identity_path), "--remediate", "--flows"],
                             ready)
        try:
            watch.wait_ready()
            yield bg, watch
        finally:
            watch.kill()


def entry_id(line: str) -> str:
    return next(f for f in line.split() if f.startswith("id="))


def pod_name(result: ScenarioResult, which: str) -> str:
    pod = result.old_pod if which == "old" else result.new_pod
    assert pod is not None
    return f"{pod.namespace}/{pod.name}"


def is_flow(line: Line, result: ScenarioResult, state: str) -> bool:
    return (line.get("kind") == "flow" and line["orig"] == result.flow.to_json()
            and line["state"] == state)


@pytest.mark.parametrize("proxy", ["iptables", "nftables", "kube-proxy"])
def test_graceful_drain_completes_while_remediate_runs(tmp_path: Path, proxy: str) -> None:
    with remediating(tmp_path, proxy=proxy) as (bg, watch):
        result = bg.result(timeout=120)
        # The tracer saw the drained entry reach TIME_WAIT: it followed it to the end.
        closed = watch.wait_for(lambda x: is_flow(x, result, "TIME_WAIT"), timeout=60)
        assert watch.stop() == 0, watch.stderr.decode()
    assert b"Traceback" not in watch.stderr
    assert watch.lines[-1]["kind"] == "summary"

    connected, fresh = result.attempts
    assert connected.answered_by == pod_name(result, "old")
    # The terminating pod really was out of the Service's rules: a new connection went elsewhere.
    assert fresh.answered_by == pod_name(result, "new")

    drained = [e for e in result.exchanges if e.sent_at > result.step("terminating").ts]
    assert len(drained) >= 10
    assert all(e.outcome == "echoed" and e.echo == e.text for e in result.exchanges), \
        result.exchanges
    assert result.counters == {"client_out_rsts": 0, "pod_out_rsts": 0, "closed": 1}

    # One entry from the first SYN to the close: never deleted and re-created.
    ids = {entry_id(result.conntrack[k][0]) for k in ("established", "draining", "closed")}
    assert len(ids) == 1, result.conntrack
    assert result.conntrack["closed"][0].split()[3] == "TIME_WAIT"
    assert closed["entry_id"] == int(ids.pop().removeprefix("id="))

    # --remediate was on and deleted nothing: not this entry, not any other.
    assert [x for x in watch.lines if x.get("kind") == "remediation"] == []
    assert not any(x.get("kind") == "flow" and x["orig"] == result.flow.to_json()
                   and x["event"] == "destroy" for x in watch.lines)


def test_control_deleting_the_drained_entry_breaks_the_drain(tmp_path: Path) -> None:
    """What --remediate must not do, done by hand: the drain breaks, so the test above can tell."""
    deleted: list[str] = []
    holder: dict[str, BackgroundScenario] = {}

    def on_step(note: str) -> None:
        if note.startswith("rolling update"):
            bg = holder["bg"]
            proc = subprocess.run(
                ["ip", "netns", "exec", bg.node_netns, "conntrack", "-D", "-p", "tcp",
                 "--orig-port-src", str(SPORT), "--state", "ESTABLISHED"],
                capture_output=True, text=True, check=False,
            )
            deleted.append(proc.stdout + proc.stderr)

    bg = BackgroundScenario("graceful-drain", on_step=on_step, drain_s=2.0, sport=SPORT)
    holder["bg"] = bg
    with bg:
        result = bg.result(timeout=120)
    assert deleted and "1 flow entries have been deleted" in deleted[0], deleted
    drained = [e for e in result.exchanges if e.sent_at > result.step("terminating").ts]
    assert drained and drained[0].outcome == "reset", drained
    assert not any(e.outcome == "echoed" for e in drained)
