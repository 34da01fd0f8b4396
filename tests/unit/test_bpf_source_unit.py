"""The bpf source's userspace side without a kernel: what ``--dump-bpf`` prints, and how the
kernel's loss counters and kretprobe misses reach the status line, JSON status and metrics.

Nothing here compiles or loads anything: the BCC object is replaced by a fake that
holds the per-CPU counter map's sums (what ``ctt_counters`` would), and tracefs by a
directory with a ``kprobe_profile`` as the kernel writes it.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import select
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console
from typer.testing import CliRunner

from cttrace.agent import MetricsSink
from cttrace.cli import app
from cttrace.correlator import Correlator
from cttrace.errors import SourceError
from cttrace.events import Lost
from cttrace.metrics import Metrics
from cttrace.runtime import Pipeline
from cttrace.sinks.jsonl import JsonLinesSink
from cttrace.sinks.live import LiveView
from cttrace.sources import bpf as bpf_module
from cttrace.sources import trampoline as trampoline_module
from cttrace.sources.bpf import KPROBE_VARIANT_WHY, BpfSettings, BpfSource
from cttrace.sources.bpf_layout import (
    CNT_FILTERED,
    CNT_FILTERED_TRANSITION,
    CNT_LOST,
    CNT_NOT_ACCEPTED,
    CNT_STASH_FULL,
    NR_COUNTERS,
    CttTracked,
    addr_key,
)
from cttrace.sources.probe import BpfFeatures
from cttrace.sources.trampoline import Trampoline


class FakeCounters:
    """``bpf["ctt_counters"]``: a per-CPU array whose ``sum(slot).value`` adds the CPUs."""

    def __init__(self) -> None:
        self.values = [0] * NR_COUNTERS

    def __len__(self) -> int:
        return len(self.values)

    def sum(self, slot: int) -> ctypes.c_uint64:
        return ctypes.c_uint64(self.values[slot])


class _Addr(ctypes.Structure):
    _fields_ = (("addr", ctypes.c_uint8 * 16),)


class FakeWatched:
    """``bpf["ctt_watched"]``: a hash of struct ctt_addr -> __u8, as BCC's Table shows it."""

    Key = _Addr
    Leaf = ctypes.c_uint8

    def __init__(self) -> None:
        self.keys: set[bytes] = set()

    def __setitem__(self, key: _Addr, leaf: ctypes.c_uint8) -> None:
        self.keys.add(bytes(key))

    def __delitem__(self, key: _Addr) -> None:
        self.keys.remove(bytes(key))


class FakeTracked:
    """``bpf["ctt_tracked"]``: the kernel's kept entries, nf_conn address -> struct."""

    map_fd = 77

    def __init__(self) -> None:
        self.entries: dict[int, CttTracked] = {}
        # Entries the kernel deletes right after userspace has read them.
        self.deleted_after_read: set[int] = set()

    def items(self) -> list[tuple[ctypes.c_uint64, CttTracked]]:
        out = [(ctypes.c_uint64(k), CttTracked.from_buffer_copy(bytes(v)))
               for k, v in self.entries.items()]
        for k in self.deleted_after_read:
            del self.entries[k]
        return out

    def update_existing(self, map_fd: int, key: ctypes.c_uint64, value: CttTracked) -> bool:
        """bpf_syscall.update_existing on this map: BPF_EXIST."""
        assert map_fd == self.map_fd
        if key.value not in self.entries:
            return False
        self.entries[key.value] = value
        return True


