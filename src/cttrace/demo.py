"""``cttrace demo``: reproduce a failure in the lab and catch it, live, on this kernel.

The lab scenario runs in a background thread (it waits until the tracer is
attached before sending a packet); the tracer runs in front with the same
wiring as ``cttrace watch``, following the identity the lab writes. When the
scenario is over and the findings had their grace period, the demo prints what
the client saw and what cttrace named.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from cttrace.findings import Finding
from cttrace.rules import (
    Settings,
    dead_endpoint,
    settings_of,
    snat_collision,
    unnated_reply,
    wrong_pod,
)
from cttrace.watch import WatchOptions, run_watch

#: What each scenario is expected to be caught as (the demo waits for these).
EXPECTED = {
    "recycled-ip": wrong_pod.RULE.id,
    "dead-pod": dead_endpoint.RULE.id,
    "bridge-no-brnf": unnated_reply.RULE.id,
    "snat-race": snat_collision.RULE.id,
}


def run_demo(scenario: str, opts: WatchOptions, stop: threading.Event, *,
             family: str = "4") -> int:
    from cttrace.lab.background import BackgroundScenario

    attached = threading.Event()
    found: list[Finding] = []
    expected = EXPECTED.get(scenario)
    narrate: list[Callable[[str], None]] = [lambda s: print(s, file=sys.stderr, flush=True)]

    def on_step(text: str) -> None:
        narrate[0](f"lab: {text}")

    def on_ready(say: Callable[[str], None]) -> None:
        narrate[0] = say
        attached.set()

    with BackgroundScenario(scenario, wait_ready=attached.is_set, on_step=on_step,
                            family=family) as bg:
        opts.netns = bg.node_netns
        opts.identity_file = bg.identity_path

        def finish_when_caught() -> None:
            # After the scenario, give time-driven rules (grace, dead-after) their time.
            while not stop.is_set() and not bg.done():
                time.sleep(0.1)
            settings = Settings.of(opts.rule_settings)
            slack = max(settings[s] for s in settings_of() if s.flag) + 3.0
            deadline = time.monotonic() + slack
            while not stop.is_set() and time.monotonic() < deadline:
                if expected is not None and any(f.rule == expected for f in found):
                    break
                time.sleep(0.1)
            time.sleep(0.5)  # let the view show the last finding
            stop.set()

        threading.Thread(target=finish_when_caught, daemon=True).start()
        run_watch(opts, stop, on_finding=found.append, on_ready=on_ready)
        result = bg.result(timeout=60) if bg.done() else None
    return _verdict(scenario, result, found, expected)


#: Above this many client attempts, the verdict counts outcomes instead of listing each.
MAX_ATTEMPT_LINES = 4


def _outcome(attempt: Any) -> str:
    return f"answered by {attempt.answered_by}" if attempt.answered_by else attempt.outcome


def _verdict(scenario: str, result: object, found: list[Finding], expected: str | None) -> int:
    out = sys.stderr
    if result is None:
        print("cttrace demo: stopped before the scenario finished", file=out)
        return 130
    lines: list[str] = [""]
    attempts = getattr(result, "attempts", ())
    who = f"client {getattr(result, 'client', '?')} -> Service {getattr(result, 'service', None)}"
    if len(attempts) <= MAX_ATTEMPT_LINES:
        for a in attempts:
            lines.append(f"{who} from port {a.sport}: {_outcome(a)}")
    else:  # a burst (snat-race): one line per outcome
        outcomes = Counter(_outcome(a) for a in attempts)
        lines.append(f"{who}: {len(attempts)} connections at once: "
                     + ", ".join(f"{n} {got}" for got, n in outcomes.most_common()))
    caught = [f for f in found if f.rule == expected]
    if caught:
        f = caught[0]
        lines.append(f"cttrace caught it: {f.rule} ({f.severity}): {f.summary}")
    else:
        lines.append(f"cttrace did NOT report {expected} for {scenario}; findings: "
                     f"{sorted({str(f.rule) for f in found}) or 'none'}")
    print("\n".join(lines), file=out, flush=True)
    return 0 if caught else 1
