"""Test tiers (see README): unit anywhere; ``kernel`` needs root and this machine's kernel;
``vm`` boots Debian's kernel under virtme-ng.

A kernel or VM test that cannot run here fails under CI (CI=true) instead of
skipping: a green run must mean the tier ran.
"""

from __future__ import annotations

import os
import shutil

import pytest

_KERNEL_TOOLS = ("ip", "iptables", "conntrack", "nft")


def _kernel_tier_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, conntrack)"
    missing = [t for t in _KERNEL_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (run scripts/install-deps.sh test)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is None:
        return
    reason = _kernel_tier_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"kernel tier cannot run: {reason}", pytrace=False)
    pytest.skip(f"kernel tier: {reason}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A VM-tier host test marked ``vm_boot_only(release, ...)`` exists for those kernels'
    boots only (tests/test_vm_tier.py ONE_KERNEL): its other kernels are deselected."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("vm_boot_only")
        callspec = getattr(item, "callspec", None)
        if marker is not None and callspec is not None \
                and callspec.params.get("vm_tier") not in marker.args:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
