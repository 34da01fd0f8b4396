"""Thin wrappers over iproute2, sysctl and iptables-restore, aimed at one named netns.

The lab drives the kernel with the same commands a person would type to
inspect it afterwards (``ip -n ctl-ab12-node route``), so what it does can be
replayed and checked by hand. Every command that fails raises
:class:`~cttrace.lab.preconditions.LabError` carrying the command and its stderr.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

from cttrace.lab.ownership import claim
from cttrace.lab.preconditions import LabError
from cttrace.netns import list_named_netns


def run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    """Run ``argv``, return its stdout; raise :class:`LabError` if it fails."""
    proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LabError(f"`{shlex.join(argv)}` failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def ip_batch(netns: str, commands: Sequence[str]) -> None:
    """Run several ``ip`` commands in ``netns`` with one process (``ip -batch``)."""
    run(["ip", "-n", netns, "-batch", "-"], stdin="\n".join(commands) + "\n")


def sysctl(netns: str, settings: Mapping[str, str | int]) -> None:
    """Set sysctls in ``netns``.

    /proc/sys/net shows the namespace of the *reading* task (net/sysctl_net.c:
    net_ctl_header_lookup uses current->nsproxy->net_ns), so the writer has to
    run inside the namespace.
    """
    args = [f"{key}={value}" for key, value in settings.items()]
    run(in_netns(netns, ["sysctl", "-q", "-w", *args]))


def read_sysctl(netns: str, key: str) -> str:
    return run(in_netns(netns, ["sysctl", "-n", key])).strip()


def snmp_counters(netns: str) -> dict[str, int]:
    """The namespace's /proc/net/snmp as ``{"Tcp.OutRsts": 3, ...}`` (MIB counters are per
    network namespace and start at zero in a new one)."""
    lines = run(in_netns(netns, ["cat", "/proc/net/snmp"])).splitlines()
    counters: dict[str, int] = {}
    # The file pairs lines: "Tcp: RtoAlgorithm RtoMin ..." then "Tcp: 1 200 ...".
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        proto, _, names = header.partition(":")
        for name, value in zip(names.split(), values.partition(":")[2].split(), strict=False):
            counters[f"{proto}.{name}"] = int(value)
    return counters


def add_netns(name: str) -> None:
    """Create ``name`` and mark it as the lab's (only marked namespaces are ever removed
    by ``cttrace lab down``)."""
    run(["ip", "netns", "add", name])
    claim(name)


def lab_netns(prefix: str) -> list[str]:
    """Named network namespaces whose name starts with ``prefix``."""
    return [name for name in list_named_netns() if name.startswith(prefix)]


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is ``name`` (``ip netns pids`` scans /proc)."""
    try:
        out = run(["ip", "netns", "pids", name])
    except LabError:
        return []  # the namespace is already gone
    return [int(pid) for pid in out.split()]


def delete_netns(name: str, *, deadline_s: float = 5.0) -> None:
    """Kill every process in ``name``, wait for them to exit, then delete the namespace.

    ``ip netns del`` only removes the bind mount under /run/netns; the namespace
    itself lives on while a process is inside it. Killing first makes deletion real:
    the veths and conntrack entries of the namespace go with it.
    """
    pids = netns_pids(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_exited(pids, deadline_s=deadline_s)
    try:
        run(["ip", "netns", "del", name])
    except LabError:
        if name in list_named_netns():
            raise


def wait_exited(pids: Sequence[int], *, deadline_s: float) -> None:
    """Wait until none of ``pids`` runs any more (zombies count as exited: a task
    leaves its namespaces in exit_task_namespaces(), before it becomes a zombie)."""
    deadline = time.monotonic() + deadline_s
    pending = list(pids)
    while pending:
        pending = [pid for pid in pending if _running(pid)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise LabError(f"processes {pending} did not exit after SIGKILL")
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the parenthesised comm, which may itself contain ')'.
    return stat[stat.rindex(")") + 2] != "Z"
