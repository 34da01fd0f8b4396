"""The agent's small HTTP endpoint: ``/metrics``, ``/healthz`` and ``/readyz``.

Why it exists: Prometheus scrapes ``/metrics`` and the kubelet probes the other
two, all on one port (``--listen``). The agent runs with hostNetwork, so the
port is taken on the node itself; the default, :data:`DEFAULT_PORT` (19808), sits
outside the Prometheus exporter range 9100-9999 (fully allocated, e.g. 9808 is the
CSI livenessprobe's), outside the NodePort range 30000-32767 and below Linux's
ephemeral range (32768-60999), so it collides with neither exporters, Services
nor outgoing connections.

* ``/healthz``: 200 while ``healthy()`` says so (process alive, sources attached),
  else 503 with the reason: the liveness probe restarts an agent whose probes fell off.
* ``/readyz``: 200 while ``ready()`` says so (attached and identity in sync), else
  503 with the reason: the pod is not Ready until findings can name pods.

Standard library only (``http.server``); exposition comes from prometheus_client,
which also negotiates OpenMetrics from the Accept header.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from cttrace.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_PORT = 19808
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"

#: A probe: ``(ok, text)``; the text is the response body (the reason when not ok).
Check = Callable[[], tuple[bool, str]]


class ListenError(UserError):
    """``--listen`` cannot be parsed or bound."""


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port). Accepts ``:19808`` (all IPv4) and ``[::]:19808``."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ListenError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenError(f"--listen {text!r}: put an IPv6 address in brackets, e.g. [::]:"
                          f"{DEFAULT_PORT}")
    return (host or "0.0.0.0", int(port_text))


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a stuck scrape never holds up the agent's exit
    allow_reuse_address = True  # rebind at once after a restart (TIME_WAIT sockets)


class _Handler(BaseHTTPRequestHandler):
    # Set per server by AgentHTTPServer (a subclass per instance).
    registry: ClassVar[CollectorRegistry]
    healthy: ClassVar[Check]
    ready: ClassVar[Check]

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(self.registry), content_type)
        elif path == "/healthz":
            self._probe(type(self).healthy)
        elif path == "/readyz":
            self._probe(type(self).ready)
        else:
            self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _probe(self, check: Check) -> None:
        try:
            ok, text = check()
        except Exception as err:  # a probe that raises is a failing probe, not a 500
            ok, text = False, f"check failed: {err!r}"
        self._reply(200 if ok else 503, (text or ("ok" if ok else "not ok")).encode() + b"\n")

    def _reply(self, status: int, body: bytes,
               content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s %s", self.address_string(), format % args)


class AgentHTTPServer:
    """Serves ``registry`` and the two probes on ``listen`` from a daemon thread."""

    def __init__(self, listen: str, registry: CollectorRegistry, *,
                 healthy: Check, ready: Check) -> None:
        self._host, self._port = parse_listen(listen)
        self._handler = type("CttraceHandler", (_Handler,), {
            "registry": registry,
            "healthy": staticmethod(healthy),
            "ready": staticmethod(ready),
        })
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when ``--listen`` asked for port 0."""
        if self._server is None:
            return (self._host, self._port)
        host, port = self._server.server_address[:2]
        return (str(host), int(port))

    def start(self) -> None:
        """Bind and serve; raises :class:`ListenError` if the address cannot be bound."""
        with self._lock:
            if self._server is not None:
                return
            server_class = type("_Server", (_Server,), {
                "address_family": socket.AF_INET6 if ":" in self._host else socket.AF_INET,
            })
            try:
                server = server_class((self._host, self._port), self._handler)
            except OSError as err:
                raise ListenError(
                    f"cannot listen on {self._host}:{self._port}: {err.strerror}; "
                    "pick another --listen"
                ) from None
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever,
                                            kwargs={"poll_interval": 0.2},
                                            name="cttrace-http", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket. Idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()  # returns once serve_forever() has left its loop
        server.server_close()
        if thread is not None:
            thread.join()
