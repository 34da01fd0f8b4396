"""The processes that live in pod namespaces: pod servers and client sessions.

Both are real processes started with ``ip netns exec``, so that a tracer sees
what it would see on a node: a connect() from a process in the client pod's
network namespace, a server in the backend pod's. They run in their own
session (no terminal signals): the lab, not a stray Ctrl-C, decides when a
pod dies, so an abrupt death is always the lab's SIGKILL.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import orjson

import cttrace
from cttrace.lab.plumbing import in_netns
from cttrace.lab.preconditions import LabError

#: How long a pod process may take to start (a Python start-up: ~0.1 s on a real CPU, seconds
#: in the VM tier's emulated guest when a scenario starts several clients at once; seen over
#: 10 s there under host load). A deadline, not a wait: a healthy start returns at once.
SERVER_START_DEADLINE_S = 30.0


def _python_module(netns: str, module: str, args: list[str]) -> list[str]:
    return in_netns(netns, [sys.executable, "-m", module, *args])


def _env() -> dict[str, str]:
    # The child must import this very cttrace, even when it is not installed.
    src = str(Path(cttrace.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": src if not path else f"{src}{os.pathsep}{path}"}


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as err:
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
            bufsize=0, start_new_session=True, env=_env(),
        )


def _read_line(proc: subprocess.Popen[bytes], deadline_s: float, what: str, log: Path) -> bytes:
    """One line from ``proc``'s stdout within ``deadline_s``, or a LabError quoting its stderr
    (the log lives in the lab's state directory, which teardown removes)."""
    stdout: IO[bytes] | None = proc.stdout
    assert stdout is not None
    ready, _, _ = select.select([stdout], [], [], deadline_s)
    line = stdout.readline() if ready else b""
    if not line.endswith(b"\n"):
        state = "exited" if proc.poll() is not None else f"said nothing for {deadline_s:g} s"
        raise LabError(f"{what} {state}{_last_words(log)}")
    return line


def _last_words(log: Path) -> str:
    """``": <last stderr line>"`` of a failed child, for its one-line error."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return f": {lines[-1]}" if lines else ""


class PodServer:
    """``python -m cttrace.lab.podserver`` in a pod namespace, listening once started."""

    def __init__(self, netns: str, ip: str, port: int, identity: str, log: Path) -> None:
        args = ["--ip", ip, "--port", str(port), "--identity", identity]
        self.proc = _spawn(_python_module(netns, "cttrace.lab.podserver", args), log)
        _read_line(self.proc, SERVER_START_DEADLINE_S, f"pod server in {netns}", log)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdout.close()
        self.proc.stdin.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL and reap: an abrupt death, no graceful shutdown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


class ClientSession:
    """``python -m cttrace.lab.podclient`` in a client pod namespace.

    It connects at once and reports the outcome (:attr:`greeting`); if the
    connection was answered it then takes commands (``send``, ``close``) and
    reports each as one JSON line. See :mod:`cttrace.lab.podclient`.
    """

    def __init__(self, netns: str, *, src: str, sport: int, dst: str, dport: int,
                 connect_timeout: float, reply_timeout: float, log: Path,
                 v4_mapped: bool = False) -> None:
        self.log = log
        args = [
            "--src", src, "--sport", str(sport), "--dst", dst, "--dport", str(dport),
            "--connect-timeout", str(connect_timeout), "--reply-timeout", str(reply_timeout),
            *(["--v4-mapped"] if v4_mapped else []),
        ]
        self.proc = _spawn(_python_module(netns, "cttrace.lab.podclient", args), log)
        # Start-up, connect timeout and the wait for the greeting, with room to spare.
        self.greeting = self._result(SERVER_START_DEADLINE_S + connect_timeout + reply_timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def connected(self) -> bool:
        return self.greeting.get("outcome") == "answered"

    def send(self, text: str, *, wait_s: float) -> dict[str, Any]:
        """Send one line; the result says whether it came back (``echo``) within ``wait_s``."""
        return self._command(f"send {wait_s} {text}", wait_s + 5.0)

    def close(self) -> dict[str, Any] | None:
        """Close the connection (FIN) and let the process exit; returns its report if it had one."""
        try:
            if self.proc.poll() is None and self.connected:
                return self._command("close", 5.0)
            return None
        finally:
            self._finish()

    def _command(self, line: str, deadline_s: float) -> dict[str, Any]:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode() + b"\n")
        except BrokenPipeError:
            raise LabError(f"client {self.pid} exited early{_last_words(self.log)}") from None
        return self._result(deadline_s)

    def _result(self, deadline_s: float) -> dict[str, Any]:
        line = _read_line(self.proc, deadline_s, f"client {self.pid}", self.log)
        result: dict[str, Any] = orjson.loads(line)
        return result

    def _finish(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        try:
            self.proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
