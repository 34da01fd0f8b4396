"""``--remediate``: delete conntrack entries whose DNAT decision went stale before any reply.

An unreplied entry (SYN_SENT) still carries the DNAT target chosen when the
client's first SYN passed; if that pod is gone, or the target is no longer an
endpoint of the Service, the client's next SYN from the same port would follow
the stale decision (to the void, or to whoever got the IP). Deleting the entry
makes the next SYN traverse kube-proxy's rules again and get a fresh decision.

Scope is deliberately narrow: only entries that never saw a reply. Replied and
established entries are never touched, so graceful termination keeps draining
(this is why kube-proxy itself refuses to flush TCP entries). Deletions are
rate-limited, each one is logged, and the kernel delete names the exact entry
(tuple and CTA_ID), so a newer entry on the same tuple is never hit.
"""

from __future__ import annotations

import collections
import errno as _errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cttrace.correlator import Correlator, Entry
from cttrace.entry_table import Key as _Key
from cttrace.findings import Finding, rfc3339
from cttrace.identity.model import IdentityView
from cttrace.rules import UNREPLIED_TCP_STATES

#: States in which no reply was seen; None: the source reported no state.
_UNREPLIED_STATES: frozenset[int | None] = frozenset({None, *UNREPLIED_TCP_STATES})


class Mode(StrEnum):
    """What ``--remediate`` accepts."""

    OFF = "off"
    DRY_RUN = "dry-run"
    ON = "on"


def stale_reason(entry: Entry, identity: IdentityView, now: float) -> str | None:
    """Why ``entry``'s DNAT decision is stale, or None when it must be left alone."""
    if entry.replied is not None or entry.created is None or entry.state not in _UNREPLIED_STATES:
        return None
    ip = entry.target[0]
    chosen = identity.owner_at(ip, entry.created)
    holder = identity.owner_at(ip, now)
    if chosen is not None and (holder is None or holder.uid != chosen.uid):
        return f"pod {chosen} no longer holds {ip}"
    service = identity.service_for(entry.orig.dst, entry.orig.dport, entry.created)
    if service is not None and chosen is not None and identity.is_endpoint(
        service, ip, now, now, chosen.uid
    ) is False:
        return f"{ip} is no longer an endpoint of Service {service}"
    if chosen is None and holder is None and any(
        o.since <= entry.created for o in identity.ownerships(ip)
    ):
        return f"no pod holds {ip} any more"
    return None


@dataclass(frozen=True, slots=True)
class Remediation:
    ts: float
    action: str  # deleted | would-delete | failed
    entry: Entry
    reason: str
    errno: int = 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "kind": "remediation",
            "ts": rfc3339(self.ts),
            "action": self.action,
            "entry_id": self.entry.entry_id,
            "orig": self.entry.orig.to_json(),
            "target": {"ip": self.entry.target[0], "port": self.entry.target[1]},
            "reason": self.reason,
        }
        if self.errno:
            out["error"] = os.strerror(self.errno)
        return out


Deleter = Callable[[Entry], int]  # returns 0 or the kernel's errno


class Remediator:
    """Runs as a periodic job of the pipeline; scans when identity changes."""

    def __init__(
        self,
        mode: Mode,
        correlator: Correlator,
        delete: Deleter | None,
        log: Callable[[Remediation], None],
        *,
        rate_per_s: float = 10.0,
        burst: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode is Mode.ON and delete is None:
            raise ValueError("remediate=on needs a deleter")
        self.mode = mode
        self.correlator = correlator
        self.delete = delete
        self.log = log
        self.rate = rate_per_s
        self.burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._last = clock()
        self._generation = -1
        # Keyed like the correlator's table (the tuple), the id telling entries at it apart.
        self._queue: collections.OrderedDict[_Key, Entry] = collections.OrderedDict()
        self._done: set[tuple[_Key, int]] = set()
        self.counts: collections.Counter[str] = collections.Counter()

    def check(self, now: float) -> list[Finding]:
        identity = self.correlator.identity
        if identity is None or self.mode is Mode.OFF:
            return []
        if identity.generation != self._generation:
            self._generation = identity.generation
            self._scan(identity, now)
        self._refill()
        while self._queue and self._tokens >= 1.0:
            key, entry = self._queue.popitem(last=False)
            if self.correlator.entries.get(key) is not entry:
                continue  # destroyed or replaced meanwhile
            reason = stale_reason(entry, identity, now)
            if reason is None:
                continue  # answered or rescued meanwhile: leave it
            self._tokens -= 1.0
            self._done.add((key, entry.entry_id))
            self._act(entry, reason, now)
        if self._queue:
            self.counts["rate_limited"] = len(self._queue)
        return []

    def _scan(self, identity: IdentityView, now: float) -> None:
        entries = self.correlator.entries
        for key, entry in entries.items():
            if (key, entry.entry_id) in self._done or key in self._queue:
                continue
            if stale_reason(entry, identity, now) is not None:
                self._queue[key] = entry
        if len(self._done) > 4 * self.correlator.settings.max_entries:
            self._done = {(key, entry_id) for key, entry_id in self._done
                          if (e := entries.get(key)) is not None and e.entry_id == entry_id}

    def _refill(self) -> None:
        t = self._clock()
        self._tokens = min(self.burst, self._tokens + (t - self._last) * self.rate)
        self._last = t

    def _act(self, entry: Entry, reason: str, now: float) -> None:
        if self.mode is Mode.DRY_RUN:
            record = Remediation(now, "would-delete", entry, reason)
        else:
            assert self.delete is not None
            err = self.delete(entry)
            if err in (0, _errno.ENOENT):  # ENOENT: it expired on its own first
                record = Remediation(now, "deleted", entry, reason)
            else:
                record = Remediation(now, "failed", entry, reason, err)
        self.counts[record.action] += 1
        self.log(record)
