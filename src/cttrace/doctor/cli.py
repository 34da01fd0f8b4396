"""``cttrace doctor``: audit the node-level settings behind conntrack surprises.

The lead's CLI mounts :func:`doctor_command` (``app.command("doctor")(doctor_command)``);
``python -m cttrace.doctor.cli`` runs it on its own. :func:`doctor` is the plain
function underneath, returning the exit code: 0 all checks pass, 1 a check
fails, 2 something could not be checked.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from enum import StrEnum
from typing import IO, Annotated, Literal

import typer

from cttrace.doctor.bpfsource import BpfReadiness, probe_bpf_readiness
from cttrace.doctor.checks import DoctorOptions, run_checks
from cttrace.doctor.cooldown import resolve_ip_cooldown
from cttrace.doctor.model import ExitCode, Report
from cttrace.doctor.readers import LiveReader, NodeReader
from cttrace.doctor.render import render_json, render_table
from cttrace.errors import UserError


class OutputFormat(StrEnum):
    TABLE = "table"
    JSON = "json"


def doctor(
    netns: str | None = None,
    output: Literal["table", "json"] = "table",
    ip_cooldown: float | None = None,
    sample_seconds: float = 2.0,
    kubeconfig: str | None = None,
    *,
    reader: NodeReader | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    bpf_readiness: Callable[[], BpfReadiness] | None = None,
) -> int:
    """Run every check and print the report; returns the exit code.

    ``reader`` replaces the live kernel (tests), and with it the bpf-source check's
    look at the node, unless ``bpf_readiness`` is given too; problems the user can fix
    (missing namespace, not root) are printed as one line on stderr with exit 2.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        if bpf_readiness is None and reader is None:
            bpf_readiness = probe_bpf_readiness
        options = DoctorOptions(
            cooldown=resolve_ip_cooldown(ip_cooldown, kubeconfig), sample_seconds=sample_seconds,
            bpf_readiness=bpf_readiness,
        )
        report = _report(reader if reader is not None else LiveReader(netns), options, sleep)
    except UserError as exc:
        print(f"cttrace doctor: {exc}", file=err)
        return ExitCode.NOT_CHECKED
    if output == "json":
        out.write(render_json(report).decode())
    else:
        render_table(report, out)
    return report.exit_code


def _report(reader: NodeReader, options: DoctorOptions, sleep: Callable[[float], None]) -> Report:
    return Report(
        node=os.uname().nodename,
        netns=reader.netns,
        checks=run_checks(reader, options, sleep),
    )


def doctor_command(
    netns: Annotated[
        str | None,
        typer.Option(help="Audit inside this named network namespace (see `ip netns list`)."),
    ] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", help="table for people, json for scripts.")
    ] = OutputFormat.TABLE,
    ip_cooldown: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Seconds the CNI keeps a freed pod IP before reusing it "
            "(default: aws-node's IP_COOLDOWN_PERIOD when the API is reachable, else 30).",
        ),
    ] = None,
    sample_seconds: Annotated[
        float,
        typer.Option(min=0, help="How long to watch insert_failed/drop grow (0: one reading)."),
    ] = 2.0,
    kubeconfig: Annotated[
        str | None,
        typer.Option(help="kubeconfig to read the aws-node DaemonSet with (in-cluster if unset)."),
    ] = None,
) -> None:
    """Check the node settings behind conntrack surprises and print the exact fixes.

    Exit code: 0 all pass, 1 a check fails, 2 something could not be checked.
    """
    fmt: Literal["table", "json"] = "json" if output is OutputFormat.JSON else "table"
    code = doctor(netns, fmt, ip_cooldown, sample_seconds, kubeconfig)
    raise typer.Exit(code)


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("doctor")(doctor_command)

if __name__ == "__main__":
    app()
