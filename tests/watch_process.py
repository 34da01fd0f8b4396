"""Run ``cttrace watch`` (or ``agent``) as a separate process, the way a user does, and read
its JSON lines as they come.

The process writes ``--ready-file`` once its source is attached and identity is in
sync; tests wait on that file (never a sleep), generate traffic, wait for the lines they expect
with a deadline, then stop it with SIGINT and check it exits cleanly.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from cttrace.identity.model import PodRef

Line = dict[str, Any]


class WatchProcess:
    def __init__(self, args: list[str], ready_file: Path, *, command: str = "watch",
                 wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command that execs its arguments (e.g. one that drops privileges)."""
        self.ready_file = ready_file
        ready_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "cttrace", command, *args,
             "--ready-file", str(ready_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[Line] = []
        self.stderr = b""
        self._q: queue.Queue[Line | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self._q.put(orjson.loads(raw))
            except orjson.JSONDecodeError:
                self._q.put({"kind": "unparsed", "raw": raw.decode(errors="replace")})
        self._q.put(None)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_file.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"cttrace exited early ({self.proc.returncode}): {err}")
            if time.monotonic() > deadline:
                raise AssertionError("cttrace did not become ready in time")
            time.sleep(0.05)

    def wait_for(self, pred: Callable[[Line], bool], timeout: float = 60.0) -> Line:
        for line in self.lines:
            if pred(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching line within {timeout}s; got {self.lines}")
            try:
                line = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"cttrace ended first; got {self.lines}")
            self.lines.append(line)
            if pred(line):
                return line

    def findings(self, rule: str | None = None) -> list[Line]:
        return [x for x in self.lines if x.get("kind") == "finding"
                and (rule is None or x.get("rule") == rule)]

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=timeout)
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.lines.append(line)
        if self.proc.stderr is not None:
            self.stderr = self.proc.stderr.read()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def ref(pod: PodRef | None) -> dict[str, str] | None:
    """A pod as findings name it (``client``, ``old_owner``, ...), to compare with a JSON line."""
    return None if pod is None else {"namespace": pod.namespace, "name": pod.name, "uid": pod.uid}


def owner(line: Line, key: str) -> dict[str, str] | None:
    """A finding's owner field (``old_owner``/``new_owner``) without keys added later."""
    obj = line[key]
    return None if obj is None else {k: obj[k] for k in ("namespace", "name", "uid")}