class FakeBpf:
    def __init__(self) -> None:
        self.counters = FakeCounters()
        self.watched = FakeWatched()
        self.tracked = FakeTracked()
        self.cleaned = False
        # What BCC keeps of attached probes: kprobe_fds[ev_name][fn_name] = fd, and
        # tracepoint_fds[b"cat:name"] = fd (the tracepoints it attached by itself at load).
        self.kprobe_fds: dict[bytes, dict[bytes, int]] = {}
        self.tracepoint_fds: dict[bytes, int] = {b"tcp:tcp_receive_reset": 9}
        # kfunc_entry_fds[b"kfunc__<function>"] = fd: fentry programs (attached at load).
        self.kfunc_entry_fds: dict[bytes, int] = {}
        self.calls: list[tuple[str, bytes, bytes]] = []
        # funcs[name] = loaded function (BCC's .fd); dump_func(name) = its instructions.
        self.funcs: dict[bytes, object] = {}

    def dump_func(self, name: str) -> bytes:
        return name.encode()

    def attach_kfunc(self, fn_name: bytes) -> None:
        self.kfunc_entry_fds[b"kfunc__" + fn_name] = 5

    def detach_kfunc(self, fn_name: bytes) -> None:
        del self.kfunc_entry_fds[fn_name]

    def _add(self, ev_name: bytes, fn_name: str) -> None:
        self.kprobe_fds.setdefault(ev_name, {})[fn_name.encode()] = 3

    def attach_kprobe(self, event: str, fn_name: str) -> None:
        self._add(b"p_" + event.encode(), fn_name)

    def attach_kretprobe(self, event: str, fn_name: str, maxactive: int) -> None:
        self._add(b"r_" + event.encode(), fn_name)

    def detach_kprobe_event(self, ev_name: bytes) -> None:
        del self.kprobe_fds[ev_name]
        self.calls.append(("detach", ev_name, b""))

    def attach_tracepoint(self, tp: bytes, fn_name: bytes) -> None:
        self.tracepoint_fds[tp] = 9
        self.calls.append(("attach_tracepoint", tp, fn_name))

    def detach_tracepoint(self, tp: bytes) -> None:
        del self.tracepoint_fds[tp]
        self.calls.append(("detach_tracepoint", tp, b""))

    def __getitem__(self, name: str) -> object:
        if name == "ctt_watched":
            return self.watched
        if name == "ctt_tracked":
            return self.tracked
        assert name == "ctt_counters"
        return self.counters

    def ring_buffer_consume(self) -> None:
        pass

    def cleanup(self) -> None:
        self.cleaned = True


def features(tracefs: Path | None, **overrides: object) -> BpfFeatures:
    base = BpfFeatures(release="6.1.0-test", headers_dir=None, ringbuf=True,
                       send_reset_kprobe=True, send_reset_tracepoint=True,
                       receive_reset_tracepoint=True, tracefs=tracefs)
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[tuple[BpfSource, FakeBpf, Path]]:
    """A BpfSource as open() leaves it, on a fake BCC object and a fake tracefs."""
    source = BpfSource()
    fake = FakeBpf()
    source._bpf = fake
    source._features = features(tmp_path)
    source._settings = BpfSettings()
    source._epoll = select.epoll()
    profile = tmp_path / "kprobe_profile"
    pid = os.getpid()
    # <event> <hits> <misses>; BCC names its tracefs probes [pr]_<func>_bcc_<pid>
    profile.write_text(
        f"  p_tcp_connect_bcc_{pid}                              120               0\n"
        f"  r___nf_conntrack_confirm_bcc_{pid}                   500               2\n"
        f"  r_nf_conntrack_tcp_packet_bcc_{pid}                 9000               1\n"
        "  r_nf_conntrack_tcp_packet_bcc_1                     9000              50\n"
    )
    yield source, fake, profile
    source.close()


def test_stats_report_kernel_losses_and_kretprobe_misses(
    opened: tuple[BpfSource, FakeBpf, Path],
) -> None:
    source, fake, _ = opened
    fake.counters.values[CNT_LOST] = 5
    fake.counters.values[CNT_STASH_FULL] = 2
    fake.counters.values[CNT_FILTERED] = 40
    fake.counters.values[CNT_FILTERED_TRANSITION] = 12
    fake.counters.values[CNT_NOT_ACCEPTED] = 1
    stats = source.stats()
    # A failed ring buffer write and a call whose return could not be matched both
    # lose an event; another process's probes (pid 1) are not ours.
    assert stats.lost == 7
    # Filtered in the kernel: entries, and (apart) state changes no rule needs.
    assert stats.filtered == 40
    assert stats.extra["filtered_transitions"] == 12
    assert stats.extra["kretprobe_misses"] == 3
    assert stats.extra["kprobe_misses"] == 0
    assert stats.extra["stash_full"] == 2
    assert stats.extra["confirm_not_accepted"] == 1


def test_read_turns_kernel_losses_into_a_lost_event_once(
    opened: tuple[BpfSource, FakeBpf, Path],
) -> None:
    source, fake, _ = opened
    assert source.read() == []
    fake.counters.values[CNT_LOST] = 4
    lost = source.read()
    assert len(lost) == 1 and isinstance(lost[0], Lost)
    assert (lost[0].source, lost[0].missed, lost[0].reason) == ("bpf", 4, "ring buffer full")
    assert source.read() == []  # counted once
    fake.counters.values[CNT_STASH_FULL] = 1
    assert [e.missed for e in source.read() if isinstance(e, Lost)] == [1]


