"""``cttrace agent --source bpf`` on Debian's kernel, run as the DaemonSet runs it.

One agent process (:class:`~tests.vm.conftest.SharedAgent`: the DaemonSet's arguments,
with what the VM lacks replaced) was started when the tests were collected, so that its
BCC compile overlapped the others; it has traced the guest since, and these tests run
last. What the cluster relies on, each checked from outside the process:

* ``/healthz`` and ``/readyz`` (the DaemonSet's startup, liveness and readiness probes)
  answer 200 once the bpf source is attached, and the ready file is there;
* ``/metrics`` counts the bpf source's events while connection load goes through a
  Service, and exports the lost-event and kretprobe-miss counters an operator alerts on;
* SIGTERM under that load (what the kubelet sends on a rolling update) exits 0 within the
  DaemonSet's ``terminationGracePeriodSeconds``, before the kubelet's SIGKILL, with no
  traceback, and every BPF program the agent loaded is gone from the kernel
  (``bpftool prog``), with its kprobe events.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest
import yaml

from tests import agent_http
from tests.agent_http import key

from .conftest import (
    SharedAgent,
    assert_detached,
    bpf_prog_ids,
    prog_ids_of,
    wait_until,
    write_timing,
)
from .topology import Topology

pytestmark = pytest.mark.vm

DAEMONSET = Path(__file__).resolve().parents[2] / "deploy" / "base" / "daemonset.yaml"
#: How long the load may take to show in /metrics, under emulation.
LOAD_SEEN_S = 90.0
#: New entries of the load the agent must have counted before it is stopped.
LOAD_ENTRIES = 20


def grace_period_s() -> float:
    """The DaemonSet's terminationGracePeriodSeconds: SIGTERM, then SIGKILL after this."""
    spec = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    return float(spec["terminationGracePeriodSeconds"])


def tracked(samples: agent_http.Samples) -> float:
    """NATed TCP entries the agent's kernel side has kept (its own counter)."""
    return samples.get(key("cttrace_bpf_entries_tracked_total", source="bpf"), 0.0)


def test_probes_answer_once_the_bpf_source_is_attached(bpf_agent: SharedAgent) -> None:
    agent = bpf_agent.process
    started = agent.wait_for(lambda x: x.get("kind") == "agent" and x.get("msg") == "started",
                             timeout=0)
    assert started["source"] == "bpf" and started["fallback"] is None
    assert started["node"] == SharedAgent.NODE
    assert started["alertmanagers"] == [bpf_agent.alertmanager_url]
    assert agent_http.get(bpf_agent.port, "/healthz") == (200, "source attached\n")
    assert agent_http.get(bpf_agent.port, "/readyz") == (200, "ready\n")
    assert agent.ready_file.read_text() == "bpf\n"

    # What an operator alerts on is exported from the start, for the bpf source.
    samples = agent_http.scrape(bpf_agent.port)
    assert key("cttrace_lost_events_total", source="bpf") in samples
    assert key("cttrace_bpf_entry_map_evictions_total", source="bpf") in samples
    # How each kernel function is hooked, and why.
    assert key("cttrace_source_hook_info", source="bpf", function="tcp_connect", mode="fentry",
               why="vmlinux function, kernel BTF and trampolines") in samples
    hook_info = started["hooks"]
    assert hook_info["nf_conntrack_tcp_packet"]["mode"] == "fexit"
    assert key("cttrace_source_hook_info", source="bpf", function="nf_ct_delete", mode="fentry",
               why=hook_info["nf_ct_delete"]["why"]) in samples
    assert key("cttrace_trampoline_misses_total", source="bpf") in samples


def test_sigterm_under_load_exits_0_within_the_grace_period_and_detaches(
    bpf_agent: SharedAgent, topology: Topology
) -> None:
    agent = bpf_agent.process
    pid = agent.proc.pid
    programs = prog_ids_of(pid)
    # BCC's programs and the conntrack trampolines cttrace loaded itself (nothing of it is
    # in tracefs: no kretprobe with a maxactive of its own is attached beside trampolines).
    assert len(programs) >= 5 and programs <= bpf_prog_ids()
    grace = grace_period_s()

    before = agent_http.scrape(bpf_agent.port)
    with topology.load(80) as load:
        # Under load: the kernel is tracking the load's entries right now, and (healthy
        # connections) sends userspace nothing about them.
        def counting() -> bool:
            now = agent_http.scrape(bpf_agent.port)
            return tracked(now) >= tracked(before) + LOAD_ENTRIES

        wait_until(counting, f"{LOAD_ENTRIES} new entries of the load in /metrics", LOAD_SEEN_S)
        during = agent_http.scrape(bpf_agent.port)
        rc, took = agent.terminate(grace)
        assert load.proc.poll() is None, "the load ended before the agent did"
    assert agent.stop() == 0 == rc, agent.stderr.decode(errors="replace")[-3000:]
    assert b"Traceback" not in agent.stderr, agent.stderr.decode(errors="replace")[-3000:]
    write_timing("agent_sigterm_to_exit_s", took)
    summary = agent.lines[-1]
    assert summary["kind"] == "summary"
    emitted = (during[key("cttrace_bpf_records_emitted_total", source="bpf")]
               - before[key("cttrace_bpf_records_emitted_total", source="bpf")])
    assert emitted <= 0.01 * (tracked(during) - tracked(before)), emitted
    assert not agent.ready_file.exists(), "the ready file outlived the agent"
    with socket.socket() as probe:  # the port is released
        assert probe.connect_ex(("127.0.0.1", bpf_agent.port)) == errno.ECONNREFUSED
    # Every program it loaded is gone, and so are its kprobe events.
    assert_detached(pid, programs, grace)
