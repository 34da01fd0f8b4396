"""``cttrace agent --source bpf`` with exactly the DaemonSet's privileges, on Debian's kernel.

deploy/base/daemonset.yaml runs the agent as uid 0 with every capability dropped but
the ones it adds (BPF, PERFMON, NET_ADMIN, SYS_RESOURCE: no SYS_ADMIN), without
privilege escalation (no_new_privs), with a read-only root filesystem, read-only
host mounts (tracefs, debugfs, /lib/modules, /usr/src, the cgroup tree) and one
writable emptyDir at /tmp. There is no container runtime in the VM, so this test
builds the same confinement by hand around one agent process:

* ``unshare --mount`` gives it a mount namespace of its own, in which every mount
  is remounted read-only (the root, tracefs, debugfs, /sys, the module and header
  trees) except /proc (but /proc/sys, read-only as a runtime makes it), /dev and
  /tmp (the emptyDir; the test's ``--ready-file`` and identity files live there);
* ``setpriv`` then limits the capability bounding set to the DaemonSet's list,
  clears the inheritable and ambient sets and sets no_new_privs, and execs the
  agent: uid 0 gets exactly the bounding set as its permitted and effective set.

One node setting is needed besides: ``kernel.perf_event_paranoid`` at most 2.
Debian's kernels default it to 3 (CONFIG_SECURITY_PERF_EVENTS_RESTRICT), where
Debian's patch to ``perf_event_open()`` answers EACCES to anyone without
CAP_SYS_ADMIN, CAP_PERFMON or not (measured in this guest on 6.1: every
tracepoint and kprobe ``perf_event_open()`` of the confined process failed).
The fixture sets it to 2, as a node's admin would, and restores it afterwards.

What is checked, from outside the process: its capability sets and its mounts
are exactly that; it compiles and attaches the bpf source (not a fallback)
without writing tracefs (no kprobe events of its own: kretprobes go through the
perf_kprobe PMU, see cttrace.sources.kprobe_events); and it names the wrong pod
of the recycled-ip scenario, identity followed from the lab.
"""

from __future__ import annotations

import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cttrace.lab.background import BackgroundScenario
from tests import agent_http
from tests.watch_process import owner, ref

from .conftest import (
    COMPILE_DEADLINE_S,
    OUT_DIR,
    DrainedWatchProcess,
    has_read,
    kprobe_events_of,
    point,
    write_timing,
)
from .test_agent_bpf import DAEMONSET

pytestmark = pytest.mark.vm

NODE = "ctl-vm-least"
#: How long a finding may take to show after its scenario's traffic, under emulation.
FINDING_S = 90.0
#: Capability numbers (include/uapi/linux/capability.h) of the names the DaemonSet uses.
CAPABILITY_BITS = {"NET_ADMIN": 12, "SYS_ADMIN": 21, "SYS_RESOURCE": 24, "PERFMON": 38,
                   "BPF": 39}
#: The node setting the DaemonSet's capabilities need (see the module docstring).
PERF_EVENT_PARANOID = Path("/proc/sys/kernel/perf_event_paranoid")
NODE_PARANOID = 2
#: Mounts left writable: what a container runtime leaves writable (proc, the /dev tmpfs)
#: and the DaemonSet's emptyDir at /tmp.
WRITABLE = ("/proc", "/dev", "/tmp")

#: Run inside the new mount namespace, as root with every capability, before the agent
#: (its command is the arguments).
_CONFINE = """
set -eu
# tracefs is also automounted under debugfs: mount it now, so that it is made read-only too.
ls /sys/kernel/debug/tracing >/dev/null 2>&1 || true
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r mnt; do
    case $mnt in /proc|/proc/*|/dev|/dev/*) continue;; esac
    # A mount whose flags cannot be changed in place gets a bind mount of itself on top.
    mount -o remount,bind,ro "$mnt" 2>/dev/null \
        || { mount --bind "$mnt" "$mnt" && mount -o remount,bind,ro "$mnt"; } \
        || echo "cannot make $mnt read-only" >&2
done
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mountpoint -q /tmp || mount --bind /tmp /tmp
mount -o remount,bind,rw /tmp
exec setpriv --bounding-set "$CAPS" --inh-caps -all --ambient-caps -all --no-new-privs -- "$@"
"""


def security_context() -> dict[str, object]:
    spec = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert isinstance(context, dict)
    return context


def daemonset_capabilities() -> list[str]:
    """The capabilities the DaemonSet adds after dropping ALL."""
    caps = security_context()["capabilities"]
    assert isinstance(caps, dict) and caps["drop"] == ["ALL"]
    added = caps["add"]
    assert isinstance(added, list)
    return [str(cap) for cap in added]


def confinement() -> list[str]:
    """The command prefix that confines what it execs as described above."""
    caps = ",".join(["-all", *(f"+{cap.lower()}" for cap in daemonset_capabilities())])
    return ["unshare", "--mount", "--propagation", "private", "--",
            "env", f"CAPS={caps}", "sh", "-c", _CONFINE, "confine"]


