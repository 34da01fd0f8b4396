"""Boot one of Debian's kernels once under virtme-ng and run the whole VM tier inside it.

This machine's own kernel has no kprobes, so the BCC programs are tested in
Debian's kernels (:data:`KERNELS`: bookworm's 6.1 and its 6.12 line, one boot
each, named by ``--kernel``) booted by virtme-ng with TCG emulation
(``--disable-kvm``: KVM does not boot here). The guest runs on the host's
root filesystem (copy-on-write), so it sees this repository, its venv, BCC
and the kernel headers where the host has them; one directory is shared
read-write for the results (exit code, junit XML, timings, recorded BPF
samples).

    python tests/vm/run_vm_tier.py [--kernel 6.1|6.12|/boot/vmlinuz-X] [--record] [--out DIR]
                                   [-- pytest args]

Exit code: the guest's pytest exit code; 2 when the VM cannot be started
(what is missing is printed); 3 when the guest never reported a result.
scripts/vm-setup.sh installs everything this needs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
GUEST_SCRIPT = REPO / "tests" / "vm" / "guest.sh"
SAMPLES_DIR = REPO / "tests" / "unit" / "data" / "bpf"
KUBE_CACHE = Path(os.environ.get("CTTRACE_KUBE_CACHE", "/var/cache/cttrace"))
#: A hung guest must not eat CI's 90 minutes: boot ~30 s, compiles ~3 min, the tests ~10 min
#: plus ~12 min for the real kube-proxy in IPVS mode (test_ipvs.py: etcd and kube-apiserver
#: under emulation; 872 s for its two tests, compile included, on 6.1).
DEFAULT_TIMEOUT = 2400.0
#: Each guest test may wait for the session's one BCC compile.
GUEST_TEST_TIMEOUT = 900


class SetupError(Exception):
    """Something the VM tier needs is missing; the message says what to install."""


#: The kernels the VM tier boots, one boot each, by name -> the release pattern of their
#: /boot/vmlinuz-<release>: Debian bookworm's own kernel (linux-image-amd64) and the 6.12
#: line Debian 13 runs, from bookworm's archive (linux-image-6.12-amd64).
#: scripts/vm-setup.sh installs both with their headers; the README's "Kernels" table
#: lists exactly these (tests/unit/test_kernels_table.py).
KERNELS = {"6.1": "6.1.0-*-amd64", "6.12": "6.12.*+deb12-amd64"}


def _release_key(release: str) -> list[int]:
    """Numeric sort key of a release (6.12.118+deb12-amd64 -> [6, 12, 118, 12])."""
    return [int(part) for part in re.findall(r"\d+", release)]


def _has_headers(release: str) -> bool:
    """BCC in the guest compiles against /lib/modules/<release>/build."""
    build = Path("/lib/modules") / release / "build"
    return (build / "include" / "generated" / "autoconf.h").is_file()


def installed_kernel(name: str, boot: Path = Path("/boot")) -> Path | None:
    """The newest /boot/vmlinuz-* of kernel ``name`` (a key of KERNELS) that has headers."""
    images = [image for image in boot.glob(f"vmlinuz-{KERNELS[name]}")
              if _has_headers(image.name.removeprefix("vmlinuz-"))]
    return max(images, key=lambda image: _release_key(image.name), default=None)


def find_kernel(kernel: str) -> Path:
    """The kernel image to boot: a name from KERNELS (its newest installed image with
    headers), or a path to a vmlinuz."""
    if kernel in KERNELS:
        image = installed_kernel(kernel)
        if image is None:
            raise SetupError(
                f"kernel {kernel} is not installed with its headers (no /boot/vmlinuz-"
                f"{KERNELS[kernel]} with /lib/modules/<release>/build): run scripts/vm-setup.sh"
            )
        return image
    path = Path(kernel)
    if not path.is_file():
        raise SetupError(f"kernel {kernel} is neither one of {', '.join(KERNELS)} nor an "
                         "existing kernel image")
    return path


def kernel_release(image: Path) -> str:
    return image.name.removeprefix("vmlinuz-")


def find_vng() -> tuple[Path, dict[str, str]]:
    """virtme-ng's ``vng`` (beside this interpreter first) and the PATH it needs.

    vng runs ``virtme-run`` and ``qemu-system-x86_64`` from PATH.
    """
    env = dict(os.environ)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    vng = shutil.which("vng", path=env["PATH"])
    if vng is None:
        raise SetupError(f"vng not found: {bin_dir}/pip install virtme-ng (scripts/vm-setup.sh)")
    if shutil.which("qemu-system-x86_64", path=env["PATH"]) is None:
        raise SetupError("qemu-system-x86_64 not found: apt install qemu-system-x86")
    return Path(vng), env


def vng_argv(vng: Path, kernel: Path, out: Path, guest: str, memory: str,
             cpus: int) -> list[str]:
    """vng's command line: boot ``kernel`` and run the shell command ``guest`` in it."""
    return [
        str(vng),
        "--disable-kvm",  # TCG: KVM is not available on these machines
        "--run", str(kernel),
        "--memory", memory,
        "--cpus", str(cpus),
        "--rwdir", str(out),  # the only host directory the guest can write to
        # virtme-init mounts a tmpfs over /var/cache: show the guest the Kubernetes
        # binaries scripts/build-kube.sh cached there (tests/vm/test_ipvs.py runs them).
        *(["--rodir", str(KUBE_CACHE)] if KUBE_CACHE.is_dir() else []),
        "--exec", guest,
    ]


