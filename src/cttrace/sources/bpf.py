"""The ``bpf`` source: BCC programs on conntrack and connect, read from a ring or perf buffer.

This is the only module that imports bcc, and it does so inside
:meth:`BpfSource.open`: importing cttrace never compiles or attaches anything.
The C ships inside the package as data (``cttrace/bpf/``: one header with the
event layout, one file per concern), found through :mod:`importlib.resources` so
an installed wheel finds it as a checkout does; :func:`program_text` prepends the settings as
``#define``\\ s and concatenates them into the single text BCC compiles, which
is also what ``--dump-bpf`` prints.

Compiling takes seconds on a real node (minutes under emulation), so a
process compiles once per :meth:`open`. Lost events are never silent: failed
buffer writes are counted in the kernel, perf's lost records are counted in
userspace, both come out as :class:`cttrace.events.Lost`, and kretprobe misses
(returns the kernel could not instrument because more than ``maxactive``
calls were in flight) are read from tracefs' ``kprobe_profile``.
"""

from __future__ import annotations

import ctypes
import os
import select
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from cttrace.errors import SourceError
from cttrace.events import Event, Lost
from cttrace.rules import UNREPLIED_TCP_STATES, WANTED_TCP_STATES
from cttrace.sources import SourceStats
from cttrace.sources.bcc_compile import CompileFailed, compile_program
from cttrace.sources.bpf_layout import (
    CNT_FILTERED,
    CNT_FILTERED_TRANSITION,
    CNT_LOST,
    CNT_NOT_ACCEPTED,
    CNT_STASH_FULL,
    DecodeError,
    decode,
)
from cttrace.sources.kprobe_events import usable_maxactive
from cttrace.sources.probe import SEND_RESET_KPROBE, BpfFeatures, check_bpf

#: Concatenated in this order; each .bpf.c file's ``#include "cttrace.h"`` is
#: satisfied by the header text placed first.
PROGRAM_FILES = ("cttrace.h", "maps.bpf.c", "conntrack.bpf.c", "connect.bpf.c", "reset.bpf.c")
_LOCAL_INCLUDE = '#include "cttrace.h"'
#: Counter slots whose events never left the kernel: a failed buffer write, a call
#: the return probe could not be matched with.
_LOST_SLOTS = (CNT_LOST, CNT_STASH_FULL)

#: (kernel function, entry program, return program or None)
_KPROBES = (
    ("__nf_conntrack_confirm", "ctt_confirm_enter", "ctt_confirm_return"),
    ("nf_conntrack_tcp_packet", "ctt_tcp_packet_enter", "ctt_tcp_packet_return"),
    ("nf_ct_delete", "ctt_ct_delete", None),
    ("tcp_connect", "ctt_connect_enter", None),
)


def default_bpf_dir() -> Traversable:
    """The package's own ``bpf/`` folder (package data, wherever cttrace is installed)."""
    return resources.files("cttrace") / "bpf"


@dataclass(frozen=True, slots=True)
class BpfSettings:
    """Everything that shapes the program before it is compiled (rendered as #defines)."""

    netns_ino: int = 0
    """Report conntrack entries of this network namespace only (ns.inum); 0: every namespace."""
    ringbuf: bool = True
    """Use one BPF ring buffer (ordered across CPUs) when the kernel has it, else perf buffers."""
    ringbuf_pages: int = 256
    """Ring buffer size in pages (power of two): 1 MiB holds ~8k conntrack records."""
    perf_pages: int = 64
    """Perf buffer pages per CPU (power of two), when there is no ring buffer."""
    tracked_max: int = 65536
    """NATed TCP entries remembered between confirm and delete (LRU beyond that)."""
    stash_max: int = 4096
    """Calls in flight between a kprobe and its kretprobe."""
    kretprobe_maxactive: int = 256
    """Instances per kretprobe: the kernel's default, max(10, 2 * CPUs), misses under load."""
    send_reset: str = "kprobe"
    """Where sent resets are seen: ``kprobe`` (tcp_v4_send_reset, sees socketless ones),
    ``tracepoint`` (tcp:tcp_send_reset) or ``off``."""
    receive_reset_tracepoint: bool = True

    def defines(self) -> str:
        values = {
            "CTT_NETNS_INO": f"{self.netns_ino}U",
            "CTT_USE_RINGBUF": int(self.ringbuf),
            "CTT_RINGBUF_PAGES": self.ringbuf_pages,
            "CTT_TRACKED_MAX": self.tracked_max,
            "CTT_STASH_MAX": self.stash_max,
            "CTT_SEND_RESET_TRACEPOINT": int(self.send_reset == "tracepoint"),
            "CTT_RECEIVE_RESET_TRACEPOINT": int(self.receive_reset_tracepoint),
            # The state changes the rules read (cttrace.rules), as enum tcp_conntrack bits.
            "CTT_WANTED_FROM_STATES": f"{_state_bits(UNREPLIED_TCP_STATES):#x}U",
            "CTT_WANTED_TO_STATES": f"{_state_bits(WANTED_TCP_STATES):#x}U",
        }
        return "".join(f"#define {name} {value}\n" for name, value in values.items())