def status_fields(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {name: value.strip() for name, _, value in (line.partition(":") for line in lines)}


def mounts(pid: int) -> dict[str, tuple[str, set[str]]]:
    """The process's mounts: {mount point: (filesystem type, per-mount options)}, the top
    mount of each point (mountinfo lists a point again for each mount stacked on it)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        found[parts[4]] = (rest.split()[0], set(parts[5].split(",")))
    return found


class ConfinedAgent:
    def __init__(self, directory: Path, process: DrainedWatchProcess, link: Path) -> None:
        self.dir = directory
        self.process = process
        self.link = link  # the agent's --identity-file, a symlink to the lab's file
        self.port = 0


@pytest.fixture(scope="module")
def confined_agent() -> Iterator[ConfinedAgent]:
    paranoid = PERF_EVENT_PARANOID.read_text()
    PERF_EVENT_PARANOID.write_text(f"{NODE_PARANOID}\n")
    # Under /tmp, the one writable place: the agent writes its ready file here.
    directory = Path(tempfile.mkdtemp(prefix="ctl-least-"))
    empty = directory / "identity-start.jsonl"
    empty.touch()
    link = directory / "identity.jsonl"
    point(link, empty)
    wrapper = confinement()
    started_at = time.time()
    print(f"confined by: {shlex.join(wrapper)}")
    process = DrainedWatchProcess(
        ["--source", "bpf", "--listen", "127.0.0.1:0", "--node", NODE,
         "--identity-file", str(link)],
        directory / "ready", command="agent", wrapper=wrapper)
    agent = ConfinedAgent(directory, process, link)
    try:
        # In a whole tier this compile runs beside the three others: allow it longer.
        process.wait_ready(timeout=2 * COMPILE_DEADLINE_S)
        write_timing("least_privilege_compile_and_attach_s",
                     process.ready_file.stat().st_mtime - started_at)
        started = process.wait_for(
            lambda x: x.get("kind") == "agent" and x.get("msg") == "started", timeout=10)
        agent.port = int(started["listen"].rsplit(":", 1)[1])
        yield agent
    finally:
        process.save(OUT_DIR / "agent-least-privilege.log")
        for log in Path("/tmp").glob("cttrace-bcc-*.log"):  # the compiler's output, if any
            shutil.copy(log, OUT_DIR / log.name)
        shutil.rmtree(directory, ignore_errors=True)
        PERF_EVENT_PARANOID.write_text(paranoid)


def test_agent_runs_with_exactly_the_daemonsets_capabilities_and_read_only_mounts(
        confined_agent: ConfinedAgent) -> None:
    context = security_context()
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    pid = confined_agent.process.proc.pid
    assert Path(f"/proc/{pid}/exe").resolve().name.startswith("python")  # setpriv exec'd it

    status = status_fields(pid)
    want = sum(1 << CAPABILITY_BITS[cap] for cap in daemonset_capabilities())
    assert want & (1 << CAPABILITY_BITS["SYS_ADMIN"]) == 0
    for name in ("CapPrm", "CapEff", "CapBnd"):
        assert int(status[name], 16) == want, f"{name} {status[name]}, want {want:016x}"
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Uid"].split()[0] == "0"

    seen = mounts(pid)
    assert "ro" in seen["/"][1]
    tracefs = [mnt for mnt, (fstype, _) in seen.items() if fstype == "tracefs"]
    assert tracefs, f"no tracefs mounted: {sorted(seen)}"
    assert "ro" in seen["/proc/sys"][1]
    writable = sorted(mnt for mnt, (_, options) in seen.items() if "rw" in options)
    assert [mnt for mnt in writable
            if not any(mnt == top or mnt.startswith(f"{top}/") for top in WRITABLE)] == [], seen
    assert "/tmp" in writable
    assert all("ro" in seen[mnt][1] for mnt in tracefs)
    # It registered no probe in tracefs: every kprobe and kretprobe is a perf_kprobe event.
    assert kprobe_events_of(pid) == []


def test_confined_agent_attaches_the_bpf_source_and_names_the_wrong_pod(
        confined_agent: ConfinedAgent) -> None:
    agent = confined_agent.process
    started = agent.wait_for(lambda x: x.get("kind") == "agent" and x.get("msg") == "started",
                             timeout=0)
    assert started["source"] == "bpf" and started["fallback"] is None
    assert agent_http.get(confined_agent.port, "/healthz") == (200, "source attached\n")
    # Opening nf_conntrack's BTF object (for its trampolines) takes CAP_SYS_ADMIN, which the
    # DaemonSet does not grant: the conntrack hooks are the kprobe variant, and it says why.
    tcp_packet = started["hooks"]["nf_conntrack_tcp_packet"]
    assert tcp_packet["mode"] == "kprobe+kretprobe", tcp_packet
    assert "CAP_SYS_ADMIN" in tcp_packet["why"], tcp_packet
    assert started["hooks"]["tcp_connect"]["mode"] == "fentry"

    identity = confined_agent.dir / "identity-recycled-ip.jsonl"
    # Its own client port: the session's shared bpf watch sees this run too, and
    # test_watch_bpf's recycled-ip looks its findings up by flow.
    with BackgroundScenario("recycled-ip", identity_path=identity, sport=40126,
                            wait_ready=lambda: has_read(agent.proc.pid, identity)) as bg:
        point(confined_agent.link, identity)  # the lab created it: the agent follows it now
        result = bg.result(timeout=120)
        flow = result.flow.to_json()
        # Decided before the lab (and the entry with it) goes away.
        wrong_pod = agent.wait_for(lambda x: x.get("kind") == "finding"
                                   and x.get("rule") == "wrong-pod" and x.get("orig") == flow,
                                   timeout=FINDING_S)
    assert wrong_pod["severity"] == "critical" and wrong_pod["source"] == "bpf"
    assert owner(wrong_pod, "old_owner") == ref(result.old_pod)
    assert owner(wrong_pod, "new_owner") == ref(result.new_pod)
    samples = agent_http.scrape(confined_agent.port)
    assert samples[agent_http.key("cttrace_findings_total", rule="wrong-pod",
                                  severity="critical")] >= 1

    rc, _ = agent.terminate(60.0)
    assert agent.stop() == 0 == rc, agent.stderr.decode(errors="replace")[-3000:]
    assert b"Traceback" not in agent.stderr, agent.stderr.decode(errors="replace")[-3000:]
