"""Finding and removing labs: one instance, or every leftover on the machine.

A lab normally tears itself down (context manager, try/finally, signals). This
module is also what ``cttrace lab down`` uses after a lab process was killed
with SIGKILL or the machine's power went: it needs nothing but the names, so
it works without the process that built the lab.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cttrace.errors import UserError
from cttrace.lab.naming import PREFIX, STATE_ROOT, LabNames, check_instance, instance_of_netns
from cttrace.lab.ownership import owned
from cttrace.lab.plumbing import delete_netns, lab_netns

STATE_FILE = "lab.json"


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    instance: str
    netns: tuple[str, ...]
    state: dict[str, Any]  # lab.json, empty when missing or unreadable

    @property
    def owner_alive(self) -> bool:
        """Whether the process that built the lab still runs (False for leftovers)."""
        pid = self.state.get("pid")
        if not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def write_state(names: LabNames, state: dict[str, Any], root: Path = STATE_ROOT) -> None:
    directory = names.state_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def list_instances(root: Path = STATE_ROOT) -> list[InstanceInfo]:
    """Every lab instance that has a namespace it created (:mod:`ownership`) or a state
    directory here. Namespaces that only look like a lab's are not listed."""
    by_instance: dict[str, list[str]] = {}
    for netns in lab_namespaces(f"{PREFIX}-", root):
        instance = instance_of_netns(netns)
        if instance is not None:
            by_instance.setdefault(instance, []).append(netns)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and _is_instance(entry.name):
                by_instance.setdefault(entry.name, [])
    return [
        InstanceInfo(instance, tuple(sorted(netns)), _read_state(root / instance))
        for instance, netns in sorted(by_instance.items())
    ]


def _read_state(directory: Path) -> dict[str, Any]:
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _is_instance(name: str) -> bool:
    try:
        check_instance(name)
    except UserError:
        return False
    return True


def lab_namespaces(prefix: str, root: Path = STATE_ROOT) -> list[str]:
    """The namespaces named ``prefix...`` that a lab created: never anyone else's."""
    return [netns for netns in lab_netns(prefix) if owned(netns, root)]


def remove_instance(names: LabNames, root: Path = STATE_ROOT) -> list[str]:
    """Kill every process in the namespaces the instance created, delete them, remove its
    state dir. Namespaces that only carry its prefix (another user's) are left alone.

    Pod namespaces go first and node and fabric last, so that no pod is ever
    left routed to a node that no longer exists. Returns the deleted namespaces.
    """
    infrastructure = {names.node_netns, names.fabric_netns}
    found = lab_namespaces(names.netns_prefix, root)
    ordered = sorted(found, key=lambda netns: netns in infrastructure)
    for netns in ordered:
        delete_netns(netns)
    shutil.rmtree(names.state_dir(root), ignore_errors=True)
    return ordered


def remove_all(root: Path = STATE_ROOT) -> list[str]:
    """``remove_instance`` for every lab instance found; returns the instances removed."""
    instances = [info.instance for info in list_instances(root)]
    for instance in instances:
        remove_instance(LabNames(instance), root)
    return instances


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM while the block runs, so a second Ctrl-C cannot cut a teardown
    short. Only the main thread may change signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt


@contextmanager
def signals_interrupt() -> Iterator[None]:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt in the main thread for the block, so
    that ``kill`` runs the same finally blocks, and teardown, as Ctrl-C does.

    SIGINT is set explicitly too: a process started in the background by a
    non-interactive shell inherits SIGINT ignored, and Python then leaves it so.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
