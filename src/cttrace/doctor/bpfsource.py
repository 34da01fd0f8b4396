"""The ``bpf-source`` check: can ``--source bpf`` run on this node, and if not, what is missing.

Unlike the other checks this is about the kernel and the node's files, not about
a network namespace's settings: kprobes (the hooks the programs attach to),
kernel BTF (what fentry needs), the kernel headers BCC compiles against, and
finally a compile of the real program (:mod:`cttrace.sources.bcc_compile`:
with the structs BCC's own uapi header lacks supplied). Every piece is looked
at on its own, so a node missing two things is told both. When the bpf source
cannot run, ``--source auto`` falls back to netlink, so this is a ``warn``:
cttrace still works, with less evidence (no socket identity, no
inherited-entry).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from cttrace.doctor.model import CheckResult, Verdict
from cttrace.errors import SourceError
from cttrace.sources.probe import (
    HEADERS_ENV,
    KernelView,
    find_kernel_headers,
    find_tracefs,
    kprobes_unavailable,
    module_fentry_unavailable,
)

CHECK_ID = "bpf-source"
#: Kernel BTF: what fentry/fexit programs are checked against (CONFIG_DEBUG_INFO_BTF).
BTF_VMLINUX = "sys/kernel/btf/vmlinux"
KHEADERS = "sys/kernel/kheaders.tar.xz"
PERF_EVENT_PARANOID = "proc/sys/kernel/perf_event_paranoid"
#: Above this, Debian's kernels (their own patch to perf_event_open(); level 3 is their
#: default) refuse every perf event to a process without CAP_SYS_ADMIN, whatever else it
#: holds (CAP_PERFMON included): the DaemonSet's kprobes are perf events, so its agent
#: could not attach.
PARANOID_MAX_WITHOUT_SYS_ADMIN = 2


@dataclass(frozen=True, slots=True)
class BpfReadiness:
    """What the check saw; each ``*_problem`` is None when that piece is fine."""

    release: str
    root: bool
    bcc: bool
    kprobes_problem: str | None
    fentry: bool
    headers: str | None
    """Where BCC will read the headers from (a directory, or kheaders)."""
    headers_problem: str | None
    compile: str
    """``ok``, ``ok (supplied struct …)``, ``failed: <one line>`` or ``not tried: …``."""
    supplied: list[str] = field(default_factory=list)
    perf_event_paranoid: int | None = None
    """kernel.perf_event_paranoid, None when unreadable."""
    conntrack_hooks: str = ""
    """How the nf_conntrack functions would be hooked: trampolines, or kprobes and why."""


def _headers(view: KernelView) -> tuple[str | None, str | None]:
    release = view.kernel_release()
    try:
        chosen = find_kernel_headers(view, os.environ.get(HEADERS_ENV))
    except SourceError as err:
        return None, str(err)
    if chosen is not None:
        return str(chosen), None
    build = f"/lib/modules/{release}/build"
    if view.path(build).is_dir():
        return build, None
    return f"/{KHEADERS} (CONFIG_IKHEADERS)", None


def probe_bpf_readiness(view: KernelView | None = None, compile_program: bool = True
                        ) -> BpfReadiness:
    """Look at this node; compile the program when everything it needs is there."""
    view = view or KernelView()
    release = view.kernel_release()
    root = view.effective_uid() == 0
    bcc = importlib.util.find_spec("bcc") is not None
    kprobes_problem = kprobes_unavailable(view, find_tracefs(view))
    headers, headers_problem = _headers(view)
    fentry = view.path(BTF_VMLINUX).exists()
    supplied: list[str]
    missing = [what for what, bad in (("root", not root), ("BCC", not bcc),
                                      ("kprobes", kprobes_problem), ("headers", headers_problem))
               if bad]
    if missing:
        compile_result, supplied = f"not tried: no {', no '.join(missing)}", []
    elif not compile_program:
        compile_result, supplied = "not tried", []
    else:
        compile_result, supplied = _compile_probe()
    return BpfReadiness(release, root, bcc, kprobes_problem, fentry, headers, headers_problem,
                        compile_result, supplied, _perf_event_paranoid(view),
                        _conntrack_hooks(view))


def _conntrack_hooks(view: KernelView) -> str:
    reason = module_fentry_unavailable(view)
    if reason:
        return f"kprobes: {reason}"
    # Loading a trampoline on a module function opens the module's BTF object, which only
    # CAP_SYS_ADMIN may (kernel/bpf/syscall.c): the DaemonSet's agent does not hold it.
    return "fexit/fentry with CAP_SYS_ADMIN; kprobes without it (the DaemonSet's default)"


def _perf_event_paranoid(view: KernelView) -> int | None:
    try:
        return int(view.path(PERF_EVENT_PARANOID).read_text().strip())
    except (OSError, ValueError):
        return None


def _paranoid_problem(seen: BpfReadiness) -> str | None:
    level = seen.perf_event_paranoid
    if level is None or level <= PARANOID_MAX_WITHOUT_SYS_ADMIN:
        return None
    return (f"kernel.perf_event_paranoid={level} refuses perf events (kprobes are) to an "
            "agent without CAP_SYS_ADMIN, as the DaemonSet runs")


PARANOID_FIX = (f"sysctl -w kernel.perf_event_paranoid={PARANOID_MAX_WITHOUT_SYS_ADMIN}"
                "   # and keep it in /etc/sysctl.d/ (deploy/README.md)")


def _compile_probe() -> tuple[str, list[str]]:
    """Compile (and load the maps of) the program the bpf source would, then unload it."""
    from bcc import BPF  # only reached when BCC is installed

    from cttrace.sources.bcc_compile import CompileFailed, compile_program
    from cttrace.sources.bpf import BpfSettings, program_text, settings_for
    from cttrace.sources.probe import check_bpf

    try:
        features = check_bpf()
        text = program_text(settings_for(features, BpfSettings()))
        compiled = compile_program(BPF, text, features.release, features.headers_dir)
    except (SourceError, CompileFailed) as err:
        return f"failed: {err}", []
    compiled.module.cleanup()
    supplied = list(compiled.supplied)
    return ("ok" + (f" (supplied struct {', '.join(supplied)} from the kernel's own "
                    "uapi bpf.h)" if supplied else "")), supplied


def check_bpf_source(seen: BpfReadiness) -> CheckResult:
    observed: dict[str, object] = {
        "release": seen.release,
        "root": seen.root,
        "bcc": seen.bcc,
        "kprobes": seen.kprobes_problem is None,
        "fentry_btf": seen.fentry,
        "conntrack_hooks": seen.conntrack_hooks,
        "headers": seen.headers,
        "compile": seen.compile,
    }
    if seen.supplied:
        observed["supplied_structs"] = seen.supplied
    if seen.perf_event_paranoid is not None:
        observed["perf_event_paranoid"] = seen.perf_event_paranoid
    paranoid = _paranoid_problem(seen)
    if seen.compile.startswith("ok") and paranoid:
        return CheckResult(CHECK_ID, Verdict.WARN,
                           f"the bpf source compiles on {seen.release} ({seen.compile}), but "
                           f"{paranoid}: it would fall back to --source netlink",
                           observed, PARANOID_FIX)
    if seen.compile.startswith("ok"):
        return CheckResult(CHECK_ID, Verdict.PASS,
                           f"the bpf source can run on {seen.release}: kprobes, headers at "
                           f"{seen.headers}, and the program compiles ({seen.compile})",
                           observed)
    problems, fix = [], []
    if not seen.root:
        problems.append("not root (loading BPF needs CAP_SYS_ADMIN, or CAP_BPF + CAP_PERFMON)")
        fix.append("# run cttrace doctor as root (the DaemonSet's container is privileged)")
    if not seen.bcc:
        problems.append("BCC's Python bindings are not installed")
        fix.append("apt-get install python3-bpfcc")
    if seen.kprobes_problem:
        problems.append(f"kprobes unavailable: {seen.kprobes_problem}")
        fix.append("# boot a kernel with CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y "
                   "(Debian, Ubuntu, Fedora and Amazon Linux kernels have them)")
    if seen.headers_problem:
        problems.append(seen.headers_problem.split("; install", 1)[0])
        fix.append(f"# install this kernel's headers: apt-get install linux-headers-{seen.release}"
                   f" (Debian, Ubuntu) or dnf install kernel-devel-{seen.release} (Fedora)")
        fix.append("# or: modprobe kheaders (CONFIG_IKHEADERS); in a DaemonSet mount the "
                   "host's /lib/modules and /usr/src at the same paths")
    if seen.compile.startswith("failed"):
        problems.append(f"the program does not compile: {seen.compile.removeprefix('failed: ')}")
        fix.append("# a newer BCC (python3-bpfcc) may know this kernel; until then cttrace "
                   "uses --source netlink")
    if paranoid:
        problems.append(paranoid)
        fix.append(PARANOID_FIX)
    if not problems:  # not tried for another reason
        problems.append(f"the compile was {seen.compile}")
    return CheckResult(
        CHECK_ID, Verdict.WARN,
        f"the bpf source cannot run on {seen.release}: {'; '.join(problems)}; cttrace falls "
        "back to --source netlink (no socket identity, no inherited-entry)",
        observed, "\n".join(fix) or None)
