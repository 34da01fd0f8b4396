"""What a lab scenario's own result must show, checked the same way in every tier that
runs it (the kernel tier with the netlink source, the VM tier with the bpf source)."""

from __future__ import annotations

import pytest

from cttrace.lab.results import ScenarioResult
from tests.watch_process import Line, owner, ref

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


def assert_wrong_pod_names_everyone(wp: Line, result: ScenarioResult) -> None:
    """recycled-ip's retry reached the pod that inherited the IP, and the ``wrong-pod``
    finding ``wp`` names the flow, the DNAT target, the client, the Service and both
    pods: the same names whoever wrote the Service rules."""
    assert result.attempts[-1].answered_by == f"{result.new_pod.namespace}/{result.new_pod.name}"
    assert wp["severity"] == "critical"
    assert wp["orig"] == result.flow.to_json()
    assert wp["target"] == {"ip": result.target[0], "port": result.target[1]}
    assert owner(wp, "client") == ref(result.client)
    assert wp["service"] == {"namespace": result.service.namespace, "name": result.service.name}
    assert owner(wp, "old_owner") == ref(result.old_pod)
    assert owner(wp, "new_owner") == ref(result.new_pod)
    assert wp["new_owner_is_endpoint"] is False
    first, retry = result.attempts
    assert wp["unreplied_s"] == pytest.approx(retry.started - first.started, abs=0.5)
    assert (wp["service"]["name"], wp["old_owner"]["name"], wp["new_owner"]["name"],
            wp["client"]["name"]) == ("cart", "cart-7d9f8-w5n4t", "ledger-5c8f9-x2x7q",
                                      "frontend-6d8c9-k2x7p")


def assert_dead_endpoint_names_the_pod(de: Line, result: ScenarioResult) -> None:
    """dead-pod's established connection outlived its pod, and the ``dead-endpoint``
    finding ``de`` names the flow, the dead pod and the client."""
    assert de["orig"] == result.flow.to_json()
    assert owner(de, "old_owner") == ref(result.old_pod)
    assert owner(de, "client") == ref(result.client)
    assert de["state"] == "ESTABLISHED"
    assert (de["old_owner"]["name"], de["client"]["name"]) == ("checkout-6f7b8-q9w2z",
                                                               "frontend-6d8c9-k2x7p")
