"""The ``cttrace`` command line. Commands are thin: options in, one call out.

Errors a user can cause (:class:`cttrace.errors.UserError`) become one line on
stderr and a non-zero exit here, at the edge, never a traceback.
"""

from __future__ import annotations

import enum
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from cttrace.errors import UserError

app = typer.Typer(
    name="cttrace",
    help=(
        "Catch what conntrack does behind Kubernetes' back: connections silently reaching "
        "the wrong pod through a recycled IP, traffic to dead pods, SNAT collisions, "
        "un-NATed replies.\n\nStart with `cttrace demo` (a lab on this machine's kernel), "
        "then `cttrace watch` on a node."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class SourceKind(enum.StrEnum):
    auto = "auto"
    netlink = "netlink"
    bpf = "bpf"


class OutputKind(enum.StrEnum):
    auto = "auto"
    table = "table"
    json = "json"


def _version(value: bool) -> None:
    if value:
        from cttrace import __version__

        typer.echo(f"cttrace {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Catch what conntrack does behind Kubernetes' back."""


def _fail(err: UserError) -> typer.Exit:
    typer.echo(f"cttrace: error: {err}", err=True)
    return typer.Exit(err.exit_code)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop``: the loop finishes its turn, then everything is closed."""
    previous: dict[signal.Signals, Any] = {}

    def handler(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


NetnsOpt = Annotated[
    str | None,
    typer.Option("--netns", help="Trace conntrack inside this named network namespace "
                 "(`ip netns list`); conntrack is per namespace. Default: the current one."),
]
SourceOpt = Annotated[
    SourceKind,
    typer.Option("--source", help="Kernel source: bpf (kprobes via BCC: sockets, in-kernel "
                 "filtering), netlink (ctnetlink events, needs only CAP_NET_ADMIN), or auto "
                 "(bpf, else netlink, saying why)."),
]
IdentityFileOpt = Annotated[
    Path | None,
    typer.Option("--identity-file", help="Follow this file of Kubernetes watch events (JSON "
                 "lines: {\"type\": ADDED|MODIFIED|DELETED, \"object\": Pod|Service|"
                 "EndpointSlice}) to name pods and Services; the lab writes one."),
]
LateAfterOpt = Annotated[
    float,
    typer.Option("--late-after", help="Seconds an entry may stay unreplied before its first "
                 "reply counts as late-establish.", min=0.0),
]
GraceOpt = Annotated[
    float,
    typer.Option("--identity-grace", help="Seconds a decision waits for identity that lags "
                 "the kernel (pod status reaches the API late).", min=0.0),
]
DeadAfterOpt = Annotated[
    float,
    typer.Option("--dead-after", help="Seconds an entry may outlive its pod before "
                 "dead-endpoint fires.", min=0.0),
]


@app.command()
def watch(
    source: SourceOpt = SourceKind.auto,
    netns: NetnsOpt = None,
    identity_file: IdentityFileOpt = None,
    output: Annotated[
        OutputKind,
        typer.Option("--output", "-o", help="table: live view; json: one JSON object per "
                     "line (findings, status, summary). auto: table on a terminal, else json."),
    ] = OutputKind.auto,
    namespace: Annotated[list[str] | None, typer.Option(
        "--namespace", "-n", help="Only flows/findings involving this namespace (repeatable).")
    ] = None,
    service: Annotated[list[str] | None, typer.Option(
        "--service", help="Only this Service, as name or namespace/name (repeatable).")] = None,
    ip: Annotated[list[str] | None, typer.Option(
        "--ip", help="Only flows/findings with this client, VIP or backend IP (repeatable).")
    ] = None,
    rule: Annotated[list[str] | None, typer.Option(
        "--rule", help="Only findings of this rule: wrong-pod, late-establish, dead-endpoint, "
        "unnated-reply, inherited-entry, snat-collision (repeatable).")] = None,
    late_after: LateAfterOpt = 3.0,
    identity_grace: GraceOpt = 5.0,
    dead_after: DeadAfterOpt = 5.0,
    flows: Annotated[bool, typer.Option(
        "--flows", help="With json output, also print one line per conntrack event.")] = False,
    duration: Annotated[float | None, typer.Option(
        "--duration", help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    ready_file: Annotated[Path | None, typer.Option(
        "--ready-file", help="Write this file once the source is attached (for scripts).")
    ] = None,
) -> None:
    """Watch NATed TCP flows live and name what goes wrong, as it happens."""
    from cttrace.watch import WatchOptions, run_watch

    opts = WatchOptions(
        source=str(source), netns=netns, identity_file=identity_file,
        output=str(output), namespaces=namespace or [], services=service or [],
        ips=ip or [], rules=rule or [], late_after=late_after,
        identity_grace=identity_grace, dead_after=dead_after, flows=flows,
        duration=duration, ready_file=ready_file,
    )
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            run_watch(opts, stop)
    except UserError as err:
        raise _fail(err) from None


@app.command()
def explain(
    findings: Annotated[Path, typer.Argument(
        help="A file of JSON lines from `cttrace watch -o json` or the agent's log; - for stdin.",
        allow_dash=True)],
    tuple_: Annotated[str | None, typer.Option(
        "--tuple", help="Only the entry of this client tuple: SRC:SPORT or "
        "SRC:SPORT->DST:DPORT.")] = None,
    entry: Annotated[int | None, typer.Option("--entry", help="Only this conntrack entry id.")
                     ] = None,
    rule: Annotated[str | None, typer.Option("--rule", help="Only findings of this rule.")
                    ] = None,
    output: Annotated[OutputKind, typer.Option(
        "--output", "-o", help="table (text timeline) or json (one timeline per line).")
    ] = OutputKind.table,
) -> None:
    """Tell the story of a finding's conntrack entry as a timeline: created, DNAT target's
    owner gone, IP reassigned, first reply, finding."""
    import orjson

    from cttrace.explain import matches, read_findings, render, timeline

    try:
        if str(findings) == "-":
            lines = sys.stdin.buffer.read().splitlines()
        else:
            try:
                lines = findings.read_bytes().splitlines()
            except OSError as err:
                raise UserError(f"cannot read {findings}: {err.strerror}") from None
        chosen = [f for f in read_findings(lines, str(findings))
                  if matches(f, tuple_text=tuple_, entry_id=entry, rule=rule)]
        if not chosen:
            raise UserError(f"no finding in {findings} matches")
        for i, f in enumerate(chosen):
            steps = timeline(f)
            if output == OutputKind.json:
                typer.echo(orjson.dumps({"entry_id": f.get("entry_id"),
                                         "steps": [s.to_json() for s in steps]}).decode())
            else:
                if i:
                    typer.echo("")
                typer.echo(render(steps))
    except UserError as err:
        raise _fail(err) from None


def _mount(name: str, loader: Callable[[], typer.Typer], help_text: str) -> None:
    try:
        sub = loader()
    except ImportError:
        return
    app.add_typer(sub, name=name, help=help_text)


def _lab_app() -> typer.Typer:
    from cttrace.lab.cli import app as lab_app

    assert isinstance(lab_app, typer.Typer)
    return lab_app


_mount("lab", _lab_app, "Build a Kubernetes-like node from network namespaces on this "
       "kernel and reproduce conntrack failures in it.")


def main() -> None:
    try:
        app()
    except UserError as err:
        typer.echo(f"cttrace: error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
