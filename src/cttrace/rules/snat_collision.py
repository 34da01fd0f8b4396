"""``snat-collision``: the conntrack ``insert_failed`` / ``drop`` counters grow.

Two connections through MASQUERADE/SNAT set up concurrently on different CPUs can
both be given the same source port (neither is in the hash table yet when
``get_unique_tuple()`` checks); the second clashes at ``__nf_conntrack_confirm()``,
and when ``nf_ct_resolve_clash()`` cannot merge it the packet is dropped and
``insert_failed`` and ``drop`` grow. ``drop`` alone also grows when the table is
full (``nf_conntrack_in()`` cannot allocate), with ``early_drop`` counting the
evictions. Decided from counters (cttrace.ctstats samples them), not from
conntrack events: a finding of this rule names a namespace, not a tuple.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from cttrace.findings import Finding, Severity
from cttrace.rules._spec import RuleSpec

#: Seconds between two samples of the counters.
SAMPLE_INTERVAL = 5.0

#: The counters a SNAT port clash moves.
COLLISION_COUNTERS = ("insert_failed", "drop")


def counter_deltas(
    before: Mapping[str, int], after: Mapping[str, int], names: tuple[str, ...]
) -> dict[str, int] | None:
    """``after - before`` for ``names``; None when any counter went backwards.

    Each per-CPU counter is a 32-bit ``unsigned int`` that wraps, and a
    namespace can be recreated under the same name: a decrease means the
    baseline is stale, not that something un-happened.
    """
    deltas = {name: after.get(name, 0) - before.get(name, 0) for name in names}
    if any(d < 0 for d in deltas.values()):
        return None
    return deltas


class SnatCollisionSampler:
    """Turns successive counter samples into ``snat-collision`` findings.

    ``threshold`` is the growth rate (dropped inserts per second, the larger of
    the ``insert_failed`` and ``drop`` deltas) at which a finding is critical
    rather than a warning. The first sample, and any sample after a counter
    went backwards, only sets the baseline.
    """

    def __init__(self, threshold: float = 1.0, clock: Callable[[], float] = time.time) -> None:
        if threshold <= 0:
            raise ValueError("threshold must be positive (failures per second)")
        self.threshold = threshold
        self._clock = clock
        self._prev: dict[str, int] | None = None
        self._prev_ts = 0.0

    def sample(self, stats: Mapping[str, int], now: float | None = None) -> Finding | None:
        ts = self._clock() if now is None else now
        prev, prev_ts = self._prev, self._prev_ts
        self._prev, self._prev_ts = dict(stats), ts
        if prev is None:
            return None
        deltas = counter_deltas(prev, stats, (*COLLISION_COUNTERS, "early_drop"))
        if deltas is None:
            return None
        growth = max(deltas["insert_failed"], deltas["drop"])
        if growth == 0:
            return None
        interval = ts - prev_ts
        rate = growth / interval if interval > 0 else float(growth)
        severity = Severity.CRITICAL if rate >= self.threshold else Severity.WARNING
        return Finding(
            rule=RULE.id,
            severity=severity,
            ts=ts,
            orig=None,  # counters carry no tuple
            target=None,
            summary=_summary(deltas, interval),
            details={
                "counters": {
                    name: stats.get(name, 0)
                    for name in (*COLLISION_COUNTERS, "early_drop", "clashres")
                },
                "deltas": deltas,
                "interval_s": round(interval, 3),
                "rate_per_s": round(rate, 3),
            },
        )


def _summary(deltas: Mapping[str, int], interval: float) -> str:
    span = f"in {interval:.1f} s"
    if deltas["insert_failed"]:
        return (
            f"conntrack insert_failed +{deltas['insert_failed']}, drop +{deltas['drop']} {span}: "
            "connections clashed on one NAT tuple and packets were dropped; "
            "MASQUERADE/SNAT rules need --random-fully (see `cttrace doctor`)"
        )
    return (
        f"conntrack drop +{deltas['drop']} {span} without insert failures "
        f"(early_drop +{deltas['early_drop']}): the table is likely full "
        "(see `cttrace doctor`, check conntrack-fill)"
    )


RULE = RuleSpec(
    id="snat-collision",
    alert="CttraceSnatCollision",
    rank=6,
    fires_when="the namespace's conntrack `insert_failed` / `drop` counters grow (sampled "
    f"every {SAMPLE_INTERVAL:g} s); with the bpf source also every other namespace's failed "
    "NATed TCP inserts, counted in the kernel",
    needs="any",
    advice=(
        "Run `cttrace doctor` on this node to list the MASQUERADE/SNAT rules without "
        "--random-fully and the conntrack table fill."
    ),
)