def test_losses_and_misses_reach_status_line_json_and_metrics(
    opened: tuple[BpfSource, FakeBpf, Path],
) -> None:
    source, fake, _ = opened
    fake.counters.values[CNT_LOST] = 7
    console = Console(file=io.StringIO(), width=300, record=True)
    view = LiveView(Correlator(), None, console=console)
    out = io.BytesIO()
    json_sink = JsonLinesSink(out)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.add_source("bpf", source.stats)
    pipeline = Pipeline(source, Correlator(), [view, json_sink, MetricsSink(metrics)])
    summary = pipeline.run(threading.Event(), duration=0)
    view.close()

    assert summary.lost == 7
    screen = console.export_text()
    assert "source bpf" in screen and "lost 7" in screen and "kretprobe misses 3" in screen
    status = orjson.loads(out.getvalue().splitlines()[0])
    assert (status["kind"], status["lost"], status["kretprobe_misses"]) == ("status", 7, 3)
    assert registry.get_sample_value("cttrace_lost_events_total", {"source": "bpf"}) == 7
    assert registry.get_sample_value("cttrace_kretprobe_misses_total", {"source": "bpf"}) == 3


def test_detach_and_attach_again_without_compiling(
    opened: tuple[BpfSource, FakeBpf, Path],
) -> None:
    source, fake, _ = opened
    source._settings = BpfSettings(fentry=False)  # a kernel without BTF: tcp_connect's kprobe
    source._attach(source._settings)  # what open() attached
    attached = {ev: set(fns) for ev, fns in fake.kprobe_fds.items()}
    assert b"r___nf_conntrack_confirm" in attached and b"p_tcp_connect" in attached
    source.detach()
    assert fake.kprobe_fds == {} and fake.tracepoint_fds == {}
    source.attach()
    assert {ev: set(fns) for ev, fns in fake.kprobe_fds.items()} == attached
    assert ("attach_tracepoint", b"tcp:tcp_receive_reset",
            b"tracepoint__tcp__tcp_receive_reset") in fake.calls
    assert not fake.cleaned


def test_ipv6_resets_are_probed_beside_ipv4_where_the_kernel_allows(
    opened: tuple[BpfSource, FakeBpf, Path],
) -> None:
    """A client answering an un-reverse-NATed IPv6 SYN-ACK resets it through
    tcp_v6_send_reset; it is probed with tcp_v4_send_reset when it is traceable."""
    source, fake, _ = opened
    source._settings = BpfSettings(fentry=False)
    source._features = replace(source._features, send_reset6_kprobe=True)  # type: ignore[type-var]
    source._attach(source._settings)
    assert b"p_tcp_v4_send_reset" in fake.kprobe_fds
    assert b"p_tcp_v6_send_reset" in fake.kprobe_fds
    assert source.hooks()["tcp_v6_send_reset"][0] == "kprobe"
    source.detach()
    source._features = replace(source._features, send_reset6_kprobe=False)  # type: ignore[type-var]
    source._attach(source._settings)
    assert b"p_tcp_v4_send_reset" in fake.kprobe_fds
    assert b"p_tcp_v6_send_reset" not in fake.kprobe_fds
    assert "tcp_v6_send_reset" not in source.hooks()


def test_tcp_connect_through_fentry_detaches_and_attaches_again(
    opened: tuple[BpfSource, FakeBpf, Path],
) -> None:
    source, fake, _ = opened
    source._settings = BpfSettings(fentry=True)
    source._attach(source._settings)
    assert fake.kfunc_entry_fds == {b"kfunc__tcp_connect": 5}
    assert b"p_tcp_connect" not in fake.kprobe_fds
    assert source.hooks()["tcp_connect"][0] == "fentry"
    source.detach()
    assert fake.kfunc_entry_fds == {}
    source.attach()
    assert fake.kfunc_entry_fds == {b"kfunc__tcp_connect": 5}


