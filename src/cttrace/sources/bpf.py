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
userspace, both come out as :class:`cttrace.events.Lost`, kretprobe misses
(returns the kernel could not instrument because more than ``maxactive``
calls were in flight) are read from tracefs' ``kprobe_profile``, and runs of a
trampoline program the kernel skipped from its fdinfo (``recursion_misses``).

The nf_conntrack hooks come in two variants compiled together: BPF trampolines,
which BCC cannot attach to a module's functions and
:mod:`cttrace.sources.trampoline` loads, and kprobes, the fallback where the
kernel, or the agent's capabilities, do not allow trampolines (:meth:`BpfSource.hooks`
says which and why).
"""

from __future__ import annotations

import contextlib
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

from cttrace.correlator import Entry
from cttrace.errors import SourceError
from cttrace.events import CtStatus, Event, Lost
from cttrace.rules import UNREPLIED_TCP_STATES, WANTED_TCP_STATES, Settings
from cttrace.rules.inherited_entry import INHERIT_WINDOW
from cttrace.rules.late_establish import LATE_AFTER
from cttrace.sources import SourceStats
from cttrace.sources.bcc_compile import CompileFailed, compile_program
from cttrace.sources.bpf_layout import (
    CNT_EMITTED,
    CNT_FILTERED,
    CNT_FILTERED_TRANSITION,
    CNT_LOST,
    CNT_NOT_ACCEPTED,
    CNT_QUIET,
    CNT_REPORTED,
    CNT_STASH_FULL,
    CNT_TRACKED,
    CNT_UNSEEN_DELETE,
    CttTracked,
    DecodeError,
    addr_key,
    decode,
    tracked_events,
    tracked_flows,
)
from cttrace.sources.bpf_syscall import update_existing
from cttrace.sources.kprobe_events import usable_maxactive
from cttrace.sources.probe import (
    CONNTRACK_MODULE,
    SEND_RESET6_KPROBE,
    SEND_RESET_KPROBE,
    BpfFeatures,
    check_bpf,
)
from cttrace.sources.trampoline import Trampoline, load_module_trampolines, prog_fdinfo

#: Concatenated in this order; each .bpf.c file's ``#include "cttrace.h"`` is
#: satisfied by the header text placed first.
PROGRAM_FILES = ("cttrace.h", "maps.bpf.c", "conntrack.bpf.c", "connect.bpf.c", "reset.bpf.c")
_LOCAL_INCLUDE = '#include "cttrace.h"'
#: Counter slots whose events never left the kernel: a failed buffer write, a call
#: the return probe could not be matched with.
_LOST_SLOTS = (CNT_LOST, CNT_STASH_FULL)

#: The nf_conntrack hooks where trampolines can be loaded (cttrace.sources.trampoline):
#: (kernel function, program, fentry or fexit). An fexit program sees the arguments
#: and the return value at once.
_TRAMPOLINES = (
    ("__nf_conntrack_confirm", "ctt_confirm_fexit", "fexit"),
    ("nf_conntrack_tcp_packet", "ctt_tcp_packet_fexit", "fexit"),
    ("nf_ct_delete", "ctt_ct_delete_fentry", "fentry"),
)
_TRAMPOLINE_WHY = ("nf_conntrack module function: loaded by cttrace against the module's BTF "
                   "(BCC attaches trampolines to vmlinux functions only)")
#: Why the conntrack hooks are kprobes after attach(module_kprobes=True).
KPROBE_VARIANT_WHY = ("the fallback (no BTF or trampolines, or no CAP_SYS_ADMIN to open the "
                      "module's BTF object), switched to without recompiling")
#: The same hooks as kprobes, where trampolines cannot be had:
#: (kernel function, entry program, return program or None)
_KPROBES = (
    ("__nf_conntrack_confirm", "ctt_confirm_enter", "ctt_confirm_return"),
    ("nf_conntrack_tcp_packet", "ctt_tcp_packet_enter", "ctt_tcp_packet_return"),
    ("nf_ct_delete", "ctt_ct_delete", None),
)
_CONNECT = ("tcp_connect", "ctt_connect_enter", None)
_SEND_RESET = (SEND_RESET_KPROBE, "ctt_send_reset_enter", None)
_SEND_RESET6 = (SEND_RESET6_KPROBE, "ctt_send_reset6_enter", None)


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
    """Where sent resets are seen: ``kprobe`` (tcp_v4_send_reset, and tcp_v6_send_reset
    where it can be probed: sees socketless ones), ``tracepoint`` (tcp:tcp_send_reset) or
    ``off``."""
    receive_reset_tracepoint: bool = True
    """Also report resets local sockets receive (tcp:tcp_receive_reset); with ``stream_all``
    only: no rule needs them."""
    stream_all: bool = False
    """Send every record to userspace (``--flows``, the record-level tests);
    False: the kernel keeps each entry and sends it only once a rule may need it."""
    late_after_ns: int = round(LATE_AFTER.default * 1e9)
    """An entry unreplied this long is sent: ``--late-after``, the earliest a first-reply
    rule (late-establish, wrong-pod decided on a reply) or unnated-reply's no-reply can fire."""
    inherit_ns: int = round(INHERIT_WINDOW.default * 1e9)
    """A connect() this long after its entry's confirm did not create it (the correlator's
    ``inherit_window``)."""
    connects_max: int = 65536
    """connect()s remembered until their entry is confirmed (LRU)."""
    watched_max: int = 16384
    """DNAT targets userspace can watch at once."""
    fentry: bool = True
    """Reach the hooks through BPF trampolines (fentry, fexit) where the kernel allows
    it, instead of kprobes: tcp_connect through BCC, the nf_conntrack functions through
    cttrace.sources.trampoline."""

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
            "CTT_STREAM_ALL": int(self.stream_all),
            "CTT_LATE_NS": f"{self.late_after_ns}ULL",
            "CTT_INHERIT_NS": f"{self.inherit_ns}ULL",
            "CTT_CONNECTS_MAX": self.connects_max,
            "CTT_WATCHED_MAX": self.watched_max,
            "CTT_FENTRY": int(self.fentry),
        }
        return "".join(f"#define {name} {value}\n" for name, value in values.items())


