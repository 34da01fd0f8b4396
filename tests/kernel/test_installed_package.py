"""An installed cttrace works away from its checkout: the wheel carries its BPF programs.

What a user relies on: ``pip install cttrace-*.whl`` into a fresh virtual
environment (Debian's python3 with its site-packages, as the DaemonSet image
makes it, so ``import bcc`` works) gives a ``cttrace`` whose ``watch --dump-bpf``
prints the whole program from the package's own data, and whose ``doctor``
runs, both started from a directory that is not the checkout.

Kernel tier: the doctor reads this machine's sysctls and conntrack as root.
The wheel's dependencies come from the package index pip is set up with.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cttrace.sources.bpf import PROGRAM_FILES

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
#: Debian's interpreter: the one whose site-packages hold python3-bpfcc.
SYSTEM_PYTHON = "/usr/bin/python3"


def _run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``cttrace`` script of a wheel built from this checkout, installed in a fresh venv."""
    work = tmp_path_factory.mktemp("wheel")
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist",
                 REPO, cwd=work)
    assert built.returncode == 0, built.stderr
    wheels = list((work / "dist").glob("cttrace-*.whl"))
    assert len(wheels) == 1, wheels
    venv = work / "venv"
    made = _run(SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", venv, cwd=work)
    assert made.returncode == 0, made.stderr
    pip = _run(venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheels[0],
               cwd=work)
    assert pip.returncode == 0, pip.stderr
    return venv / "bin" / "cttrace"


def test_the_wheel_carries_every_bpf_file_and_dump_bpf_prints_them(
        installed: Path, tmp_path: Path) -> None:
    done = _run(installed, "watch", "--dump-bpf", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in PROGRAM_FILES:
        assert f"/* ==== bpf/{name} ==== */" in done.stdout
    # the program really is the package's C, not an empty shell
    assert "__nf_conntrack_confirm" in done.stdout or "nf_conntrack_confirm" in done.stdout
    assert "cannot read the BPF program" not in done.stderr


def test_the_installed_doctor_audits_this_node(installed: Path, tmp_path: Path) -> None:
    done = _run(installed, "doctor", "-o", "json", cwd=tmp_path, timeout=120)
    # 0: all pass, 1: a check fails; 2 would mean it could not check at all
    assert done.returncode in (0, 1), done.stderr
    report = orjson.loads(done.stdout)
    assert report["exit_code"] == done.returncode
    assert {check["id"] for check in report["checks"]} >= {"br-netfilter", "conntrack-fill"}
