"""``cttrace lab``: build a namespace node, replay a failure scenario, clean up.

Mounted by the main CLI as ``cttrace lab``; also runs alone as
``python -m cttrace.lab.cli``. Commands are thin: the work is in
:mod:`cttrace.lab.scenarios` and :mod:`cttrace.lab.node`.
"""

from __future__ import annotations

import enum
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import orjson
import typer

from cttrace.addr import endpoint
from cttrace.errors import UserError
from cttrace.lab import teardown
from cttrace.lab.addressing import Family
from cttrace.lab.naming import LabNames, check_instance
from cttrace.lab.node import Lab
from cttrace.lab.preconditions import LabError, require_root
from cttrace.lab.proxies import DEFAULT_PROXY, PROXY_SUMMARIES
from cttrace.lab.scenario_parts import CART, FRONTEND
from cttrace.lab.scenarios import SCENARIOS, get_scenario, run_scenario

#: Exit status after Ctrl-C or SIGTERM, as a shell reports a SIGINT death (128 + 2).
EXIT_INTERRUPTED = 130



class LayoutChoice(enum.StrEnum):
    routed = "routed"
    bridge = "bridge"


class ProxyChoice(enum.StrEnum):
    """The names of cttrace.lab.proxies.PROXIES, as typer wants them: an enum."""

    iptables = "iptables"
    nftables = "nftables"
    kube_proxy = "kube-proxy"
    kube_proxy_ipvs = "kube-proxy-ipvs"