@pytest.fixture
def trampolines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str, bytes]]:
    """load_module_trampolines replaced by one that hands out /dev/null fds as programs
    (and attach() as links): what was asked for is recorded in the returned list."""
    asked: list[tuple[str, str, str, bytes]] = []

    def load(module: str, programs: list[tuple[str, str, str, bytes]]) -> list[Trampoline]:
        assert module == "nf_conntrack"
        asked.extend(programs)
        return [Trampoline(program, function, kind, os.open(os.devnull, os.O_RDONLY))
                for program, function, kind, _ in programs]

    monkeypatch.setattr(bpf_module, "load_module_trampolines", load)
    monkeypatch.setattr(trampoline_module, "attach",
                        lambda prog_fd: os.open(os.devnull, os.O_RDONLY))
    return asked


def test_conntrack_hooks_are_fexit_and_fentry_where_module_btf_allows(
    opened: tuple[BpfSource, FakeBpf, Path], trampolines: list[tuple[str, str, str, bytes]],
) -> None:
    """Where the kernel has nf_conntrack's BTF, its three functions carry trampolines that
    cttrace loads itself; no kprobe or kretprobe is attached to them."""
    source, fake, _ = opened
    source._features = replace(source._features, fentry_unavailable=None,  # type: ignore[type-var]
                               module_fentry_unavailable=None)
    source._load_trampolines(source._settings, source._features)  # type: ignore[arg-type]
    source._attach(source._settings)  # type: ignore[arg-type]
    assert [(fn, prog, kind) for prog, fn, kind, _ in trampolines] == [
        ("__nf_conntrack_confirm", "ctt_confirm_fexit", "fexit"),
        ("nf_conntrack_tcp_packet", "ctt_tcp_packet_fexit", "fexit"),
        ("nf_ct_delete", "ctt_ct_delete_fentry", "fentry")]
    assert trampolines[0][3] == b"ctt_confirm_fexit"  # BCC's compiled instructions
    hooks = source.hooks()
    assert hooks["nf_conntrack_tcp_packet"][0] == "fexit"
    assert hooks["__nf_conntrack_confirm"][0] == "fexit"
    assert hooks["nf_ct_delete"][0] == "fentry"
    assert "module's BTF" in hooks["nf_ct_delete"][1]
    assert not [ev for ev in fake.kprobe_fds if b"nf_c" in ev]
    links = [t.link_fd for t in source._trampolines]
    assert None not in links
    source.detach()
    assert [t.link_fd for t in source._trampolines] == [None, None, None]
    source.attach()
    assert None not in [t.link_fd for t in source._trampolines]
    assert "trampoline_misses" in source.stats().extra

    # The fallback, switched to without compiling again: the kprobe variant.
    source.detach()
    source.attach(module_kprobes=True)
    assert source._trampolines == []
    assert b"p_nf_conntrack_tcp_packet" in fake.kprobe_fds
    assert b"r_nf_conntrack_tcp_packet" in fake.kprobe_fds
    assert source.hooks()["nf_conntrack_tcp_packet"] == ("kprobe+kretprobe", KPROBE_VARIANT_WHY)


@pytest.mark.parametrize("why", [
    "the nf_conntrack module has no BTF (/sys/kernel/btf/nf_conntrack; "
    "CONFIG_DEBUG_INFO_BTF_MODULES)",
    "the kernel has no BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)",
])
def test_conntrack_hooks_fall_back_to_kprobes_saying_why(
    opened: tuple[BpfSource, FakeBpf, Path], trampolines: list[tuple[str, str, str, bytes]],
    why: str,
) -> None:
    source, fake, _ = opened
    source._features = replace(source._features,  # type: ignore[type-var]
                               module_fentry_unavailable=why)
    source._load_trampolines(source._settings, source._features)  # type: ignore[arg-type]
    source._attach(source._settings)  # type: ignore[arg-type]
    assert trampolines == []
    assert source.hooks()["nf_conntrack_tcp_packet"] == ("kprobe+kretprobe", why)
    assert source.hooks()["nf_ct_delete"] == ("kprobe", why)
    assert b"r___nf_conntrack_confirm" in fake.kprobe_fds


