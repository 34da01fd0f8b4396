"""Can the BCC source run on this kernel, and with which variant of each hook?

Every question is settled by looking at what exists (the kprobe PMU, tracefs
files, kallsyms, the kernel's config, header directories, a trial
``bpf(BPF_MAP_CREATE)``), never by comparing ``uname -r`` against version
numbers: distribution kernels backport features and disable others.

:func:`check_bpf` returns the :class:`BpfFeatures` to build the program with,
or raises :class:`~cttrace.errors.SourceError` whose message is the one line
``--source auto`` prints before falling back to netlink, e.g.
``kprobes unavailable: CONFIG_KPROBES is not set on 6.18.44 (no
/sys/kernel/tracing/kprobe_events)``. Nothing here imports bcc.
"""

from __future__ import annotations

import ctypes
import errno
import gzip
import importlib.util
import os
import platform
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cttrace.errors import SourceError
from cttrace.sources.bpf_syscall import BPF_MAP_CREATE, bpf, syscall_number

#: Kernel functions the programs must probe (bpf/conntrack.bpf.c, bpf/connect.bpf.c).
REQUIRED_KPROBES = (
    "__nf_conntrack_confirm",
    "nf_conntrack_tcp_packet",
    "nf_ct_delete",
    "tcp_connect",
)
#: Sees resets sent for segments no socket owns; preferred over tcp:tcp_send_reset,
#: which before v6.10 fires only when there is a socket (bpf/reset.bpf.c).
SEND_RESET_KPROBE = "tcp_v4_send_reset"
#: Its IPv6 twin (net/ipv6/tcp_ipv6.c), probed beside it where it can be.
SEND_RESET6_KPROBE = "tcp_v6_send_reset"
#: Where the Debian/Ubuntu/Fedora packages and `make modules_install` put the headers.
HEADERS_ENV = "CTTRACE_KERNEL_HEADERS"
#: The modules that provide the probed functions when they are not built in.
CONNTRACK_MODULE = "nf_conntrack"

_TRACEFS_DIRS = ("sys/kernel/tracing", "sys/kernel/debug/tracing")
#: enum bpf_map_type: BPF_MAP_TYPE_RINGBUF (v5.8, commit 457f44363a88
#: "bpf: Implement BPF ring buffer and verifier support for it").
_BPF_MAP_TYPE_RINGBUF = 27


@dataclass(frozen=True, slots=True)
class BpfFeatures:
    """What the kernel offers; :mod:`cttrace.sources.bpf` builds its program from this."""

    release: str
    headers_dir: Path | None
    """Kernel headers to hand BCC (BCC_KERNEL_SOURCE); None: BCC finds them itself
    (/lib/modules/<release>/build or /sys/kernel/kheaders.tar.xz)."""
    ringbuf: bool
    """BPF_MAP_TYPE_RINGBUF can be created: one ordered buffer instead of per-CPU perf buffers."""
    send_reset_kprobe: bool
    """tcp_v4_send_reset can be probed (sees resets that have no socket)."""
    send_reset_tracepoint: bool
    receive_reset_tracepoint: bool
    tracefs: Path | None
    """The tracefs mount, where kprobe_profile reports kretprobe misses."""
    fentry_unavailable: str | None = "not probed"
    """Why tcp_connect cannot be reached through a BPF trampoline (fentry); None: it can."""
    send_reset6_kprobe: bool = False
    """tcp_v6_send_reset can be probed (IPv6 resets that have no socket)."""
    module_fentry_unavailable: str | None = "not probed"
    """Why the nf_conntrack functions cannot be reached through BPF trampolines
    (fentry, fexit); None: they can (cttrace.sources.trampoline loads them)."""


@dataclass(frozen=True, slots=True)
class KernelView:
    """Where to look: the real machine by default, a fake tree in unit tests."""

    root: Path = Path("/")
    release: str = ""
    euid: int = -1

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    def kernel_release(self) -> str:
        return self.release or os.uname().release

    def effective_uid(self) -> int:
        return self.euid if self.euid >= 0 else os.geteuid()


