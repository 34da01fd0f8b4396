"""What a lab scenario's own result must show, checked the same way in every tier that
runs it (the kernel tier with the netlink source, the VM tier with the bpf source)."""

from __future__ import annotations

import pytest

from cttrace.lab.results import ScenarioResult

#: Run a scenario test on an IPv4 and on an IPv6 node (``Lab(family=...)``).
by_family = pytest.mark.parametrize("family", ["4", "6"], ids=["ipv4", "ipv6"])


def assert_snat_race_clashed(result: ScenarioResult) -> int:
    """snat-race did what it claims: every SNAT port answered once, every other connection
    timed out, and the kernel counted an insert failure and a drop for at least each
    loser's first SYN. Returns the node's ``insert_failed`` growth."""
    connections, ports = result.options["connections"], result.options["ports"]
    assert isinstance(connections, int) and isinstance(ports, int)
    answered = [a for a in result.attempts if a.outcome == "answered"]
    assert len(answered) == ports  # every SNAT port taken once; the rest clashed
    assert all(a.outcome == "timeout" for a in result.attempts if a not in answered)
    failed = result.counters["insert_failed"]
    # At least the first SYN of every losing connection failed to insert and was dropped.
    assert failed >= connections - ports
    assert result.counters["drop"] >= failed
    return failed
