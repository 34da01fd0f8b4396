"""Doctor output: a table for people, JSON (schema in README.md) for scripts."""

from __future__ import annotations

from typing import IO

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cttrace.doctor.model import Report, Verdict

_STYLE = {
    Verdict.PASS: "green",
    Verdict.FAIL: "bold red",
    Verdict.WARN: "yellow",
    Verdict.INFO: "cyan",
    Verdict.ERROR: "magenta",
}
_OBSERVED_WIDTH = 60


def render_json(report: Report) -> bytes:
    return orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2) + b"\n"


def _observed_text(observed: dict[str, object]) -> str:
    lines = []
    for key, value in observed.items():
        shown = value if isinstance(value, str) else orjson.dumps(value).decode()
        if len(shown) > _OBSERVED_WIDTH:
            shown = shown[: _OBSERVED_WIDTH - 1] + "…"
        lines.append(f"{key}={shown}")
    return "\n".join(lines)


def render_table(report: Report, stream: IO[str], color: bool | None = None) -> None:
    width = None if stream.isatty() else 160  # a pipe or file gets wide, unwrapped rows
    console = Console(file=stream, no_color=color is False, force_terminal=color, width=width)
    where = f"netns {report.netns}" if report.netns else "host network namespace"
    console.print(Text(f"cttrace doctor: {report.node}, {where}", style="bold"))
    table = Table(show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("summary", ratio=3)
    table.add_column("observed", ratio=2)
    for check in report.checks:
        table.add_row(
            check.id,
            Text(str(check.verdict), style=_STYLE[check.verdict]),
            Text(check.summary),
            Text(_observed_text(check.observed), style="dim"),
        )
    console.print(table)
    fixes = [c for c in report.checks if c.fix and c.verdict in (Verdict.FAIL, Verdict.WARN)]
    if fixes:
        console.print(Text("To fix:", style="bold"))
        for check in fixes:
            console.print(Text(f"# {check.id}", style="bold"))
            assert check.fix is not None
            for line in check.fix.splitlines():
                # Never wrapped: the lines are meant to be copied into a shell.
                console.print(line, markup=False, highlight=False, soft_wrap=True)
    failed = sum(c.verdict is Verdict.FAIL for c in report.checks)
    errors = sum(c.verdict is Verdict.ERROR for c in report.checks)
    console.print(
        f"{failed} failed, {errors} could not be checked; exit code {report.exit_code}",
        markup=False,
        highlight=False,
    )
