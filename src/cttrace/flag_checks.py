"""Checks of command-line values that the type alone does not catch, run while parsing.

Why it exists: a value that is wrong must stop the command before it attaches to
the kernel, with one line naming the flag (a :class:`UserError`: exit code 2), not
as a traceback seconds into a healthy run (a ``--ready-file`` in a missing
directory used to fail only once identity was in sync) and not silently
(``--ip 999.1.1.1`` used to filter out everything). Each function is a typer
``callback``: it gets the parsed value and returns it, or raises
:class:`FlagError`.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from cttrace.errors import UserError


class FlagError(UserError):
    """A command-line value that cannot work; the message names the flag."""


def ready_file(path: Path | None) -> Path | None:
    """The file's directory must exist and be writable, and the path must not be a directory."""
    if path is None:
        return None
    parent = path.parent
    if not parent.is_dir():
        raise FlagError(f"--ready-file {path}: directory {parent} does not exist")
    if path.is_dir():
        raise FlagError(f"--ready-file {path} is a directory; give a file path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FlagError(f"--ready-file {path}: directory {parent} is not writable")
    return path


def duration(value: float | None) -> float | None:
    """``--duration``: None (no limit) or more than 0 seconds."""
    if value is not None and not value > 0:  # also refuses NaN
        raise FlagError(f"--duration {value:g}: give a number of seconds greater than 0")
    return value


def ip_addresses(values: list[str] | None) -> list[str] | None:
    """Each ``--ip`` is an IPv4 or IPv6 address (in its canonical spelling)."""
    if not values:
        return values
    out = []
    for text in values:
        try:
            out.append(str(ipaddress.ip_address(text.strip())))
        except ValueError:
            raise FlagError(f"--ip {text!r} is not an IPv4 or IPv6 address") from None
    return out


def node_name(value: str | None) -> str | None:
    """A node name is not empty (it becomes the ``node`` label of every alert)."""
    if value is not None and not value.strip():
        raise FlagError("--node must not be empty (default: $NODE_NAME, else the host name)")
    return value.strip() if value is not None else None


def listen_address(value: str) -> str:
    """``HOST:PORT`` as the agent's HTTP server parses it."""
    from cttrace.http_server import parse_listen

    parse_listen(value)  # its ListenError names the flag
    return value


def alertmanager_urls(values: list[str] | None) -> list[str] | None:
    """Each ``--alertmanager-url`` is an http(s) URL with a host."""
    from cttrace.sinks.alertmanager import alerts_url

    for url in values or []:
        alerts_url(url)  # its AlertmanagerConfigError names the flag
    return values