def _state_bits(states: frozenset[int]) -> int:
    return sum(1 << state for state in states)


def settings_for_rules(rules: Settings, *, stream_all: bool = False) -> BpfSettings:
    """The settings that let the kernel send exactly what the rules may need: an entry
    unreplied ``--late-after`` seconds, a connect() within inherited-entry's
    ``inherit_window`` of its entry's confirm. ``stream_all``: every record (``--flows``)."""
    return BpfSettings(stream_all=stream_all, late_after_ns=_ns(rules[LATE_AFTER]),
                       inherit_ns=_ns(rules[INHERIT_WINDOW]))


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


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
        receive_reset_tracepoint=wanted.receive_reset_tracepoint and wanted.stream_all
        and features.receive_reset_tracepoint,
        fentry=wanted.fentry and features.fentry_unavailable is None,
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
        self._watched: set[str] = set()
        self._replay: set[str] = set()
        self._trampolines: list[Trampoline] = []
        self._module_kprobe_why = "not opened"

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

    # --- what userspace asks of the kernel -------------------------------------------------

    def watch_target(self, ip: str) -> None:
        """Report every entry toward DNAT target ``ip`` from now on (kernel map ctt_watched),
        and, at the next :meth:`read`, the entries already toward it that the kernel kept.

        Called when ``ip``'s owner died, changed, or left its Service: a rule may now need
        entries that were healthy until then (dead-endpoint, wrong-pod).
        """
        if self._bpf is None or ip in self._watched:
            return
        table = self._bpf["ctt_watched"]
        key = table.Key()
        ctypes.memmove(ctypes.addressof(key), addr_key(ip), ctypes.sizeof(key))
        try:
            table[key] = table.Leaf(1)
        except Exception:  # BCC raises bare Exception; E2BIG: the map is full
            self._stats.extra["watched_full"] = self._stats.extra.get("watched_full", 0) + 1
            return
        self._watched.add(ip)
        self._replay.add(ip)

    def unwatch_target(self, ip: str) -> None:
        """Stop reporting new entries toward ``ip`` (its watch window has passed)."""
        if self._bpf is None or ip not in self._watched:
            return
        table = self._bpf["ctt_watched"]
        key = table.Key()
        ctypes.memmove(ctypes.addressof(key), addr_key(ip), ctypes.sizeof(key))
        with contextlib.suppress(KeyError):
            del table[key]
        self._watched.discard(ip)
        self._replay.discard(ip)

    def program_runs(self) -> dict[str, tuple[int, int]]:
        """``{program: (runs, run ns)}`` of every loaded program, from its fd's fdinfo
        (``run_cnt``, ``run_time_ns``): the kernel counts them while
        ``kernel.bpf_stats_enabled`` is 1 (bench/bpf_overhead.py turns it on)."""
        out: dict[str, tuple[int, int]] = {}
        for name, fd in self._program_fds():
            fields = prog_fdinfo(fd)
            if fields:
                out[name] = (fields.get("run_cnt", 0), fields.get("run_time_ns", 0))
        return out

    def _program_fds(self) -> list[tuple[str, int]]:
        """(name, fd) of every loaded program: BCC's and the module trampolines."""
        if self._bpf is None:
            return []
        out = [(name.decode() if isinstance(name, bytes) else str(name), fn.fd)
               for name, fn in self._bpf.funcs.items()]
        return out + [(t.program, t.prog_fd) for t in self._trampolines]

    def _trampoline_misses(self) -> int:
        """Runs of trampoline programs the kernel skipped because the same program was
        already running on that CPU (fdinfo ``recursion_misses``: an interrupt's packet
        arriving while the program ran): their events are lost."""
        names = {t.program for t in self._trampolines} | {"kfunc__tcp_connect"}
        return sum(prog_fdinfo(fd).get("recursion_misses", 0)
                   for name, fd in self._program_fds() if name in names)

    def _replay_watched(self) -> list[Event]:
        """The entries the kernel kept toward the newly watched targets, as the records it
        would have sent; each is marked reported so that its changes and delete follow.

        The mark is a write-back of the whole value read a moment before, made only if
        the kernel still holds the entry: one deleted meanwhile (its DESTROY unsent, as
        it was not reported) is left deleted and not replayed, so userspace never holds
        an entry that is gone. A state change the kernel stored in between is
        overwritten by the older state, and would be reported once more."""
        targets = {addr_key(ip) for ip in self._replay}
        self._replay.clear()
        table = self._bpf["ctt_tracked"]
        out: list[Event] = []
        for key, value in table.items():
            tracked = CttTracked.from_buffer_copy(bytes(value))
            if tracked.reported or bytes(tracked.reply.saddr) not in targets:
                continue
            value.reported = 1
            try:
                held = update_existing(table.map_fd, key, value)
            except OSError as exc:
                raise SourceError(f"cannot mark a kept entry reported in ctt_tracked: "
                                  f"{exc.strerror}") from exc
            if held:
                out.extend(tracked_events(int(key.value), tracked, self._mono_to_wall))
        return out

    def kept_entries(self) -> list[Entry]:
        """The entries the kernel keeps and has sent nothing of (healthy so far), read from
        its map now: what the live table shows beside the correlator's own entries at each
        refresh, where otherwise every record of every connection would stream to userspace."""
        if self._bpf is None:
            return []
        out: list[Entry] = []
        for key, value in self._bpf["ctt_tracked"].items():
            tracked = CttTracked.from_buffer_copy(bytes(value))
            if not tracked.reported:
                out.append(kept_entry(int(key.value), tracked, self._mono_to_wall))
        return out

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
            self._load_trampolines(settings, features)
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
        if self._replay:
            # First: records for these entries already in the buffer follow their history.
            self._pending[:0] = self._replay_watched()
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
            self._stats.filtered = counters[CNT_FILTERED]  # not translated TCP, other netns
            # State changes of tracked entries that no rule needs, also dropped in the kernel.
            self._stats.extra["filtered_transitions"] = counters[CNT_FILTERED_TRANSITION]
            self._stats.extra["confirm_not_accepted"] = counters[CNT_NOT_ACCEPTED]
            self._stats.extra["stash_full"] = counters[CNT_STASH_FULL]
            # Where the cost goes: entries the kernel kept, the few it sent, records written.
            self._stats.extra["entries_tracked"] = counters[CNT_TRACKED]
            self._stats.extra["entries_reported"] = counters[CNT_REPORTED]
            self._stats.extra["records_emitted"] = counters[CNT_EMITTED]
            self._stats.extra["kept_in_kernel"] = counters[CNT_QUIET]
            # NATed TCP entries deleted while the kernel map did not hold them: evicted
            # from the LRU map (or older than the programs). Never silent.
            self._stats.extra["entry_map_evictions"] = counters[CNT_UNSEEN_DELETE]
            self._stats.extra["watched_targets"] = len(self._watched)
            self._stats.hooks = self.hooks()
            self._stats.extra["perf_lost"] = self._perf_lost
            misses = _tracefs_misses(
                self._features.tracefs if self._features else None, os.getpid()
            )
            if misses is not None:
                self._stats.extra["kprobe_misses"] = misses[0]
                self._stats.extra["kretprobe_misses"] = misses[1]
            self._stats.extra["trampoline_misses"] = self._trampoline_misses()
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
        for fn_name in list(bpf.kfunc_entry_fds):
            bpf.detach_kfunc(fn_name)
        for trampoline in self._trampolines:
            trampoline.detach()
        tracepoints = list(bpf.tracepoint_fds)
        for tp in tracepoints:
            bpf.detach_tracepoint(tp)
        self._detached_tracepoints += tracepoints

    def attach(self, *, module_kprobes: bool = False) -> None:
        """Attach again what :meth:`detach` took off (open() attaches by itself).

        ``module_kprobes``: hook the nf_conntrack functions with the kprobe variant from
        now on, unloading their trampolines (both variants were compiled): how the VM tier
        and the bench exercise the fallback without compiling again.
        """
        bpf = self._bpf
        if bpf is None or self._settings is None:
            raise SourceError("bpf source is not open")
        if module_kprobes and self._trampolines:
            self._drop_trampolines(KPROBE_VARIANT_WHY)
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
        self._drop_trampolines("closed")
        if self._bpf is not None:
            bpf, self._bpf = self._bpf, None
            bpf.cleanup()  # detaches every probe, frees buffers, closes program fds

    # --- internals ---------------------------------------------------------------------

    def hooks(self) -> dict[str, tuple[str, str]]:
        """How each kernel function is reached, and why: ``{function: (mode, why)}``
        (``fentry``, ``fexit``, ``kprobe`` or ``kprobe+kretprobe``; the ``source`` line and
        /metrics)."""
        settings, features = self._settings, self._features
        if settings is None or features is None:
            return {}
        if self._trampolines:
            out = {t.function: (t.kind, _TRAMPOLINE_WHY) for t in self._trampolines}
        else:
            out = {function: ("kprobe+kretprobe" if ret else "kprobe", self._module_kprobe_why)
                   for function, _, ret in _KPROBES}
        if settings.fentry:
            out["tcp_connect"] = ("fentry", "vmlinux function, kernel BTF and trampolines")
        else:
            out["tcp_connect"] = ("kprobe", features.fentry_unavailable or "fentry turned off")
        if settings.send_reset == "kprobe":
            for function, _, _ in self._send_reset_kprobes():
                out[function] = ("kprobe", "static function: resets are rare")
        return out

    def _send_reset_kprobes(self) -> list[tuple[str, str, None]]:
        """The reset functions probed under ``send_reset == "kprobe"``: IPv4's, and IPv6's
        where this kernel lets it be probed."""
        v6 = self._features is not None and self._features.send_reset6_kprobe
        return [_SEND_RESET, _SEND_RESET6] if v6 else [_SEND_RESET]

    def _load_trampolines(self, settings: BpfSettings, features: BpfFeatures) -> None:
        """Load the nf_conntrack hooks as trampolines where this kernel allows it; otherwise
        the kprobes will be attached, and ``hooks()`` says why."""
        if not settings.fentry:
            self._module_kprobe_why = features.module_fentry_unavailable or "fentry turned off"
            return
        if features.module_fentry_unavailable is not None:
            self._module_kprobe_why = features.module_fentry_unavailable
            return
        try:
            self._trampolines = load_module_trampolines(CONNTRACK_MODULE, [
                (program, function, kind, self._bpf.dump_func(program))
                for function, program, kind in _TRAMPOLINES])
        except SourceError as exc:
            self._module_kprobe_why = f"trampolines failed: {exc}"

    def _drop_trampolines(self, why: str) -> None:
        """Detach and unload the conntrack trampolines: their kprobes take over."""
        while self._trampolines:
            self._trampolines.pop().close()
        self._module_kprobe_why = why

    def _attach(self, settings: BpfSettings) -> None:
        bpf = self._bpf
        maxactive = usable_maxactive(settings.kretprobe_maxactive)
        try:
            for trampoline in self._trampolines:
                trampoline.attach()
        except SourceError as exc:
            self._drop_trampolines(f"trampolines failed: {exc}")
        probes = [] if self._trampolines else list(_KPROBES)
        if settings.fentry:
            # BCC attached it when it loaded the program; again after a detach().
            if b"kfunc__tcp_connect" not in bpf.kfunc_entry_fds:
                try:
                    bpf.attach_kfunc(fn_name=b"tcp_connect")
                except Exception as exc:  # BCC raises bare Exception
                    raise SourceError(f"cannot attach fentry to tcp_connect: {exc}") from exc
        else:
            probes.append(_CONNECT)
        if settings.send_reset == "kprobe":
            probes.extend(self._send_reset_kprobes())
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


def kept_entry(ct_ptr: int, t: CttTracked, mono_to_wall: float) -> Entry:
    """A kept entry as the correlator's :class:`Entry` (for display: no rule reads it)."""
    orig, reply = tracked_flows(t)
    created = t.created_ns / 1e9 + mono_to_wall
    replied = t.replied_ns / 1e9 + mono_to_wall if t.replied_ns else None
    status = t.status | (int(CtStatus.SEEN_REPLY) if replied is not None else 0)
    return Entry(entry_id=ct_ptr, orig_tuple=(orig.src, orig.sport, orig.dst, orig.dport),
                 target_ip=reply.src,
                 target_port=reply.sport, created=created, state=t.state, status=status,
                 source="bpf", last_seen=replied or created, replied=replied)


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
