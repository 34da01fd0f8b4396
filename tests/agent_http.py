"""What the cluster sees of ``cttrace agent``: its HTTP endpoint, read over HTTP.

Shared by the kernel tier (tests/kernel/test_agent_e2e.py, the netlink source) and
the VM tier (tests/vm/test_agent_bpf.py, the bpf source).
"""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

#: One scrape: {(metric sample name, sorted labels): value}.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` on the agent at 127.0.0.1:``port``: (HTTP status, body)."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def scrape(port: int) -> Samples:
    """``/metrics`` scraped over HTTP and parsed back with Prometheus' own parser."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The :data:`Samples` key of one series."""
    return name, tuple(sorted(labels.items()))