def test_a_trampoline_that_cannot_attach_gives_way_to_the_kprobes(
    opened: tuple[BpfSource, FakeBpf, Path], trampolines: list[tuple[str, str, str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, fake, _ = opened
    source._features = replace(source._features, fentry_unavailable=None,  # type: ignore[type-var]
                               module_fentry_unavailable=None)
    source._load_trampolines(source._settings, source._features)  # type: ignore[arg-type]

    def refuse(prog_fd: int) -> int:
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(trampoline_module, "attach", refuse)
    source._attach(source._settings)  # type: ignore[arg-type]
    assert source._trampolines == []
    assert source.hooks()["nf_conntrack_tcp_packet"] == (
        "kprobe+kretprobe", "trampolines failed: cannot attach fexit to __nf_conntrack_confirm: "
        "Device or resource busy")
    assert b"r_nf_conntrack_tcp_packet" in fake.kprobe_fds


def test_a_refused_trampoline_falls_back_to_kprobes_with_the_kernels_reason(
    opened: tuple[BpfSource, FakeBpf, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, fake, _ = opened
    source._features = replace(source._features, fentry_unavailable=None,  # type: ignore[type-var]
                               module_fentry_unavailable=None)

    def refuse(module: str, programs: object) -> list[Trampoline]:
        raise SourceError("opening nf_conntrack's BTF object needs CAP_SYS_ADMIN "
                          "(BPF_BTF_GET_NEXT_ID, BPF_BTF_GET_FD_BY_ID)")

    monkeypatch.setattr(bpf_module, "load_module_trampolines", refuse)
    source._load_trampolines(source._settings, source._features)  # type: ignore[arg-type]
    source._attach(source._settings)  # type: ignore[arg-type]
    mode, why = source.hooks()["nf_conntrack_tcp_packet"]
    assert mode == "kprobe+kretprobe"
    assert why.startswith("trampolines failed: opening nf_conntrack's BTF object needs "
                          "CAP_SYS_ADMIN")
    assert b"p_nf_conntrack_tcp_packet" in fake.kprobe_fds


def kept(target: str, *, replied: bool, reported: bool = False) -> CttTracked:
    t = CttTracked()
    t.created_ns, t.replied_ns, t.l3num = 5_000_000_000, 5_010_000_000 if replied else 0, 2
    t.state, t.reported = 3 if replied else 1, int(reported)
    t.orig.saddr[:4] = bytes([10, 0, 0, 2])
    t.orig.daddr[:4] = bytes([10, 96, 0, 10])
    t.reply.saddr[:] = addr_key(target)
    return t


@pytest.fixture
def map_updates(opened: tuple[BpfSource, FakeBpf, Path],
                monkeypatch: pytest.MonkeyPatch) -> FakeTracked:
    """Write-backs to ctt_tracked land in the fake map."""
    monkeypatch.setattr("cttrace.sources.bpf.update_existing", opened[1].tracked.update_existing)
    return opened[1].tracked


def test_a_watched_target_replays_the_entries_the_kernel_kept_toward_it(
    opened: tuple[BpfSource, FakeBpf, Path], map_updates: FakeTracked,
) -> None:
    """dead-endpoint needs the live entries toward an IP once its pod is gone: watching the
    IP puts it in the kernel's map and replays, at the next read, every kept entry toward it
    that userspace does not hold yet, marking it reported so its changes follow."""
    source, fake, _ = opened
    fake.tracked.entries = {
        0x1000: kept("10.244.0.7", replied=True),
        0x2000: kept("10.244.0.8", replied=True),  # another target
        0x3000: kept("10.244.0.7", replied=True, reported=True),  # userspace has it
    }
    source.watch_target("10.244.0.7")
    source.watch_target("10.244.0.7")  # once
    assert fake.watched.keys == {addr_key("10.244.0.7")}
    events = source.read()
    assert [(e.kind.name, e.entry_id) for e in events] == [("NEW", 0x1000), ("UPDATE", 0x1000)]
    assert fake.tracked.entries[0x1000].reported == 1
    assert fake.tracked.entries[0x2000].reported == 0
    assert source.read() == []  # replayed once
    assert source.stats().extra["watched_targets"] == 1
    source.unwatch_target("10.244.0.7")
    assert fake.watched.keys == set()


def test_an_entry_deleted_while_replayed_is_neither_replayed_nor_brought_back(
    opened: tuple[BpfSource, FakeBpf, Path], map_updates: FakeTracked,
) -> None:
    """The kernel deletes a kept entry between userspace's read and its write-back: its
    DESTROY never left the kernel (it was not reported), so replaying it would leave
    userspace holding a connection that is gone (dead-endpoint on a closed connection),
    and writing it back would put it in the map again with nothing left to delete it."""
    source, fake, _ = opened
    fake.tracked.entries = {
        0x1000: kept("10.244.0.7", replied=True),
        0x2000: kept("10.244.0.7", replied=True),
    }
    fake.tracked.deleted_after_read = {0x2000}
    source.watch_target("10.244.0.7")
    events = source.read()
    assert {e.entry_id for e in events} == {0x1000}
    assert set(fake.tracked.entries) == {0x1000}


def test_the_live_table_shows_the_entries_the_kernel_keeps_read_at_refresh(
    opened: tuple[BpfSource, FakeBpf, Path],
) -> None:
    """The kernel sends nothing of a healthy entry, so the live table reads those from the
    kernel's map when it redraws, beside the correlator's own (reported) entries."""
    source, fake, _ = opened
    healthy = kept("10.244.0.7", replied=True)
    healthy.orig.sport_be, healthy.orig.dport_be = socket.htons(40001), socket.htons(80)
    unanswered = kept("10.244.0.8", replied=False)
    unanswered.orig.sport_be = socket.htons(40002)
    fake.tracked.entries = {0x1000: healthy, 0x2000: unanswered,
                            0x3000: kept("10.244.0.9", replied=True, reported=True)}
    entries = {e.entry_id: e for e in source.kept_entries()}
    assert set(entries) == {0x1000, 0x2000}  # the reported one is the correlator's
    assert entries[0x1000].orig == ("10.0.0.2", 40001, "10.96.0.10", 80)
    assert entries[0x1000].target_ip == "10.244.0.7" and entries[0x1000].replied is not None
    assert entries[0x2000].replied is None

    console = Console(file=io.StringIO(), width=300, record=True)
    view = LiveView(Correlator(), None, console=console, kept=source.kept_entries)
    view.close()
    screen = console.export_text()
    assert "10.0.0.2:40001" in screen and "10.244.0.7:0" in screen
    assert "10.0.0.2:40002" in screen and "SYN_SENT" in screen
    assert "10.244.0.9" not in screen


def test_close_detaches_through_bcc(opened: tuple[BpfSource, FakeBpf, Path]) -> None:
    source, fake, _ = opened
    source.close()
    source.close()  # idempotent
    assert fake.cleaned


# --- --dump-bpf -------------------------------------------------------------------------


def test_dump_bpf_prints_the_program_for_this_kernel_without_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A kernel without ring buffers and without a probeable tcp_v4_send_reset.
    monkeypatch.setattr(bpf_module, "check_bpf", lambda headers: features(
        None, ringbuf=False, send_reset_kprobe=False))
    netns = tmp_path / "netns"  # --netns takes a path too; its inode is the filter
    netns.write_text("")
    result = CliRunner().invoke(app, ["watch", "--dump-bpf", "--netns", str(netns)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith("/* cttrace BPF program")
    assert f"#define CTT_NETNS_INO {netns.stat().st_ino}U\n" in text
    assert "#define CTT_USE_RINGBUF 0\n" in text
    assert "#define CTT_SEND_RESET_TRACEPOINT 1\n" in text
    for name in bpf_module.PROGRAM_FILES:
        assert f"/* ==== bpf/{name} ==== */" in text
    for function in ("ctt_confirm_enter", "ctt_tcp_packet_return", "ctt_ct_delete",
                     "ctt_connect_enter", "ctt_send_reset_enter"):
        assert f"int {function}(" in text
    assert '#include "cttrace.h"' not in text  # inlined once, at the top
    assert "bcc" not in sys.modules


def test_dump_bpf_on_a_kernel_that_cannot_run_it_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cttrace.errors import SourceError

    def refuse(headers: str | None) -> BpfFeatures:
        raise SourceError("kprobes unavailable: CONFIG_KPROBES is not set on 6.18.44")

    monkeypatch.setattr(bpf_module, "check_bpf", refuse)
    result = CliRunner().invoke(app, ["watch", "--dump-bpf"])
    assert result.exit_code == 0, result.output
    first, rest = result.output.split("\n", 1)
    assert "cannot run the bpf source (kprobes unavailable: CONFIG_KPROBES is not set" in first
    assert rest.startswith("/* cttrace BPF program") and "#define CTT_USE_RINGBUF 1\n" in rest


def test_dump_bpf_names_a_missing_netns(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["watch", "--dump-bpf", "--netns", "ctl-no-such-ns"])
    assert result.exit_code == 2
    assert "network namespace 'ctl-no-such-ns' not found" in result.output
