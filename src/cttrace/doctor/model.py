"""What a doctor run produces: one result per check, and the report's exit code.

The JSON form (:meth:`Report.to_json`) is a contract with users; see
``README.md`` beside this file for the schema. Keys stay; new keys may be added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Verdict(StrEnum):
    PASS = "pass"  # the invariant holds
    FAIL = "fail"  # the invariant is broken: apply ``fix``
    WARN = "warn"  # holds, but with little margin, or it cannot be decided from here
    INFO = "info"  # a setting worth knowing; never changes the exit code
    ERROR = "error"  # could not check (missing tool, no permission, module not loaded)


class ExitCode:
    OK = 0  # no check failed and every check could run
    FAILED = 1  # at least one check failed (wins over ERROR: a failure is definite)
    NOT_CHECKED = 2  # at least one check could not run, or the doctor could not start


@dataclass(frozen=True, slots=True)
class CheckResult:
    id: str  # stable identifier, e.g. ``br-netfilter``
    verdict: Verdict
    summary: str  # one sentence a person reads first
    observed: dict[str, object] = field(default_factory=dict)  # the values the verdict rests on
    # Shell command lines that fix it, one per line, to be run in order; None
    # when there is nothing to change.
    fix: str | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "verdict": str(self.verdict),
            "summary": self.summary,
            "observed": self.observed,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class Report:
    node: str
    netns: str | None
    checks: tuple[CheckResult, ...]

    @property
    def exit_code(self) -> int:
        verdicts = {c.verdict for c in self.checks}
        if Verdict.FAIL in verdicts:
            return ExitCode.FAILED
        if Verdict.ERROR in verdicts:
            return ExitCode.NOT_CHECKED
        return ExitCode.OK

    def check(self, check_id: str) -> CheckResult:
        """The result of ``check_id`` (KeyError when that check did not run)."""
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(check_id)

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "netns": self.netns,
            "checks": [c.to_json() for c in self.checks],
            "exit_code": self.exit_code,
        }