def check_bpf(headers: str | None = None, view: KernelView | None = None) -> BpfFeatures:
    """Return what the BCC source needs, or raise SourceError saying precisely what is missing.

    ``headers``: a kernel header directory chosen by the user; defaults to
    ``$CTTRACE_KERNEL_HEADERS``, then the distributions' places.
    """
    view = view or KernelView()
    release = view.kernel_release()
    if view.effective_uid() != 0:
        raise SourceError(
            "bpf source needs root (CAP_SYS_ADMIN, or CAP_BPF + CAP_PERFMON) to load "
            "programs and attach kprobes: run as root or in a privileged container"
        )
    if importlib.util.find_spec("bcc") is None:
        raise SourceError(
            "BCC's Python bindings are not installed: apt install python3-bpfcc "
            "(a virtualenv needs --system-site-packages to see them)"
        )
    tracefs = find_tracefs(view)
    reason = kprobes_unavailable(view, tracefs)
    if reason:
        raise SourceError(f"kprobes unavailable: {reason}")
    reason = lockdown_reason(view)
    if reason:
        raise SourceError(reason)
    functions = traceable_functions(view, tracefs)
    missing = [name for name in REQUIRED_KPROBES if name not in functions]
    if missing:
        raise SourceError(missing_functions_reason(view, release, missing, tracefs))
    headers_dir = find_kernel_headers(view, headers if headers else os.environ.get(HEADERS_ENV))
    fentry = fentry_unavailable(view)
    return BpfFeatures(
        release=release,
        headers_dir=headers_dir,
        ringbuf=ringbuf_supported(),
        send_reset_kprobe=SEND_RESET_KPROBE in functions,
        send_reset_tracepoint=tracepoint_exists(view, tracefs, "tcp", "tcp_send_reset"),
        receive_reset_tracepoint=tracepoint_exists(view, tracefs, "tcp", "tcp_receive_reset"),
        tracefs=tracefs,
        fentry_unavailable=fentry,
        send_reset6_kprobe=SEND_RESET6_KPROBE in functions,
        # fentry_unavailable reads all of /proc/kallsyms: once for both.
        module_fentry_unavailable=fentry or module_btf_missing(view),
    )


# --- kprobes -------------------------------------------------------------------


def find_tracefs(view: KernelView) -> Path | None:
    """The mounted tracefs (its ``available_events`` exists), or None."""
    for rel in _TRACEFS_DIRS:
        candidate = view.path(rel)
        if (candidate / "available_events").exists():
            return candidate
    return None


def kernel_config(view: KernelView) -> dict[str, str] | None:
    """``CONFIG_*`` values from /proc/config.gz or /boot/config-<release>; None if neither."""
    release = view.kernel_release()
    try:
        text = gzip.decompress(view.path("proc/config.gz").read_bytes()).decode()
    except OSError:
        try:
            text = view.path(f"boot/config-{release}").read_text()
        except OSError:
            return None
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            config[key] = value
    return config


def kprobes_unavailable(view: KernelView, tracefs: Path | None) -> str | None:
    """None when kprobes can be created, else why not (without the ``kprobes unavailable:`` prefix).

    Two ways exist: the ``kprobe`` perf PMU (v4.17, commit e12f03d7031a
    "perf/core: Implement the 'perf_kprobe' PMU"), which is what BCC tries
    first, and writing to tracefs' ``kprobe_events``.
    """
    if view.path("sys/bus/event_source/devices/kprobe").exists():
        return None
    if tracefs is not None and (tracefs / "kprobe_events").exists():
        return None
    release = view.kernel_release()
    where = f"{tracefs}/kprobe_events" if tracefs else "/sys/kernel/tracing/kprobe_events"
    config = kernel_config(view)
    if config is not None:
        for option in ("CONFIG_KPROBES", "CONFIG_KPROBE_EVENTS"):
            if config.get(option) != "y":
                return f"{option} is not set on {release} (no {where})"
    if tracefs is None:
        return (
            f"no kprobe PMU (/sys/bus/event_source/devices/kprobe) and tracefs is not mounted "
            f"on {release}: mount -t tracefs nodev /sys/kernel/tracing"
        )
    return f"no kprobe PMU and no {where} on {release}"


