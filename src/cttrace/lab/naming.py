"""Names of everything the lab creates, all derived from one instance id.

Every network namespace, link and state directory of a lab carries the ``ctl``
prefix and the instance id, so that several labs (and other cttrace tests) can
run side by side on one machine, and so that ``cttrace lab down`` can find the
leftovers of a lab whose process died without tearing down. The kube-proxy
chains need no prefix: they live only inside the lab's own node namespace.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cttrace.errors import UserError

PREFIX = "ctl"

#: Where ``lab.json`` and the identity file of each instance live (a tmpfs: gone at reboot,
#: like the namespaces themselves).
STATE_ROOT = Path("/run/cttrace-lab")

#: Interface names are at most IFNAMSIZ - 1 = 15 bytes (include/uapi/linux/if.h;
#: dev_valid_name() refuses longer ones with EINVAL).
IFNAME_MAX = 15

#: 6 characters keep the longest link name (``ctl`` + 6 + ``h`` + 5-digit slot) within
#: IFNAME_MAX; lowercase because netns names show up in paths and shell commands.
_INSTANCE_RE = re.compile(r"^[a-z0-9]{1,6}$")

#: The alphabet Kubernetes uses for generated name suffixes (k8s.io/apimachinery's
#: rand.String: no vowels, no confusable digits), so generated pod names look real.
K8S_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


class InstanceError(UserError):
    """An instance id that cannot be used to name namespaces and links."""


def new_instance() -> str:
    """A fresh random instance id (4 hex digits)."""
    return secrets.token_hex(2)


def check_instance(instance: str) -> str:
    """Return ``instance`` if it is a valid id, else raise :class:`InstanceError`."""
    if not _INSTANCE_RE.match(instance):
        raise InstanceError(
            f"lab instance id {instance!r} is not 1-6 lowercase letters or digits "
            "(it becomes part of namespace and interface names, e.g. ctl-ab12-node)"
        )
    return instance


def k8s_suffix(length: int = 5) -> str:
    """A random suffix like the ones ReplicaSets give their pods (``x2x7q``)."""
    return "".join(secrets.choice(K8S_SUFFIX_ALPHABET) for _ in range(length))


def instance_of_netns(netns: str) -> str | None:
    """The instance id in a lab namespace name (``ctl-ab12-node`` -> ``ab12``), else None."""
    parts = netns.split("-", 2)
    if len(parts) == 3 and parts[0] == PREFIX and _INSTANCE_RE.match(parts[1]):
        return parts[1]
    return None


@dataclass(frozen=True, slots=True)
class LabNames:
    """All names of one lab instance."""

    instance: str

    def __post_init__(self) -> None:
        check_instance(self.instance)

    @property
    def netns_prefix(self) -> str:
        return f"{PREFIX}-{self.instance}-"

    @property
    def node_netns(self) -> str:
        return f"{self.netns_prefix}node"

    @property
    def fabric_netns(self) -> str:
        return f"{self.netns_prefix}fabric"

    def pod_netns(self, pod_name: str) -> str:
        return f"{self.netns_prefix}{pod_name}"

    @property
    def control_netns(self) -> str:
        """Where the real kube-apiserver and its etcd run (``--proxy kube-proxy`` only)."""
        return f"{self.netns_prefix}ctrl"

    @property
    def tag(self) -> str:
        """Put in iptables comments, so a ruleset dump says which lab wrote it."""
        return f"{PREFIX}-{self.instance}"

    # Links. The node ends of the fabric link and of the pod veths live in the node
    # namespace; the other ends in the fabric or pod namespace. Both ends carry the
    # prefix so that `ip -all netns exec ip link` output says whose they are.

    @property
    def fabric_link_node(self) -> str:
        return self._link("fab0")

    @property
    def fabric_link_fabric(self) -> str:
        return self._link("fab1")

    @property
    def bridge(self) -> str:
        return self._link("br")

    @property
    def control_link_node(self) -> str:
        """The node end of the link to the control-plane namespace."""
        return self._link("cp0")

    @property
    def control_link_control(self) -> str:
        return self._link("cp1")

    def pod_link_node(self, slot: int) -> str:
        """The node ("host") end of a pod's veth."""
        return self._link(f"h{slot}")

    def pod_link_pod(self, slot: int) -> str:
        """The pod end of a pod's veth (what Kubernetes calls the pod's eth0)."""
        return self._link(f"p{slot}")

    def _link(self, suffix: str) -> str:
        name = f"{PREFIX}{self.instance}{suffix}"
        if len(name) > IFNAME_MAX:
            raise InstanceError(f"interface name {name!r} is longer than {IFNAME_MAX} bytes")
        return name

    def state_dir(self, root: Path = STATE_ROOT) -> Path:
        return root / self.instance
