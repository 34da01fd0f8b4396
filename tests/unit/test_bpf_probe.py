"""Feature probes for the bpf source, on fake /sys, /proc, /boot and /lib/modules trees.

What a user reads when ``--source auto`` falls back, or ``--source bpf``
refuses, comes from these probes; each case builds the files a real kernel
would (or would not) have and checks the one-line reason.
"""

from __future__ import annotations

import gzip
import platform
from pathlib import Path

import pytest

from cttrace.errors import SourceError
from cttrace.rules import Settings
from cttrace.sources.bpf import BpfSettings, program_text, settings_for, settings_for_rules
from cttrace.sources.probe import (
    REQUIRED_KPROBES,
    BpfFeatures,
    KernelView,
    check_bpf,
    find_kernel_headers,
    find_tracefs,
    kprobes_unavailable,
    missing_functions_reason,
    module_fentry_unavailable,
    traceable_functions,
)

RELEASE = "6.18.44-test"


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def view_of(root: Path, euid: int = 0) -> KernelView:
    return KernelView(root=root, release=RELEASE, euid=euid)


def headers_tree(directory: Path) -> Path:
    touch(directory / "include" / "generated" / "autoconf.h")
    touch(directory / "include" / "linux" / "kconfig.h")
    return directory


def test_no_kprobes_names_the_missing_config_option(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "config.gz").write_bytes(
        gzip.compress(b"CONFIG_BPF=y\n# CONFIG_KPROBES is not set\nCONFIG_HAVE_KPROBES=y\n")
    )
    with pytest.raises(SourceError) as err:
        check_bpf(view=view_of(tmp_path))
    assert str(err.value) == (
        f"kprobes unavailable: CONFIG_KPROBES is not set on {RELEASE} "
        "(no /sys/kernel/tracing/kprobe_events)"
    )


def test_kprobe_pmu_or_tracefs_kprobe_events_is_enough(tmp_path: Path) -> None:
    touch(tmp_path / "sys/bus/event_source/devices/kprobe/type", "6\n")
    assert kprobes_unavailable(view_of(tmp_path), None) is None
    other = tmp_path / "other"
    touch(other / "sys/kernel/debug/tracing/available_events")
    touch(other / "sys/kernel/debug/tracing/kprobe_events")
    tracefs = find_tracefs(view_of(other))
    assert tracefs == other / "sys/kernel/debug/tracing"
    assert kprobes_unavailable(view_of(other), tracefs) is None


def test_unmounted_tracefs_is_named_with_the_mount_command(tmp_path: Path) -> None:
    touch(tmp_path / f"boot/config-{RELEASE}", "CONFIG_KPROBES=y\nCONFIG_KPROBE_EVENTS=y\n")
    reason = kprobes_unavailable(view_of(tmp_path), None)
    assert reason is not None and "mount -t tracefs nodev /sys/kernel/tracing" in reason


def test_not_root_is_refused_first(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="needs root"):
        check_bpf(view=view_of(tmp_path, euid=1000))


def test_traceable_functions_come_from_tracefs_or_kallsyms(tmp_path: Path) -> None:
    tracefs = tmp_path / "sys/kernel/tracing"
    touch(tracefs / "available_filter_functions",
          "tcp_v4_connect\nnf_ct_delete [nf_conntrack]\n")
    assert traceable_functions(view_of(tmp_path), tracefs) == {"tcp_v4_connect", "nf_ct_delete"}
    touch(tmp_path / "proc/kallsyms",
          "ffffffff81000000 T tcp_v4_connect\nffffffffc0735020 t __nf_conntrack_confirm\t"
          "[nf_conntrack]\nffffffff82000000 D some_data\n")
    assert traceable_functions(view_of(tmp_path), None) == {
        "tcp_v4_connect", "__nf_conntrack_confirm",
    }


def test_missing_conntrack_functions_say_to_load_the_module(tmp_path: Path) -> None:
    reason = missing_functions_reason(view_of(tmp_path), RELEASE, list(REQUIRED_KPROBES[:3]), None)
    assert "the nf_conntrack module is not loaded" in reason
    assert "modprobe nf_conntrack" in reason
    (tmp_path / "sys/module/nf_conntrack").mkdir(parents=True)
    reason = missing_functions_reason(view_of(tmp_path), RELEASE, ["nf_ct_delete"], None)
    assert reason == (
        f"kernel functions cttrace probes are not traceable on {RELEASE}: nf_ct_delete "
        "(not in /proc/kallsyms: inlined, renamed or marked notrace)"
    )


def test_headers_in_lib_modules_split_like_debian_are_left_to_bcc(tmp_path: Path) -> None:
    build = tmp_path / f"lib/modules/{RELEASE}/build"
    touch(build / "include/generated/autoconf.h")
    touch(tmp_path / f"lib/modules/{RELEASE}/source/include/linux/kconfig.h")
    assert find_kernel_headers(view_of(tmp_path), None) is None


def test_headers_under_usr_src_are_handed_to_bcc(tmp_path: Path) -> None:
    tree = headers_tree(tmp_path / f"usr/src/linux-headers-{RELEASE}")
    assert find_kernel_headers(view_of(tmp_path), None) == tree


