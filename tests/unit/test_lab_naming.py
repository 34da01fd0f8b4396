"""Lab names: every namespace and link of an instance is prefixed, unique per instance, and
short enough for the kernel."""

from __future__ import annotations

import pytest

from cttrace.lab.naming import (
    IFNAME_MAX,
    K8S_SUFFIX_ALPHABET,
    InstanceError,
    LabNames,
    check_instance,
    instance_of_netns,
    k8s_suffix,
    new_instance,
)


def test_namespaces_carry_prefix_and_instance() -> None:
    names = LabNames("ab12")
    assert names.node_netns == "ctl-ab12-node"
    assert names.fabric_netns == "ctl-ab12-fabric"
    assert names.pod_netns("ledger-5c8f9-x2x7q") == "ctl-ab12-ledger-5c8f9-x2x7q"
    assert names.tag == "ctl-ab12"


def test_links_fit_ifnamsiz_for_the_longest_instance_and_slot() -> None:
    names = LabNames("zzzzzz")
    links = [names.fabric_link_node, names.fabric_link_fabric, names.bridge,
             names.pod_link_node(99999), names.pod_link_pod(99999)]
    assert all(link.startswith("ctlzzzzzz") for link in links)
    assert max(len(link) for link in links) <= IFNAME_MAX
    assert len(set(links)) == len(links)


def test_a_link_name_the_kernel_would_refuse_is_an_error() -> None:
    with pytest.raises(InstanceError, match="longer than 15"):
        LabNames("zzzzzz").pod_link_node(100000)


@pytest.mark.parametrize("bad", ["", "AB12", "ab-1", "abcdefg", "ab 1", "../x"])
def test_instance_ids_that_cannot_name_namespaces_are_refused(bad: str) -> None:
    with pytest.raises(InstanceError, match="1-6 lowercase letters or digits"):
        check_instance(bad)


def test_new_instances_are_valid_and_differ() -> None:
    instances = {new_instance() for _ in range(20)}
    assert all(check_instance(i) == i for i in instances)
    assert len(instances) > 1


def test_instance_is_recovered_from_a_namespace_name() -> None:
    assert instance_of_netns("ctl-ab12-node") == "ab12"
    assert instance_of_netns("ctl-ab12-cart-7d9f8-w5n4t") == "ab12"
    assert instance_of_netns("cni-1234-5678") is None
    assert instance_of_netns("ctl-TOOLONGX-node") is None


def test_pod_suffixes_use_the_kubernetes_alphabet() -> None:
    suffix = k8s_suffix()
    assert len(suffix) == 5
    assert set(suffix) <= set(K8S_SUFFIX_ALPHABET)
