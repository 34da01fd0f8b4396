"""Alertmanager sink: every finding becomes an alert on every Alertmanager of a cluster.

Why it is shaped this way:

* The event path must never wait for the network. :meth:`AlertmanagerSink.submit`
  only files the alert in a bounded in-memory book under a short lock; one
  delivery thread per Alertmanager URL does the HTTP.
* An Alertmanager HA cluster gossips silences and the notification log, not
  alerts: every member must receive every alert itself, so each URL has its own
  thread, its own backoff and its own record of what it has accepted. A dead
  member never delays a live one.
* Alertmanager keeps alerts in memory only and expires an alert sent without
  ``endsAt`` after its ``resolve_timeout`` (default 5m). Firing alerts are
  therefore re-sent every ``resend_interval`` (keep it shorter than
  ``resolve_timeout``); the same re-send repopulates an Alertmanager that restarted.
* Findings are one-shot facts. An alert stays firing for ``hold`` seconds after
  the latest finding with its labels, and for at least ``hold`` seconds after a
  given Alertmanager first accepted it, so an outage longer than ``hold`` does not
  swallow the alert; then it is sent once more with ``endsAt`` (resolved).
* Nothing is lost within the bound: an alert stays in the book until every URL
  accepted its resolution. The bound (``queue_max``, ``--alert-queue``) counts only
  alerts some Alertmanager has not accepted yet: one every Alertmanager has, kept
  for its re-sends and resolution, never takes an undelivered alert's room (those
  are bounded apart, by as many again; past that the longest-delivered is let go,
  and Alertmanager resolves it after its ``resolve_timeout``). When the undelivered
  are at the bound, the least severe goes first (a new critical displaces the newest
  held warning; a new warning among criticals is dropped); each drop is counted and
  logged with the dropped alert's labels.
"""

from __future__ import annotations

import base64
import logging
import random
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import orjson

import cttrace
from cttrace.addr import endpoint, flow_text, is_ipv6
from cttrace.errors import UserError
from cttrace.events import Flow
from cttrace.findings import Finding, rfc3339
from cttrace.rules import RULES, by_id

log = logging.getLogger(__name__)

#: The ``alertname`` of each rule's findings, from the rules' own declarations.
ALERT_NAMES: Mapping[str, str] = {spec.id: spec.alert for spec in RULES}

#: Alertmanager answers these when the alerts themselves are invalid: re-sending the same
#: batch can never succeed, so it is discarded for that URL (counted as ``rejected``).
_REJECTED_STATUS = frozenset({400, 422})


class AlertmanagerConfigError(UserError):
    """An Alertmanager option that cannot work (bad URL, unreadable CA file)."""


def tuple_text(flow: Flow) -> str:
    """``10.0.0.5:40000->10.96.0.10:80`` (IPv6 addresses in brackets)."""
    return flow_text(flow, "->")


def _delete_command(flow: Flow) -> str:
    family = "-f ipv6 " if is_ipv6(flow.src) else ""
    return (
        f"conntrack -D {family}-p tcp -s {flow.src} --sport {flow.sport} "
        f"-d {flow.dst} --dport {flow.dport}"
    )


def finding_to_alert(finding: Finding, node: str, generator_url: str) -> dict[str, object]:
    """The Alertmanager v2 ``postableAlert`` for ``finding`` (without ``endsAt``: firing).

    Labels identify the alert (Alertmanager fingerprints the label set), so they hold
    only stable names; ``tuple`` keeps two findings about different connections apart.
    Unknown names are left out rather than sent empty.
    """
    spec = by_id(finding.rule)
    labels: dict[str, str] = {
        "alertname": spec.alert,
        "severity": str(finding.severity),
        "node": node,
    }
    orig = finding.orig  # None: a finding from counters (snat-collision) names no tuple
    if orig is not None:
        labels["tuple"] = tuple_text(orig)
    if finding.service is not None:
        labels["namespace"] = finding.service.namespace
        labels["service"] = finding.service.name
    for name, pod in (
        ("client_pod", finding.client),
        ("old_pod", finding.old_owner),
        ("new_pod", finding.new_owner),
    ):
        if pod is not None:
            labels[name] = str(pod)
    advice = spec.advice.format(delete=_delete_command(orig) if orig is not None else "")
    annotations: dict[str, str] = {
        "summary": f"{finding.summary.rstrip().rstrip('.')} (node {node}). {advice}",
    }
    if orig is not None:
        annotations["tuple"] = labels["tuple"]
    if finding.target is not None and finding.target[0]:
        annotations["target"] = endpoint(*finding.target)
    if finding.unreplied_s is not None:
        annotations["unreplied_s"] = f"{finding.unreplied_s:g}"
    alert: dict[str, object] = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(finding.ts),
    }
    if generator_url:
        alert["generatorURL"] = generator_url
    return alert


