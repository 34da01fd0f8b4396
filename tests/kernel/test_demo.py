"""``cttrace demo``, the README's first command, run as a user runs it.

Each scenario the demo offers runs in a lab on this kernel with the tracer
attached; the demo must name the failure (JSON lines on stdout, the verdict on
stderr), exit 0, and leave no namespace or lab state behind, also when the user
presses Ctrl-C half-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import orjson
import pytest

from cttrace.demo import EXPECTED
from cttrace.lab.naming import STATE_ROOT
from cttrace.lab.scenario_parts import CART, FRONTEND, LEDGER

pytestmark = pytest.mark.kernel

#: A scenario takes a few seconds; the demo then gives time-driven rules their grace.
DEMO_TIMEOUT_S = 120.0


def demo(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "cttrace", "demo", *args, "-o", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def lab_instance(lines: list[dict[str, object]]) -> str:
    """The lab's instance id, from the source line's ``ctl-<instance>-node``."""
    netns = next(x["netns"] for x in lines if x.get("kind") == "source")
    assert isinstance(netns, str) and netns.startswith("ctl-") and netns.endswith("-node")
    return netns.removeprefix("ctl-").removesuffix("-node")


def assert_nothing_left(instance: str) -> None:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                           check=True).stdout
    left = [n.split()[0] for n in names.splitlines() if n.startswith(f"ctl-{instance}-")]
    assert left == [], f"namespaces left behind: {left}"
    assert not (STATE_ROOT / instance).exists()


@pytest.mark.parametrize("scenario", sorted(EXPECTED))
def test_demo_names_the_failure_and_leaves_nothing(scenario: str) -> None:
    proc = demo(scenario)
    out, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    verdict = err.decode()
    assert proc.returncode == 0, verdict[-3000:]
    assert "Traceback" not in verdict
    lines = [orjson.loads(raw) for raw in out.splitlines()]
    rule = str(EXPECTED[scenario])
    found = [x for x in lines if x.get("kind") == "finding" and x.get("rule") == rule]
    assert found, f"no {rule} finding in {lines}"
    assert f"cttrace caught it: {rule}" in verdict
    assert lines[-1]["kind"] == "summary"
    assert_nothing_left(lab_instance(lines))


def test_make_demo_names_client_service_old_and_new_pod() -> None:
    """The default scenario: the README promises the four names of the wrong connection."""
    proc = demo()
    out, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    assert proc.returncode == 0, err.decode()[-3000:]
    lines = [orjson.loads(raw) for raw in out.splitlines()]
    wrong = [x for x in lines if x.get("kind") == "finding" and x.get("rule") == "wrong-pod"]
    assert len(wrong) == 1
    w = wrong[0]

    def name(key: str) -> tuple[str, str]:
        return w[key]["namespace"], w[key]["name"].rsplit("-", 2)[0]

    assert w["severity"] == "critical"
    assert name("client") == (FRONTEND.namespace, FRONTEND.app)
    assert w["service"] == {"namespace": CART.namespace, "name": CART.app}
    assert name("old_owner") == (CART.namespace, CART.app)
    assert name("new_owner") == (LEDGER.namespace, LEDGER.app)
    new_pod = f"{w['new_owner']['namespace']}/{w['new_owner']['name']}"
    assert f"answered by {new_pod}" in err.decode()  # what the client saw, in the verdict


def test_ctrl_c_mid_scenario_exits_130_and_tears_the_lab_down() -> None:
    proc = demo("dead-pod")
    assert proc.stdout is not None
    first = orjson.loads(proc.stdout.readline())  # the tracer is attached: the lab is up
    assert first["kind"] == "source"
    instance = lab_instance([first])
    assert any(n.startswith(f"ctl-{instance}-node") for n in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=DEMO_TIMEOUT_S)
    assert proc.returncode == 130, err.decode()[-3000:]
    assert "Traceback" not in err.decode()
    assert_nothing_left(instance)
