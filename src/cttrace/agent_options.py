"""What ``cttrace agent`` can be told, with its defaults: their one definition.

A module of its own so that the command line reads these defaults without
importing the agent itself (Prometheus client, HTTP server: ~100 ms of start-up
that ``cttrace --help`` and every other command would pay).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cttrace.assemble import TraceOptions


@dataclass(slots=True)
class AgentOptions(TraceOptions):
    listen: str = "0.0.0.0:19808"
    """HOST:PORT of /metrics, /healthz and /readyz (19808: cttrace's port)."""
    alertmanager_urls: list[str] = field(default_factory=list)
    node: str = ""
    """Empty: $NODE_NAME, else the host name."""
    generator_url: str = ""
    resend_interval: float = 60.0
    """Seconds between re-sends of an active alert: below Alertmanager's resolve_timeout (5m)."""
    alert_hold: float = 300.0
    alert_queue: int = 10_000
    basic_auth: tuple[str, str] | None = None
    bearer_token: str | None = None
    ca_file: str | None = None
    shutdown_deadline: float = 10.0


#: Every default, for the command line's options.
DEFAULTS = AgentOptions()