def lockdown_reason(view: KernelView) -> str | None:
    """Lockdown in ``confidentiality`` mode forbids bpf_probe_read_kernel (security/lockdown)."""
    try:
        modes = view.path("sys/kernel/security/lockdown").read_text()
    except OSError:
        return None
    if "[confidentiality]" in modes:
        return (
            "kernel lockdown is in confidentiality mode: BPF programs may not read kernel "
            "memory (boot with lockdown=integrity or none, or use --source netlink)"
        )
    return None


def traceable_functions(view: KernelView, tracefs: Path | None) -> frozenset[str]:
    """Names of the kernel functions that can carry a kprobe.

    tracefs' ``available_filter_functions`` lists exactly the traceable ones
    (``nf_ct_delete [nf_conntrack]``); without tracefs, fall back to text
    symbols in /proc/kallsyms (as root; addresses and all).
    """
    if tracefs is not None:
        try:
            text = (tracefs / "available_filter_functions").read_text()
        except OSError:
            pass
        else:
            return frozenset(line.split(" ", 1)[0] for line in text.splitlines() if line)
    try:
        text = view.path("proc/kallsyms").read_text()
    except OSError:
        return frozenset()
    names = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in ("t", "T", "w", "W"):
            names.add(parts[2])
    return frozenset(names)


def missing_functions_reason(
    view: KernelView, release: str, missing: list[str], tracefs: Path | None
) -> str:
    where = f"{tracefs}/available_filter_functions" if tracefs else "/proc/kallsyms"
    conntrack = [name for name in missing if name != "tcp_connect"]
    if conntrack and not view.path(f"sys/module/{CONNTRACK_MODULE}").exists():
        return (
            f"the {CONNTRACK_MODULE} module is not loaded, so {', '.join(conntrack)} cannot be "
            f"probed: modprobe {CONNTRACK_MODULE} (kube-proxy loads it on a real node)"
        )
    return (
        f"kernel functions cttrace probes are not traceable on {release}: "
        f"{', '.join(missing)} (not in {where}: inlined, renamed or marked notrace)"
    )


#: Present when the kernel can attach BPF trampolines (what BCC's BPF.support_kfunc() checks).
_TRAMPOLINE_SYMBOL = "bpf_trampoline_link_prog"


def fentry_unavailable(view: KernelView) -> str | None:
    """Why fentry (a BPF trampoline) cannot replace the kprobe on a vmlinux function; None: it can.

    It needs the kernel's BTF (CONFIG_DEBUG_INFO_BTF: /sys/kernel/btf/vmlinux), trampolines
    (x86-64, v5.5+) and the function in ftrace's list (checked with the kprobes).
    """
    if platform.machine() != "x86_64":
        return f"BCC attaches BPF trampolines on x86-64 only, not {platform.machine()}"
    if not view.path("sys/kernel/btf/vmlinux").is_file():
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)"
    try:
        with view.path("proc/kallsyms").open() as kallsyms:
            if not any(line.rstrip().endswith(f" {_TRAMPOLINE_SYMBOL}") for line in kallsyms):
                return f"the kernel has no BPF trampolines ({_TRAMPOLINE_SYMBOL} not in kallsyms)"
    except OSError as exc:
        return f"cannot read /proc/kallsyms: {exc.strerror}"
    return None


def module_fentry_unavailable(view: KernelView, module: str = CONNTRACK_MODULE) -> str | None:
    """Why the functions of ``module`` cannot carry BPF trampolines; None: they can.

    What :func:`fentry_unavailable` needs, and :func:`module_btf_missing`.
    """
    return fentry_unavailable(view) or module_btf_missing(view, module)


