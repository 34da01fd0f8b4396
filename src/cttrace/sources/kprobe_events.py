"""Whether BCC may give kretprobes a ``maxactive`` of their own on this node.

BCC (libbcc's ``bpf_attach_probe()``) registers a kretprobe with an explicit
``maxactive`` only by writing ``r<N>:...`` to tracefs' ``kprobe_events``: the
perf_kprobe PMU (``perf_event_open()`` with the ``kprobe`` PMU type) has no
field for it, so with ``maxactive`` 0 BCC uses the PMU and writes nothing to
tracefs. The DaemonSet mounts tracefs read-only; there the write fails (EROFS)
and the whole bpf source with it. So ``maxactive`` is asked for only where
``kprobe_events`` can be written; elsewhere the kernel's default applies
(``max(10, 2 * CPUs)``, set in ``register_kretprobe()``) and misses are
counted from ``kprobe_profile`` as always.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

#: Where libbcc writes probe definitions: the debugfs mount of tracefs when it exists
#: (BCC checks it first), else tracefs' own mount point.
KPROBE_EVENTS = ("/sys/kernel/debug/tracing/kprobe_events", "/sys/kernel/tracing/kprobe_events")


def usable_maxactive(wanted: int, paths: Sequence[str] = KPROBE_EVENTS) -> int:
    """``wanted`` if BCC can write it to ``kprobe_events`` here, else 0 (the kernel's
    default, through the perf_kprobe PMU). ``access()`` reports a read-only mount."""
    path = next((p for p in paths if os.path.exists(p)), None)
    if wanted > 0 and path is not None and os.access(path, os.W_OK):
        return wanted
    return 0