def test_override_must_be_a_complete_tree(tmp_path: Path) -> None:
    half = tmp_path / "half"
    touch(half / "include/generated/autoconf.h")
    with pytest.raises(SourceError, match=r"CTTRACE_KERNEL_HEADERS=.*half is not a complete"):
        find_kernel_headers(view_of(tmp_path), str(half))
    whole = headers_tree(tmp_path / "whole")
    assert find_kernel_headers(view_of(tmp_path), str(whole)) == whole


def test_dangling_build_link_is_explained(tmp_path: Path) -> None:
    modules = tmp_path / f"lib/modules/{RELEASE}"
    modules.mkdir(parents=True)
    (modules / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")
    with pytest.raises(SourceError) as err:
        find_kernel_headers(view_of(tmp_path), None)
    message = str(err.value)
    assert f"points to /usr/src/linux-headers-{RELEASE}, which is missing" in message
    assert f"apt install linux-headers-{RELEASE}" in message
    assert "mount the host's /lib/modules and /usr/src at the same paths" in message


@pytest.mark.skipif(platform.machine() != "x86_64", reason="trampolines: x86-64 kernels only")
def test_conntrack_trampolines_need_the_modules_btf_or_a_built_in_conntrack(
    tmp_path: Path,
) -> None:
    view = view_of(tmp_path)
    assert "kernel has no BTF" in str(module_fentry_unavailable(view))
    touch(tmp_path / "sys/kernel/btf/vmlinux")
    touch(tmp_path / "proc/kallsyms", "ffffffff81234560 T bpf_trampoline_link_prog\n")
    # A loaded module without BTF of its own (CONFIG_DEBUG_INFO_BTF_MODULES unset).
    touch(tmp_path / "sys/module/nf_conntrack/initstate", "live\n")
    assert module_fentry_unavailable(view) == (
        "the nf_conntrack module has no BTF (/sys/kernel/btf/nf_conntrack; "
        "CONFIG_DEBUG_INFO_BTF_MODULES)")
    touch(tmp_path / "sys/kernel/btf/nf_conntrack")
    assert module_fentry_unavailable(view) is None
    # Built in (no initstate, no BTF of its own): its functions are in vmlinux's BTF.
    (tmp_path / "sys/kernel/btf/nf_conntrack").unlink()
    (tmp_path / "sys/module/nf_conntrack/initstate").unlink()
    assert module_fentry_unavailable(view) is None


def features(**changes: object) -> BpfFeatures:
    base = {"release": RELEASE, "headers_dir": None, "ringbuf": True, "send_reset_kprobe": True,
            "send_reset_tracepoint": True, "receive_reset_tracepoint": True, "tracefs": None,
            "fentry_unavailable": None}
    base.update(changes)
    return BpfFeatures(**base)  # type: ignore[arg-type]


def test_settings_follow_what_the_kernel_has() -> None:
    wanted = BpfSettings(netns_ino=7, stream_all=True)
    assert settings_for(features(), wanted) == wanted
    no_btf = settings_for(features(fentry_unavailable="the kernel has no BTF"), wanted)
    assert no_btf.fentry is False  # tcp_connect falls back to its kprobe
    older = settings_for(features(ringbuf=False, send_reset_kprobe=False), wanted)
    assert (older.ringbuf, older.send_reset, older.netns_ino) == (False, "tracepoint", 7)
    bare = settings_for(
        features(send_reset_kprobe=False, send_reset_tracepoint=False,
                 receive_reset_tracepoint=False), wanted)
    assert (bare.send_reset, bare.receive_reset_tracepoint) == ("off", False)


def test_only_streaming_every_record_attaches_the_received_reset_tracepoint() -> None:
    """No rule needs the resets local sockets receive: the kernel-filtered program leaves
    that tracepoint off; --flows (stream_all) keeps it."""
    filtered = settings_for(features(), BpfSettings())
    assert (filtered.stream_all, filtered.receive_reset_tracepoint) == (False, False)


def test_the_kernel_filter_is_derived_from_the_rules_settings() -> None:
    settings = settings_for_rules(Settings(late_after=2.5, inherit_window=0.75))
    assert (settings.late_after_ns, settings.inherit_ns) == (2_500_000_000, 750_000_000)
    defines = settings.defines()
    assert "#define CTT_LATE_NS 2500000000ULL\n" in defines
    assert "#define CTT_INHERIT_NS 750000000ULL\n" in defines
    assert "#define CTT_STREAM_ALL 0\n" in defines


def test_program_text_is_self_contained_and_carries_the_settings() -> None:
    text = program_text(BpfSettings(netns_ino=4026531840, ringbuf=False, send_reset="tracepoint"))
    assert "#define CTT_NETNS_INO 4026531840U\n" in text
    assert "#define CTT_USE_RINGBUF 0\n" in text
    assert "#define CTT_SEND_RESET_TRACEPOINT 1\n" in text
    assert '#include "cttrace.h"' not in text  # the header is inlined once, first
    assert text.index("struct ctt_ct_event {") < text.index("int ctt_confirm_enter(")
    for name in ("conntrack.bpf.c", "connect.bpf.c", "reset.bpf.c"):
        assert f"/* ==== bpf/{name} ==== */" in text