def module_btf_missing(view: KernelView, module: str = CONNTRACK_MODULE) -> str | None:
    """Why ``module``'s functions have no BTF to load trampolines against; None: they have.

    A loaded module's own BTF (/sys/kernel/btf/<module>, CONFIG_DEBUG_INFO_BTF_MODULES;
    v5.11 attaches trampolines to module functions), which cttrace reads with libbpf. A
    module built into the kernel (/sys/module/<module> without ``initstate``) is in
    vmlinux's BTF.
    """
    if view.path(f"sys/kernel/btf/{module}").is_file():
        return None
    if view.path(f"sys/module/{module}").is_dir() and \
            not view.path(f"sys/module/{module}/initstate").exists():
        return None  # built in
    return (f"the {module} module has no BTF (/sys/kernel/btf/{module}; "
            "CONFIG_DEBUG_INFO_BTF_MODULES)")


def tracepoint_exists(view: KernelView, tracefs: Path | None, category: str, event: str) -> bool:
    return tracefs is not None and (tracefs / "events" / category / event).is_dir()


# --- kernel headers ----------------------------------------------------------------


def _has_headers(build: Path, source: Path | None = None) -> bool:
    """A header tree BCC can compile against.

    include/generated/autoconf.h is generated by the kernel build for this
    exact configuration; include/linux/kconfig.h is the first file BCC
    includes. Debian and Ubuntu split them into two packages
    (linux-headers-<release> and its -common half, joined by
    /lib/modules/<release>/source), which BCC follows only from
    /lib/modules/<release>/build.
    """
    if not (build / "include" / "generated" / "autoconf.h").is_file():
        return False
    roots = (build,) if source is None else (build, source)
    return any((root / "include" / "linux" / "kconfig.h").is_file() for root in roots)


def find_kernel_headers(view: KernelView, override: str | None) -> Path | None:
    """The header directory to give BCC, None if BCC will find it itself, or SourceError."""
    release = view.kernel_release()
    if override:
        directory = Path(override)
        if not _has_headers(directory):
            raise SourceError(
                f"{HEADERS_ENV}={override} is not a complete kernel header tree for {release} "
                "(needs include/generated/autoconf.h and include/linux/kconfig.h in one tree)"
            )
        return directory
    build = view.path(f"lib/modules/{release}/build")
    if _has_headers(build, view.path(f"lib/modules/{release}/source")):
        return None  # BCC's own first choice
    distro_dirs = (f"usr/src/linux-headers-{release}", f"usr/src/kernels/{release}")
    for candidate in map(view.path, distro_dirs):
        if _has_headers(candidate):
            return candidate
    if view.path("sys/kernel/kheaders.tar.xz").exists():
        return None  # CONFIG_IKHEADERS: BCC unpacks it itself
    if build.is_symlink():
        state = f"/lib/modules/{release}/build points to {os.readlink(build)}, which is missing"
    else:
        state = f"/lib/modules/{release}/build does not exist"
    raise SourceError(
        f"no kernel headers for {release}: {state}; install them (Debian/Ubuntu: apt install "
        f"linux-headers-{release}; Fedora: dnf install kernel-devel-{release}) or set "
        f"{HEADERS_ENV}=<dir>; in a DaemonSet mount the host's /lib/modules and /usr/src "
        "at the same paths"
    )


# --- BPF ring buffer -------------------------------------------------------------


@cache
def ringbuf_supported() -> bool:
    """Whether the kernel creates a BPF_MAP_TYPE_RINGBUF map (one page, then closed).

    EINVAL means the map type is unknown (before v5.8). EPERM is not
    "unsupported": it is raised as such, since nothing else would load either.
    """
    if syscall_number() is None:
        return False  # unknown syscall number: the perf buffer works everywhere
    attr = (ctypes.c_uint32 * 16)()  # union bpf_attr, BPF_MAP_CREATE part; rest must be zero
    attr[0] = _BPF_MAP_TYPE_RINGBUF
    attr[1] = 0  # key_size
    attr[2] = 0  # value_size
    attr[3] = os.sysconf("SC_PAGE_SIZE")  # max_entries: a power-of-two multiple of the page size
    try:
        os.close(bpf(BPF_MAP_CREATE, attr))
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise SourceError(
                "bpf(BPF_MAP_CREATE) failed with EPERM: this process may not use BPF "
                "(needs CAP_SYS_ADMIN or CAP_BPF; check kernel.unprivileged_bpf_disabled and "
                "any LSM)"
            ) from exc
        return False
    return True