def vng_command(vng: Path, kernel: Path, out: Path, pytest_args: list[str],
                memory: str, cpus: int) -> list[str]:
    # The guest runs this line in a shell: each word quoted (a -k expression has spaces).
    guest = shlex.join([
        "sh", str(GUEST_SCRIPT), str(out), sys.executable,
        f"--timeout={GUEST_TEST_TIMEOUT}", *pytest_args,
    ])
    return vng_argv(vng, kernel, out, guest, memory, cpus)


def boot_vm(cmd: list[str], kernel: Path, env: dict[str, str], timeout: float,
         output: IO[bytes] | None = None) -> float | None:
    """Run vng's ``cmd`` (one boot, the guest command, power-off): wall seconds, or None
    when the VM was killed after ``timeout``. ``output``: where the guest's console goes
    (default: this process's stdout)."""
    print(f"cttrace-vm: booting {kernel} ({' '.join(cmd[:-1])} ...)", flush=True)
    started = time.monotonic()
    try:
        subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=output,
                       stderr=None if output is None else subprocess.STDOUT,
                       timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"cttrace-vm: the VM did not finish within {timeout:.0f} s", file=sys.stderr)
        return None
    return time.monotonic() - started


def run(args: argparse.Namespace) -> int:
    kernel = find_kernel(args.kernel)
    vng, env = find_vng()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = Path(tempfile.mkdtemp(prefix="ctl-vm-"))
    cmd = vng_command(vng, kernel, out, args.pytest_args, args.memory, args.cpus)
    wall = boot_vm(cmd, kernel, env, args.timeout)
    if wall is None:
        return 3

    rc_file = out / "rc"
    if not rc_file.exists():
        print(f"cttrace-vm: the guest reported no result (see the output above; {out})",
              file=sys.stderr)
        return 3
    rc = int(rc_file.read_text().strip())
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
    boot = (out / "boot_s").read_text().strip() if (out / "boot_s").exists() else "?"
    timings.update(boot_s=boot, wall_s=round(wall, 1))
    timings_file.write_text(json.dumps(timings))
    print(
        f"cttrace-vm: guest exit {rc}; boot {boot} s, BCC compile+attach "
        f"{timings.get('compile_and_attach_s', '?')} s in-process and "
        f"{timings.get('watch_compile_and_attach_s', '?')} s in `cttrace watch` (at the same "
        f"time), whole tier {wall:.0f} s wall",
        flush=True,
    )
    if args.record:
        recorded = sorted((out / "bpf-samples").glob("*.json"))
        SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
        for sample in recorded:
            shutil.copy(sample, SAMPLES_DIR / sample.name)
        print(f"cttrace-vm: recorded {len(recorded)} samples into {SAMPLES_DIR}")
    if rc == 0 and not args.keep and not args.out:
        shutil.rmtree(out, ignore_errors=True)
    else:
        print(f"cttrace-vm: results kept in {out}")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="6.1",
                        help=f"the kernel to boot: {' or '.join(KERNELS)} (its newest installed "
                        "image with headers), or a path to a vmlinuz (default 6.1)")
    parser.add_argument("--memory", default="3G", help="guest memory (default 3G)")
    parser.add_argument("--cpus", type=int, default=2, help="guest CPUs (default 2)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds before the VM is killed")
    parser.add_argument("--record", action="store_true",
                        help=f"copy the recorded BPF records into {SAMPLES_DIR}")
    parser.add_argument("--keep", action="store_true", help="keep the results directory")
    parser.add_argument("--out", help="results directory (kept): rc, junit.xml, timings.json, "
                        "bpf-samples/; default: a new /tmp/ctl-vm-* removed after success")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SetupError as exc:
        print(f"cttrace-vm: cannot run the VM tier: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
