#!/usr/bin/env bash
# Installs what cttrace needs on a fresh Debian bookworm machine, as root, and
# nothing that is already there: the Debian packages, then the venv (made from
# Debian's python3 with --system-site-packages, so Debian's python3-bpfcc is
# importable), then the package itself in editable mode.
#
#   scripts/install-deps.sh [base|test]    (default: base)
#
# base: what `make demo` and a node need; test: also what the test tiers need.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-base}

base_pkgs=(iproute2 iptables nftables conntrack procps python3-venv python3-pip python3-bpfcc bpfcc-tools
           libbpf1)  # libbpf1: BCC depends on it; cttrace loads its BTF reader itself
test_pkgs=(prometheus-alertmanager)

want=("${base_pkgs[@]}")
[ "$what" = test ] && want+=("${test_pkgs[@]}")

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "cttrace: these Debian packages are missing: ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "cttrace: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts the alertmanager service on install; the tests start their own.
  if [[ " ${missing[*]} " == *" prometheus-alertmanager "* ]]; then
    systemctl disable --now prometheus-alertmanager >/dev/null 2>&1 || pkill -x prometheus-alert || true
  fi
fi

stamp=.venv/.cttrace-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
  fi
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
  touch "$stamp"
fi
