"""Conntrack statistics: read the kernel's per-CPU counters for ``snat-collision``.

``/proc/net/stat/nf_conntrack`` has a header line of column names and one line
per possible CPU of hex values (``ct_cpu_seq_show()`` in
net/netfilter/nf_conntrack_standalone.c). The counters are per network
namespace (``net->ct.stat``). Columns are looked up by header name, never by
position: the kernel has renamed and zeroed columns over the years (``searched``
became ``clashres``, ``new``/``ignore``/``delete`` print 0 since 5.x).

Why these counters matter is the rule's business (:mod:`cttrace.rules.snat_collision`,
which turns samples into findings); ``clashres`` counts the clashes that were
resolved, ``early_drop`` the evictions of a full table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

from cttrace.errors import UserError
from cttrace.findings import Finding
from cttrace.netns import entered_netns
from cttrace.rules.snat_collision import (
    COLLISION_COUNTERS,
    SnatCollisionSampler,
    counter_deltas,
)

__all__ = [
    "COLLISION_COUNTERS", "ConntrackStatsError", "NamespaceCollisions", "SnatCollisionSampler",
    "counter_deltas", "parse_conntrack_stats", "read_conntrack_stats",
]

#: ``/proc/net`` follows the thread-group leader; ``thread-self`` follows the
#: reading thread, which matters when a thread has entered another netns.
STAT_PATH = Path("/proc/thread-self/net/stat/nf_conntrack")

#: The ``entries`` column is ``nf_conntrack_count`` of the namespace, printed
#: identically on every CPU line: it is taken once, not summed.
_NOT_PER_CPU = frozenset({"entries"})

class ConntrackStatsError(UserError):
    """The conntrack statistics file is missing or unreadable."""


def parse_conntrack_stats(text: str) -> dict[str, int]:
    """Sum the per-CPU lines of ``/proc/net/stat/nf_conntrack`` by column name.

    Raises ``ValueError`` when the text is not that file's format.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("empty conntrack statistics")
    header = lines[0].split()
    totals = dict.fromkeys(header, 0)
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) != len(header):
            raise ValueError(f"line {lineno} has {len(fields)} columns, header has {len(header)}")
        for name, raw in zip(header, fields, strict=True):
            value = int(raw, 16)
            if name in _NOT_PER_CPU:
                totals[name] = value
            else:
                totals[name] += value
    return totals


def _read_stats_file(path: Path) -> dict[str, int]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConntrackStatsError(
            f"no {path}: nf_conntrack is not loaded (modprobe nf_conntrack)"
        ) from None
    except OSError as exc:
        raise ConntrackStatsError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return parse_conntrack_stats(text)
    except ValueError as exc:
        raise ConntrackStatsError(f"unexpected format in {path}: {exc}") from None


def read_conntrack_stats(netns: str | None = None, path: Path = STAT_PATH) -> dict[str, int]:
    """Conntrack counters of the current (or the named) network namespace, summed over CPUs.

    Raises :class:`ConntrackStatsError`, or :class:`cttrace.netns.NetnsError`
    when ``netns`` cannot be entered.
    """
    with entered_netns(netns):
        return _read_stats_file(path)


class NamespaceCollisions:
    """``snat-collision`` in network namespaces whose failed inserts are counted in the
    kernel as they happen: the bpf source counts, by namespace, the NATed TCP entries
    whose ``__nf_conntrack_confirm()`` did not accept the packet (the insert clashed and
    the packet was dropped; the kernel counts ``insert_failed`` and ``drop`` for it in
    ``nf_ct_resolve_clash()``).

    Tracing every namespace, the bpf source sees clashes in namespaces whose
    statistics cttrace does not read (a kind node, a lab node, a pod): each gets a
    :class:`SnatCollisionSampler` of its own, whose baseline is zero at ``start`` (the
    counts start when the programs are loaded), so a namespace's first failures are
    reported, not taken as a baseline. ``skip`` is the namespace sampled from its
    statistics file instead (never reported twice). The counts survive the namespace,
    so a clash just before a namespace goes away is still reported.
    """

    def __init__(
        self,
        read: Callable[[], Mapping[int, int]],
        *,
        skip: int | None,
        start: float,
        name_of: Callable[[int], str | None] | None = None,
        threshold: float = 1.0,
    ) -> None:
        from cttrace.netns import netns_name_of

        self._read = read
        self._skip = skip
        self._last = start
        self._name_of = name_of or netns_name_of
        self._threshold = threshold
        self._samplers: dict[int, SnatCollisionSampler] = {}

    def sample(self, now: float) -> list[Finding]:
        out: list[Finding] = []
        counts = {ino: n for ino, n in self._read().items() if ino != self._skip}
        for gone in self._samplers.keys() - counts.keys():
            del self._samplers[gone]  # evicted from the kernel's LRU map
        for ino, failed in sorted(counts.items()):
            sampler = self._samplers.get(ino)
            if sampler is None:
                sampler = self._samplers[ino] = SnatCollisionSampler(self._threshold)
                sampler.sample({"insert_failed": 0, "drop": 0}, self._last)
            # Each failed confirm dropped its packet: one insert failure, one drop.
            finding = sampler.sample({"insert_failed": failed, "drop": failed}, now)
            if finding is not None:
                out.append(self._named(finding, ino, failed))
        self._last = now
        return out

    def _named(self, finding: Finding, ino: int, failed: int) -> Finding:
        name = self._name_of(ino)
        where = f"network namespace {name}" if name else f"network namespace inode {ino}"
        deltas = finding.details["deltas"]
        assert isinstance(deltas, dict)
        return dataclasses.replace(
            finding,
            summary=f"{where}: {finding.summary}",
            details={
                **finding.details,
                # What was counted: not early_drop or clashres, which only the
                # namespace's own statistics have.
                "counters": {"insert_failed": failed, "drop": failed},
                "deltas": {k: deltas[k] for k in COLLISION_COUNTERS},
                "netns": name,
                "netns_ino": ino,
                "source": "bpf",
            },
        )
