"""What the lab needs from the machine, checked before anything is created.

Each check fails with one line that says what to install or do, so that a
missing binary never shows up as a traceback halfway through building a node.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cttrace.errors import NotRootError, UserError


class LabError(UserError):
    """The lab cannot be built or run here; the message says why and what to do."""


#: Binaries the lab runs, and the Debian package that ships each.
TOOLS: dict[str, str] = {
    "ip": "iproute2",
    "iptables-restore": "iptables",
    "conntrack": "conntrack",
    "sysctl": "procps",
}

#: Present once br_netfilter is loaded (built in, or `modprobe br_netfilter`); per network
#: namespace since Linux 5.3 (net/bridge/br_netfilter_hooks.c: brnf_init_net).
BRIDGE_NF_SYSCTL = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


def require_root(what: str = "cttrace lab") -> None:
    """Creating namespaces, links and iptables rules needs CAP_SYS_ADMIN and CAP_NET_ADMIN."""
    if os.geteuid() != 0:
        raise NotRootError(what)


def require_tools(tools: dict[str, str] = TOOLS) -> None:
    missing = [(tool, package) for tool, package in tools.items() if shutil.which(tool) is None]
    if missing:
        names = ", ".join(f"`{tool}`" for tool, _ in missing)
        packages = " ".join(sorted({package for _, package in missing}))
        raise LabError(
            f"the lab needs {names} on PATH: install them with `apt-get install {packages}`"
        )


def require_br_netfilter() -> None:
    """Make bridge-nf-call-iptables exist, loading br_netfilter if it is a module."""
    if BRIDGE_NF_SYSCTL.exists():
        return
    modprobe = shutil.which("modprobe")
    if modprobe is not None:
        subprocess.run([modprobe, "br_netfilter"], capture_output=True, check=False)
    if not BRIDGE_NF_SYSCTL.exists():
        raise LabError(
            f"{BRIDGE_NF_SYSCTL} does not exist: the bridge scenario needs br_netfilter "
            "(`modprobe br_netfilter`; kernel option CONFIG_BRIDGE_NETFILTER)"
        )
