"""How long the CNI keeps a freed pod IP before handing it to another pod.

The ``syn-sent-vs-ip-cooldown`` check compares this with the conntrack
SYN_SENT timeout. The AWS VPC CNI calls it ``IP_COOLDOWN_PERIOD`` (seconds,
default 30; settable since v1.15, fixed at 30 before) and reads it from the
environment of the ``aws-node`` DaemonSet in ``kube-system``. Other CNIs have
no such setting; the user can state one with ``--ip-cooldown``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

AWS_DEFAULT_IP_COOLDOWN_S = 30.0
AWS_NODE_NAMESPACE = "kube-system"
AWS_NODE_DAEMONSET = "aws-node"
COOLDOWN_ENV = "IP_COOLDOWN_PERIOD"
API_TIMEOUT_S = 5.0

#: Environment of the aws-node container (None values are ``valueFrom`` refs);
#: None when there is no aws-node DaemonSet.
AwsNodeEnv = Mapping[str, str | None] | None


@dataclass(frozen=True, slots=True)
class IpCooldown:
    seconds: float | None  # None: not known
    source: str  # where the value (or its absence) comes from, for the report
    error: str | None = None  # the API was asked and its answer could not be used


def cooldown_from_env(env: AwsNodeEnv) -> IpCooldown:
    """Interpret the aws-node container environment (pure, for tests)."""
    where = f"{AWS_NODE_NAMESPACE}/{AWS_NODE_DAEMONSET}"
    if env is None:
        return IpCooldown(None, f"no DaemonSet {where}: not the AWS VPC CNI; pass --ip-cooldown")
    if COOLDOWN_ENV not in env:
        return IpCooldown(AWS_DEFAULT_IP_COOLDOWN_S, f"{where} default ({COOLDOWN_ENV} unset)")
    raw = env[COOLDOWN_ENV]
    try:
        seconds = float(raw) if raw is not None else None
    except ValueError:
        seconds = None
    if seconds is None or seconds < 0:
        return IpCooldown(
            None,
            where,
            error=f"{where} sets {COOLDOWN_ENV}={raw!r}, not seconds; pass --ip-cooldown",
        )
    return IpCooldown(seconds, f"{where} env {COOLDOWN_ENV}")


def read_aws_node_env(kubeconfig: str | None) -> AwsNodeEnv:
    """The aws-node container's environment from the API (kubeconfig, else in-cluster)."""
    # Imported here: the Kubernetes client takes a noticeable time to import
    # and only this path needs it.
    from kubernetes import client, config
    from kubernetes.client.exceptions import ApiException

    if kubeconfig is not None:
        api_client = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    else:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
        api_client = client.ApiClient()
    apps = client.AppsV1Api(api_client)
    try:
        ds = apps.read_namespaced_daemon_set(
            AWS_NODE_DAEMONSET, AWS_NODE_NAMESPACE, _request_timeout=API_TIMEOUT_S
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    pod_spec = ds.spec.template.spec if ds.spec is not None else None
    containers = pod_spec.containers if pod_spec is not None else []
    if not containers:
        return {}
    main = next((c for c in containers if c.name == AWS_NODE_DAEMONSET), containers[0])
    return {e.name: e.value for e in (main.env or [])}


def resolve_ip_cooldown(
    flag: float | None,
    kubeconfig: str | None,
    *,
    read_env: Callable[[str | None], AwsNodeEnv] = read_aws_node_env,
    environ: Mapping[str, str] = os.environ,
) -> IpCooldown:
    """``--ip-cooldown`` if given; else aws-node's setting when an API is reachable; else 30 s."""
    if flag is not None:
        return IpCooldown(flag, "--ip-cooldown")
    if kubeconfig is None and "KUBERNETES_SERVICE_HOST" not in environ:
        return IpCooldown(
            AWS_DEFAULT_IP_COOLDOWN_S,
            "AWS VPC CNI default (no Kubernetes API given; use --kubeconfig or --ip-cooldown)",
        )
    try:
        env = read_env(kubeconfig)
    except Exception as exc:  # any API/config failure is reported, not raised
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f"{AWS_NODE_NAMESPACE}/{AWS_NODE_DAEMONSET}"
        return IpCooldown(None, where, error=f"cannot read {where} ({first}); pass --ip-cooldown")
    return cooldown_from_env(env)