app = typer.Typer(
    help=(
        "Reproduce conntrack failures on this machine's real kernel, safely.\n\n"
        "A lab is a Kubernetes node made of network namespaces: pods behind veths with /32 "
        "routes, kube-proxy's iptables chains (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP -> DNAT) "
        "in a node namespace, and a 'fabric' namespace that silently drops whatever the node "
        "routes out, so no packet ever leaves the lab. It also writes, as Kubernetes watch "
        "events, the Pods, Services and EndpointSlices an API server would serve (the identity "
        "file that `cttrace watch --identity-file` reads).\n\n"
        "Everything is named ctl-<instance>-* and removed on exit, Ctrl-C included. Needs root."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

FamilyOpt = Annotated[Family, typer.Option(
    "--family",
    help="The node's IP family: 4, 6 (pods and Services IPv6 only: ip6tables DNAT, /128 pod "
         "routes, proxy NDP for the pods' gateway) or dual (both; the scenario's connections "
         "use IPv6, every pod and Service's second address).",
)]

InstanceOpt = Annotated[str | None, typer.Option(
    "--instance", "-i",
    help="Lab instance id (1-6 lowercase letters/digits); namespaces are named "
         "ctl-<instance>-node, ctl-<instance>-fabric, ctl-<instance>-<pod>. Default: random.",
)]
ProxyOpt = Annotated[ProxyChoice, typer.Option(
    "--proxy",
    help="Who writes the Service rules in the node namespace. iptables: cttrace's imitation of "
         "kube-proxy's iptables mode (KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP -> DNAT). nftables: "
         "cttrace's imitation of kube-proxy's nftables mode (table ip kube-proxy, and table ip6 "
         "kube-proxy on an IPv6 or dual-stack node; verdict maps, numgen). Both lab modes work "
         "with every --family. kube-proxy: the real kube-proxy (1.20, iptables mode) run inside "
         "the node namespace against a real kube-apiserver in the lab's control-plane namespace "
         "ctl-<instance>-ctrl (built once by scripts/build-kube.sh; adds ~20 s of start-up). "
         "kube-proxy-ipvs: the same in IPVS mode (needs the ip_vs modules, ipvsadm and ipset). "
         "The real kube-proxy runs on an IPv4 node only: with --family 6 or dual it is refused.",
)]
IdentityOpt = Annotated[Path | None, typer.Option(
    "--identity-file",
    help="Write the identity (Kubernetes watch events, one JSON per line) here instead of "
         "/run/cttrace-lab/<instance>/identity.jsonl. Truncated when the lab starts.",
)]


def _fail(err: UserError) -> NoReturn:
    typer.echo(f"cttrace lab: error: {err}", err=True)
    raise typer.Exit(err.exit_code)


def _interrupted(what: str) -> NoReturn:
    typer.echo(f"cttrace lab: interrupted; {what} torn down", err=True)
    raise typer.Exit(EXIT_INTERRUPTED)


def _narrate(line: str) -> None:
    typer.echo(f"* {line}", err=True)


def _rules_dump(lab: Lab) -> str:
    """The command that shows the rules ``lab``'s proxy wrote."""
    if lab.proxy.name == "nftables":
        return f"nft list table {'ip6' if lab.plan.version == 6 else 'ip'} kube-proxy"
    if lab.proxy.name == "kube-proxy-ipvs":
        return "ipvsadm -Ln"
    return f"{lab.plan.iptables}-save -t nat"


def _ready_file_check(path: Path) -> Callable[[], bool]:
    """``wait_ready`` for --ready-file: says once what it waits for, then polls the file."""
    said = False

    def ready() -> bool:
        nonlocal said
        if path.exists():
            return True
        if not said:
            _narrate(f"waiting for {path} to exist before sending traffic")
            said = True
        return False

    return ready


@app.command()
def run(
    scenario: Annotated[str, typer.Argument(
        help=f"Which failure to replay: {', '.join(SCENARIOS)} (see `cttrace lab list`).",
        show_default=False,
    )],
    instance: InstanceOpt = None,
    identity_file: IdentityOpt = None,
    ready_file: Annotated[Path | None, typer.Option(
        "--ready-file",
        help="Build the node, then wait (up to 60 s) until this file exists before sending any "
             "traffic: start a tracer on ctl-<instance>-node, let it create the file once "
             "attached, and it sees the scenario from its first packet.",
    )] = None,
    keep: Annotated[bool, typer.Option(
        "--keep",
        help="Leave the namespaces, pod servers and identity file in place afterwards, to "
             "inspect them (`ip netns exec ctl-<instance>-node conntrack -L`); remove them with "
             "`cttrace lab down --instance <instance>`.",
    )] = False,
    brnf: Annotated[bool, typer.Option(
        "--brnf",
        help="bridge-no-brnf only: set bridge-nf-call-iptables=1 (and -ip6tables=1; the "
             "healthy control, where the connection works) instead of 0.",
    )] = False,
    family: FamilyOpt = Family.V4,
    proxy: ProxyOpt = ProxyChoice.iptables,
) -> None:
    """Replay SCENARIO with real packets, then tear the lab down.

    Narration goes to stderr as it happens, starting with who writes the Service
    rules (--proxy); the result (client, Service, flow, DNAT target, old and new
    pod, each attempt's outcome, step times, the flow's conntrack entries, and
    "proxy") is printed as one JSON line on stdout.
    """
    try:
        spec = get_scenario(scenario)
        options: dict[str, object] = {"brnf": brnf} if spec.name == "bridge-no-brnf" else {}
        if brnf and not options:
            raise LabError("--brnf applies only to the bridge-no-brnf scenario")
        wait_ready = None if ready_file is None else _ready_file_check(ready_file)
        with teardown.signals_interrupt():
            result = run_scenario(
                spec.name, instance=instance and check_instance(instance),
                identity_path=identity_file, wait_ready=wait_ready, on_step=_narrate, keep=keep,
                family=family, proxy=proxy.value, **options,
            )
    except KeyboardInterrupt:
        _interrupted("the lab was")
    except UserError as err:
        _fail(err)
    if keep:
        _narrate(f"kept: `cttrace lab down --instance {result.instance}` removes it")
    sys.stdout.buffer.write(orjson.dumps(result.to_json()) + b"\n")


@app.command()
def up(
    instance: InstanceOpt = None,
    identity_file: IdentityOpt = None,
    layout: Annotated[LayoutChoice, typer.Option(
        "--layout",
        help="routed: pods on veths with /32 routes (AWS VPC CNI style); bridge: pods on one "
             "bridge and /24 (kubenet/docker style).",
    )] = LayoutChoice.routed,
    family: FamilyOpt = Family.V4,
    proxy: ProxyOpt = ProxyChoice.iptables,
) -> None:
    """Build a node with a client pod and one Service, and keep it until Ctrl-C.

    For exploring by hand: the command prints the namespaces and a few commands
    to try (connect through the Service, list conntrack entries, dump kube-proxy's
    chains). Ctrl-C (or SIGTERM) tears everything down.
    """
    try:
        with teardown.signals_interrupt(), Lab(
            instance=instance and check_instance(instance), layout=layout.value,
            identity_path=identity_file, family=family, proxy=proxy.value,
        ) as lab:
            client = lab.start_pod(FRONTEND)
            backend = lab.start_pod(CART)
            cart = lab.add_service("shop", "cart", app="cart", vip="10.100.37.12",
                                   endpoints=[backend])
            typer.echo("\n".join([
                f"lab {lab.instance} is up ({lab.layout} layout, IPv{lab.plan.version}"
                f"{' on a dual-stack node' if len(lab.plans) > 1 else ''}):",
                f"  Service rules   {lab.proxy.description}",
                f"  node netns      {lab.node_netns}",
                f"  fabric netns    {lab.names.fabric_netns}",
                f"  client          {client.namespace}/{client.name} {client.ip}  "
                f"netns {client.netns}",
                f"  Service         shop/cart {endpoint(cart.vip, cart.port)} -> "
                f"{backend.namespace}/{backend.name} {endpoint(backend.ip, cart.target_port)}",
                f"  identity file   {lab.identity_path}",
                "try:",
                f"  ip netns exec {client.netns} {sys.executable} -m cttrace.lab.podclient "
                f"--src {client.ip} --sport 40000 --dst {cart.vip} --dport {cart.port} </dev/null",
                f"  ip netns exec {lab.node_netns} conntrack -L -f ipv{lab.plan.version}",
                f"  ip netns exec {lab.node_netns} {_rules_dump(lab)}",
                "Ctrl-C tears it down.",
            ]))
            threading.Event().wait()
    except KeyboardInterrupt:
        _interrupted("the lab was")
    except UserError as err:
        _fail(err)


@app.command("list")
def list_() -> None:
    """List the scenarios, and the lab instances present on this machine (running or left over)."""
    typer.echo("scenarios:")
    for spec in SCENARIOS.values():
        typer.echo(f"  {spec.name:<16} {spec.summary}")
    typer.echo(f"proxies (--proxy; each scenario runs with any of them, default {DEFAULT_PROXY}):")
    for name, description in PROXY_SUMMARIES.items():
        typer.echo(f"  {name:<16} {description}")
    instances = teardown.list_instances()
    typer.echo("instances:" if instances else "instances: none")
    for info in instances:
        owner = info.state.get("pid")
        status = f"running (pid {owner})" if info.owner_alive else "left over"
        proxy = info.state.get("proxy", DEFAULT_PROXY)
        typer.echo(f"  {info.instance:<8} {status}; rules by {proxy}; "
                   f"netns: {', '.join(info.netns) or 'none'}")
    if any(not info.owner_alive for info in instances):
        typer.echo("remove leftovers with `cttrace lab down --all`")


@app.command()
def down(
    instance: InstanceOpt = None,
    all_: Annotated[bool, typer.Option(
        "--all",
        help="Remove every lab instance: every network namespace a lab created (their "
             "processes are killed first) and all state under /run/cttrace-lab. Each lab marks "
             "the namespaces it creates; other ctl-* namespaces are never touched.",
    )] = False,
) -> None:
    """Remove a lab that did not tear itself down (its process was killed, the shell closed)."""
    try:
        require_root("cttrace lab down")
        if all_ == (instance is not None):
            raise LabError("say which lab to remove: --instance <id> or --all")
        if all_:
            removed = teardown.remove_all()
            typer.echo(f"removed lab instances: {', '.join(removed)}" if removed
                       else "no lab instances found")
        else:
            assert instance is not None
            gone = teardown.remove_instance(LabNames(check_instance(instance)))
            typer.echo(f"removed {', '.join(gone)}" if gone
                       else f"no namespaces of lab {instance} found")
    except UserError as err:
        _fail(err)


if __name__ == "__main__":
    app()
