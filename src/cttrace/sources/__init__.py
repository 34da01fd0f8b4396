"""Kernel sources: turn kernel facts into :mod:`cttrace.events` records.

Every source has the same small shape, so the runtime loop drives any of them:
``open()`` attaches (raising :class:`cttrace.errors.SourceError` with the exact
reason), ``fileno()`` is pollable, ``read()`` returns whatever is ready without
blocking, ``stats()`` reports counters, ``close()`` detaches and is idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cttrace.events import Event


@dataclass(slots=True)
class SourceStats:
    events: int = 0  # events delivered to the correlator
    lost: int = 0  # events the source knows it missed (ENOBUFS, perf buffer)
    resyncs: int = 0  # table dumps after loss
    filtered: int = 0  # events seen but dropped as irrelevant (non-TCP, un-NATed)
    # source-specific counters (kretprobe misses, ...)
    extra: dict[str, int] = field(default_factory=dict)
    # how each kernel hook is attached and why: {"tcp_connect": ("fentry", "kernel BTF")}
    hooks: dict[str, tuple[str, str]] = field(default_factory=dict)


class Source(Protocol):
    name: str

    def open(self) -> None: ...

    def fileno(self) -> int: ...

    def read(self) -> list[Event]: ...

    def stats(self) -> SourceStats: ...

    def close(self) -> None: ...


def hooks_json(stats: SourceStats) -> dict[str, object]:
    """``{"hooks": {function: {"mode": ..., "why": ...}}}`` for the ``source`` line; {} for a
    source without kernel hooks."""
    if not stats.hooks:
        return {}
    return {"hooks": {fn: {"mode": mode, "why": why} for fn, (mode, why) in stats.hooks.items()}}
