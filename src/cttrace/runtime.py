"""The loop that wires a source, identity, the correlator and sinks together.

One thread does everything on the event path: wait on the source's fd (with a
short timeout so time-driven rules still fire), feed what is ready to the
correlator, poll identity (a file follower or the API watcher's queue, both
non-blocking), hand findings to the sinks. Sinks that talk to the network
(Alertmanager) queue and never block this loop.

After each read the loop pauses for ``coalesce_s`` (:data:`COALESCE_S`) before
it waits on the fd again, so under load one wake-up takes a batch of events
instead of one or two: in the lab storm (bench/storm.py) this cut the netlink
source's CPU by nearly half at 4,000 connections/s and by a quarter at
~10,000. An event arriving after a quiet spell is still read at once; one
arriving during a burst waits at most ``coalesce_s``. The kernel buffers hold
the meantime easily: the netlink socket's is 32 MiB, a bpf perf buffer 64
pages per CPU.
"""

from __future__ import annotations

import gc
import select
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cttrace.correlator import Correlator
from cttrace.entry_table import UNREPLIED
from cttrace.errors import UserError
from cttrace.events import CtEvent, Event
from cttrace.findings import Finding
from cttrace.sources import Source

#: Pause after each read so the next one takes a batch (see the module docstring).
COALESCE_S = 0.005
#: Young-generation collection threshold on the event path (CPython's default is 700).
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a process that streams events.

    Every decoded event is a tuple the collector tracks; with CPython's default
    threshold a batch of them survives a young collection and is promoted, and
    the full collections that follow walk every tracked entry: 20-25% of the
    pipeline's time in bench/pipeline.py. Collecting the young generation every
    20,000 allocations makes it ~2% at no cost in peak memory (the events hold
    no cycles; they die by reference counting). ``gc.freeze`` moves everything
    alive at start-up (imported modules, the Kubernetes client) out of the
    collector's sight for good.
    """
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 10, 10)


class IdentityPoller(Protocol):
    """Something that applies pending identity changes to the index when polled."""

    def poll(self) -> int: ...

    @property
    def in_sync(self) -> bool: ...


@dataclass(slots=True)
class Status:
    """What the status line and the status JSON lines show."""

    ts: float
    source: str
    events: int
    events_per_s: float
    lost: int
    tracked: int
    findings: int
    identity: str  # "none", "syncing", "in sync"
    extra: dict[str, int] = field(default_factory=dict)
    #: Entries the correlator's full table evicted, by reason (cttrace.entry_table.REASONS).
    evicted: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        from cttrace.findings import rfc3339

        out: dict[str, object] = {
            "kind": "status",
            "ts": rfc3339(self.ts),
            "source": self.source,
            "events": self.events,
            "events_per_s": round(self.events_per_s, 1),
            "lost": self.lost,
            "tracked": self.tracked,
            "findings": self.findings,
            "identity": self.identity,
            "evicted": self.evicted,
        }
        out.update(self.extra)
        return out


class Sink(Protocol):
    def finding(self, finding: Finding) -> None: ...

    def event(self, event: Event) -> None: ...

    def status(self, status: Status) -> None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Periodic:
    """A check the loop runs every ``interval`` seconds (counter sampling, not events)."""

    interval: float
    check: Callable[[float], list[Finding]]
    due: float = 0.0


@dataclass(slots=True)
class Summary:
    events: int
    lost: int
    findings: Counter[str]
    seconds: float


class Pipeline:
    def __init__(
        self,
        source: Source,
        correlator: Correlator,
        sinks: Sequence[Sink],
        identity: Sequence[IdentityPoller] = (),
        *,
        clock: Callable[[], float] = time.time,
        tick_s: float = 0.1,
        status_s: float = 1.0,
        on_finding: Callable[[Finding], None] | None = None,
        periodic: Sequence[Periodic] = (),
        coalesce_s: float = COALESCE_S,
        on_warning: Callable[[dict[str, object]], None] | None = None,
    ) -> None:
        """``on_warning`` gets a ``{"kind": "warning", ...}`` object for each condition that
        loses a finding (unreplied entries evicted from a full table), once per status."""
        self.source = source
        self.correlator = correlator
        self.sinks = list(sinks)
        self.identity = list(identity)
        self.clock = clock
        self.tick_s = tick_s
        self.status_s = status_s
        self.on_finding = on_finding
        self.periodic = list(periodic)
        self.coalesce_s = coalesce_s
        self.on_warning = on_warning
        self._warned_unreplied = 0
        self.findings: Counter[str] = Counter()
        self._events = 0
        self._rate_mark = (0.0, 0)
        self._rate = 0.0

    @property
    def identity_state(self) -> str:
        if not self.identity:
            return "none"
        return "in sync" if all(p.in_sync for p in self.identity) else "syncing"

    def run(
        self,
        stop: threading.Event,
        *,
        ready_file: Path | None = None,
        duration: float | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> Summary:
        """Run until ``stop`` is set (or ``duration`` passes). The source must be open."""
        start = self.clock()
        self._rate_mark = (start, 0)
        fd = self.source.fileno()
        ready = False

        def signal_ready_once_in_sync() -> None:
            # Ready means findings will carry names: the source is attached (it is
            # open) and identity has been read to its present end, as /readyz.
            nonlocal ready
            if ready or self.identity_state == "syncing":
                return
            ready = True
            if ready_file is not None:
                try:
                    ready_file.write_text(f"{self.source.name}\n")
                except OSError as err:  # checked when parsed; the directory went since
                    raise UserError(f"cannot write --ready-file {ready_file}: "
                                    f"{err.strerror}") from None
            if on_ready is not None:
                on_ready()

        tune_gc()
        for poller in self.identity:
            poller.poll()
        signal_ready_once_in_sync()
        next_tick = next_status = start
        self._emit_status(start)
        while not stop.is_set():
            now = self.clock()
            if duration is not None and now - start >= duration:
                break
            timeout = max(0.0, min(next_tick, next_status) - now)
            readable, _, _ = select.select([fd], [], [], timeout)
            if readable:
                self._dispatch(self.source.read())
                if self.coalesce_s:
                    time.sleep(self.coalesce_s)  # let the next batch gather
            now = self.clock()
            if now >= next_tick:
                for poller in self.identity:
                    poller.poll()
                signal_ready_once_in_sync()
                now = self.clock()  # identity read just now is stamped at or before this
                self._emit(self.correlator.tick(now))
                next_tick = now + self.tick_s
                for job in self.periodic:
                    if now >= job.due:
                        job.due = now + job.interval
                        self._emit(job.check(now))
            if now >= next_status:
                self._emit_status(now)
                next_status = now + self.status_s
        # Let rules waiting on the clock see the final moment.
        self._emit(self.correlator.tick(self.clock()))
        stats = self.source.stats()
        return Summary(
            events=self._events, lost=stats.lost, findings=self.findings,
            seconds=self.clock() - start,
        )

    def _dispatch(self, events: list[Event]) -> None:
        if not events:
            return
        now = self.clock()
        feed = self.correlator.feed
        self._events += len(events)
        for ev in events:
            found = feed(ev, now)
            if isinstance(ev, CtEvent):
                for sink in self.sinks:
                    sink.event(ev)
            if found:
                self._emit(found)

    def _emit(self, found: list[Finding]) -> None:
        for finding in found:
            self.findings[str(finding.rule)] += 1
            if self.on_finding is not None:
                self.on_finding(finding)
            for sink in self.sinks:
                sink.finding(finding)

    def _emit_status(self, now: float) -> None:
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 0.5:
            self._rate = (self._events - mark_n) / (now - mark_t)
            self._rate_mark = (now, self._events)
        stats = self.source.stats()
        evicted = dict(self.correlator.entries.evicted)
        self._warn_evicted(now, evicted)
        status = Status(
            ts=now,
            source=self.source.name,
            events=self._events,
            events_per_s=self._rate,
            lost=stats.lost,
            tracked=len(self.correlator.entries),
            findings=sum(self.findings.values()),
            identity=self.identity_state,
            extra=dict(stats.extra),
            evicted=evicted,
        )
        for sink in self.sinks:
            sink.status(status)

    def _warn_evicted(self, now: float, evicted: dict[str, int]) -> None:
        lost = evicted.get(UNREPLIED, 0)
        if lost <= self._warned_unreplied or self.on_warning is None:
            return
        from cttrace.findings import rfc3339

        limit = self.correlator.entries.limit
        self.on_warning({
            "kind": "warning", "ts": rfc3339(now), "reason": "evicted-unreplied",
            "evicted_unreplied": lost - self._warned_unreplied, "total": lost,
            "msg": f"{lost - self._warned_unreplied} unreplied entries evicted: the "
                   f"correlator's table is full ({limit} entries) of entries rules still "
                   "need; late-establish and wrong-pod cannot fire for them",
        })
        self._warned_unreplied = lost
