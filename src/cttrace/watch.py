"""``cttrace watch``: one source, identity, the correlator and a terminal or JSON sink.

Kept apart from the CLI so the demo (and tests) can run the same wiring
in-process.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cttrace.assemble import (
    TraceOptions,
    build_remediator,
    build_tracing,
    snat_check,
    warn,
)
from cttrace.blind_spots import TracedNamespace, blind_spot_checks
from cttrace.filters import Filter
from cttrace.findings import Finding, rfc3339
from cttrace.runtime import Periodic, Pipeline, Sink, Summary
from cttrace.sources import hooks_json
from cttrace.sources.bpf import settings_for_rules
from cttrace.sources.select import open_source
from cttrace.sources.watched import follow_targets


@dataclass(slots=True)
class WatchOptions(TraceOptions):
    output: str = "auto"  # auto | table | json
    namespaces: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    flows: bool = False
    duration: float | None = None


def run_watch(
    opts: WatchOptions,
    stop: threading.Event,
    *,
    on_finding: Callable[[Finding], None] | None = None,
    on_ready: Callable[[Callable[[str], None]], None] | None = None,
) -> Summary:
    """Run until ``stop``. ``on_ready`` is called once attached, with a function that prints
    a line of narration where it does not disturb the output (above the live view, or on
    stderr beside JSON lines)."""
    flt = Filter.build(namespaces=opts.namespaces, services=opts.services, ips=opts.ips,
                       rules=opts.rules)
    correlator, pollers = build_tracing(opts)
    table = opts.output == "table" or (opts.output == "auto" and sys.stdout.isatty())
    # --flows prints every event: it needs every record; otherwise the kernel sends only
    # what a rule may need (the live table reads the rest from the kernel's map).
    source, note = open_source(opts.source, opts.netns, settings_for_rules(
        correlator.settings, stream_all=opts.flows))
    targets = follow_targets(correlator.identity, source, opts.netns)
    json_sink = None
    sinks: list[Sink] = []
    try:
        if note:
            warn(note)
        say: Callable[[str], None] = warn
        if table:
            from cttrace.sinks.live import LiveView

            view = LiveView(correlator, correlator.identity, flt,
                            kept=getattr(source, "kept_entries", None))
            say = view.say
            sinks.append(view)
        else:
            from cttrace.sinks.jsonl import JsonLinesSink

            json_sink = JsonLinesSink(sys.stdout.buffer, flt, flows=opts.flows)
            json_sink.note({"kind": "source", "ts": rfc3339(time.time()), "source": source.name,
                            "netns": opts.netns, "fallback": note,
                            **hooks_json(source.stats())})
            sinks.append(json_sink)
        log = json_sink.note if json_sink is not None else (
            lambda obj: warn(f"remediate: {obj['action']} entry {obj['entry_id']}: "
                             f"{obj['reason']}"))
        warning: Callable[[dict[str, object]], None] = (
            json_sink.note if json_sink is not None else lambda obj: say(str(obj["msg"])))
        # A deleted traced namespace ends the watch: nothing can happen there any more.
        periodic = [snat_check(opts.netns, source),
                    *blind_spot_checks(TracedNamespace(opts.netns), warning, on_gone=stop.set),
                    Periodic(0.5, lambda now: _stop_if_stdout_reader_left(stop))]
        if targets is not None:
            periodic.append(Periodic(1.0, targets.expire))
        remediator = build_remediator(opts.remediate, correlator, opts.netns,
                                      lambda r: log(r.to_json()))
        if remediator is not None:
            periodic.append(remediator)
        pipeline = Pipeline(source, correlator, sinks, pollers, on_finding=on_finding,
                            status_s=0.5 if table else 1.0, periodic=periodic,
                            on_warning=warning)
        summary = pipeline.run(
            stop, ready_file=opts.ready_file, duration=opts.duration,
            on_ready=(lambda: on_ready(say)) if on_ready is not None else None,
        )
    finally:
        try:
            for sink in sinks:
                sink.close()  # a reader that left makes this fail (EPIPE): still clean up
        finally:
            source.close()
            if opts.ready_file is not None:
                opts.ready_file.unlink(missing_ok=True)
    _report(summary, json_sink)
    return summary


def stdout_reader_left(fd: int = 1) -> bool:
    """True when ``fd`` is a pipe whose reader closed it (``watch | head -1``): the write
    end then polls POLLERR (pipe_poll() in fs/pipe.c, once ``pipe->readers`` is 0)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def stdout_to_devnull() -> None:
    """Send what is still written to stdout nowhere: its reader has left."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)


def _stop_if_stdout_reader_left(stop: threading.Event) -> list[Finding]:
    # Between snapshots the table view writes nothing, so no EPIPE would tell: nobody
    # reads any more, so the run ends like a Ctrl-C, its last output going nowhere.
    if not stop.is_set() and stdout_reader_left():
        stdout_to_devnull()
        stop.set()
    return []


def _report(summary: Summary, json_sink: object | None) -> None:
    by_rule = dict(sorted(summary.findings.items()))
    if json_sink is not None:
        from cttrace.sinks.jsonl import JsonLinesSink

        assert isinstance(json_sink, JsonLinesSink)
        json_sink.note({"kind": "summary", "ts": rfc3339(time.time()), "events": summary.events,
                        "lost": summary.lost, "findings": by_rule,
                        "seconds": round(summary.seconds, 3)})
        return
    found = ", ".join(f"{n} {rule}" for rule, n in by_rule.items()) or "no findings"
    print(f"cttrace: {summary.seconds:.0f}s, {summary.events} events, {summary.lost} lost, "
          f"{found}", file=sys.stderr)
