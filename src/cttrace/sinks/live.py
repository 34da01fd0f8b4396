"""The interactive ``cttrace watch`` view (rich): flows, findings, a status line.

It redraws only from the pipeline's own thread (on status ticks and findings),
so it reads the correlator's tables without locks. With the bpf source the
kernel keeps the healthy entries and sends nothing of them; the view reads
those from the kernel's map at a refresh (``kept``, at most every
:data:`KEPT_S` seconds) and shows them beside the correlator's own. On a terminal it redraws in
place; into a pipe or file (``watch -o table | head``), where nothing can be
redrawn, it prints a snapshot at the start, at each finding, every
:data:`SNAPSHOT_S` seconds and at the end.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cttrace.addr import endpoint
from cttrace.correlator import Correlator, Entry
from cttrace.events import Event, state_name, status_names
from cttrace.filters import Filter
from cttrace.findings import Finding, Severity
from cttrace.identity.model import IdentityView, PodRef, ServiceRef
from cttrace.runtime import Status

_SEVERITY_STYLE = {Severity.CRITICAL: "bold white on red", Severity.WARNING: "bold yellow",
                   Severity.INFO: "cyan"}
_SHOWN_EXTRAS = frozenset({"kretprobe_misses", "trampoline_misses", "dropped_messages",
                           "malformed"})
_MAX_ROWS = 15
_MAX_FINDINGS = 8
#: Seconds between snapshots of the view when the output is not a terminal.
SNAPSHOT_S = 10.0
#: Seconds between two reads of the entries the kernel keeps (a walk of its map).
KEPT_S = 1.0


class LiveView:
    def __init__(self, correlator: Correlator, identity: IdentityView | None,
                 flt: Filter | None = None, console: Console | None = None,
                 kept: Callable[[], list[Entry]] | None = None) -> None:
        self.correlator = correlator
        self.kept = kept
        self._kept: list[Entry] = []
        self._kept_at = float("-inf")
        self.identity = identity
        self.filter = flt or Filter()
        self.console = console or Console()
        self.recent: deque[Finding] = deque(maxlen=_MAX_FINDINGS)
        self._status: Status | None = None
        self._live: Live | None = None
        self._snapshot_at = float("-inf")
        if self.console.is_terminal:
            self._live = Live(console=self.console, auto_refresh=False, transient=False)
            self._live.start()

    def say(self, text: str) -> None:
        """A line of narration printed above the live area (thread-safe: rich locks)."""
        # Text, not a str: rich would read "[fd00::5]" as markup and drop it.
        self.console.print(Text(text, style="cyan"), highlight=False)

    def finding(self, finding: Finding) -> None:
        if self.filter.finding(finding):
            self.recent.append(finding)
            self._redraw(snapshot=True)

    def event(self, event: Event) -> None:
        pass  # the table is drawn from the correlator's entries

    def status(self, status: Status) -> None:
        self._status = status
        self._redraw()

    def close(self) -> None:
        self._redraw(snapshot=True)
        if self._live is not None:
            self._live.stop()

    def _redraw(self, *, snapshot: bool = False) -> None:
        """Redraw in place; not on a terminal, print a snapshot when due (or ``snapshot``)."""
        if self._live is None:
            now = time.monotonic()
            if not snapshot and now - self._snapshot_at < SNAPSHOT_S:
                return
            self._snapshot_at = now
            self.console.print(Group(self._flows(), self._findings(), self._status_line()))
            return
        self._live.update(Group(self._flows(), self._findings(), self._status_line()),
                          refresh=True)

    def _name(self, ip: str, port: int, t: float) -> str:
        owner = self.identity.owner_at(ip, t) if self.identity else None
        return str(owner) if owner is not None else endpoint(ip, port)

    def _flows(self) -> Table:
        table = Table(title="NATed TCP flows", expand=True, title_justify="left")
        for col in ("client", "service", "backend", "state", "age", "flags"):
            table.add_column(col, no_wrap=True)
        now = time.time()
        rows = self._newest(self.correlator.entries.newest_first(), now)
        held = {entry.entry_id for entry in rows}
        kept = [e for e in self._kept_entries() if e.entry_id not in held]
        rows = sorted(rows + self._newest(kept, now), reverse=True,
                      key=lambda e: e.created or e.last_seen)[:_MAX_ROWS]
        for entry in rows:
            t = entry.created or entry.last_seen
            service: ServiceRef | None = (
                self.identity.service_for(entry.orig.dst, entry.orig.dport, t)
                if self.identity else None
            )
            unreplied = entry.replied is None
            table.add_row(
                # Text cells: a str would be parsed as markup, and "[fd00::5]:80" lost.
                Text(self._name(entry.orig.src, entry.orig.sport, t)),
                Text(str(service) if service else endpoint(entry.orig.dst, entry.orig.dport)),
                Text(self._name(entry.target[0], entry.target[1], entry.replied or now)),
                Text(state_name(entry.state), style="yellow" if unreplied else "green"),
                f"{now - t:5.1f}s",
                " ".join(status_names(entry.status)),
            )
        return table

    def _newest(self, entries: Iterable[Entry], now: float) -> list[Entry]:
        """The first :data:`_MAX_ROWS` of ``entries`` (newest first) the filter shows."""
        rows: list[Entry] = []
        for entry in entries:
            if self._show(entry, now):
                rows.append(entry)
                if len(rows) >= _MAX_ROWS:
                    break
        return rows

    def _kept_entries(self) -> list[Entry]:
        """The kernel's kept entries, newest first, read again when :data:`KEPT_S` passed."""
        if self.kept is None:
            return []
        now = time.monotonic()
        if now - self._kept_at >= KEPT_S:
            self._kept_at = now
            self._kept = sorted(self.kept(), key=lambda e: e.created or e.last_seen,
                                reverse=True)
        return self._kept

    def _show(self, entry: Entry, now: float) -> bool:
        if self.filter.empty:
            return True
        t = entry.created or entry.last_seen
        ident = self.identity
        client: PodRef | None = ident.owner_at(entry.orig.src, t) if ident else None
        backend: PodRef | None = ident.owner_at(entry.target[0], t) if ident else None
        service = ident.service_for(entry.orig.dst, entry.orig.dport, t) if ident else None
        return self.filter.flow((entry.orig.src, entry.orig.dst, entry.target[0]), client,
                                service, backend)

    def _findings(self) -> Table:
        table = Table(title="findings", expand=True, title_justify="left", show_lines=False)
        table.add_column("time", no_wrap=True)
        table.add_column("rule", no_wrap=True)
        table.add_column("what happened")
        for f in reversed(self.recent):
            table.add_row(
                time.strftime("%H:%M:%S", time.localtime(f.ts)),
                Text(f"{f.rule} {f.severity}", style=_SEVERITY_STYLE[f.severity]),
                Text(f.summary),
            )
        return table

    def _status_line(self) -> Text:
        s = self._status
        if s is None:
            return Text("attaching...", style="dim")
        # Only the source counters a person should act on; JSON status lines carry them all.
        extra = "".join(f"  {k.replace('_', ' ')} {v}" for k, v in s.extra.items()
                        if k in _SHOWN_EXTRAS and v)
        return Text(
            f"source {s.source}  events {s.events} ({s.events_per_s:.0f}/s)  lost {s.lost}  "
            f"tracked {s.tracked}  findings {s.findings}  identity {s.identity}{extra}  "
            "(Ctrl-C to stop)",
            style="bold red" if s.lost else "dim",
        )