def alerts_url(url: str) -> str:
    """The ``/api/v2/alerts`` URL under an Alertmanager base URL (which may carry a prefix)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise AlertmanagerConfigError(
            f"--alertmanager-url {url!r}: expected http(s)://host[:port][/path-prefix]"
        )
    path = parts.path.rstrip("/")
    if not path.endswith("/api/v2/alerts"):
        path += "/api/v2/alerts"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


LabelKey = tuple[tuple[str, str], ...]


def label_key(labels: Mapping[str, str]) -> LabelKey:
    """What Alertmanager fingerprints an alert by: its sorted label set."""
    return tuple(sorted(labels.items()))


@dataclass(slots=True)
class _Delivery:
    """What one Alertmanager has accepted of one alert."""

    first_accepted: float | None = None  # first time it accepted the firing alert
    last_accepted: float | None = None  # latest acceptance of the firing alert
    resolved: bool = False  # it accepted the resolution


@dataclass(slots=True)
class _HeldAlert:
    """One alert (one label set) and its delivery state on every Alertmanager."""

    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: float
    resolve_at: float  # latest finding + hold
    generator_url: str | None
    rank: int  # _SEVERITY_RANK of its severity label: the least severe is dropped first
    generation: int = 0  # bumped when a resolved alert fires again
    per_url: dict[str, _Delivery] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sending:
    """One alert in one POST: enough to record the outcome if it is still current."""

    key: LabelKey
    generation: int
    resolves: bool
    wire: dict[str, object]


#: Severity labels, least severe first; an unknown one ranks with the least severe.
_SEVERITY_RANK: Mapping[str, int] = {"info": 0, "warning": 1, "critical": 2}


class AlertBook:
    """The alerts cttrace holds, and what each Alertmanager still has to be sent.

    Pure bookkeeping on explicit times (no threads, no clock), so that its timing
    rules are unit-tested at full speed. Not thread-safe: the sink locks around it.

    ``capacity`` bounds the alerts some Alertmanager has not accepted yet
    (undelivered), and, apart from them, the delivered ones kept for re-sending and
    resolution (see the module docstring).
    """

    def __init__(self, urls: Iterable[str], *, resend_interval: float, hold: float,
                 capacity: int) -> None:
        self.urls = tuple(urls)
        self.resend_interval = resend_interval
        self.hold = hold
        self.capacity = capacity
        self._alerts: dict[LabelKey, _HeldAlert] = {}
        # Keys of the undelivered alerts by rank (in filing order), and of the delivered
        # ones (in delivery order): what a full book drops or lets go, found in O(1).
        self._undelivered: dict[int, dict[LabelKey, None]] = {
            rank: {} for rank in sorted(set(_SEVERITY_RANK.values()))}
        self._delivered: dict[LabelKey, None] = {}
        #: Delivered alerts let go before their resolution to bound the book.
        self.released = 0

    def __len__(self) -> int:
        return len(self._alerts)

    def undelivered(self) -> int:
        """Alerts some Alertmanager has not accepted (the ones ``capacity`` bounds)."""
        return sum(len(keys) for keys in self._undelivered.values())

    def add(self, alert: Mapping[str, object], *, starts_at: float,
            now: float) -> dict[str, str] | None:
        """File a firing alert; returns the labels of the alert dropped for it, if any.

        With the undelivered alerts at ``capacity``, a new alert displaces the newest
        held one of the lowest severity below its own, or, if there is none, is itself
        dropped (its labels are returned and nothing changes). ``starts_at`` is
        ``alert["startsAt"]`` as a timestamp; a new finding with the labels of a held
        alert extends its hold, or makes it fire again if it resolved.
        """
        labels = dict(_str_map(alert["labels"]))
        annotations = dict(_str_map(alert.get("annotations", {})))
        generator = alert.get("generatorURL")
        key = label_key(labels)
        held = self._alerts.get(key)
        if held is None:
            rank = _SEVERITY_RANK.get(labels.get("severity", ""), 0)
            dropped = None
            if self.undelivered() >= self.capacity:
                victim = self._least_severe_below(rank)
                if victim is None:
                    return labels
                dropped = self._alerts[victim].labels
                self._forget(victim)
            self._alerts[key] = _HeldAlert(
                labels=labels, annotations=annotations, starts_at=starts_at,
                resolve_at=now + self.hold,
                generator_url=generator if isinstance(generator, str) else None,
                rank=rank, per_url={url: _Delivery() for url in self.urls},
            )
            self._undelivered[rank][key] = None
            return dropped
        held.annotations = annotations
        if any(self._resolving(held, url, now) for url in self.urls):
            # It had (partly) resolved: it fires again as a new occurrence, everywhere.
            held.starts_at = starts_at
            held.resolve_at = now + self.hold
            held.generation += 1
            held.per_url = {url: _Delivery() for url in self.urls}
            self._delivered.pop(key, None)
            self._undelivered[held.rank][key] = None
        else:
            held.resolve_at = max(held.resolve_at, now + self.hold)
        return None

    def _least_severe_below(self, rank: int) -> LabelKey | None:
        """The newest undelivered alert of the lowest rank under ``rank``, if any."""
        for lower, keys in self._undelivered.items():
            if lower >= rank:
                break
            if keys:
                return next(reversed(keys))
        return None

    def _forget(self, key: LabelKey) -> None:
        held = self._alerts.pop(key)
        self._undelivered[held.rank].pop(key, None)
        self._delivered.pop(key, None)

    def _delivered_everywhere(self, key: LabelKey, held: _HeldAlert) -> None:
        if key in self._delivered:
            return
        self._undelivered[held.rank].pop(key, None)
        self._delivered[key] = None
        if len(self._delivered) > self.capacity:
            self._forget(next(iter(self._delivered)))
            self.released += 1

    def _ends(self, held: _HeldAlert, url: str) -> float | None:
        first = held.per_url[url].first_accepted
        if first is None:
            return None
        return max(held.resolve_at, first + self.hold)

    def _resolving(self, held: _HeldAlert, url: str, now: float) -> bool:
        ends = self._ends(held, url)
        return held.per_url[url].resolved or (ends is not None and now >= ends)

    def due(self, url: str, now: float, limit: int) -> list[Sending]:
        """Up to ``limit`` alerts ``url`` should be sent now: new, due a re-send, or resolved."""
        out: list[Sending] = []
        for key, held in self._alerts.items():
            if len(out) >= limit:
                break
            state = held.per_url[url]
            if state.resolved:
                continue
            ends = self._ends(held, url)
            if ends is not None and now >= ends:
                out.append(Sending(key, held.generation, True, self._wire(held, ends)))
            elif (state.last_accepted is None
                  or now - state.last_accepted >= self.resend_interval):
                out.append(Sending(key, held.generation, False, self._wire(held, None)))
        return out

    def next_due(self, url: str, now: float) -> float | None:
        """The earliest time something is due for ``url`` (``now`` if already), or None."""
        best: float | None = None
        for held in self._alerts.values():
            state = held.per_url[url]
            if state.resolved:
                continue
            if state.last_accepted is None:
                return now
            ends = self._ends(held, url)
            assert ends is not None  # accepted once, so its hold has started
            when = min(ends, state.last_accepted + self.resend_interval)
            if best is None or when < best:
                best = when
        return None if best is None else max(best, now)

    def accepted(self, url: str, sent: Iterable[Sending], now: float) -> None:
        """``url`` accepted ``sent`` at ``now``; forget alerts every URL saw resolved."""
        for item in sent:
            held = self._alerts.get(item.key)
            if held is None or held.generation != item.generation:
                continue  # it fired again meanwhile: the new occurrence still has to go
            state = held.per_url[url]
            if item.resolves:
                state.resolved = True
                if all(s.resolved for s in held.per_url.values()):
                    self._forget(item.key)
            else:
                if state.first_accepted is None:
                    state.first_accepted = now
                    if all(s.first_accepted is not None for s in held.per_url.values()):
                        self._delivered_everywhere(item.key, held)
                state.last_accepted = now

    def unsent(self, url: str) -> int:
        """Alerts whose current firing state ``url`` never accepted (what a flush must send)."""
        return sum(1 for held in self._alerts.values()
                   if held.per_url[url].first_accepted is None)

    @staticmethod
    def _wire(held: _HeldAlert, ends: float | None) -> dict[str, object]:
        wire: dict[str, object] = {
            "labels": held.labels,
            "annotations": held.annotations,
            "startsAt": rfc3339(held.starts_at),
        }
        if ends is not None:
            # Alertmanager rejects an alert whose end is before its start (HTTP 400).
            wire["endsAt"] = rfc3339(max(ends, held.starts_at))
        if held.generator_url:
            wire["generatorURL"] = held.generator_url
        return wire


def _str_map(value: object) -> Iterable[tuple[str, str]]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping of strings, got {type(value).__name__}")
    return ((str(k), str(v)) for k, v in value.items())


class _Outcome(Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"  # Alertmanager unreachable or failing: send again after a backoff
    REJECTED = "rejected"  # Alertmanager refused these alerts as invalid


@dataclass(slots=True)
class _Counters:
    sent: int = 0  # alerts accepted, summed over URLs
    failed: int = 0  # POSTs that did not succeed
    retries: int = 0  # POSTs made after a failure to the same URL
    rejected: int = 0  # alerts an Alertmanager refused as invalid (HTTP 400/422)
    dropped: int = 0  # alerts dropped from a full book, or findings after close


class AlertmanagerSink:
    """Delivers findings as alerts to every Alertmanager in ``urls`` (v2 API)."""

    def __init__(
        self,
        urls: list[str],
        *,
        node: str,
        generator_url: str,
        resend_interval: float = 60.0,
        hold: float = 300.0,
        queue_max: int = 10000,
        batch_max: int = 64,
        timeout: float = 5.0,
        basic_auth: tuple[str, str] | None = None,
        bearer_token: str | None = None,
        ca_file: str | None = None,
        insecure_skip_verify: bool = False,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not urls:
            raise AlertmanagerConfigError("no --alertmanager-url given")
        if basic_auth is not None and bearer_token is not None:
            raise AlertmanagerConfigError(
                "give either Alertmanager basic auth or a bearer token, not both"
            )
        if resend_interval <= 0 or hold < 0 or queue_max < 1 or batch_max < 1 or timeout <= 0:
            raise AlertmanagerConfigError(
                "Alertmanager resend interval, timeout, queue and batch sizes must be positive"
            )
        self._urls = list(dict.fromkeys(alerts_url(u) for u in urls))
        self._node = node
        self._generator_url = generator_url
        self._batch_max = batch_max
        self._timeout = timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = max(backoff_max, backoff_initial)
        self._clock = clock
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"cttrace/{cttrace.__version__}",
        }
        if basic_auth is not None:
            token = base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"
        elif bearer_token is not None:
            self._headers["Authorization"] = f"Bearer {bearer_token}"
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=_tls_context(ca_file, insecure_skip_verify))
        )
        self._book = AlertBook(self._urls, resend_interval=resend_interval, hold=hold,
                               capacity=queue_max)
        self._counters = _Counters()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._flush_deadline = 0.0  # time.monotonic() by which close() gives up

    @property
    def urls(self) -> list[str]:
        """The ``/api/v2/alerts`` URLs alerts go to."""
        return list(self._urls)

    def submit(self, finding: Finding) -> None:
        """File ``finding``'s alert for delivery. Never waits for the network."""
        alert = finding_to_alert(finding, self._node, self._generator_url)
        with self._cond:
            if self._closing:
                self._counters.dropped += 1
                return
            dropped = self._book.add(alert, starts_at=finding.ts, now=self._clock())
            if dropped is not None:
                self._counters.dropped += 1
            self._cond.notify_all()
        if dropped is not None:
            log.warning("alert queue full (--alert-queue %d undelivered): dropped %s %s",
                        self._book.capacity, dropped.get("severity", "?"),
                        dropped.get("alertname", "?"), extra={"fields": {"dropped": dropped}})

    # The runtime's sink interface (cttrace.runtime.Sink): only findings become alerts.
    def finding(self, finding: Finding) -> None:
        self.submit(finding)

    def event(self, event: object) -> None:
        pass

    def status(self, status: object) -> None:
        pass

    def start(self) -> None:
        """Start one delivery thread per Alertmanager URL (idempotent)."""
        with self._cond:
            if self._threads or self._closing:
                return
            for url in self._urls:
                thread = threading.Thread(target=self._deliver_loop, args=(url,),
                                          name=f"cttrace-alertmanager-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
        for thread in self._threads:
            thread.start()

    def close(self, deadline_s: float = 5.0) -> None:
        """Send what no Alertmanager has yet, for at most ``deadline_s``; then stop.

        Firing alerts are not resolved on close: the condition did happen, and
        Alertmanager resolves them itself after ``resolve_timeout`` if no other
        cttrace re-sends them. Idempotent.
        """
        end = time.monotonic() + max(0.0, deadline_s)
        with self._cond:
            if not self._closing:
                self._closing = True
                self._flush_deadline = end
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))

    def stats(self) -> dict[str, int]:
        """Counters: sent, failed, retries, rejected, dropped; queue_depth = alerts held."""
        with self._cond:
            c = self._counters
            return {
                "sent": c.sent,
                "failed": c.failed,
                "retries": c.retries,
                "rejected": c.rejected,
                "dropped": c.dropped,
                "queue_depth": len(self._book),
            }

    def undelivered(self) -> int:
        """Alerts whose current firing state some Alertmanager has not accepted yet.

        Unlike ``queue_depth`` (every alert held, delivered ones included, for their
        re-sends and resolution), this is what an outage or a shutdown would lose.
        """
        with self._cond:
            return max((self._book.unsent(url) for url in self._urls), default=0)

    # -- delivery thread -------------------------------------------------------------

    def _deliver_loop(self, url: str) -> None:
        failures = 0
        retry_at = 0.0  # clock time before which this URL is left alone after a failure
        while True:
            with self._cond:
                batch = self._next_batch(url, retry_at)
                if batch is None:
                    return
            outcome = self._post(url, batch, failures)
            with self._cond:
                now = self._clock()
                if failures:
                    self._counters.retries += 1
                if outcome is _Outcome.RETRY:
                    self._counters.failed += 1
                    failures += 1
                    retry_at = now + self._backoff(failures)
                    continue
                if failures:
                    log.info("Alertmanager %s reachable again after %d failed attempts",
                             url, failures)
                failures = 0
                retry_at = 0.0
                if outcome is _Outcome.REJECTED:
                    self._counters.failed += 1
                    self._counters.rejected += len(batch)
                else:
                    self._counters.sent += len(batch)
                # A rejected batch is recorded as delivered: re-sending it cannot succeed.
                self._book.accepted(url, batch, now)

    def _next_batch(self, url: str, retry_at: float) -> list[Sending] | None:
        """Wait (holding the condition) until ``url`` has something to send; None: stop."""
        while True:
            now = self._clock()
            if self._closing and (time.monotonic() >= self._flush_deadline
                                  or self._book.unsent(url) == 0):
                return None
            if now >= retry_at:
                batch = self._book.due(url, now, self._batch_max)
                if batch:
                    return batch
            wake = self._book.next_due(url, now)
            if retry_at > now:
                wake = retry_at if wake is None else max(wake, retry_at)
            # Waits are capped so that wall-clock steps (NTP) cannot stall delivery for long.
            wait = 1.0 if wake is None else min(1.0, max(0.0, wake - now))
            if self._closing:
                wait = min(wait, max(0.0, self._flush_deadline - time.monotonic()))
            self._cond.wait(wait)

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff with jitter, so that a cluster of agents spreads out."""
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(failures - 1, 30))
        return random.uniform(ceiling / 2, ceiling)

    def _post(self, url: str, batch: list[Sending], failures: int) -> _Outcome:
        body = orjson.dumps([item.wire for item in batch])
        request = urllib.request.Request(url, data=body, headers=self._headers, method="POST")
        timeout = self._timeout
        if self._closing:
            timeout = min(timeout, max(0.1, self._flush_deadline - time.monotonic()))
        try:
            with self._opener.open(request, timeout=timeout) as response:
                response.read()
            return _Outcome.ACCEPTED
        except urllib.error.HTTPError as err:
            detail = err.read(200).decode("utf-8", "replace").strip()
            if err.code in _REJECTED_STATUS:
                log.error("Alertmanager %s rejected %d alerts: HTTP %d %s",
                          url, len(batch), err.code, detail)
                return _Outcome.REJECTED
            reason = f"HTTP {err.code} {detail}"
        except (OSError, ValueError) as err:  # URLError, timeouts, TLS errors, resets
            reason = str(getattr(err, "reason", err))
        if failures == 0:
            log.warning("cannot deliver alerts to Alertmanager %s (%s); retrying with backoff",
                        url, reason)
        return _Outcome.RETRY


def _tls_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as err:
        raise AlertmanagerConfigError(
            f"cannot read the Alertmanager CA file {ca_file!r}: {err}"
        ) from err
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