def _state_bits(states: frozenset[int]) -> int:
    return sum(1 << state for state in states)


def settings_for(features: BpfFeatures, wanted: BpfSettings) -> BpfSettings:
    """``wanted``, reduced to what this kernel has."""
    send_reset = wanted.send_reset
    if send_reset == "kprobe" and not features.send_reset_kprobe:
        send_reset = "tracepoint"
    if send_reset == "tracepoint" and not features.send_reset_tracepoint:
        send_reset = "off"
    return replace(
        wanted,
        ringbuf=wanted.ringbuf and features.ringbuf,
        send_reset=send_reset,
        receive_reset_tracepoint=wanted.receive_reset_tracepoint
        and features.receive_reset_tracepoint,
    )


def program_text(settings: BpfSettings, bpf_dir: Traversable | None = None) -> str:
    """The complete C text BCC compiles (what ``--dump-bpf`` prints)."""
    bpf_dir = bpf_dir or default_bpf_dir()
    parts = [
        "/* cttrace BPF program: settings, then " + ", ".join(PROGRAM_FILES) + " */\n",
        settings.defines(),
    ]
    for name in PROGRAM_FILES:
        path = bpf_dir / name
        try:
            text = path.read_text()
        except OSError as exc:
            raise SourceError(
                f"cannot read the BPF program {path}: {exc.strerror} "
                "(the cttrace package is installed without its bpf/ data files: reinstall it)"
            ) from exc
        if name != "cttrace.h":
            text = text.replace(_LOCAL_INCLUDE, "/* cttrace.h: inlined above */")
        parts.append(f"\n/* ==== bpf/{name} ==== */\n{text}")
    return "".join(parts)


def _tracefs_misses(tracefs: Path | None, pid: int) -> tuple[int, int] | None:
    """(kprobe misses, kretprobe misses) of this process's probes, from kprobe_profile.

    BCC names its tracefs probes ``p_<func>_bcc_<pid>`` / ``r_<func>_bcc_<pid>``;
    each line of kprobe_profile is ``<event> <hits> <misses>``. None when
    the probes were created through the perf kprobe PMU, which does not
    appear there.
    """
    if tracefs is None:
        return None
    try:
        text = (tracefs / "kprobe_profile").read_text()
    except OSError:
        return None
    suffix = f"_bcc_{pid}"
    entry = ret = 0
    found = False
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or not parts[0].endswith(suffix):
            continue
        found = True
        if parts[0].startswith("r_"):
            ret += int(parts[2])
        else:
            entry += int(parts[2])
    return (entry, ret) if found else None


