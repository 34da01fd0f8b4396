"""`cttrace doctor` against real network namespaces, iptables (legacy and nft), nft and sysctls.

What a user relies on: on a namespace configured badly (a bridge with a veth
port and bridge-nf-call-iptables=0, MASQUERADE without --random-fully in
iptables-nft, iptables-legacy and native nft, SYN_SENT timeout 120 s against a
30 s IP cooldown) each failing check is reported with its fix and the exit code
is 1; running exactly the printed fixes makes every check pass (exit 0); a
namespace configured well from the start passes; the JSON parses and follows
the schema; a missing namespace is one line and exit 2. The IP cooldown is read
from a real API's aws-node DaemonSet.

Every namespace is the test's own (``ctl-dr<random>``) and is deleted at the end.
"""

from __future__ import annotations

import io
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from kubernetes import client

from cttrace.doctor.cli import doctor
from tests.fixtures.kube import KubeCluster, kube_cluster  # noqa: F401 (fixture)

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(REPO / ".venv" / "bin" / "python")
SYN_SENT = "net.netfilter.nf_conntrack_tcp_timeout_syn_sent"
BRNF = "net.bridge.bridge-nf-call-iptables"
FAILING = {"syn-sent-vs-ip-cooldown", "br-netfilter", "masquerade-random-fully"}


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Node:
    """A network namespace standing in for a node, with a bridge holding one veth port."""

    ns: str
    bridge: str
    port: str
    nft_table: str

    def run(self, *argv: str) -> str:
        return sh("ip", "netns", "exec", self.ns, *argv)

    def sysctl(self, name: str, value: object) -> None:
        self.run("sysctl", "-qw", f"{name}={value}")

    def read_sysctl(self, name: str) -> str:
        return self.run("sysctl", "-n", name).strip()

    def masquerade(self, random_fully: bool) -> None:
        extra = ["--random-fully"] if random_fully else []
        self.run(
            "iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/24",
            "-m", "comment", "--comment", "ctl pod's egress", "-j", "MASQUERADE", *extra,
        )  # fmt: skip
        self.run(
            "iptables-legacy", "-t", "nat", "-A", "POSTROUTING", "-o", self.port,
            "-j", "MASQUERADE", *extra,
        )  # fmt: skip
        self.run("nft", "add", "table", "inet", self.nft_table)
        self.run(
            "nft", "add", "chain", "inet", self.nft_table, "post",
            "{ type nat hook postrouting priority srcnat; }",
        )  # fmt: skip
        flags = ["fully-random"] if random_fully else []
        self.run(
            "nft", "add", "rule", "inet", self.nft_table, "post",
            "ip", "saddr", "10.245.0.0/24", "masquerade", *flags,
        )  # fmt: skip


@pytest.fixture
def node() -> Iterator[Node]:
    uid = secrets.token_hex(3)
    made = Node(f"ctl-dr{uid}", f"ctlb{uid}", f"ctlv{uid}a", f"ctl{uid}")
    sh("ip", "netns", "add", made.ns)
    try:
        made.run("ip", "link", "set", "lo", "up")
        made.run("ip", "link", "add", made.bridge, "type", "bridge")
        made.run("ip", "link", "add", made.port, "type", "veth", "peer", "name", f"ctlv{uid}b")
        made.run("ip", "link", "set", made.port, "master", made.bridge)
        yield made
    finally:
        subprocess.run(["ip", "netns", "del", made.ns], check=False)


def configure_badly(node: Node) -> None:
    node.sysctl(BRNF, 0)
    node.sysctl(SYN_SENT, 120)
    node.masquerade(random_fully=False)


