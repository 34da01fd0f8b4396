#!/usr/bin/env bash
# Installs what the VM tier (tests/test_vm_tier.py -> tests/vm/run_vm_tier.py)
# needs on a fresh Debian bookworm machine, as root, and nothing that is
# already there. One line per thing installed; silent when all is present.
#
#   qemu-system-x86      the emulator (TCG: KVM does not boot on these machines)
#   busybox-static       virtme-ng's initramfs (Debian's 9p/virtio drivers are modules)
#   linux-image-amd64    Debian's 6.1 kernel, with kprobes; booted in the VM, never on the host
#   linux-headers-amd64  its headers, for BCC in the guest (the metapackages pull the
#                        same version of both: /boot/vmlinuz-<v> and /lib/modules/<v>/build)
#   linux-image-6.12-amd64, linux-headers-6.12-amd64
#                        Debian's 6.12 line (bookworm's archive; Debian 13's kernel) and its
#                        headers: the VM tier boots both kernels (KERNELS in
#                        tests/vm/run_vm_tier.py), one boot each
#   python3-bpfcc        BCC (the venv sees it through --system-site-packages)
#   bpftool              the tier checks that no cttrace program outlives SIGTERM
#   gcc                  the unit tier compiles bpf/cttrace.h to check the Python mirror
#   virtme-ng            `vng` from PyPI, into the project's venv
#
# The guest runs on this machine's root filesystem (copy-on-write), so it
# sees the venv, BCC and the headers exactly as installed here.
set -euo pipefail
cd "$(dirname "$0")/.."

VIRTME_NG_VERSION=${VIRTME_NG_VERSION:-1.42}
# ipvsadm, ipset: the real kube-proxy in IPVS mode (tests/vm/test_ipvs.py).
pkgs=(qemu-system-x86 busybox-static linux-image-amd64 linux-headers-amd64
      linux-image-6.12-amd64 linux-headers-6.12-amd64 python3-bpfcc bpftool gcc ipvsadm ipset)

installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for p in "${pkgs[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "vm-setup: these Debian packages are missing: ${missing[*]}; run as root" \
         "(or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  apt-get update -qq
  for p in "${missing[@]}"; do
    echo "vm-setup: installing $p" >&2
  done
  # The kernel's postinst builds an initramfs for a machine that never boots it:
  # harmless, and virtme-ng builds its own.
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
fi

# Each kernel the VM tier boots needs an image with matching headers: BCC in the
# guest compiles against /lib/modules/<v>/build of the kernel that runs there.
if ! lacking=$(python3 -c 'import sys; sys.path.insert(0, "tests/vm")
from run_vm_tier import KERNELS, installed_kernel
print(" ".join(f"{k} (/boot/vmlinuz-{p})" for k, p in KERNELS.items() if installed_kernel(k) is None))'
); then
  exit 1
fi
if [ -n "$lacking" ]; then
  echo "vm-setup: no image with headers in /lib/modules/<v>/build for kernel(s) $lacking;" \
       "apt-get install linux-headers-<v> for the installed linux-image" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  scripts/install-deps.sh base
fi
if ! .venv/bin/python -c 'import importlib.metadata as m, sys; sys.exit(m.version("virtme-ng") != sys.argv[1])' \
     "$VIRTME_NG_VERSION" 2>/dev/null; then
  echo "vm-setup: installing virtme-ng $VIRTME_NG_VERSION into .venv" >&2
  .venv/bin/pip install -q --disable-pip-version-check "virtme-ng==$VIRTME_NG_VERSION"
fi
