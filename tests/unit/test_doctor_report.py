"""The doctor's report: exit codes, the documented JSON schema, and the table's fix lines."""

from __future__ import annotations

import io
import secrets

import orjson
import pytest

from cttrace.doctor.checks import BRNF_IPTABLES, SYN_SENT
from cttrace.doctor.cli import doctor
from cttrace.doctor.model import CheckResult, Report, Verdict
from tests.unit.test_doctor_checks import HEALTHY_SYSCTLS, NFT_SAVE, FakeReader, counters, ok


def _no_sleep(seconds: float) -> None:
    pass


def bad_node(netns: str | None = "ctl-dr1") -> FakeReader:
    sysctls = dict(HEALTHY_SYSCTLS, **{SYN_SENT: "120", BRNF_IPTABLES: "0"})
    return FakeReader(
        netns=netns,
        sysctls=sysctls,
        bridges={"ctlbr0": ["ctlva"]},
        stats=[counters()],
        commands={"iptables-nft-save": ok(NFT_SAVE)},
    )


def good_node() -> FakeReader:
    return FakeReader(
        netns="ctl-dr1",
        bridges={"ctlbr0": ["ctlva"]},
        stats=[counters()],
        commands={"iptables-nft-save": ok("")},
    )


def run_json(reader: FakeReader) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    code = doctor(reader.netns, "json", ip_cooldown=30, sample_seconds=0, reader=reader, stdout=out)
    return code, orjson.loads(out.getvalue())


def result(verdict: Verdict) -> CheckResult:
    return CheckResult("x", verdict, "s")


@pytest.mark.parametrize(
    ("verdicts", "code"),
    [
        ([Verdict.PASS, Verdict.INFO, Verdict.WARN], 0),
        ([Verdict.PASS, Verdict.FAIL], 1),
        ([Verdict.PASS, Verdict.ERROR], 2),
        ([Verdict.ERROR, Verdict.FAIL], 1),  # a definite failure wins
    ],
)
def test_exit_code(verdicts: list[Verdict], code: int) -> None:
    assert Report("n", None, tuple(result(v) for v in verdicts)).exit_code == code


def test_json_follows_the_documented_schema() -> None:
    code, doc = run_json(bad_node())
    assert code == 1
    assert set(doc) == {"node", "netns", "checks", "exit_code"}
    assert isinstance(doc["node"], str) and doc["node"]
    assert doc["netns"] == "ctl-dr1"
    assert doc["exit_code"] == 1
    checks = doc["checks"]
    assert isinstance(checks, list)
    for check in checks:
        assert set(check) == {"id", "verdict", "summary", "observed", "fix"}
        assert check["verdict"] in {"pass", "fail", "warn", "info", "error"}
        assert isinstance(check["summary"], str)
        assert isinstance(check["observed"], dict)
        assert check["fix"] is None or isinstance(check["fix"], str)
    verdicts = {c["id"]: c["verdict"] for c in checks}
    assert verdicts["syn-sent-vs-ip-cooldown"] == "fail"
    assert verdicts["br-netfilter"] == "fail"
    assert verdicts["masquerade-random-fully"] == "fail"
    assert verdicts["conntrack-fill"] == "pass"


def test_host_namespace_is_null_in_json() -> None:
    _, doc = run_json(FakeReader(netns=None, stats=[counters()]))
    assert doc["netns"] is None


def test_a_well_configured_node_exits_0() -> None:
    code, doc = run_json(good_node())
    assert code == 0 and doc["exit_code"] == 0


def test_table_lists_each_fix_on_one_unwrapped_line() -> None:
    out = io.StringIO()
    code = doctor(
        "ctl-dr1",
        "table",
        ip_cooldown=30,
        sample_seconds=0,
        reader=bad_node(),
        stdout=out,
        sleep=_no_sleep,
    )
    assert code == 1
    lines = out.getvalue().splitlines()
    assert "ip netns exec ctl-dr1 sysctl -w net.bridge.bridge-nf-call-iptables=1" in lines
    assert (
        "ip netns exec ctl-dr1 sysctl -w net.netfilter.nf_conntrack_tcp_timeout_syn_sent=20"
        in lines
    )
    assert lines[-1] == "3 failed, 0 could not be checked; exit code 1"


def test_a_missing_namespace_is_one_line_on_stderr_and_exit_2() -> None:
    name = f"ctl-dr{secrets.token_hex(3)}-absent"
    out, err = io.StringIO(), io.StringIO()
    code = doctor(name, "json", ip_cooldown=30, sample_seconds=0, stdout=out, stderr=err)
    assert code == 2
    assert out.getvalue() == ""
    message = err.getvalue()
    assert message.count("\n") == 1
    assert message.startswith(f"cttrace doctor: network namespace '{name}' not found")
