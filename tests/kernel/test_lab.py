"""The lab's scenarios on the real kernel: what conntrack really does, read back from the kernel.

Each test builds its own lab ``ctl-<random instance>-*`` (namespaces only; no
packet leaves them), runs a scenario, and asserts the kernel facts a tracer is
later expected to catch: the client's outcome, the flow's conntrack entry as
``conntrack -L`` prints it in the node namespace, and the identity written. Then
it asserts that nothing of the lab is left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from cttrace.events import Flow
from cttrace.lab.background import BackgroundScenario
from cttrace.lab.naming import STATE_ROOT, LabNames, new_instance
from cttrace.lab.node import Lab, LabAborted
from cttrace.lab.plumbing import (
    in_netns,
    lab_netns,
    netns_pids,
    read_sysctl,
    run,
    snmp_counters,
    wait_exited,
)
from cttrace.lab.processes import ClientSession
from cttrace.lab.results import ScenarioResult
from cttrace.lab.scenario_parts import FRONTEND
from cttrace.lab.scenarios import run_scenario
from cttrace.lab.teardown import remove_instance
from tests.lab_checks import by_family

pytestmark = pytest.mark.kernel

DEADLINE_S = 30.0


@pytest.fixture
def instance() -> Iterator[str]:
    """A fresh lab instance id; whatever a failing test leaves of it is removed afterwards."""
    inst = new_instance()
    try:
        yield inst
    finally:
        remove_instance(LabNames(inst))


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {deadline_s:g} s")
        time.sleep(0.05)


def assert_torn_down(instance: str) -> None:
    names = LabNames(instance)
    assert lab_netns(names.netns_prefix) == []
    assert not names.state_dir().exists()


def identity_events(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def event_index(events: list[dict[str, Any]], etype: str, kind: str, name: str) -> int:
    for i, event in enumerate(events):
        obj = event["object"]
        if (event["type"], obj["kind"], obj["metadata"]["name"]) == (etype, kind, name):
            return i
    raise AssertionError(f"no {etype} {kind} {name} in the identity file")


def tuple_text(result: ScenarioResult) -> tuple[str, str]:
    """How conntrack -L prints the flow's original and reply directions."""
    f, (ip, port) = result.flow, result.target
    return (f"src={f.src} dst={f.dst} sport={f.sport} dport={f.dport}",
            f"src={ip} dst={f.src} sport={port} dport={f.sport}")


def entry_id(line: str) -> str:
    match = re.search(r"\bid=(\d+)", line)
    assert match, line
    return match.group(1)


@by_family
def test_recycled_ip_retry_rides_the_old_entry_to_another_services_pod(
        instance: str, tmp_path: Path, family: str) -> None:
    identity = tmp_path / "identity.jsonl"
    result = run_scenario("recycled-ip", instance=instance, identity_path=identity, family=family)

    first, retry = result.attempts
    assert (first.sport, retry.sport) == (result.flow.sport, result.flow.sport)
    assert first.outcome == "timeout"
    assert result.old_pod is not None and result.new_pod is not None
    assert (result.service.namespace, result.service.name) == ("shop", "cart")
    assert f"{result.old_pod.namespace}/{result.old_pod.name}".startswith("shop/cart-")
    # The client asked Service shop/cart and was answered by billing/ledger's new pod.
    assert retry.outcome == "answered"
    assert retry.answered_by == f"{result.new_pod.namespace}/{result.new_pod.name}"
    assert result.new_pod.namespace == "billing"
    assert f"uid={result.new_pod.uid}" in (retry.line or "")
    late_after = result.options["late_after"]
    assert isinstance(late_after, float) and retry.started - first.started >= late_after

    orig, reply = tuple_text(result)
    (before,) = result.conntrack["after-first-attempt"]
    assert "SYN_SENT" in before and "[UNREPLIED]" in before
    assert orig in before and reply in before
    (after,) = result.conntrack["after-retry"]
    assert "[UNREPLIED]" not in after and "[ASSURED]" in after
    assert orig in after and reply in after
    assert entry_id(after) == entry_id(before)  # the very entry the dead pod's SYN created

    names = [step.name for step in result.steps]
    assert names == ["ready", "pod-killed", "first-attempt", "endpoint-removed", "ip-recycled",
                     "retry"]
    assert [s.ts for s in result.steps] == sorted(s.ts for s in result.steps)

    events = identity_events(identity)
    deleted = event_index(events, "DELETED", "Pod", result.old_pod.name)
    added = event_index(events, "ADDED", "Pod", result.new_pod.name)
    assert deleted < added
    assert events[added]["object"]["status"]["podIP"] == result.target[0]
    assert events[deleted]["object"]["status"]["podIP"] == result.target[0]
    cart_slices = [e["object"] for e in events if e["object"]["kind"] == "EndpointSlice"
                   and e["object"]["metadata"]["labels"]["kubernetes.io/service-name"] == "cart"]
    assert [len(s["endpoints"]) for s in cart_slices] == [1, 0]
    assert_torn_down(instance)


