"""Which network namespaces the lab itself created, so that cleanup removes only those.

Why it exists: a lab's namespaces follow a name pattern (``ctl-<instance>-<pod>``),
but a name is no proof of whose a namespace is: another user, tool or test may
create ``ctl-ab12-web`` for reasons of its own. ``cttrace lab down`` runs without
the process that built the lab (it was killed), so it cannot ask that process;
instead the lab marks every namespace the moment it creates it: a file named
after the namespace under the instance's state directory, holding the
namespace's inode number (``ns.inum``, what ``stat /run/netns/<name>`` reports).
Cleanup removes a namespace only when its mark is there and names the namespace
that has that name now: a namespace deleted by someone else and re-created
under the same name by another user carries a new inode, so it is not ours.
"""

from __future__ import annotations

from pathlib import Path

from cttrace.errors import UserError
from cttrace.lab.naming import STATE_ROOT, instance_of_netns
from cttrace.netns import netns_inode

#: The marks' directory inside an instance's state directory.
MARKS = "netns"


def _mark(netns: str, root: Path) -> Path:
    instance = instance_of_netns(netns)
    if instance is None:
        raise ValueError(f"{netns!r} is not a lab namespace name (ctl-<instance>-<name>)")
    return root / instance / MARKS / netns


def claim(netns: str, root: Path = STATE_ROOT) -> None:
    """Mark ``netns``, just created by the lab, as the lab's."""
    mark = _mark(netns, root)
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.write_text(f"{netns_inode(netns)}\n")


def owned(netns: str, root: Path = STATE_ROOT) -> bool:
    """Whether ``netns`` is a namespace the lab created (and it still exists)."""
    try:
        marked = int(_mark(netns, root).read_text())
        return netns_inode(netns) == marked
    except (OSError, ValueError, UserError):
        return False  # no mark, a garbled one, not a lab name, or the namespace is gone
