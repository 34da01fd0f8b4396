"""How an address and port are written wherever a person reads them.

An IPv6 address contains colons, so ``fd00:100::7:7:443`` cannot be read: is
443 a port or the address's last group? RFC 3986 (section 3.2.2) and RFC 5952
(section 6) write it ``[fd00:100::7:7]:443``, as curl, ss and kubectl do. Every
summary, live-view cell, explain line, alert annotation and lab narration goes
through :func:`endpoint` so that all of them agree; JSON fields keep the bare
address (``{"ip": ..., "port": ...}``), which needs no brackets.
"""

from __future__ import annotations

import socket

from cttrace.events import Flow


def is_ipv6(ip: str) -> bool:
    """Whether ``ip`` (canonical text, as the sources print it) is an IPv6 address."""
    return ":" in ip


def canonical(text: str) -> str:
    """``text`` as ``inet_ntop`` writes it (``FD00:0::5`` -> ``fd00::5``), the form every
    source prints kernel addresses in; ValueError when it is not an IP address."""
    family = socket.AF_INET6 if is_ipv6(text) else socket.AF_INET
    try:
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except OSError:
        raise ValueError(f"{text!r} is not an IP address") from None


def endpoint(ip: str, port: int | str) -> str:
    """``10.0.0.5:443``, ``[fd00::5]:443``."""
    return f"[{ip}]:{port}" if is_ipv6(ip) else f"{ip}:{port}"


def flow_text(flow: Flow, arrow: str = " -> ") -> str:
    """``10.0.0.5:40000 -> 10.96.0.10:80`` (IPv6 addresses in brackets)."""
    return f"{endpoint(flow.src, flow.sport)}{arrow}{endpoint(flow.dst, flow.dport)}"