def doctor_json(node: Node, *extra: str) -> tuple[int, dict[str, Any]]:
    """The doctor as a user runs it: a separate process."""
    proc = subprocess.run(
        [PYTHON, "-m", "cttrace.doctor.cli", "--netns", node.ns, "--output", "json", *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.stderr == ""
    return proc.returncode, orjson.loads(proc.stdout)


def checks_by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in doc["checks"]}


def assert_schema(doc: dict[str, Any], netns: str) -> None:
    assert set(doc) == {"node", "netns", "checks", "exit_code"}
    assert doc["netns"] == netns
    for check in doc["checks"]:
        assert set(check) == {"id", "verdict", "summary", "observed", "fix"}
        assert check["verdict"] in {"pass", "fail", "warn", "info", "error"}


def test_badly_configured_node_fails_with_fixes_that_work(node: Node) -> None:
    configure_badly(node)
    out = io.StringIO()
    code = doctor(node.ns, "json", ip_cooldown=30, sample_seconds=0.2, stdout=out)
    doc = orjson.loads(out.getvalue())
    assert_schema(doc, node.ns)
    assert code == 1 and doc["exit_code"] == 1
    checks = checks_by_id(doc)
    assert {cid for cid, c in checks.items() if c["verdict"] == "fail"} == FAILING
    assert not [c for c in checks.values() if c["verdict"] == "error"]

    syn = checks["syn-sent-vs-ip-cooldown"]
    assert syn["observed"]["nf_conntrack_tcp_timeout_syn_sent"] == 120
    assert syn["fix"] == f"ip netns exec {node.ns} sysctl -w {SYN_SENT}=20"

    brnf = checks["br-netfilter"]
    assert brnf["observed"]["bridges"] == {node.bridge: [node.port]}
    assert brnf["observed"]["bridge-nf-call-iptables"] == "0"
    assert brnf["fix"] == f"ip netns exec {node.ns} sysctl -w {BRNF}=1"

    masq = checks["masquerade-random-fully"]
    backends = sorted(r["backend"] for r in masq["observed"]["rules_without_random_fully"])
    assert backends == ["iptables-legacy", "iptables-nft", "nft"]
    assert len(masq["fix"].splitlines()) == 3

    # The printed fixes, run as printed, are what it takes.
    for check in checks.values():
        if check["verdict"] == "fail":
            for line in check["fix"].splitlines():
                subprocess.run(["sh", "-c", line], check=True, capture_output=True)

    code, doc = doctor_json(node, "--ip-cooldown", "30", "--sample-seconds", "0.2")
    assert_schema(doc, node.ns)
    assert code == 0, [c for c in doc["checks"] if c["verdict"] not in ("pass", "info")]
    # bpf-source is about this machine's kernel (no kprobes: warn), not the namespace.
    assert {c["verdict"] for c in doc["checks"] if c["id"] != "bpf-source"} <= {"pass", "info"}
    # ... and the namespace really is configured well now.
    assert node.read_sysctl(SYN_SENT) == "20"
    assert node.read_sysctl(BRNF) == "1"
    assert "--random-fully" in node.run("iptables-nft-save", "-t", "nat")
    assert "--random-fully" in node.run("iptables-legacy-save", "-t", "nat")
    assert "fully-random" in node.run("nft", "list", "table", "inet", node.nft_table)


def test_well_configured_node_passes(node: Node) -> None:
    node.sysctl(BRNF, 1)
    node.sysctl(SYN_SENT, 20)
    node.masquerade(random_fully=True)
    code, doc = doctor_json(node, "--ip-cooldown", "30", "--sample-seconds", "0.2")
    assert_schema(doc, node.ns)
    assert code == 0 and doc["exit_code"] == 0
    checks = checks_by_id(doc)
    for cid in ("syn-sent-vs-ip-cooldown", "br-netfilter", "masquerade-random-fully"):
        assert checks[cid]["verdict"] == "pass", checks[cid]
    assert checks["masquerade-random-fully"]["observed"]["rules_checked"] == 3
    assert checks["conntrack-fill"]["verdict"] == "pass"
    assert checks["insert-failed"]["verdict"] == "pass"
    # The namespace's own values were read, not the host's.
    assert checks["syn-sent-vs-ip-cooldown"]["observed"]["nf_conntrack_tcp_timeout_syn_sent"] == 20
    assert checks["br-netfilter"]["observed"]["bridges"] == {node.bridge: [node.port]}


def test_table_output_of_a_bad_node_prints_the_fixes(node: Node) -> None:
    configure_badly(node)
    proc = subprocess.run(
        [PYTHON, "-m", "cttrace.doctor.cli", "--netns", node.ns, "--ip-cooldown", "30",
         "--sample-seconds", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"ip netns exec {node.ns} sysctl -w {BRNF}=1" in lines
    assert lines[-1] == "3 failed, 0 could not be checked; exit code 1"


def test_missing_namespace_is_one_line_and_exit_2() -> None:
    name = f"ctl-dr{secrets.token_hex(3)}"
    proc = subprocess.run(
        [PYTHON, "-m", "cttrace.doctor.cli", "--netns", name, "--ip-cooldown", "30"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"cttrace doctor: network namespace '{name}' not found")
    assert "Traceback" not in proc.stderr


def aws_node(cooldown: str) -> client.V1DaemonSet:
    labels = {"k8s-app": "aws-node"}
    env = [client.V1EnvVar(name="IP_COOLDOWN_PERIOD", value=cooldown)]
    container = client.V1Container(name="aws-node", image="ctl/aws-node:test", env=env)
    return client.V1DaemonSet(
        metadata=client.V1ObjectMeta(name="aws-node", namespace="kube-system"),
        spec=client.V1DaemonSetSpec(
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[container]),
            ),
        ),
    )


def test_ip_cooldown_comes_from_the_aws_node_daemonset(
    node: Node,
    kube_cluster: KubeCluster,  # noqa: F811 (fixture)
) -> None:
    kubeconfig = kube_cluster.kubeconfig
    code, doc = doctor_json(node, "--kubeconfig", kubeconfig, "--sample-seconds", "0")
    syn = checks_by_id(doc)["syn-sent-vs-ip-cooldown"]
    assert syn["verdict"] == "warn"  # no aws-node: not the AWS VPC CNI, cooldown unknown
    assert "not the AWS VPC CNI" in syn["observed"]["ip_cooldown_source"]
    assert code == 0  # a warning is not a failure

    with kube_cluster.api_client() as api:
        apps = client.AppsV1Api(api)
        apps.create_namespaced_daemon_set("kube-system", aws_node("150"))
        try:
            code, doc = doctor_json(node, "--kubeconfig", kubeconfig, "--sample-seconds", "0")
        finally:
            apps.delete_namespaced_daemon_set("aws-node", "kube-system")
    assert code == 0
    syn = checks_by_id(doc)["syn-sent-vs-ip-cooldown"]
    assert syn["observed"]["ip_cooldown_s"] == 150
    assert syn["observed"]["ip_cooldown_source"] == "kube-system/aws-node env IP_COOLDOWN_PERIOD"
    assert syn["verdict"] == "pass"  # a fresh namespace's SYN_SENT timeout is 120 s


def test_unreachable_kubeconfig_is_could_not_check(node: Node, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    node.sysctl(BRNF, 1)
    code, doc = doctor_json(node, "--kubeconfig", str(kubeconfig), "--sample-seconds", "0")
    syn = checks_by_id(doc)["syn-sent-vs-ip-cooldown"]
    assert syn["verdict"] == "error" and "--ip-cooldown" in syn["summary"]
    assert code == 2
