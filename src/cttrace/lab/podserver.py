"""A pod's server: answers every TCP connection with one line naming the pod, then echoes.

Run by the lab inside a pod's network namespace::

    ip netns exec ctl-ab12-ledger-5c8f9-x2x7q python -m cttrace.lab.podserver \\
        --ip 10.0.1.12 --port 8080 --identity "pod=billing/ledger-5c8f9-x2x7q uid=..."

The first line a client reads is the pod's identity, so a test or a person can
tell from the client side alone which pod a connection really reached. After
that, each line the client sends comes back, which keeps a long-lived
connection observable. "listening" on stdout tells the lab the socket is ready.
"""

from __future__ import annotations

import argparse
import socket
import socketserver
import sys

from cttrace.addr import endpoint, is_ipv6


class _Handler(socketserver.StreamRequestHandler):
    identity: bytes = b""

    def handle(self) -> None:
        try:
            self.wfile.write(self.identity)
            for line in self.rfile:
                self.wfile.write(line)
        except ConnectionError:
            pass  # the client reset or vanished; nothing to report


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cttrace.lab.podserver", description=__doc__)
    parser.add_argument("--ip", required=True, help="the pod IP to listen on")
    parser.add_argument("--port", type=int, required=True, help="the container port")
    parser.add_argument("--identity", required=True, help="the line sent first on each connection")
    args = parser.parse_args(argv)

    handler = type("Handler", (_Handler,), {"identity": args.identity.encode() + b"\n"})
    server_class = _Server6 if is_ipv6(args.ip) else _Server
    with server_class((args.ip, args.port), handler) as server:
        print(f"listening {endpoint(args.ip, args.port)}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
