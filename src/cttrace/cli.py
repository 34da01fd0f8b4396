"""The ``cttrace`` command line. Commands are thin: options in, one call out.

Errors a user can cause (:class:`cttrace.errors.UserError`) become one line on
stderr and a non-zero exit here, at the edge, never a traceback.
"""

from __future__ import annotations

import enum
import functools
import inspect
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from cttrace import flag_checks
from cttrace.agent_options import DEFAULTS as AGENT
from cttrace.errors import UserError
from cttrace.remediate import Mode as RemediateMode
from cttrace.rules import RULES, settings_of
from cttrace.sources.select import SourceKind

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
MaxEntriesOpt = Annotated[
    int | None,
    typer.Option("--max-entries", help="Most NATed conntrack entries followed at once. When "
                 "full, entries no rule needs any more (answered, finished) go first; an "
                 "unreplied one only when nothing else is left, counted and warned about. "
                 "Default: the traced namespace's nf_conntrack_max, at least 262144.", min=1),
]
ReadyFileOpt = Annotated[
    Path | None,
    typer.Option("--ready-file", callback=flag_checks.ready_file,
                 help="Write this file once the source is attached and identity is in sync "
                 "(for scripts: traffic sent after it is named). Its directory must exist."),
]


def _with_rule_settings(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` one option per rule setting that has a flag (``--late-after``...),
    as the rules declare it (cttrace.rules): the command receives their values as
    ``rule_settings``, by setting name. A new rule's setting is a new option here."""
    flagged = [s for s in settings_of() if s.flag]
    signature = inspect.signature(command, eval_str=True)
    params = [p for p in signature.parameters.values() if p.name != "rule_settings"]
    params += [
        inspect.Parameter(s.name, inspect.Parameter.KEYWORD_ONLY, default=s.default,
                          annotation=Annotated[float, typer.Option(s.flag, help=s.help,
                                                                   min=0.0)])
        for s in flagged
    ]

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        values = {s.name: kwargs.pop(s.name) for s in flagged}
        command(rule_settings=values, **kwargs)

    run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def _rule_help() -> str:
    ids = ", ".join(spec.id for spec in RULES)
    return f"Only findings of this rule: {ids} (repeatable)."


RemediateOpt = Annotated[
    RemediateMode,
    typer.Option("--remediate", help="--remediate[=on|dry-run|off]: delete conntrack entries "
                 "that never saw a reply and whose DNAT target's pod is gone or no longer an "
                 "endpoint, so the client's next SYN gets a fresh decision. Replied and "
                 "established entries are never touched. dry-run only logs. Needs identity."),
]
KubeconfigOpt = Annotated[
    str | None,
    typer.Option("--kubeconfig", help="Name pods and Services from this cluster (list+watch of "
                 "Pods, Services, EndpointSlices). In a pod, the in-cluster config is used "
                 "without this flag."),
]


def _want_kube(kubeconfig: str | None, no_kube: bool) -> bool:
    import os

    return not no_kube and (kubeconfig is not None or "KUBERNETES_SERVICE_HOST" in os.environ)


@app.command()
@_with_rule_settings
def watch(
    source: SourceOpt = SourceKind.AUTO,
    netns: NetnsOpt = None,
    identity_file: IdentityFileOpt = None,
    kubeconfig: KubeconfigOpt = None,
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
        "--ip", callback=flag_checks.ip_addresses,
        help="Only flows/findings with this client, VIP or backend IP (repeatable).")
    ] = None,
    rule: Annotated[list[str] | None, typer.Option("--rule", help=_rule_help())] = None,
    max_entries: MaxEntriesOpt = None,
    remediate: RemediateOpt = RemediateMode.OFF,
    flows: Annotated[bool, typer.Option(
        "--flows", help="With json output, also print one line per conntrack event.")] = False,
    duration: Annotated[float | None, typer.Option(
        "--duration", callback=flag_checks.duration,
        help="Stop after this many seconds (default: until Ctrl-C).")] = None,
    ready_file: ReadyFileOpt = None,
    dump_bpf: Annotated[bool, typer.Option(
        "--dump-bpf", help="Print the complete BPF program text the bpf source would compile "
        "on this kernel (settings as #defines first) and exit; compiles and attaches nothing.")
    ] = False,
    rule_settings: dict[str, float] | None = None,
) -> None:
    """Watch NATed TCP flows live and name what goes wrong, as it happens."""
    if dump_bpf:
        from cttrace.netns import netns_inode
        from cttrace.sources.bpf import BpfSource

        try:
            text = BpfSource(netns_ino=netns_inode(netns) if netns else None).dump_text()
        except UserError as err:
            raise _fail(err) from None
        typer.echo(text, nl=False)
        return
    from cttrace.watch import WatchOptions, run_watch

    opts = WatchOptions(
        source=str(source), netns=netns, identity_file=identity_file,
        kubeconfig=kubeconfig, kube=_want_kube(kubeconfig, False), output=str(output),
        namespaces=namespace or [], services=service or [],
        ips=ip or [], rules=rule or [], rule_settings=rule_settings or {}, flows=flows,
        duration=duration, ready_file=ready_file, remediate=str(remediate),
        max_entries=max_entries,
    )
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            run_watch(opts, stop)
    except UserError as err:
        raise _fail(err) from None
    except BrokenPipeError:
        # `watch | head`: the reader has what it wanted; a quiet end, as with a table.
        from cttrace.watch import stdout_to_devnull

        stdout_to_devnull()


@app.command()
@_with_rule_settings
def demo(
    scenario: Annotated[str, typer.Argument(
        help="recycled-ip (a retry reaches the pod that inherited a dead pod's IP), dead-pod "
        "(a connection keeps sending to a vanished pod), bridge-no-brnf (replies bypass "
        "conntrack on a bridge), snat-race (concurrent connections clash on one MASQUERADE "
        "tuple and SYNs are dropped).")] = "recycled-ip",
    source: SourceOpt = SourceKind.AUTO,
    output: Annotated[OutputKind, typer.Option(
        "--output", "-o", help="table (live view) or json; auto: table on a terminal.")
    ] = OutputKind.auto,
    family: Annotated[str, typer.Option(
        "--family", help="The lab node's IP family: 4, 6 or dual (both; the connections use "
        "IPv6).")] = "4",
    rule_settings: dict[str, float] | None = None,
) -> None:
    """Reproduce a conntrack failure in a network-namespace lab on this kernel and watch
    cttrace name it. Needs root; leaves nothing behind."""
    from cttrace.demo import EXPECTED, run_demo
    from cttrace.watch import WatchOptions

    if scenario not in EXPECTED:
        raise _fail(UserError(f"unknown scenario {scenario!r}: choose one of "
                              f"{', '.join(EXPECTED)}"))
    opts = WatchOptions(source=str(source), output=str(output),
                        rule_settings=rule_settings or {})
    stop = threading.Event()
    try:
        with _stop_on_signals(stop):
            code = run_demo(scenario, opts, stop, family=family)
    except UserError as err:
        raise _fail(err) from None
    raise typer.Exit(code)


@app.command()
@_with_rule_settings
def agent(
    source: SourceOpt = SourceKind.AUTO,
    netns: NetnsOpt = None,
    identity_file: IdentityFileOpt = None,
    kubeconfig: KubeconfigOpt = None,
    no_kube: Annotated[bool, typer.Option(
        "--no-kube", help="Do not use the Kubernetes API even when running in a pod.")] = False,
    listen: Annotated[str, typer.Option(
        "--listen", callback=flag_checks.listen_address,
        help="HOST:PORT for /metrics, /healthz and /readyz.")] = AGENT.listen,
    alertmanager_url: Annotated[list[str] | None, typer.Option(
        "--alertmanager-url", callback=flag_checks.alertmanager_urls,
        help="Send alerts to this Alertmanager (repeat for every member "
        "of an HA cluster: each gets every alert).")] = None,
    node: Annotated[str | None, typer.Option(
        "--node", callback=flag_checks.node_name,
        help="Node name in alerts and logs (default: $NODE_NAME, else the host name).")
    ] = None,
    generator_url: Annotated[str | None, typer.Option(
        "--generator-url", help="Link in each alert (default: http://NODE:PORT/).")] = None,
    resend_interval: Annotated[float, typer.Option(
        "--alert-resend-interval", help="Seconds between re-sends of an active alert; keep it "
        "below Alertmanager's resolve_timeout (default 5m).", min=1.0)] = AGENT.resend_interval,
    alert_hold: Annotated[float, typer.Option(
        "--alert-hold", help="Seconds a one-shot finding's alert stays active before it is "
        "resolved.", min=0.0)] = AGENT.alert_hold,
    alert_queue: Annotated[int, typer.Option(
        "--alert-queue", help="Alerts not yet accepted by every Alertmanager that are held "
        "for delivery (delivered ones kept for re-sending do not count). When full, the least "
        "severe is dropped first, logged and counted in "
        "cttrace_alertmanager_dropped_alerts_total.", min=1)] = AGENT.alert_queue,
    alertmanager_user: Annotated[str | None, typer.Option(
        "--alertmanager-user", help="Basic auth user (password from "
        "$CTTRACE_ALERTMANAGER_PASSWORD).")] = None,
    alertmanager_token_file: Annotated[Path | None, typer.Option(
        "--alertmanager-token-file", help="Bearer token file for Alertmanager.")] = None,
    alertmanager_ca: Annotated[Path | None, typer.Option(
        "--alertmanager-ca", help="CA bundle to verify Alertmanager's TLS certificate.")] = None,
    max_entries: MaxEntriesOpt = None,
    remediate: RemediateOpt = RemediateMode.OFF,
    shutdown_deadline: Annotated[float, typer.Option(
        "--shutdown-deadline", help="Seconds SIGTERM may take to flush alerts before exit.",
        min=0.0)] = AGENT.shutdown_deadline,
    ready_file: ReadyFileOpt = None,
    rule_settings: dict[str, float] | None = None,
) -> None:
    """Run as the node agent: JSON logs, /metrics, /healthz, /readyz and Alertmanager alerts."""
    import os

    from cttrace.agent import run_agent
    from cttrace.agent_options import AgentOptions

    try:
        basic_auth = None
        if alertmanager_user is not None:
            password = os.environ.get("CTTRACE_ALERTMANAGER_PASSWORD")
            if password is None:
                raise UserError("--alertmanager-user needs $CTTRACE_ALERTMANAGER_PASSWORD")
            basic_auth = (alertmanager_user, password)
        token = None
        if alertmanager_token_file is not None:
            try:
                token = alertmanager_token_file.read_text().strip()
            except OSError as err:
                raise UserError(f"cannot read {alertmanager_token_file}: {err.strerror}") \
                    from None
        opts = AgentOptions(
            source=str(source), netns=netns, identity_file=identity_file,
            kubeconfig=kubeconfig, kube=_want_kube(kubeconfig, no_kube), listen=listen,
            alertmanager_urls=alertmanager_url or [], node=node or "",
            generator_url=generator_url or "", resend_interval=resend_interval,
            alert_hold=alert_hold, alert_queue=alert_queue, basic_auth=basic_auth,
            bearer_token=token, ca_file=str(alertmanager_ca) if alertmanager_ca else None,
            rule_settings=rule_settings or {}, shutdown_deadline=shutdown_deadline,
            ready_file=ready_file, remediate=str(remediate), max_entries=max_entries,
        )
        stop = threading.Event()
        with _stop_on_signals(stop):
            run_agent(opts, stop)
    except UserError as err:
        raise _fail(err) from None


@app.command()
def explain(
    findings: Annotated[Path, typer.Argument(
        help="A file of JSON lines from `cttrace watch -o json` or the agent's log; - for stdin.",
        allow_dash=True)],
    tuple_: Annotated[str | None, typer.Option(
        "--tuple", help="Only the entry of this client tuple: SRC:SPORT or "
        "SRC:SPORT->DST:DPORT; IPv6 as [SRC]:SPORT.")] = None,
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
        skipped: list[int] = []
        chosen = [f for f in read_findings(lines, skipped)
                  if matches(f, tuple_text=tuple_, entry_id=entry, rule=rule)]
        if skipped:
            typer.echo(f"cttrace: explain: skipped {len(skipped)} lines of {findings} that are "
                       f"not JSON (the first: line {skipped[0]})", err=True)
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


def _mount_doctor() -> None:
    from cttrace.doctor.cli import doctor_command

    app.command("doctor")(doctor_command)


_mount_doctor()


_REMEDIATE_MODES = tuple(str(mode) for mode in RemediateMode)


def _bare_remediate(argv: list[str]) -> list[str]:
    """``--remediate`` alone means ``--remediate=on`` (click options cannot take an optional
    value, so a bare flag is spelled out here, before parsing)."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--remediate" and following not in _REMEDIATE_MODES:
            arg = f"--remediate={RemediateMode.ON}"
        out.append(arg)
    return out


def main() -> None:
    try:
        app(args=_bare_remediate(sys.argv[1:]), prog_name="cttrace")
    except UserError as err:
        typer.echo(f"cttrace: error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
