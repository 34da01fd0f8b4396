"""The VM tier, seen from the host: one boot of each of Debian's kernels runs every test in
tests/vm.

This machine's kernel has no kprobes, so the BCC source is tested in the kernels
tests/vm/run_vm_tier.py names (``KERNELS``: Debian's 6.1 and 6.12) booted by
virtme-ng under emulation (scripts/vm-setup.sh installs them). The boot and the
BCC compile cost minutes, so the whole guest run happens once per kernel per
pytest session (a session fixture, parametrized by kernel: pytest runs all of one
kernel's tests before the next boot) and each guest test is reported here as a
host test of the same name with the kernel's release as its parameter
(``test_programs_load_and_attach[6.12.118+deb12-amd64]``), failing with the
guest's own message.

The guest tests are listed by reading tests/vm/test_*.py (their top-level
``test_*`` functions), so a test that the guest did not report (it crashed,
or the VM died) fails here too. When the VM cannot be started at all, every
test fails under CI (CI=true) and is skipped elsewhere, with the reason.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.vm.run_vm_tier import KERNELS, installed_kernel, kernel_release

REPO = Path(__file__).resolve().parents[1]
VM_DIR = REPO / "tests" / "vm"
RUNNER = VM_DIR / "run_vm_tier.py"
#: tests/vm/run_vm_tier.py's exit code when the VM cannot be started (what is missing is printed).
SETUP_FAILED = 2
#: The runner kills a hung VM after its own timeout (DEFAULT_TIMEOUT); this is above it.
TIER_TIMEOUT_S = 2700

pytestmark = pytest.mark.timeout(TIER_TIMEOUT_S)

#: Guest test modules that run in one kernel's boot only: module -> kernel name (a key of
#: KERNELS). test_ipvs measures kube-proxy's IPVS datapath with etcd, kube-apiserver and
#: kube-proxy started under emulation, 11-15 min of a boot; it ran in both kernels' boots
#: with the same result (README "Datapaths"), and CI runs it in the 6.12 boot (Debian 13's
#: kernel line) to stay within its time. Its host tests exist for that kernel only.
ONE_KERNEL = {"test_ipvs": "6.12"}


def ignored_in(kernel: str) -> list[str]:
    """The guest pytest arguments that leave out the modules meant for another kernel."""
    return [f"--ignore=tests/vm/{module}.py" for module, only in ONE_KERNEL.items()
            if only != kernel]


def guest_tests() -> list[str]:
    """``module::test`` for every top-level test function in tests/vm/test_*.py."""
    found = []
    for path in sorted(VM_DIR.glob("test_*.py")):
        tree = ast.parse(path.read_text(), str(path))
        found += [f"{path.stem}::{node.name}" for node in tree.body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    return found


@dataclass
class TierRun:
    rc: int
    output: str
    out_dir: Path
    expected_release: str
    """The release this run was to boot (the test id; the kernel's name when not installed)."""
    results: dict[str, tuple[str, str]] = field(default_factory=dict)
    """``module::test`` -> (outcome: passed|failed|error|skipped, message)."""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def _parse_junit(path: Path) -> dict[str, tuple[str, str]]:
    results: dict[str, tuple[str, str]] = {}
    for case in ET.parse(path).iter("testcase"):
        module = (case.get("classname") or "").rsplit(".", 1)[-1]
        name = f"{module}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "failed" if child.tag == "failure" else child.tag
                message = "\n".join(filter(None, [child.get("message"), child.text]))
                break
        if name in results and results[name][0] != "passed":
            continue  # a teardown error after a failure: keep the first report
        results[name] = (outcome, message)
    return results


def kernel_ids() -> dict[str, str]:
    """Test id -> kernel name: the release the VM tier boots for each of KERNELS, or the
    name alone when that kernel is not installed (its tests then fail or skip saying so)."""
    ids = {}
    for name in KERNELS:
        image = installed_kernel(name)
        ids[kernel_release(image) if image else name] = name
    return ids


KERNEL_IDS = kernel_ids()


@pytest.fixture(scope="session", params=list(KERNEL_IDS))
def vm_tier(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> TierRun:
    """Boot the kernel once and run every guest test (tests/vm/run_vm_tier.py)."""
    kernel = KERNEL_IDS[request.param]
    out_dir = tmp_path_factory.mktemp(f"vm-{kernel}")
    log = out_dir / "runner.log"
    with open(log, "wb") as f:
        ignored = ignored_in(kernel)
        proc = subprocess.run([sys.executable, str(RUNNER), "--kernel", kernel,
                               "--out", str(out_dir / "guest"),
                               *(["--", *ignored] if ignored else [])],
                              stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                              cwd=REPO, timeout=TIER_TIMEOUT_S - 60, check=False)
    output = log.read_text(errors="replace")
    run = TierRun(rc=proc.returncode, output=output, out_dir=out_dir,
                  expected_release=request.param)
    if proc.returncode == SETUP_FAILED:
        reason = next((line for line in output.splitlines() if "cannot run" in line),
                      output.strip()[-500:])
        if os.environ.get("CI"):
            pytest.fail(f"VM tier cannot run: {reason}", pytrace=False)
        pytest.skip(f"VM tier: {reason}")
    junit = out_dir / "guest" / "junit.xml"
    if junit.exists():
        run.results = _parse_junit(junit)
    # What the runner measured (boot, compiles, wall), shown with -rA / in the log.
    print(next((line for line in output.splitlines() if "guest exit" in line), ""))
    return run


def base_name(reported: str) -> str:
    """``module::test`` of a reported result (a parametrized guest test reports
    ``module::test[param]``, one result per parameter)."""
    return reported.split("[", 1)[0]


def check_guest_test(vm_tier: TierRun, name: str) -> None:
    """Pass, fail or skip as guest test ``name`` (``module::test``) did in the VM: every
    parameter of a parametrized guest test must have passed."""
    runs = {reported: result for reported, result in vm_tier.results.items()
            if base_name(reported) == name}
    if not runs:
        pytest.fail(f"the guest reported no result for {name} (runner exit {vm_tier.rc}; "
                    f"results in {vm_tier.out_dir}):\n{vm_tier.tail()}", pytrace=False)
    failed = {reported: (outcome, message) for reported, (outcome, message) in runs.items()
              if outcome not in ("passed", "skipped")}
    if failed:
        pytest.fail("\n".join(f"{reported}: {outcome} in the VM:\n{message}"
                              for reported, (outcome, message) in failed.items()), pytrace=False)
    skipped = [f"{reported}: {message}" for reported, (outcome, message) in runs.items()
               if outcome == "skipped"]
    if skipped:
        if os.environ.get("CI"):
            pytest.fail(f"skipped in the VM, which CI does not allow: {'; '.join(skipped)}",
                        pytrace=False)
        pytest.skip(f"in the VM: {'; '.join(skipped)}")


def _host_test(name: str) -> Callable[[TierRun], None]:
    def host_test(vm_tier: TierRun) -> None:
        check_guest_test(vm_tier, name)

    host_test.__name__ = host_test.__qualname__ = name.split("::", 1)[1]
    host_test.__doc__ = f"tests/vm/{name.replace('::', '.py::')}, run in the VM."
    only = ONE_KERNEL.get(name.split("::", 1)[0])
    if only is not None:
        # tests/conftest.py deselects this test's other kernels (not a skip: never run there).
        releases = [release for release, kernel in KERNEL_IDS.items() if kernel == only]
        return pytest.mark.vm_boot_only(*releases)(host_test)
    return host_test


# One host test per guest test, under the guest test's own name.
for _name in guest_tests():
    _test = _host_test(_name)
    assert _test.__name__ not in globals(), f"two guest tests are named {_test.__name__}"
    globals()[_test.__name__] = _test


def test_vm_run_was_clean(vm_tier: TierRun) -> None:
    """The guest's pytest exited 0 and reported nothing besides the known tests
    (a collection error shows up as an unknown test), in the kernel it was to boot."""
    kernel = KERNEL_IDS[vm_tier.expected_release]
    expected = {name for name in guest_tests()
                if ONE_KERNEL.get(name.split("::", 1)[0], kernel) == kernel}
    unknown = sorted(reported for reported in vm_tier.results
                     if base_name(reported) not in expected)
    assert not unknown, f"the guest reported tests this file does not know: {unknown}"
    booted = vm_tier.out_dir / "guest" / "kernel"
    assert booted.exists() and booted.read_text().strip() == vm_tier.expected_release, (
        f"the guest did not run {vm_tier.expected_release}")
    assert vm_tier.rc == 0, f"guest run exit {vm_tier.rc}:\n{vm_tier.tail()}"
