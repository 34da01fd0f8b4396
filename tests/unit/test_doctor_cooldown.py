"""Where the IP reuse cooldown comes from: the flag, the aws-node DaemonSet, or the default."""

from __future__ import annotations

import pytest

from cttrace.doctor.cooldown import AwsNodeEnv, cooldown_from_env, resolve_ip_cooldown


def never_called(kubeconfig: str | None) -> AwsNodeEnv:
    raise AssertionError("the API must not be asked")


def test_the_flag_wins_and_the_api_is_not_asked() -> None:
    got = resolve_ip_cooldown(45, "/kubeconfig", read_env=never_called, environ={})
    assert (got.seconds, got.source, got.error) == (45, "--ip-cooldown", None)


def test_without_an_api_the_aws_default_is_assumed_and_said() -> None:
    got = resolve_ip_cooldown(None, None, read_env=never_called, environ={})
    assert got.seconds == 30.0 and "default" in got.source and got.error is None


def test_in_cluster_reads_aws_node() -> None:
    asked: list[str | None] = []

    def read(kubeconfig: str | None) -> AwsNodeEnv:
        asked.append(kubeconfig)
        return {"IP_COOLDOWN_PERIOD": "60", "WARM_IP_TARGET": "5"}

    got = resolve_ip_cooldown(None, None, read_env=read, environ={"KUBERNETES_SERVICE_HOST": "x"})
    assert asked == [None]
    assert got.seconds == 60.0 and got.source == "kube-system/aws-node env IP_COOLDOWN_PERIOD"


def test_a_kubeconfig_is_passed_to_the_reader() -> None:
    asked: list[str | None] = []

    def read(kubeconfig: str | None) -> AwsNodeEnv:
        asked.append(kubeconfig)
        return {}

    got = resolve_ip_cooldown(None, "/tmp/kc", read_env=read, environ={})
    assert asked == ["/tmp/kc"]
    assert got.seconds == 30.0 and "IP_COOLDOWN_PERIOD unset" in got.source


def test_an_unreachable_api_is_an_error_that_says_what_to_do() -> None:
    def read(kubeconfig: str | None) -> AwsNodeEnv:
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    got = resolve_ip_cooldown(None, "/tmp/kc", read_env=read, environ={})
    assert got.seconds is None
    assert got.error == (
        "cannot read kube-system/aws-node ([Errno 111] Connection refused); pass --ip-cooldown"
    )


def test_no_aws_node_daemonset_means_unknown() -> None:
    got = cooldown_from_env(None)
    assert got.seconds is None and got.error is None and "not the AWS VPC CNI" in got.source


@pytest.mark.parametrize("raw", ["soon", None, "-5"])
def test_a_cooldown_that_is_not_seconds_is_an_error(raw: str | None) -> None:
    got = cooldown_from_env({"IP_COOLDOWN_PERIOD": raw})
    assert got.seconds is None and got.error is not None and "--ip-cooldown" in got.error
