#!/bin/sh
# Runs inside the virtme-ng guest (started by tests/vm/run_vm_tier.py):
# load the netfilter modules, run the guest-side tests, leave results in OUT.
#   usage: guest.sh OUT PYTHON [pytest args...]
# OUT is a directory shared read-write with the host; PYTHON is the host's
# venv interpreter (the guest runs on the host's root filesystem).
set -u
out=$1
python=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)

echo "cttrace-vm: guest up $(cut -d' ' -f1 /proc/uptime) s after boot, kernel $(uname -r)"
cut -d' ' -f1 /proc/uptime > "$out/boot_s"
uname -r > "$out/kernel"

# On Debian's kernel these are modules, and a kprobe on a function of a
# module that is not loaded yet cannot be attached.
if ! modprobe -a nf_conntrack nf_nat iptable_nat nf_conntrack_netlink veth br_netfilter; then
    echo "cttrace-vm: modprobe failed" >&2
    echo 97 > "$out/rc"
    exit 97
fi

cd "$repo" || exit 98
CTTRACE_VM_GUEST=1 CTTRACE_VM_OUT="$out" PYTHONDONTWRITEBYTECODE=1 \
    "$python" -m pytest tests/vm -m vm -p no:cacheprovider -v \
    --junitxml="$out/junit.xml" "$@"
rc=$?
echo "$rc" > "$out/rc"
exit "$rc"