class BpfSource:
    """NATed TCP conntrack entries (confirm, state changes, delete), connects and resets."""

    name = "bpf"

    def __init__(
        self,
        netns_ino: int | None = None,
        *,
        settings: BpfSettings | None = None,
        headers: str | None = None,
        bpf_dir: Traversable | None = None,
        on_raw: Callable[[bytes], None] | None = None,
    ) -> None:
        """``netns_ino``: report conntrack entries of this network namespace only.

        ``headers``: kernel header directory (default $CTTRACE_KERNEL_HEADERS,
        then where distributions put them); ``on_raw`` sees every raw record
        before it is decoded (recording test data).
        """
        base = settings or BpfSettings()
        self._wanted = replace(base, netns_ino=netns_ino or base.netns_ino)
        self._headers = headers
        self._bpf_dir = bpf_dir
        self._on_raw = on_raw
        self._bpf: Any = None
        self._features: BpfFeatures | None = None
        self._settings: BpfSettings | None = None
        self._epoll: select.epoll | None = None
        self._pending: list[Event] = []
        self._mono_to_wall = 0.0
        self._stats = SourceStats()
        self._kernel_lost_seen = 0
        self._perf_lost = 0
        self._undecodable = 0
        self._detached_tracepoints: list[bytes] = []

    # --- what would be compiled ------------------------------------------------------

    def dump_text(self) -> str:
        """The program text :meth:`open` compiles on this kernel (``--dump-bpf``).

        Probes the kernel for what it can; where it cannot tell (no kprobes
        here), shows the text for the default settings.
        """
        try:
            settings = settings_for(check_bpf(self._headers), self._wanted)
        except SourceError as err:
            note = str(err).replace("*/", "* /")
            return (f"/* this kernel cannot run the bpf source ({note}): "
                    "the default settings are shown */\n"
                    + program_text(self._wanted, self._bpf_dir))
        return program_text(settings, self._bpf_dir)

    @property
    def settings(self) -> BpfSettings | None:
        """The settings the loaded program was built with (None before open)."""
        return self._settings

    def insert_failures(self) -> dict[int, int]:
        """NATed TCP entries whose confirm failed since the programs were loaded (an insert
        clash: the packet was dropped), by network namespace inode ({} before open)."""
        if self._bpf is None:
            return {}
        return {int(k.value): int(v.value) for k, v in self._bpf["ctt_insert_failed"].items()}

    # --- Source protocol ---------------------------------------------------------------

    def open(self) -> None:
        """Compile, load and attach everything; SourceError says exactly what failed."""
        if self._bpf is not None:
            return
        features = check_bpf(self._headers)
        settings = settings_for(features, self._wanted)
        text = program_text(settings, self._bpf_dir)
        try:
            from bcc import BPF  # the one place cttrace imports bcc
        except ImportError as exc:
            raise SourceError(f"cannot import BCC ({exc}): apt install python3-bpfcc") from exc

        self._mono_to_wall = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
        self._bpf = _compile(BPF, text, features)
        self._features, self._settings = features, settings
        try:
            self._attach(settings)
            self._open_output(settings)
        except BaseException:
            self.close()
            raise

    def fileno(self) -> int:
        if self._epoll is None:
            raise SourceError("bpf source is not open")
        return self._epoll.fileno()

    def read(self) -> list[Event]:
        """Every record ready now, decoded; never blocks."""
        bpf = self._bpf
        if bpf is None:
            raise SourceError("bpf source is not open")
        if self._settings is not None and self._settings.ringbuf:
            bpf.ring_buffer_consume()
        else:
            bpf.perf_buffer_consume()
        out = self._pending
        self._pending = []
        self._check_kernel_lost(out)
        self._stats.events += len(out)
        return out

    def stats(self) -> SourceStats:
        if self._bpf is not None:
            counters = self._counters()
            # The kernel counts every failed buffer write (bpf_ringbuf_output and
            # bpf_perf_event_output both return -ENOSPC), so perf's own lost
            # records are the same events counted again: shown, not added.
            self._stats.lost = sum(counters[slot] for slot in _LOST_SLOTS)
            self._stats.filtered = counters[CNT_FILTERED]  # entries: not NATed TCP, other netns
            # State changes of tracked entries that no rule needs, also dropped in the kernel.
            self._stats.extra["filtered_transitions"] = counters[CNT_FILTERED_TRANSITION]
            self._stats.extra["confirm_not_accepted"] = counters[CNT_NOT_ACCEPTED]
            self._stats.extra["stash_full"] = counters[CNT_STASH_FULL]
            self._stats.extra["perf_lost"] = self._perf_lost
            misses = _tracefs_misses(
                self._features.tracefs if self._features else None, os.getpid()
            )
            if misses is not None:
                self._stats.extra["kprobe_misses"] = misses[0]
                self._stats.extra["kretprobe_misses"] = misses[1]
        self._stats.extra["undecodable"] = self._undecodable
        if self._settings is not None:
            self._stats.extra["ringbuf"] = int(self._settings.ringbuf)
        return self._stats

    def detach(self) -> None:
        """Take every probe and tracepoint off the kernel, keeping the loaded programs,
        maps and buffers: :meth:`attach` puts them back without compiling again.

        What the probes cost is measured this way (bench/bpf_overhead.py): the same
        programs, attached and not, in one boot. Events already written stay readable.
        """
        bpf = self._bpf
        if bpf is None:
            raise SourceError("bpf source is not open")
        for ev_name in list(bpf.kprobe_fds):
            bpf.detach_kprobe_event(ev_name)
        tracepoints = list(bpf.tracepoint_fds)
        for tp in tracepoints:
            bpf.detach_tracepoint(tp)
        self._detached_tracepoints += tracepoints

    def attach(self) -> None:
        """Attach again what :meth:`detach` took off (open() attaches by itself)."""
        bpf = self._bpf
        if bpf is None or self._settings is None:
            raise SourceError("bpf source is not open")
        self._attach(self._settings)
        while self._detached_tracepoints:
            tp = self._detached_tracepoints[-1]
            # BCC attached these by name at load: TRACEPOINT_PROBE(cat, name) is the
            # function tracepoint__cat__name.
            try:
                bpf.attach_tracepoint(tp=tp, fn_name=b"tracepoint__" + tp.replace(b":", b"__"))
            except Exception as exc:  # BCC raises bare Exception
                raise SourceError(f"cannot attach to the tracepoint {tp.decode()}: {exc}") \
                    from exc
            self._detached_tracepoints.pop()

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()  # detaches every probe, frees buffers, closes program fds

    # --- internals ---------------------------------------------------------------------

    def _attach(self, settings: BpfSettings) -> None:
        bpf = self._bpf
        maxactive = usable_maxactive(settings.kretprobe_maxactive)
        probes = list(_KPROBES)
        if settings.send_reset == "kprobe":
            probes.append((SEND_RESET_KPROBE, "ctt_send_reset_enter", None))
        for function, enter, ret in probes:
            try:
                bpf.attach_kprobe(event=function, fn_name=enter)
                if ret is not None:
                    bpf.attach_kretprobe(event=function, fn_name=ret, maxactive=maxactive)
            except Exception as exc:  # BCC raises bare Exception
                raise SourceError(f"cannot attach a kprobe to {function}: {exc}") from exc

    def _open_output(self, settings: BpfSettings) -> None:
        from bcc.libbcc import lib

        table = self._bpf["ctt_events"]
        epoll = select.epoll()
        self._epoll = epoll
        if settings.ringbuf:
            table.open_ring_buffer(self._on_ringbuf_record)
            epoll.register(table.map_fd, select.EPOLLIN)
        else:
            table.open_perf_buffer(
                self._on_perf_record, page_cnt=settings.perf_pages, lost_cb=self._on_perf_lost
            )
            for reader in self._bpf.perf_buffers.values():
                epoll.register(lib.perf_reader_fd(reader), select.EPOLLIN)

    def _on_record(self, data: int, size: int) -> None:
        raw = ctypes.string_at(data, size)
        if self._on_raw is not None:
            self._on_raw(raw)
        try:
            self._pending.append(decode(raw, self._mono_to_wall))
        except DecodeError:
            self._undecodable += 1

    def _on_ringbuf_record(self, _ctx: int, data: int, size: int) -> int:
        self._on_record(data, size)
        return 0

    def _on_perf_record(self, _cpu: int, data: int, size: int) -> None:
        self._on_record(data, size)

    def _on_perf_lost(self, count: int) -> None:
        self._perf_lost += count  # already counted in the kernel: see stats()

    def _counters(self, slots: Iterable[int] | None = None) -> list[int]:
        """The per-CPU counters summed over the CPUs: ``slots`` (one map lookup each), or all."""
        table = self._bpf["ctt_counters"]
        return [int(table.sum(slot).value) for slot in slots or range(len(table))]

    def _check_kernel_lost(self, out: list[Event]) -> None:
        # After every read: only the slots that count lost events; stats() reads them all.
        lost = sum(self._counters(_LOST_SLOTS))
        if lost > self._kernel_lost_seen:
            reason = "ring buffer full" if self._settings and self._settings.ringbuf else (
                "perf buffer full"
            )
            out.append(Lost(time.time(), self.name, lost - self._kernel_lost_seen, reason))
            self._kernel_lost_seen = lost


def _compile(bpf_class: Any, text: str, features: BpfFeatures) -> Any:
    """BPF(text=...) with headers from ``features`` (cttrace.sources.bcc_compile supplies
    what BCC's headers lack); compile and load errors become a one-line SourceError."""
    try:
        return compile_program(bpf_class, text, features.release, features.headers_dir).module
    except CompileFailed as exc:
        if "Operation not permitted" in str(exc):
            raise SourceError(
                f"EPERM loading cttrace's BPF programs ({exc}): run as root "
                "with CAP_SYS_ADMIN (or CAP_BPF + CAP_PERFMON)"
            ) from exc
        raise SourceError(
            f"BCC could not compile or load cttrace's BPF programs on {features.release}: "
            f"{exc} (`cttrace watch --dump-bpf` prints the program)"
        ) from exc
