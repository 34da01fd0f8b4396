"""``cttrace doctor``'s bpf-source check: on a node like this one (no kprobes, no kernel
headers) it says both, with what to do, and that cttrace falls back to netlink; on a
node where the program compiles it passes and says what was supplied.

The node is a fake /proc, /sys and /lib/modules tree (KernelView); the compile
result of a ready node is given, since compiling needs BCC and kprobes (the VM
tier compiles for real).
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import orjson

from cttrace.doctor.bpfsource import BpfReadiness, check_bpf_source, probe_bpf_readiness
from cttrace.doctor.cli import doctor
from cttrace.doctor.model import Verdict
from cttrace.sources.probe import KernelView

from .test_doctor_checks import FakeReader, counters, ok

RELEASE = "6.18.44-test"


def host_like(root: Path) -> KernelView:
    """This machine: CONFIG_KPROBES off, no /lib/modules/<release>/build, kernel BTF."""
    (root / "proc").mkdir()
    (root / "proc" / "config.gz").write_bytes(gzip.compress(b"# CONFIG_KPROBES is not set\n"))
    (root / "sys/kernel/btf").mkdir(parents=True)
    (root / "sys/kernel/btf/vmlinux").write_bytes(b"")
    return KernelView(root=root, release=RELEASE, euid=0)


def ready(**changes: object) -> BpfReadiness:
    values: dict[str, object] = dict(
        release="6.12.118+deb12-amd64", root=True, bcc=True, kprobes_problem=None, fentry=True,
        headers="/lib/modules/6.12.118+deb12-amd64/build", headers_problem=None,
        compile="ok (supplied struct bpf_wq from the kernel's own uapi bpf.h)",
        supplied=["bpf_wq"])
    values.update(changes)
    return BpfReadiness(**values)  # type: ignore[arg-type]


def test_no_kprobes_and_no_headers_are_both_named_with_their_fixes(tmp_path: Path) -> None:
    seen = probe_bpf_readiness(host_like(tmp_path))
    assert seen.compile == "not tried: no kprobes, no headers" or seen.compile.startswith(
        "not tried: no BCC")  # on a machine without python3-bpfcc
    result = check_bpf_source(seen)
    assert result.id == "bpf-source"
    assert result.verdict is Verdict.WARN
    assert f"the bpf source cannot run on {RELEASE}: " in result.summary
    assert f"kprobes unavailable: CONFIG_KPROBES is not set on {RELEASE}" in result.summary
    assert (f"no kernel headers for {RELEASE}: /lib/modules/{RELEASE}/build does not exist"
            in result.summary)
    assert result.summary.endswith("cttrace falls back to --source netlink (no socket "
                                   "identity, no inherited-entry)")
    assert result.fix is not None
    fix = result.fix.splitlines()
    assert "# boot a kernel with CONFIG_KPROBES=y and CONFIG_KPROBE_EVENTS=y" in fix[-3]
    assert f"apt-get install linux-headers-{RELEASE}" in fix[-2]
    assert "modprobe kheaders" in fix[-1]
    assert result.observed | {"bcc": True} == {
        "release": RELEASE, "root": True, "bcc": True, "kprobes": False, "fentry_btf": True,
        "conntrack_hooks": seen.conntrack_hooks, "headers": None, "compile": seen.compile,
    }
    # No kallsyms in this tree: the trampolines' prerequisites are not there either.
    assert seen.conntrack_hooks.startswith("kprobes: cannot read /proc/kallsyms")


def test_a_node_where_the_program_compiles_passes_and_says_what_was_supplied() -> None:
    result = check_bpf_source(ready())
    assert result.verdict is Verdict.PASS
    assert result.fix is None
    assert result.observed["supplied_structs"] == ["bpf_wq"]
    assert "the program compiles (ok (supplied struct bpf_wq" in result.summary


def test_a_compile_failure_is_its_one_line() -> None:
    line = ("bpf/conntrack.bpf.c:59: no member named 'x' in 'struct nf_conn'; "
            "compiler output in /tmp/a")
    result = check_bpf_source(ready(compile=f"failed: {line}", supplied=[]))
    assert result.verdict is Verdict.WARN
    assert f"the program does not compile: {line};" in result.summary
    assert result.fix is not None and "a newer BCC" in result.fix


def test_the_check_is_in_the_json_report_and_warn_keeps_exit_code_0() -> None:
    reader = FakeReader(stats=[counters()], commands={"iptables-nft-save": ok("")})
    out = io.StringIO()
    code = doctor(None, "json", ip_cooldown=30, sample_seconds=0, reader=reader, stdout=out,
                  bpf_readiness=lambda: ready(kprobes_problem="CONFIG_KPROBES is not set",
                                              compile="not tried: no kprobes", supplied=[]))
    report = orjson.loads(out.getvalue())
    assert code == 0 and report["exit_code"] == 0
    check = report["checks"][-1]
    assert check["id"] == "bpf-source" and check["verdict"] == "warn"
    assert check["observed"]["kprobes"] is False


def test_debians_default_perf_event_paranoid_is_named_for_the_daemonset() -> None:
    """Level 3 (Debian's default) refuses kprobes to an agent without CAP_SYS_ADMIN: a node
    where root compiles and attaches is still one where the DaemonSet would fall back."""
    result = check_bpf_source(ready(perf_event_paranoid=3))
    assert result.verdict is Verdict.WARN
    assert "kernel.perf_event_paranoid=3 refuses perf events" in result.summary
    assert result.fix is not None and "sysctl -w kernel.perf_event_paranoid=2" in result.fix
    assert result.observed["perf_event_paranoid"] == 3
    assert check_bpf_source(ready(perf_event_paranoid=2)).verdict is Verdict.PASS


def test_perf_event_paranoid_is_read_from_the_node(tmp_path: Path) -> None:
    view = host_like(tmp_path)
    (tmp_path / "proc/sys/kernel").mkdir(parents=True)
    (tmp_path / "proc/sys/kernel/perf_event_paranoid").write_text("3\n")
    seen = probe_bpf_readiness(view, compile_program=False)
    assert seen.perf_event_paranoid == 3
    assert "kernel.perf_event_paranoid=3" in check_bpf_source(seen).summary
