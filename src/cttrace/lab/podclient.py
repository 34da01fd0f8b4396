"""A client in a pod: connects from a fixed source port and reports what happened, as JSON.

Run by the lab inside the client pod's network namespace::

    ip netns exec ctl-ab12-frontend-6d8c9-k2x7p python -m cttrace.lab.podclient \\
        --src 10.0.1.10 --sport 40123 --dst 10.100.37.12 --dport 80 --connect-timeout 1.5

The socket binds ``(src, sport)`` with SO_REUSEADDR, as pooled HTTP clients and
retry loops effectively do when they land on the same ephemeral port again,
connects with a short timeout, and reads the server's first line (the pod's
identity); with ``--v4-mapped`` the IPv4 addresses go through an AF_INET6 socket
as ``::ffff:a.b.c.d``, which the kernel sends as IPv4. The first stdout line is
the outcome::

    {"event": "connect", "outcome": "answered", "line": "pod=shop/cart-...", "started": ..., ...}

``outcome`` is one of: answered, timeout (no SYN-ACK in time), silent (connected
but no greeting), closed, reset, refused, unreachable, error. When answered,
the client then reads commands on stdin, one per line, and reports each:
``send WAIT_S TEXT`` (one line out, and whether it ``echoed`` back within
WAIT_S seconds) and ``close`` (close the socket: FIN). EOF on stdin closes too.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys
import time
from typing import Any

import orjson

from cttrace.addr import is_ipv6


class _Lines:
    """Reads newline-terminated lines from a socket, each within a deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""

    def read(self, timeout: float) -> tuple[str, str | None]:
        """``(outcome, line)``: answered/timeout/closed/reset with the line when answered."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", None
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                return "timeout", None
            except ConnectionResetError:
                return "reset", None
            if not chunk:
                return "closed", None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return "answered", line.decode(errors="replace")


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
    sys.stdout.flush()


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "error"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cttrace.lab.podclient", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the client pod's IP (bound)")
    parser.add_argument("--sport", type=int, required=True, help="the fixed source port")
    parser.add_argument("--dst", required=True, help="where to connect (a Service VIP)")
    parser.add_argument("--dport", type=int, required=True)
    parser.add_argument("--v4-mapped", action="store_true",
                        help="IPv4 --src/--dst through an AF_INET6 socket, as ::ffff:a.b.c.d "
                             "(a dual-stack program reaching an IPv4 Service)")
    parser.add_argument("--connect-timeout", type=float, default=1.5)
    parser.add_argument("--reply-timeout", type=float, default=1.0,
                        help="how long to wait for the server's first line")
    args = parser.parse_args(argv)

    src, dst = args.src, args.dst
    if args.v4_mapped:
        if is_ipv6(src) or is_ipv6(dst):
            parser.error("--v4-mapped takes IPv4 --src and --dst")
        src, dst = f"::ffff:{src}", f"::ffff:{dst}"
    sock = socket.socket(socket.AF_INET6 if is_ipv6(dst) else socket.AF_INET,
                         socket.SOCK_STREAM)
    if args.v4_mapped:  # whatever net.ipv6.bindv6only says
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((src, args.sport))
    sock.settimeout(args.connect_timeout)
    report: dict[str, Any] = {"event": "connect", "started": time.time(),
                              "local": sock.getsockname()[0]}
    try:
        sock.connect((dst, args.dport))
    except OSError as exc:
        report.update(outcome=_connect_error(exc), ended=time.time(), line=None, error=str(exc))
        sock.close()
        _emit(report)
        return 0
    lines = _Lines(sock)
    outcome, line = lines.read(args.reply_timeout)
    report.update(outcome="silent" if outcome == "timeout" else outcome,
                  ended=time.time(), line=line, error=None)
    _emit(report)
    if outcome != "answered":
        sock.close()
        return 0

    for command in sys.stdin:
        verb, _, rest = command.rstrip("\n").partition(" ")
        if verb == "close":
            break
        wait_s, _, text = rest.partition(" ")
        if verb != "send":
            _emit({"event": "error", "error": f"unknown command {verb!r}"})
            continue
        sent_at = time.time()
        try:
            sock.sendall(text.encode() + b"\n")
            outcome, echo = lines.read(float(wait_s))
        except OSError as exc:
            outcome, echo = _connect_error(exc), None
        _emit({"event": "send", "text": text, "sent_at": sent_at, "ended": time.time(),
               "outcome": "echoed" if outcome == "answered" else outcome, "echo": echo})
    sock.close()
    _emit({"event": "close", "at": time.time()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
