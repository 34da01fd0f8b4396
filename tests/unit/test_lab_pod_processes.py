"""The pod server and client the lab runs in pod namespaces, exercised on loopback (no root)."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

IDENTITY = "pod=billing/ledger-5c8f9-x2x7q uid=0b7e4a52-0000-4000-8000-000000000001 ip=127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server_port() -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cttrace.lab.podserver", "--ip", "127.0.0.1", "--port", str(port),
         "--identity", IDENTITY],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        assert ready, "pod server did not say it listens"
        assert proc.stdout.readline() == f"listening 127.0.0.1:{port}\n".encode()
        yield port
    finally:
        proc.kill()
        proc.wait()


def _client(port: int, sport: int, commands: str = "", *extra: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [sys.executable, "-m", "cttrace.lab.podclient", "--src", "127.0.0.1", "--sport",
         str(sport), "--dst", "127.0.0.1", "--dport", str(port), "--connect-timeout", "2",
         *extra],
        input=commands.encode(), capture_output=True, check=True, timeout=30,
    ).stdout
    return [orjson.loads(line) for line in out.splitlines()]


def test_the_client_reads_the_pods_identity_then_its_lines_come_back(server_port: int) -> None:
    connect, send, close = _client(server_port, _free_port(), "send 2.0 order 1\nclose\n")
    assert connect["event"] == "connect" and connect["outcome"] == "answered"
    assert connect["line"] == IDENTITY
    assert connect["started"] <= connect["ended"]
    assert (send["outcome"], send["echo"]) == ("echoed", "order 1")
    assert close["event"] == "close"


def test_a_v4_mapped_client_reaches_an_ipv4_server_from_an_ipv6_socket(
    server_port: int,
) -> None:
    """--v4-mapped: an AF_INET6 socket bound to ::ffff:SRC, as a dual-stack program is;
    the IPv4 server answers it (the kernel speaks IPv4 for it)."""
    connect, _ = _client(server_port, _free_port(), "", "--v4-mapped")
    assert connect["outcome"] == "answered" and connect["line"] == IDENTITY
    assert connect["local"] == "::ffff:127.0.0.1"
    (plain, _) = _client(server_port, _free_port())
    assert plain["local"] == "127.0.0.1"


def test_end_of_input_closes_a_one_shot_connection(server_port: int) -> None:
    reports = _client(server_port, _free_port())
    assert [r["event"] for r in reports] == ["connect", "close"]


def test_a_closed_port_is_reported_as_refused() -> None:
    (connect,) = _client(_free_port(), _free_port())
    assert connect["outcome"] == "refused" and connect["line"] is None


def test_the_client_connects_from_the_source_port_it_was_given() -> None:
    sport = _free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "cttrace.lab.podclient", "--src", "127.0.0.1", "--sport",
             str(sport), "--dst", "127.0.0.1", "--dport", str(port), "--reply-timeout", "5"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        listener.settimeout(10.0)
        conn, peer = listener.accept()
        with conn:
            conn.sendall(b"pod=shop/cart-7d9f8-w5n4t\n")
            out, _ = proc.communicate(timeout=10)
    assert peer == ("127.0.0.1", sport)
    assert orjson.loads(out.splitlines()[0])["line"] == "pod=shop/cart-7d9f8-w5n4t"


def test_a_server_that_says_nothing_is_reported_as_silent() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "cttrace.lab.podclient", "--src", "127.0.0.1", "--sport",
             str(_free_port()), "--dst", "127.0.0.1", "--dport", str(port),
             "--reply-timeout", "0.2"],
            stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=30,
        ).stdout
    assert orjson.loads(out.splitlines()[0])["outcome"] == "silent"