@by_family
def test_dead_pod_connection_keeps_sending_into_the_void(
        instance: str, tmp_path: Path, family: str) -> None:
    identity = tmp_path / "identity.jsonl"
    result = run_scenario("dead-pod", instance=instance, identity_path=identity, family=family)

    (attempt,) = result.attempts
    assert result.old_pod is not None
    assert attempt.answered_by == f"{result.old_pod.namespace}/{result.old_pod.name}"
    vanished = result.step("pod-vanished").ts
    alive = [e for e in result.exchanges if e.sent_at < vanished]
    void = [e for e in result.exchanges if e.sent_at >= vanished]
    assert alive and all(e.outcome == "echoed" and e.echo == e.text for e in alive)
    assert len(void) > 1 and all(e.outcome == "timeout" for e in void)

    orig, reply = tuple_text(result)
    for moment in ("established", "into-the-void"):
        (entry,) = result.conntrack[moment]
        assert "ESTABLISHED" in entry and "[ASSURED]" in entry
        assert orig in entry and reply in entry  # still DNATed to the dead pod's IP

    events = identity_events(identity)
    event_index(events, "DELETED", "Pod", result.old_pod.name)
    assert events[-1]["object"]["kind"] == "EndpointSlice"
    assert events[-1]["object"]["endpoints"] == []
    assert_torn_down(instance)


@by_family
@pytest.mark.parametrize("brnf", [False, True], ids=["brnf-0", "brnf-1"])
def test_bridge_without_br_netfilter_breaks_same_node_service_traffic(
        instance: str, brnf: bool, family: str) -> None:
    result = run_scenario("bridge-no-brnf", instance=instance, brnf=brnf, family=family)

    (attempt,) = result.attempts
    orig, reply = tuple_text(result)
    (entry,) = result.conntrack["after-attempt"]
    assert orig in entry and reply in entry
    if brnf:
        assert result.old_pod is not None
        assert attempt.answered_by == f"{result.old_pod.namespace}/{result.old_pod.name}"
        assert "[ASSURED]" in entry
        assert result.counters["client_out_rsts"] == 0
    else:
        # The SYN-ACK never passed the node's conntrack (it was bridged), so the entry
        # never saw a reply; the client got it from the pod IP and reset it.
        assert attempt.outcome == "timeout"
        assert "SYN_SENT" in entry and "[UNREPLIED]" in entry
        assert result.counters["client_out_rsts"] >= 1
    assert_torn_down(instance)


@pytest.mark.parametrize("family", ["4", "6", "dual"])
def test_whatever_the_node_routes_out_ends_silently_in_the_fabric(
        instance: str, family: str) -> None:
    """The no-leak rule, for each family of the node: its only default route leads into the
    fabric, and a SYN to an address no pod holds goes there and is dropped without an error
    (the client times out; it is neither refused nor told "unreachable")."""
    with Lab(instance=instance, family=family) as lab:
        client = lab.start_pod(FRONTEND)
        names = lab.names
        for plan in lab.plans:
            routes = run(["ip", "-n", lab.node_netns, f"-{plan.version}", "route", "show",
                          "default"]).splitlines()
            assert [r.split()[:5] for r in routes] == \
                [["default", "via", plan.fabric_ip, "dev", names.fabric_link_node]]
            assert read_sysctl(names.fabric_netns, f"net.ipv{plan.version}.conf.all.forwarding") \
                == "0"
        before = _fabric_receives(names.fabric_netns, lab.plan.version)
        nowhere = lab.plan.pod_ip(lab.plan.routed_pod_net, 99)
        session = ClientSession(client.netns, src=client.ip, sport=40999, dst=nowhere, dport=80,
                                connect_timeout=1.0, reply_timeout=0.5,
                                log=lab.state_dir / "logs" / "nowhere.log")
        session.close()
        assert session.greeting["outcome"] == "timeout", session.greeting
        (entry,) = lab.conntrack_entries(Flow(client.ip, 40999, nowhere, 80))
        assert "SYN_SENT" in entry and "[UNREPLIED]" in entry
        assert _fabric_receives(names.fabric_netns, lab.plan.version) > before
    assert_torn_down(instance)


def _fabric_receives(netns: str, version: int) -> int:
    """Packets the fabric received: Ip.InReceives (/proc/net/snmp) or Ip6InReceives."""
    if version == 4:
        return snmp_counters(netns)["Ip.InReceives"]
    for line in run(in_netns(netns, ["cat", "/proc/net/snmp6"])).splitlines():
        name, _, value = line.partition(" ")
        if name == "Ip6InReceives":
            return int(value)
    raise AssertionError("no Ip6InReceives in /proc/net/snmp6")


