"""``--source auto|netlink|bpf``: open the source a user asked for, or the best one that works.

``auto`` prefers the BCC source (socket identity, in-kernel filtering) and falls
back to ctnetlink with one line saying exactly why.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from cttrace.errors import SourceError, UserError
from cttrace.netns import netns_inode
from cttrace.sources import Source


class SourceKind(StrEnum):
    """What ``--source`` accepts."""

    AUTO = "auto"
    NETLINK = "netlink"
    BPF = "bpf"


if TYPE_CHECKING:
    from cttrace.sources.bpf import BpfSettings


KINDS = tuple(str(kind) for kind in SourceKind)


def _open_netlink(netns: str | None) -> Source:
    from cttrace.sources.netlink import NetlinkSource

    src = NetlinkSource(netns=netns)
    src.open()
    return src


def _open_bpf(netns: str | None, settings: BpfSettings | None) -> Source:
    from cttrace.sources.bpf import BpfSource

    src: Source = BpfSource(netns_ino=netns_inode(netns) if netns else None, settings=settings)
    src.open()
    return src


def open_source(kind: str, netns: str | None,
                bpf: BpfSettings | None = None) -> tuple[Source, str | None]:
    """Open and return ``(source, note)``; ``note`` says why ``auto`` fell back, else None.

    ``bpf``: how to build the bpf source (what it sends to userspace; see
    :func:`cttrace.sources.bpf.settings_for_rules`).
    """
    if kind == SourceKind.NETLINK:
        return _open_netlink(netns), None
    if kind == SourceKind.BPF:
        return _open_bpf(netns, bpf), None
    if kind != SourceKind.AUTO:
        raise UserError(f"unknown source {kind!r}: choose from {', '.join(KINDS)}")
    try:
        return _open_bpf(netns, bpf), None
    except SourceError as err:
        reason = str(err)
    except ImportError as err:  # bcc not installed
        reason = f"BCC is not installed ({err}; apt install python3-bpfcc)"
    return _open_netlink(netns), f"bpf source unavailable: {reason}; using netlink"
