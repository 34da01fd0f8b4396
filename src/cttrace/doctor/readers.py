"""Where the checks get their facts: sysctls, conntrack counters, links, command output.

Checks talk only to the small :class:`NodeReader` interface, so unit tests
hand in fixture values and run without root; :class:`LiveReader` reads the
real kernel, in the current or in a named network namespace.

Inside a named namespace every read runs with the calling thread switched
into it (:func:`cttrace.netns.entered_netns`). What follows the thread there:

* ``/proc/sys/net/...``: the sysctl tree is resolved per opener
  (``net_ctl_header_lookup()``/``net_ctl_is_seen()`` use ``current->nsproxy``).
* ``/proc/thread-self/net/...``; but not ``/proc/net``, which resolves through
  the thread-group leader.
* Child processes (``iptables-save``, ``nft``, ``ip``): a forked child copies
  the calling thread's namespaces (``copy_namespaces()``).

``/sys/class/net`` does NOT follow: sysfs shows the network namespace of
whoever mounted it (its namespace tag is taken at mount time), so links are
listed with ``ip -j -d link show`` instead.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import orjson

from cttrace.ctstats import ConntrackStatsError, read_conntrack_stats
from cttrace.netns import entered_netns

_T = TypeVar("_T")


class ReadError(Exception):
    """A fact exists but could not be read; ``str(err)`` becomes an ``error`` verdict's summary."""


@dataclass(frozen=True, slots=True)
class CommandOutput:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_line(self) -> str:
        """The first line of stderr, or the exit status when stderr is empty."""
        for line in self.stderr.splitlines():
            if line.strip():
                return line.strip()
        return f"exit status {self.returncode}"


class NodeReader(Protocol):
    netns: str | None

    def sysctl(self, name: str) -> str | None:
        """Value of sysctl ``name`` (``net.ipv4.tcp_tw_reuse``), stripped; None when it does
        not exist (its module is not loaded). Raises ReadError when it exists but is unreadable."""
        ...

    def conntrack_stats(self) -> dict[str, int]:
        """``/proc/net/stat/nf_conntrack`` summed over CPUs. Raises ReadError."""
        ...

    def bridge_ports(self) -> dict[str, list[str]]:
        """Every bridge and the names of its ports. Raises ReadError."""
        ...

    def run(self, argv: Sequence[str]) -> CommandOutput | None:
        """Run a command in the audited namespace; None when the program is not installed."""
        ...


def parse_ip_links(text: str) -> dict[str, list[str]]:
    """Bridges and their ports from ``ip -j -d link show`` output."""
    links = orjson.loads(text)
    if not isinstance(links, list):
        raise ValueError("ip -j link output is not a list")
    bridges: dict[str, list[str]] = {}
    for link in links:
        if link.get("linkinfo", {}).get("info_kind") == "bridge":
            bridges[link["ifname"]] = []
    for link in links:
        master = link.get("master")
        if master in bridges and link.get("linkinfo", {}).get("info_slave_kind") == "bridge":
            bridges[master].append(link["ifname"])
    return bridges


def parse_ipv6_links(text: str) -> set[str]:
    """Interfaces with a global IPv6 address, from ``ip -j -6 addr show scope global``
    output (unique-local fd00::/8 addresses are scope global too)."""
    links = orjson.loads(text)
    if not isinstance(links, list):
        raise ValueError("ip -j addr output is not a list")
    return {link["ifname"] for link in links
            if any(a.get("family") == "inet6" and a.get("scope") == "global"
                   for a in link.get("addr_info", []))}


def _read_sysctl(name: str) -> str | None:
    path = "/proc/sys/" + name.replace(".", "/")
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReadError(f"cannot read {path}: {exc.strerror}") from None


def _run(argv: tuple[str, ...], timeout_s: float) -> CommandOutput | None:
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError:
        return None
    except subprocess.TimeoutExpired:
        raise ReadError(f"`{' '.join(argv)}` did not finish within {timeout_s:g} s") from None
    return CommandOutput(argv, proc.returncode, proc.stdout, proc.stderr)


class LiveReader:
    """Reads this machine's kernel, inside network namespace ``netns`` when given.

    Raises :class:`cttrace.netns.NetnsError` or :class:`cttrace.errors.NotRootError`
    at once when the namespace cannot be entered.
    """

    def __init__(self, netns: str | None = None, command_timeout_s: float = 20.0) -> None:
        self.netns = netns
        self._timeout_s = command_timeout_s
        with entered_netns(netns):  # fail here, before any check runs
            pass

    def _call(self, fn: Callable[..., _T], *args: object) -> _T:
        with entered_netns(self.netns):
            return fn(*args)

    def sysctl(self, name: str) -> str | None:
        return self._call(_read_sysctl, name)

    def conntrack_stats(self) -> dict[str, int]:
        try:
            # netns=None: the thread is already inside the namespace.
            return self._call(read_conntrack_stats)
        except ConntrackStatsError as exc:
            raise ReadError(str(exc)) from None

    def bridge_ports(self) -> dict[str, list[str]]:
        out = self.run(("ip", "-j", "-d", "link", "show"))
        if out is None:
            raise ReadError("`ip` (iproute2) is not installed: cannot list bridges")
        if out.returncode != 0:
            raise ReadError(f"`ip -j -d link show` failed: {out.error_line}")
        try:
            return parse_ip_links(out.stdout)
        except (ValueError, KeyError, AttributeError) as exc:
            raise ReadError(f"unexpected `ip -j -d link show` output: {exc}") from None

    def run(self, argv: Sequence[str]) -> CommandOutput | None:
        return self._call(_run, tuple(argv), self._timeout_s)