def _lab_cli(instance: str, tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cttrace.lab.cli", "run", *args, "--instance", instance,
             "--ready-file", str(tmp_path / "ready")],
            stdout=subprocess.PIPE, stderr=err,
        )
    return proc, stderr


def test_cli_run_waits_for_the_ready_file_then_prints_the_result(
        instance: str, tmp_path: Path) -> None:
    identity = tmp_path / "identity.jsonl"
    proc, stderr = _lab_cli(instance, tmp_path, "bridge-no-brnf", "--brnf",
                            "--identity-file", str(identity))
    try:
        wait_for(lambda: b"waiting for" in stderr.read_bytes(), "the lab waiting for --ready-file")
        assert LabNames(instance).node_netns in lab_netns(LabNames(instance).netns_prefix)
        assert {e["object"]["kind"] for e in identity_events(identity)} == \
            {"Pod", "Service", "EndpointSlice"}
        (tmp_path / "ready").touch()
        out, _ = proc.communicate(timeout=DEADLINE_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, stderr.read_text()
    summary = orjson.loads(out)
    assert summary["scenario"] == "bridge-no-brnf" and summary["instance"] == instance
    assert summary["attempts"][0]["outcome"] == "answered"
    assert summary["flow"]["dst"] == "10.100.61.5"
    assert_torn_down(instance)


def test_sigint_tears_the_lab_down_and_exits_130(instance: str, tmp_path: Path) -> None:
    proc, stderr = _lab_cli(instance, tmp_path, "recycled-ip")
    try:
        wait_for(lambda: b"waiting for" in stderr.read_bytes(), "the lab waiting for --ready-file")
        pids = [pid for netns in lab_netns(LabNames(instance).netns_prefix)
                for pid in netns_pids(netns)]
        assert pids  # the pod servers
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130
    assert "torn down" in stderr.read_text()
    wait_exited(pids, deadline_s=5.0)
    assert_torn_down(instance)


def test_background_scenario_runs_while_the_caller_attaches(instance: str, tmp_path: Path) -> None:
    attached = threading.Event()
    with BackgroundScenario("recycled-ip", instance=instance,
                            identity_path=tmp_path / "identity.jsonl",
                            wait_ready=attached.is_set) as bg:
        # The node exists as soon as start() returns: a tracer can attach to it now.
        assert bg.node_netns in lab_netns(LabNames(instance).netns_prefix)
        assert bg.identity_path.exists()
        assert not bg.done()
        attached.set()
        result = bg.result(timeout=DEADLINE_S)
    assert result.new_pod is not None
    assert result.attempts[1].answered_by == f"{result.new_pod.namespace}/{result.new_pod.name}"
    assert_torn_down(instance)


def test_closing_a_background_scenario_stops_it(instance: str) -> None:
    narrated = threading.Event()
    bg = BackgroundScenario("dead-pod", instance=instance, wait_ready=lambda: False,
                            on_step=lambda _line: narrated.set())
    bg.start()
    try:
        wait_for(narrated.is_set, "the scenario's first step")
    finally:
        bg.close()
    assert bg.done()
    with pytest.raises(LabAborted):
        bg.result(timeout=0)
    assert_torn_down(instance)


def test_down_all_removes_what_a_killed_lab_left_and_nobody_elses(instance: str) -> None:
    # In a private mount namespace with empty /run/netns and /run/cttrace-lab, so that
    # `down --all` sees only this test's namespaces, never those of anyone else.
    # Beside the killed lab, another user's namespaces that merely look like a lab's: one
    # with the lab's own prefix, one like another lab's node. `down --all` must leave both.
    other = new_instance()
    foreign = [f"ctl-{instance}-web", f"ctl-{other}-node"]
    py = sys.executable
    script = f"""
set -e
mkdir -p /run/netns {STATE_ROOT}
mount -t tmpfs ctl-test /run/netns
mount -t tmpfs ctl-test {STATE_ROOT}
{py} -c '
import os
from cttrace.lab.node import Lab
from cttrace.lab.scenario_parts import FRONTEND
lab = Lab(instance="{instance}")
lab.build()
print(lab.start_pod(FRONTEND).server.pid, flush=True)
os._exit(0)  # dies without tearing down
'
for ns in {" ".join(foreign)}; do ip netns add "$ns"; done
{py} -m cttrace.lab.cli list
{py} -m cttrace.lab.cli down --all
echo "netns left: $(ip netns list | cut -d' ' -f1 | sort | tr '\n' ' ')"
echo "state left: $(ls -A {STATE_ROOT} | wc -l)"
for ns in {" ".join(foreign)}; do ip netns del "$ns"; done
"""
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    server_pid = int(lines[0])
    try:
        assert any(line.split()[:3] == [instance, "left", "over;"] for line in lines), proc.stdout
        listed = [line for line in lines if line.startswith(f"  {instance} ")]
        assert len(listed) == 1 and "-web" not in listed[0], proc.stdout
        assert not any(line.startswith(f"  {other} ") for line in lines), proc.stdout
        assert f"removed lab instances: {instance}" in lines
        assert lines[-2].split(": ", 1)[1].split() == sorted(foreign)
        assert lines[-1] == "state left: 0"
        wait_exited([server_pid], deadline_s=5.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server_pid, signal.SIGKILL)  # only if `down --all` failed to


#: What the real kube-proxy would change in the machine's root namespace if it were not
#: contained (sysctls it writes, the machine-wide conntrack hash size) and its chains.
ROOT_STATE_SYSCTLS = ("net.ipv4.conf.all.route_localnet",
                      "net.netfilter.nf_conntrack_tcp_timeout_established",
                      "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
                      "net.netfilter.nf_conntrack_max")


def root_state() -> dict[str, object]:
    """The root namespace's state the real kube-proxy would touch if it leaked."""
    sysctls = subprocess.run(["sysctl", *ROOT_STATE_SYSCTLS], capture_output=True, text=True,
                             check=True).stdout
    iptables = subprocess.run(["iptables-save"], capture_output=True, text=True,
                              check=True).stdout
    return {
        "sysctls": sysctls,
        "hashsize": Path("/sys/module/nf_conntrack/parameters/hashsize").read_text(),
        "kube_chains": sorted(line for line in iptables.splitlines()
                              if line.startswith(":KUBE-")),
    }


def process_names(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


def test_real_kube_proxy_writes_only_the_node_and_sigint_leaves_nothing(
        instance: str, tmp_path: Path) -> None:
    names = LabNames(instance)
    before = root_state()
    proc, stderr = _lab_cli(instance, tmp_path, "dead-pod", "--proxy", "kube-proxy")
    try:
        wait_for(lambda: b"waiting for" in stderr.read_bytes(), "the lab waiting for --ready-file",
                 deadline_s=180)
        narration = stderr.read_text()
        assert "Service rules: the real kube-proxy v1.20" in narration
        # kube-proxy runs in the node namespace; the API and etcd in the control plane's.
        assert process_names(netns_pids(names.node_netns)) >= {"kube-proxy"}
        assert process_names(netns_pids(names.control_netns)) >= {"kube-apiserver", "etcd"}
        # Its own rules (its comments, not the lab's tag), in the node namespace only.
        nat = subprocess.run(["ip", "netns", "exec", names.node_netns, "iptables-save",
                              "-t", "nat"], capture_output=True, text=True, check=True).stdout
        assert '--comment "shop/checkout:http cluster IP"' in nat
        assert "KUBE-MARK-MASQ" in nat and names.tag not in nat
        pids = [pid for netns in lab_netns(names.netns_prefix) for pid in netns_pids(netns)]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=DEADLINE_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, stderr.read_text()
    wait_exited(pids, deadline_s=5.0)
    assert_torn_down(instance)
    assert root_state() == before


#: (family, proxy) -> the nftables tables the node gets (iptables-nft keeps iptables' own
#: tables as nftables tables of the same names; ip6tables' are ``table ip6``).
NODE_TABLES = {
    ("4", "iptables"): {"table ip nat", "table ip filter"},
    ("6", "iptables"): {"table ip6 nat", "table ip6 filter"},
    ("4", "nftables"): {"table ip kube-proxy"},
    ("6", "nftables"): {"table ip6 kube-proxy"},
    ("dual", "nftables"): {"table ip kube-proxy", "table ip6 kube-proxy"},
}


@pytest.mark.parametrize(("family", "proxy"), NODE_TABLES, ids="-".join)
def test_the_lab_modes_write_their_tables_in_the_node_only(instance: str, family: str,
                                                           proxy: str) -> None:
    def root_tables() -> str:
        return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                              check=True).stdout

    before = root_tables(), root_state()
    with Lab(instance=instance, proxy=proxy, family=family) as lab:
        lab.add_service("shop", "cart", app="cart", vip="10.100.37.12")
        tables = subprocess.run(["ip", "netns", "exec", lab.node_netns, "nft", "list", "tables"],
                                capture_output=True, text=True, check=True).stdout
        assert set(tables.splitlines()) == NODE_TABLES[family, proxy]
        assert (root_tables(), root_state()) == before
    assert_torn_down(instance)
