"""``snat-race`` on this kernel, caught by ``cttrace watch``'s snat-collision sampler.

The lab's node masquerades traffic to a pod without --random-fully, from a few
source ports; a burst of concurrent connections from one client pod clashes
on the NAT tuple, and the kernel drops the losers' SYNs at confirm
(``insert_failed``, ``drop``). ``cttrace watch`` runs as a separate process on
the lab's node and must report every one of those failures as
``snat-collision`` findings, with no tuple (counters carry none).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cttrace.lab.background import BackgroundScenario
from tests.lab_checks import assert_snat_race_clashed
from tests.watch_process import Line, WatchProcess

pytestmark = pytest.mark.kernel


def inserts_failed(lines: list[Line]) -> int:
    return sum(x["deltas"]["insert_failed"] for x in lines
               if x.get("kind") == "finding" and x.get("rule") == "snat-collision")


@pytest.mark.parametrize("proxy", ["iptables", "nftables"])
def test_snat_race_is_a_snat_collision(tmp_path: Path, proxy: str) -> None:
    ready = tmp_path / "ready"
    with BackgroundScenario("snat-race", identity_path=tmp_path / "identity.jsonl",
                            wait_ready=ready.exists, proxy=proxy) as bg:
        watch = WatchProcess(["--source", "netlink", "--netns", bg.node_netns,
                              "--output", "json", "--identity-file", str(bg.identity_path)], ready)
        try:
            watch.wait_ready()
            result = bg.result(timeout=120)
            failed = result.counters["insert_failed"]
            # The sampler reads the counters every 5 s: wait until it has accounted for all.
            watch.wait_for(lambda _: inserts_failed(watch.lines) >= failed, timeout=60)
            assert watch.stop() == 0, watch.stderr.decode()
        finally:
            watch.kill()
    assert b"Traceback" not in watch.stderr

    assert_snat_race_clashed(result)

    findings = watch.findings("snat-collision")
    assert inserts_failed(watch.lines) == failed
    assert sum(f["deltas"]["drop"] for f in findings) == result.counters["drop"]
    assert findings[0]["severity"] == "critical"  # several per second
    assert "--random-fully" in findings[0]["summary"]
    assert findings[0]["orig"] == {"src": "", "sport": 0, "dst": "", "dport": 0}
    assert watch.findings("wrong-pod") == [] and watch.findings("late-establish") == []
