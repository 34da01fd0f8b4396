"""Every lab scenario on this kernel, caught by ``cttrace watch --source netlink`` running as a
separate process, exactly as a user runs it; findings checked against what the lab did.

The failures run with every proxy the lab has on this kernel: its own iptables and
nftables imitations of kube-proxy on IPv4 and IPv6 nodes, and the real kube-proxy
(iptables mode; IPv4 nodes only). Whoever wrote the rules, the findings must name the
same pods and Service.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cttrace.lab.background import BackgroundScenario
from cttrace.lab.results import ScenarioResult
from tests.lab_checks import (
    assert_dead_endpoint_names_the_pod,
    assert_wrong_pod_names_everyone,
    by_family,
)
from tests.watch_process import WatchProcess, owner, ref

pytestmark = pytest.mark.kernel

#: (family, proxy): the lab's own modes on IPv4 and IPv6 nodes, and the real kube-proxy,
#: which runs on IPv4 nodes only (IPVS runs in the VM tier).
LAB_SETUPS = [("4", "iptables"), ("6", "iptables"), ("4", "nftables"), ("6", "nftables")]
SETUPS = [*LAB_SETUPS, ("dual", "iptables"), ("4", "kube-proxy")]
_FAMILY_IDS = {"4": "ipv4", "6": "ipv6", "dual": "dual-stack"}


def _setups(setups: list[tuple[str, str]]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(("family", "proxy"), setups,
                                   ids=[f"{_FAMILY_IDS[f]}-{p}" for f, p in setups])


by_lab_setup, by_setup = _setups(LAB_SETUPS), _setups(SETUPS)


@contextmanager
def traced(tmp_path: Path, scenario: str, *extra: str, identity: bool = True,
           **options: Any) -> Iterator[tuple[BackgroundScenario, WatchProcess]]:
    """The lab scenario in a thread, ``cttrace watch`` in its own process; the scenario sends
    its first packet only once the tracer wrote its ready file."""
    ready = tmp_path / "ready"
    with BackgroundScenario(scenario, identity_path=tmp_path / "identity.jsonl",
                            wait_ready=ready.exists, **options) as bg:
        args = ["--source", "netlink", "--netns", bg.node_netns, "--output", "json", *extra]
        if identity:
            args += ["--identity-file", str(bg.identity_path)]
        watch = WatchProcess(args, ready)
        try:
            watch.wait_ready()
            yield bg, watch
        finally:
            watch.kill()


def finish(watch: WatchProcess) -> None:
    """SIGINT: a clean exit with a summary line."""
    assert watch.stop() == 0, watch.stderr.decode()
    assert watch.lines[-1]["kind"] == "summary"
    assert b"Traceback" not in watch.stderr


def flow_of(result: ScenarioResult) -> dict[str, object]:
    return result.flow.to_json()


def ts(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339).timestamp()


@by_setup
def test_recycled_ip_is_a_critical_wrong_pod_naming_everyone(tmp_path: Path, family: str,
                                                            proxy: str) -> None:
    with traced(tmp_path, "recycled-ip", family=family, proxy=proxy) as (bg, watch):
        wp = watch.wait_for(lambda x: x.get("rule") == "wrong-pod", timeout=60)
        result = bg.result(timeout=60)
        watch.wait_for(lambda x: x.get("rule") == "late-establish", timeout=10)
        finish(watch)
    assert_wrong_pod_names_everyone(wp, result)
    assert len(watch.findings("wrong-pod")) == 1
    assert result.proxy == proxy


def test_recycled_ip_without_identity_still_yields_late_establish(tmp_path: Path) -> None:
    with traced(tmp_path, "recycled-ip", identity=False) as (bg, watch):
        le = watch.wait_for(lambda x: x.get("rule") == "late-establish", timeout=60)
        result = bg.result(timeout=60)
        finish(watch)
    assert le["orig"] == flow_of(result)
    assert le["target"] == {"ip": result.target[0], "port": result.target[1]}
    assert le["unreplied_s"] >= 3.0
    assert le["client"] is None and le["new_owner"] is None
    assert watch.findings("wrong-pod") == []


@by_setup
def test_dead_pod_is_a_dead_endpoint(tmp_path: Path, family: str, proxy: str) -> None:
    with traced(tmp_path, "dead-pod", "--dead-after", "2", family=family,
                proxy=proxy) as (bg, watch):
        de = watch.wait_for(lambda x: x.get("rule") == "dead-endpoint", timeout=60)
        result = bg.result(timeout=60)
        finish(watch)
    assert_dead_endpoint_names_the_pod(de, result)
    assert watch.findings("wrong-pod") == []
    assert result.proxy == proxy


@by_lab_setup
def test_bridge_without_br_netfilter_is_an_unnated_reply(tmp_path: Path, family: str,
                                                         proxy: str) -> None:
    with traced(tmp_path, "bridge-no-brnf", "--late-after", "1", "--identity-grace", "2",
                brnf=False, family=family, proxy=proxy) as (bg, watch):
        ur = watch.wait_for(lambda x: x.get("rule") == "unnated-reply", timeout=60)
        result = bg.result(timeout=60)
        finish(watch)
    assert result.attempts[0].outcome != "answered"
    assert ur["orig"] == flow_of(result)
    assert ur["evidence"] == "no-reply" and ur["severity"] == "warning"
    assert owner(ur, "new_owner") == ref(result.old_pod)


@by_lab_setup
def test_bridge_with_br_netfilter_is_quiet(tmp_path: Path, family: str, proxy: str) -> None:
    with traced(tmp_path, "bridge-no-brnf", "--late-after", "1", "--identity-grace", "2",
                brnf=True, family=family, proxy=proxy) as (bg, watch):
        result = bg.result(timeout=60)
        # The rule would have fired 3 s after the SYN: watch that long past it.
        deadline = time.time() + 5.0
        watch.wait_for(lambda x: (x.get("kind") == "status" and time.time() > deadline)
                       or x.get("kind") == "finding", timeout=30)
        finish(watch)
    assert result.attempts[0].outcome == "answered"
    assert watch.findings() == []


@by_family
def test_remediate_gives_the_retry_a_fresh_decision(tmp_path: Path, family: str) -> None:
    """On IPv6 too: the ctnetlink delete of an IPv6 entry (CTA_IP_V6_SRC/DST tuple)."""
    with traced(tmp_path, "recycled-ip", "--remediate", family=family) as (bg, watch):
        rem = watch.wait_for(lambda x: x.get("kind") == "remediation", timeout=60)
        result = bg.result(timeout=60)
        finish(watch)
    first, retry = result.attempts
    assert first.outcome == "timeout"
    assert retry.answered_by is None, "the recycled pod must not answer after remediation"
    # The deletion is logged, names the first attempt's very entry, and came before the retry.
    assert rem["action"] == "deleted" and rem["orig"] == flow_of(result)
    assert "no longer" in rem["reason"]
    assert rem["target"] == {"ip": result.target[0], "port": result.target[1]}
    assert f"id={rem['entry_id']}" in result.conntrack["after-first-attempt"][0].split()
    assert ts(rem["ts"]) < retry.started
    # A fresh decision: cart has no endpoints now, so kube-proxy's REJECT answers the retry
    # (the stale entry would have carried it to the recycled ledger pod instead).
    assert retry.outcome == "refused", retry
    assert not any(f"id={rem['entry_id']}" in line.split()
                   for line in result.conntrack["after-retry"])
    assert [x["entry_id"] for x in watch.lines if x.get("kind") == "remediation"] == \
        [rem["entry_id"]]
    assert watch.findings("wrong-pod") == []


def test_malformed_identity_line_is_named_and_skipped(tmp_path: Path) -> None:
    with traced(tmp_path, "recycled-ip") as (bg, watch):
        with open(bg.identity_path, "ab") as f:
            f.write(b'{"type": "ADDED", "object": {"kind": "Pod"}}\n')
        wp = watch.wait_for(lambda x: x.get("rule") == "wrong-pod", timeout=60)
        bg.result(timeout=60)
        finish(watch)
    assert wp["new_owner"] is not None
    err = watch.stderr.decode()
    assert f"{bg.identity_path}:" in err and "skipped" in err and "metadata" in err


def test_explain_retells_the_wrong_pod_of_a_real_run(tmp_path: Path) -> None:
    import subprocess
    import sys

    import orjson

    with traced(tmp_path, "recycled-ip") as (bg, watch):
        wp = watch.wait_for(lambda x: x.get("rule") == "wrong-pod", timeout=60)
        result = bg.result(timeout=60)
        finish(watch)
    findings = tmp_path / "findings.jsonl"
    findings.write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in watch.lines))
    res = subprocess.run([sys.executable, "-m", "cttrace", "explain", str(findings),
                          "--rule", "wrong-pod", "-o", "json"], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    steps = orjson.loads(res.stdout)["steps"]
    what = [s["what"] for s in steps]
    assert what.index("created") < what.index("gone") < what.index("reply") < what.index("finding")
    old, new = result.old_pod, result.new_pod
    assert old is not None and new is not None
    gone = steps[what.index("gone")]["text"]
    assert f"{old.namespace}/{old.name}" in gone
    owners = [s["text"] for s in steps if s["what"] == "owner"]
    assert any(f"{new.namespace}/{new.name}" in t for t in owners)
    assert wp["entry_id"] == orjson.loads(res.stdout)["entry_id"]
